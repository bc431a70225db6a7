"""Off-policy estimates of what a deterministic ranking policy would have earned, from logged
lists and the logging policy's propensities (numpy only; docs/protocol.md, "Off-policy estimates").

The value of a policy is the expected slate reward r = sum_j labels_j over the L shown
positions (for 0/1 labels: positives per list). For request i the logging policy mu showed
s_i; the target policy would show pi(x_i).

- Slate IPS: w_i = 1{pi(x_i) = s_i} / mu(s_i | x_i). Unbiased whenever mu gives every list pi
  picks a positive probability; its weights are zero unless the whole list matches, so it
  needs many requests.
- Pseudo-inverse (PI, Swaminathan et al. 2017, their example of a logging policy that fills
  slots independently): w_i = sum_j 1{pi(x_i)_j = s_ij} / mu(s_ij at j | x_i) - (L - 1).
  Unbiased when the reward is additive over (position, item) and mu factorises over slots;
  it needs the per-position marginals (`position_propensities`): the list propensity alone
  does not determine them, so without that column PI is not estimated. A ranking drawn
  without replacement does not factorise exactly, and there this form is biased (two items
  shown in either order with probability 1/2: PI gives 1.5 where the value is 1).
- Self-normalised forms divide sum_i w_i r_i by sum_i w_i instead of n: biased, lower
  variance, and always inside the range of the observed rewards for IPS.

Each estimate carries a seeded percentile-bootstrap 95% interval (requests resampled) and
Kish's effective sample size (sum w)^2 / sum w^2.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ESTIMATORS = ("ips", "snips", "pi", "snpi")


@dataclass
class Estimate:
    value: float  # estimated expected slate reward of the target policy
    ci_low: float  # bootstrap 95% interval
    ci_high: float
    ess: float  # Kish's effective sample size of the weights
    n: int  # requests used


def slate_match(target: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """target: (R, W) ranked ids, shown: (R, L) logged ids, both -1 padded -> (R,) bool: the
    target's first L_i items are the logged list, in order."""
    width = shown.shape[1]
    top = np.full(shown.shape, -1, np.int64)  # (R, L) target cut or padded to L
    top[:, : min(width, target.shape[1])] = target[:, :width]
    return ((top == shown) | (shown < 0)).all(1)


def position_match(target: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """(R, W), (R, L) -> (R, L) bool: the target puts shown[j] at position j."""
    top = np.full(shown.shape, -2, np.int64)  # -2 never equals a padded shown slot
    top[:, : min(shown.shape[1], target.shape[1])] = target[:, : shown.shape[1]]
    return (top == shown) & (shown >= 0)


def ips_weights(match: np.ndarray, log_propensity: np.ndarray) -> np.ndarray:
    """(R,) bool, (R,) log mu(s_i | x_i) -> (R,) slate IPS weights."""
    return np.where(match, np.exp(-log_propensity), 0.0)


def pi_weights(pos_match: np.ndarray, position_propensities: np.ndarray, shown: np.ndarray) -> np.ndarray:
    """(R, L) bool, (R, L) mu(s_ij at j | x_i) (any value where padded), (R, L) ids -> (R,)
    pseudo-inverse weights sum_j q_ij / p_ij - (L_i - 1)."""
    n_shown = (shown >= 0).sum(1)  # (R,)
    ratio = np.where(pos_match, 1.0 / np.where(shown >= 0, position_propensities, 1.0), 0.0)  # (R, L)
    return ratio.sum(1) - (n_shown - 1)


def bootstrap_interval(num: np.ndarray, den: np.ndarray | None = None, n_boot: int = 1000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """Seeded percentile bootstrap interval of sum(num) / sum(den) over requests resampled with
    replacement, or of the mean of `num` when den is None (metrics.bootstrap_ci); (nan, nan)
    when there is nothing to resample or `n_boot` is 0."""
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    n = len(num)
    if n == 0 or n_boot == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot)
    step = max(1, 2_000_000 // n)  # resamples per block, to bound memory at ~16 MB
    for a in range(0, n_boot, step):
        idx = rng.integers(0, n, (min(step, n_boot - a), n))  # (b, R)
        with np.errstate(invalid="ignore", divide="ignore"):
            stats[a : a + len(idx)] = num[idx].mean(1) if den is None else num[idx].sum(1) / den[idx].sum(1)
    stats = stats[np.isfinite(stats)]  # a resample whose self-normalising weights sum to 0 has no ratio
    if not len(stats):
        return float("nan"), float("nan")
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def estimate(weights: np.ndarray, rewards: np.ndarray, self_normalised: bool, n_boot: int = 1000,
             seed: int = 0) -> Estimate:
    """(R,) weights and (R,) slate rewards -> mean of w r (or sum w r / sum w) with interval and ESS."""
    w, r = np.asarray(weights, np.float64), np.asarray(rewards, np.float64)
    total, sq = w.sum(), (w**2).sum()
    ess = float(total**2 / sq) if sq > 0 else 0.0
    den = w if self_normalised else None
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float((w * r).sum() / (w.sum() if self_normalised else len(w))) if len(w) else float("nan")
    lo, hi = bootstrap_interval(w * r, den, n_boot, seed)
    return Estimate(value, lo, hi, ess, int(len(w)))


def estimate_all(target: np.ndarray, shown: np.ndarray, labels: np.ndarray, log_propensity: np.ndarray,
                 position_propensities: np.ndarray | None = None, n_boot: int = 1000,
                 seed: int = 0) -> dict[str, Estimate]:
    """Every estimator that the logged columns allow.

    target (R, W) and shown (R, L) item ids, -1 padded; labels (R, L) (0 where padded);
    log_propensity (R,) log mu(s_i | x_i); position_propensities (R, L) or None.
    Returns {"ips", "snips"} and, with position propensities, {"pi", "snpi"}."""
    rewards = labels.sum(1)  # (R,) slate reward
    w = ips_weights(slate_match(target, shown), log_propensity)
    out = {"ips": estimate(w, rewards, False, n_boot, seed), "snips": estimate(w, rewards, True, n_boot, seed)}
    if position_propensities is not None:
        w = pi_weights(position_match(target, shown), position_propensities, shown)
        out.update(pi=estimate(w, rewards, False, n_boot, seed), snpi=estimate(w, rewards, True, n_boot, seed))
    return out
