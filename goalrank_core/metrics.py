"""Per-request ranking metrics with bootstrap 95% intervals: the one evaluation code path.

For a request, the positives are its shown items with label > 0, and `ranked` is the list a
policy produced from the request's candidates (best first). With rel_j = 1 if the j-th ranked
item is a positive and P = number of positives:

    HR@K   = sum_{j<K} rel_j / P                                  (share of positives in the top K)
    NDCG@K = sum_{j<K} rel_j / log2(j+2)  /  sum_{j<min(P,K)} 1 / log2(j+2)
    MAP@K  = sum_{j<K} rel_j * precision@(j+1)  /  min(P, K)

Requests without any positive have every metric undefined: they are excluded from the means
and intervals and counted in `MetricResult.n_excluded`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from goalrank_core.errors import DataValidationError
from goalrank_core.ope import Estimate, bootstrap_interval, estimate_all
from goalrank_core.schemas import METRICS, OPE, RANKED, conform

METRIC_NAMES = ("hr", "ndcg", "map")


@dataclass
class MetricResult:
    value: float  # mean over requests with >= 1 positive (NaN when there are none)
    ci_low: float  # bootstrap 95% interval of the mean
    ci_high: float
    n_requests: int  # requests averaged
    n_excluded: int  # requests without a positive
    per_request: np.ndarray  # (n_requests,) float64 values, truth order


def _padded(col: pa.ChunkedArray, fill: float = -1, dtype=np.int64) -> np.ndarray:
    """list column -> (R, W) array, right-padded with `fill`."""
    arr = col.combine_chunks()
    lengths = np.asarray(pc.list_value_length(arr).to_numpy(zero_copy_only=False), np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    out = np.full((len(lengths), max(width, 1)), fill, dtype=dtype)
    mask = np.arange(out.shape[1])[None, :] < lengths[:, None]
    out[mask] = arr.flatten().to_numpy(zero_copy_only=False)
    return out


def per_request(ranked: np.ndarray, positives: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """ranked: (R, W) raw ids, -1 padded; positives: (R, P) raw ids, -1 padded.
    Returns {"hr", "ndcg", "map"} -> (R,) float64 (NaN where a request has no positive)."""
    top = ranked[:, :k]  # (R, k')
    rel = ((top[:, :, None] == positives[:, None, :]) & (top[:, :, None] >= 0)).any(-1).astype(np.float64)  # (R, k')
    n_pos = (positives >= 0).sum(1).astype(np.float64)  # (R,)
    disc = 1.0 / np.log2(np.arange(2, k + 2))  # (k,)
    hits = rel.sum(1)
    ideal = np.cumsum(disc)[np.minimum(n_pos, k).astype(np.int64) - 1]  # (R,), garbage where n_pos = 0
    prec = np.cumsum(rel, 1) / np.arange(1, rel.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "hr": hits / n_pos,
            "ndcg": (rel * disc[: rel.shape[1]]).sum(1) / ideal,
            "map": (rel * prec).sum(1) / np.minimum(n_pos, k),
        }
    none = n_pos == 0
    return {name: np.where(none, np.nan, v) for name, v in out.items()}


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (seeded); (nan, nan) when there
    is nothing to resample or `n_boot` is 0 (no interval asked for). The off-policy
    estimates share the resampling (ope.bootstrap_interval)."""
    return bootstrap_interval(np.asarray(values), None, n_boot, seed, level)


def _check_ranked(ranked: pa.Table, truth: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Validate ranked lists against truth; returns (truth row of each ranked row, (R, W) lists)."""
    what = "ranked lists"
    ranked = conform(ranked, RANKED, what)
    rid = ranked.column("request_id")
    if pc.count_distinct(rid).as_py() != ranked.num_rows:
        ids = np.asarray(rid.to_pylist(), dtype=object).astype(str)
        _, first = np.unique(ids, return_index=True)
        row = int(np.setdiff1d(np.arange(len(ids)), first)[0])
        raise DataValidationError(f"{what}: column 'request_id' row {row}: duplicate request id {str(ids[row])!r}")
    idx = pc.index_in(rid, value_set=truth.column("request_id").combine_chunks())
    missing = np.asarray(idx.is_null().to_numpy(zero_copy_only=False), bool)
    if missing.any():
        row = int(np.flatnonzero(missing)[0])
        raise DataValidationError(f"{what}: column 'request_id' row {row}: request {rid[row].as_py()!r} is not in the truth table")
    where = idx.to_numpy(zero_copy_only=False)
    where = where.astype(np.int64)
    if len(where) != truth.num_rows:
        absent = np.setdiff1d(np.arange(truth.num_rows), where)
        raise DataValidationError(f"truth: column 'request_id' row {int(absent[0])}: request "
                                  f"{truth.column('request_id')[int(absent[0])].as_py()!r} has no ranked list")
    flat = pc.list_flatten(ranked.column("ranked")).to_numpy()
    if len(flat) and flat.min() < 0:
        row = int(pc.list_parent_indices(ranked.column("ranked").combine_chunks()).to_numpy()[np.flatnonzero(flat < 0)[0]])
        raise DataValidationError(f"{what}: column 'ranked' row {row}: negative item id")
    lists = _padded(ranked.column("ranked"))  # (R, W)
    lengths = np.asarray(pc.list_value_length(ranked.column("ranked")).to_numpy(zero_copy_only=False))
    if (lengths == 0).any():
        row = int(np.flatnonzero(lengths == 0)[0])
        raise DataValidationError(f"{what}: column 'ranked' row {row}: empty list")
    srt = np.sort(np.where(lists >= 0, lists, -np.arange(1, lists.shape[1] + 1)[None, :] - 1), axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]).any(1)
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        raise DataValidationError(f"{what}: column 'ranked' row {row}: an item appears more than once")
    cands = _padded(truth.column("candidates"))[where]  # (R, N) aligned with ranked rows
    inside = (lists[:, :, None] == cands[:, None, :]).any(-1) | (lists < 0)  # (R, W)
    if not inside.all():
        row = int(np.flatnonzero(~inside.all(1))[0])
        item = lists[row][~inside[row]][0]
        raise DataValidationError(f"{what}: column 'ranked' row {row}: item {item} is not among the request's candidates")
    return where, lists


def evaluate_lists(ranked: pa.Table, truth: pa.Table, ks: list[int] | tuple[int, ...] = (6,),
                   n_boot: int = 1000, seed: int = 0) -> dict[str, MetricResult]:
    """Score ranked lists (schemas.RANKED) against labelled requests (an IMPRESSIONS table).
    Every truth request must have exactly one ranked list and vice versa.
    Returns {"hr@K", "ndcg@K", "map@K"} for each K in `ks`."""
    if not ks or any(int(k) < 1 for k in ks):
        raise DataValidationError(f"metrics: K values must be >= 1, got {list(ks)}")
    where, lists = _check_ranked(ranked, truth)
    order = np.argsort(where)  # truth order, so results do not depend on the ranked file's order
    lists = lists[order]
    shown = _padded(truth.column("shown"))
    labels = _padded(truth.column("labels"), fill=0.0, dtype=np.float64)
    positives = np.where((labels > 0) & (shown >= 0), shown, -1)
    out: dict[str, MetricResult] = {}
    for k in ks:
        vals = per_request(lists, positives, int(k))
        for name in METRIC_NAMES:
            v = vals[name]
            kept = v[~np.isnan(v)]
            lo, hi = bootstrap_ci(kept, n_boot=n_boot, seed=seed)
            out[f"{name}@{k}"] = MetricResult(
                value=float(kept.mean()) if len(kept) else float("nan"), ci_low=lo, ci_high=hi,
                n_requests=int(len(kept)), n_excluded=int(len(v) - len(kept)), per_request=kept,
            )
    return out


def metrics_rows(split: str, policy: str, results: dict[str, MetricResult]) -> list[dict]:
    """Rows for schemas.METRICS, one per metric."""
    return [
        {"split": split, "policy": policy, "metric": name, "value": r.value, "ci_low": r.ci_low,
         "ci_high": r.ci_high, "n_requests": r.n_requests}
        for name, r in results.items()
    ]


def metrics_table(rows: list[dict]) -> pa.Table:
    return conform(pa.Table.from_pylist(rows, schema=METRICS), METRICS, "metrics")


def evaluate_ope(ranked: pa.Table, truth: pa.Table, n_boot: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Off-policy estimates (goalrank_core.ope) of the policy behind `ranked`, from a truth
    table whose `propensity` or `log_propensity` (and optionally `position_propensities`)
    the logging policy wrote. Same alignment checks as evaluate_lists."""
    names = truth.column_names
    if "log_propensity" in names:
        log_p = truth.column("log_propensity").to_numpy().astype(np.float64)
    elif "propensity" in names:
        log_p = np.log(truth.column("propensity").to_numpy().astype(np.float64))
    else:
        raise DataValidationError("truth: off-policy estimates need a 'propensity' or 'log_propensity' column "
                                  "(the logging policy's probability of each logged list)")
    where, lists = _check_ranked(ranked, truth)
    lists = lists[np.argsort(where)]  # (R, W) in truth order
    pos = None
    if "position_propensities" in names:
        pos = _padded(truth.column("position_propensities"), fill=1.0, dtype=np.float64)  # (R, L)
    return estimate_all(lists, _padded(truth.column("shown")), _padded(truth.column("labels"), fill=0.0, dtype=np.float64),
                        log_p, pos, n_boot=n_boot, seed=seed)


def has_propensities(truth: pa.Table) -> bool:
    """Whether `truth` carries the logging propensities evaluate_ope needs."""
    return "propensity" in truth.column_names or "log_propensity" in truth.column_names


def ope_rows(split: str, policy: str, estimates: dict[str, Estimate]) -> list[dict]:
    """Rows for schemas.OPE, one per estimator."""
    return [{"split": split, "policy": policy, "estimator": name, "value": e.value, "ci_low": e.ci_low,
             "ci_high": e.ci_high, "ess": e.ess, "n_requests": e.n} for name, e in estimates.items()]


def ope_table(rows: list[dict]) -> pa.Table:
    return conform(pa.Table.from_pylist(rows, schema=OPE), OPE, "off-policy estimates")
