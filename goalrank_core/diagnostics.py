"""Diagnostics of the group-relative loop: is the reward model ordering lists well, and who
supplies the lists pi_ref learns from?

Per round the fit logs (and the flow records in MLflow):
- ordering quality of the reward model against a reference value of each list (the true
  value on a simulator; the logged DCG of held-out requests on real data): mean Spearman
  correlation inside a group and top-1 agreement (the reward model's favourite is the
  reference's favourite), plus the reference value of the favourite as a share of the best;
- which policy supplies each group's best list and how much of pi_ref's mass each policy
  gets;
- the within-group reward spread and the effective group size 1 / sum pi_ref^2 (1 = pi_ref
  copies one list, |B| = uniform).
"""
from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(R, G) values -> (R, G) average ranks among the valid entries of each row (nan elsewhere)."""
    out = np.full(x.shape, np.nan)
    for r in range(x.shape[0]):
        idx = np.flatnonzero(mask[r])
        if len(idx) == 0:
            continue
        v = x[r, idx]
        order = np.argsort(v, kind="stable")
        rk = np.empty(len(v))
        rk[order] = np.arange(len(v), dtype=np.float64)
        for u in np.unique(v):  # ties share their mean rank
            tie = v == u
            if tie.sum() > 1:
                rk[tie] = rk[tie].mean()
        out[r, idx] = rk
    return out


def ordering_quality(scores: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """How well `scores` (R, G) order each group's lists against `reference` (R, G), over the
    valid lists `mask` (R, G); groups with fewer than 2 lists, or whose reference values all
    tie, are left out. -> spearman (mean over groups), top1 (share of groups whose top-scored
    list has the best reference value), top1_value (reference of the top-scored list divided
    by the group's best reference, minus the group's mean, as a share: 1 = always the best,
    0 = no better than a random list of the group), groups (how many were counted)."""
    mask = mask & np.isfinite(scores) & np.isfinite(reference)
    ref = np.where(mask, reference, np.nan)
    spread = np.nanmax(ref, 1, initial=-np.inf) - np.nanmin(np.where(mask, reference, np.inf), 1, initial=np.inf)
    keep = (mask.sum(1) >= 2) & (spread > 1e-12)
    if not keep.any():
        return {"spearman": float("nan"), "top1": float("nan"), "top1_value": float("nan"), "groups": 0}
    s, t, m = scores[keep], reference[keep], mask[keep]
    rs, rt = _ranks(s, m), _ranks(t, m)
    rs_c = rs - np.nanmean(rs, 1, keepdims=True)
    rt_c = rt - np.nanmean(rt, 1, keepdims=True)
    den = np.sqrt(np.nansum(rs_c ** 2, 1) * np.nansum(rt_c ** 2, 1))
    rho = np.where(den > 0, np.nansum(rs_c * rt_c, 1) / np.where(den > 0, den, 1.0), 0.0)  # (R',)
    pick = np.where(m, s, -np.inf).argmax(1)  # (R',)
    picked = t[np.arange(len(t)), pick]
    best = np.where(m, t, -np.inf).max(1)
    mean = np.where(m, t, 0.0).sum(1) / m.sum(1)
    top1 = picked >= best - 1e-12
    gain = np.where(best - mean > 1e-12, (picked - mean) / np.maximum(best - mean, 1e-12), 1.0)
    return {"spearman": float(rho.mean()), "top1": float(top1.mean()), "top1_value": float(gain.mean()),
            "groups": int(keep.sum())}


def group_summary(rewards: np.ndarray, pi_ref: np.ndarray, mask: np.ndarray, policy_ids: np.ndarray,
                  names: list[str]) -> dict:
    """Who fills the groups and who pi_ref learns from. rewards, pi_ref (R, G) float, mask (R, G)
    bool, policy_ids (R, G) int64 into `names` (-1 padding). -> {size, spread, effective_size,
    lists: {policy: share of lists}, best: {policy: share of groups whose best-scored list it
    proposed}, mass: {policy: mean share of pi_ref's mass}}."""
    n = max(int(mask.sum()), 1)
    r = np.where(mask, rewards, np.nan)
    cnt = mask.sum(1)
    with np.errstate(invalid="ignore"):
        spread = np.nanstd(r, 1)
    top = np.take_along_axis(policy_ids, np.where(mask, rewards, -np.inf).argmax(1)[:, None], 1)[:, 0]
    rows = max(len(rewards), 1)
    ess = 1.0 / np.maximum((pi_ref ** 2).sum(1), 1e-12)
    valid = cnt >= 2
    return {
        "size": float(cnt.mean()) if len(cnt) else 0.0,
        "spread": float(np.nanmean(spread[valid])) if valid.any() else 0.0,
        "effective_size": float(ess[valid].mean()) if valid.any() else 0.0,
        "lists": {nm: float(((policy_ids == i) & mask).sum() / n) for i, nm in enumerate(names)},
        "best": {nm: float((top == i).sum() / rows) for i, nm in enumerate(names)},
        "mass": {nm: float(np.where(policy_ids == i, pi_ref, 0.0).sum() / rows) for i, nm in enumerate(names)},
    }


def format_round(rnd: int, summary: dict, quality: dict | None = None) -> str:
    """One log line for a round of the loop."""
    top = lambda d: ", ".join(f"{k} {v:.2f}" for k, v in sorted(d.items(), key=lambda kv: -kv[1]) if v >= 0.005)  # noqa: E731
    line = (f"round {rnd}: group size {summary['size']:.1f}, reward spread {summary['spread']:.4f}, "
            f"effective size {summary['effective_size']:.1f}; best list by policy: {top(summary['best'])}; "
            f"pi_ref mass: {top(summary['mass'])}")
    if quality is not None and quality.get("groups"):
        line += (f"; reward model vs {quality.get('against', 'reference')}: spearman {quality['spearman']:.3f}, "
                 f"top-1 {quality['top1']:.2f}, top-1 value {quality['top1_value']:.2f} ({quality['groups']} groups)")
    return line


def group_summary_table(table) -> dict:
    """`group_summary` of a SCORED_GROUPS table (pyarrow): lists per row may differ in number."""
    import pyarrow as pa  # noqa: F401  (the table is a pyarrow.Table)

    pols = table.column("policies").to_pylist()
    rew, pi = table.column("rewards").to_pylist(), table.column("pi_ref").to_pylist()
    names = sorted({p for row in pols for p in row})
    index = {n: i for i, n in enumerate(names)}
    g = max((len(r) for r in pols), default=0)
    shape = (len(pols), g)
    rewards, pi_ref = np.zeros(shape), np.zeros(shape)
    mask, ids = np.zeros(shape, bool), np.full(shape, -1, np.int64)
    for r, (p, w, q) in enumerate(zip(pols, rew, pi)):
        k = len(p)
        rewards[r, :k], pi_ref[r, :k], mask[r, :k] = w, q, True
        ids[r, :k] = [index[x] for x in p]
    return group_summary(rewards, pi_ref, mask, ids, names)
