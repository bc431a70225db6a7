"""Train/valid/test impressions (`Splits`), their summary statistics, and the splitting of
logged user impressions that already carry candidates (`split_impressions`) by
`protocol.split`: `time` (default) cuts all requests at two timestamps, so every training
request is earlier than every evaluation one, as production logs are cut; `user-last` takes
each user's last request to test and the one before to validate (docs/protocol.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from goalrank_core.config_sections import ProtocolConfig
from goalrank_core.errors import GoalRankInputError


SPLITS = ("train", "valid", "test")


@dataclass
class Splits:
    train: pa.Table  # schemas.IMPRESSIONS
    valid: pa.Table
    test: pa.Table
    items: pa.Table | None  # schemas.ITEMS
    stats: dict = field(default_factory=dict)

    @property
    def source(self) -> str:
        """"interactions": impressions built by the protocol from what users rated or clicked
        (the shown list is the user's own choice); "impressions": logs of what a system showed.
        GoalRankConfig.for_source reads it to decide whether an unshown candidate is a negative."""
        return self.stats.get("source", "impressions")

    def split(self, name: str) -> pa.Table:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def split_stats(tables: dict[str, pa.Table], **extra) -> dict:
    out = dict(extra)
    for name, t in tables.items():
        lab = pc.list_flatten(t.column("labels")).to_numpy()
        out[f"{name}_requests"] = t.num_rows
        out[f"{name}_positive_share"] = round(float((lab > 0).mean()), 4) if len(lab) else 0.0
        out[f"{name}_requests_without_positive"] = _requests_without_positive(t)
        out[f"{name}_mean_candidates"] = round(float(pc.mean(pc.list_value_length(t.column("candidates"))).as_py() or 0), 2)
    return out


def _requests_without_positive(t: pa.Table) -> int:
    lab = t.column("labels").combine_chunks()
    flat = lab.flatten().to_numpy() > 0
    parents = pc.list_parent_indices(lab).to_numpy()
    has = np.zeros(t.num_rows, dtype=bool)
    has[parents[flat]] = True
    return int((~has).sum())


# ---------------------------------------------------------------- logged impressions


def _request_order(table: pa.Table, by_user: bool) -> np.ndarray:
    """(R,) row order by (user, if `by_user`) timestamp, ties by request_id: deterministic."""
    ts = table.column("timestamp").to_numpy()
    rid = np.asarray(table.column("request_id").to_pylist(), dtype=object)
    _, rid_rank = np.unique(rid.astype(str), return_inverse=True)
    keys = (rid_rank, ts, table.column("user_id").to_numpy()) if by_user else (rid_rank, ts)
    return np.lexsort(keys)


def _user_last_split(table: pa.Table) -> tuple[np.ndarray, dict]:
    """(R,) split per row (0 train, 1 valid, 2 test): each user's last request tests, the one
    before validates; a user with one request is test only, with two valid + test."""
    order = _request_order(table, by_user=True)
    su = table.column("user_id").to_numpy()[order]
    _, start, count = np.unique(su, return_index=True, return_counts=True)
    from_end = np.repeat(start + count, count) - 1 - np.arange(len(su))  # 0 = user's last
    split_of = np.empty(len(su), np.int64)
    split_of[order] = np.where(from_end == 0, 2, np.where(from_end == 1, 1, 0))
    if not (split_of == 0).any():
        raise GoalRankInputError(
            f"split user-last: the training split has no requests: {int((count < 3).sum())} of {len(count)} users have "
            f"fewer than 3 requests (each user's last request tests and the one before validates); use --split time "
            f"(protocol.split: time) for a global cut by timestamp")
    return split_of, {"users": int(len(count)), "users_without_training_requests": int((count < 3).sum())}


def _time_split(table: pa.Table, valid_share: float, test_share: float) -> tuple[np.ndarray, dict]:
    """(R,) split per row (0 train, 1 valid, 2 test): in time order the latest `test_share` of
    the requests test and the `valid_share` before them validate. A cut inside a run of equal
    timestamps moves to the run's start, so every training request is strictly earlier than
    every valid one, and every valid one than every test one."""
    order = _request_order(table, by_user=False)
    ts = table.column("timestamp").to_numpy()[order]  # (R,) ascending
    n = len(ts)
    test_at = int(np.searchsorted(ts, ts[max(n - max(1, round(test_share * n)), 0)], "left"))
    valid_at = int(np.searchsorted(ts, ts[max(test_at - max(1, round(valid_share * n)), 0)], "left"))
    if valid_at == 0:
        raise GoalRankInputError(
            f"split time: the training split has no requests: of {n} requests the latest {test_share:g} test and the "
            f"{valid_share:g} before them validate, leaving none earlier to train ({int((ts == ts[0]).sum())} share the "
            f"earliest timestamp); log more requests, lower protocol.valid_share / protocol.test_share, or use --split "
            f"user-last")
    split_sorted = np.repeat(np.arange(3), [valid_at, test_at - valid_at, n - test_at])
    split_of = np.empty(n, np.int64)
    split_of[order] = split_sorted
    stats = {"users": int(len(np.unique(table.column("user_id").to_numpy()))),
             "valid_from_timestamp": int(ts[valid_at]), "test_from_timestamp": int(ts[test_at])}
    return split_of, stats


def split_impressions(table: pa.Table, items: pa.Table | None = None, cfg: ProtocolConfig | None = None) -> Splits:
    """Split validated user impressions by `cfg.split` (`time` or `user-last`, see
    _time_split / _user_last_split; docs/protocol.md says why time is the default). Optional
    columns ride along. Raises GoalRankInputError when no request is left to train."""
    cfg = cfg or ProtocolConfig()
    if cfg.split == "time":
        split_of, extra = _time_split(table, cfg.valid_share, cfg.test_share)
    else:
        split_of, extra = _user_last_split(table)
    tables = {name: table.filter(pa.array(split_of == j)) for j, name in enumerate(SPLITS)}
    # keep each split in time order per user
    tables = {n: tb.take(pc.sort_indices(tb, [("user_id", "ascending"), ("timestamp", "ascending")])) for n, tb in tables.items()}
    stats = split_stats(tables, dataset="impressions", split=cfg.split, source="impressions", **extra)
    return Splits(tables["train"], tables["valid"], tables["test"], items, stats)
