"""Candidate groups between Parquet (raw item ids, one row per request) and tensors
(positions into each request's candidates), and the training requests looked up by id."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from goalrank_core.errors import GoalRankInputError

_ABSENT = np.iinfo(np.int64).min  # padding id that matches no candidate (raw pads are -1)


class RequestIndex:
    """The requests of a split, fetched by request_id (groups carry only the id)."""

    def __init__(self, table: pa.Table, what: str):
        self.table, self.what = table, what
        self.row = {rid: i for i, rid in enumerate(table.column("request_id").to_pylist())}

    def take(self, request_ids: list[str]) -> pa.Table:
        try:
            rows = [self.row[r] for r in request_ids]
        except KeyError as exc:
            raise GoalRankInputError(f"{self.what}: request_id {exc.args[0]!r} is not in the prepared split") from None
        return self.table.take(pa.array(rows, pa.int64()))


def groups_to_positions(enc, lists: list[list[list[int]]], width: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-request lists of raw ids -> positions (B, G, L) int64 (-1 padding) and mask (B, G)
    bool, with G = width. A list naming an item outside its request's candidates is an error."""
    b, l = len(lists), enc.shown.shape[1]
    raw = np.full((b, width, l), _ABSENT, dtype=np.int64)
    mask = np.zeros((b, width), dtype=bool)
    for i, group in enumerate(lists):
        for g, lst in enumerate(group[:width]):
            raw[i, g, : len(lst)] = lst[:l]
            mask[i, g] = True
    pos = enc.ids_to_positions(slice(None), raw)  # (B, G, L)
    bad = mask & (pos < 0).any(-1)
    if bad.any():
        i, g = (int(x) for x in np.argwhere(bad)[0])
        raise GoalRankInputError(f"{what}: request {enc.request_id[i]!r} list {g} has an item outside its candidates")
    return np.where(mask[..., None], pos, -1), mask


def positions_to_rows(enc, lists: np.ndarray, mask: np.ndarray, values: dict[str, np.ndarray] | None = None) -> dict:
    """Positions (B, G, L) + mask (B, G) -> columns of raw-id lists, keeping masked lists only;
    `values` (B, G) arrays become per-request lists alongside."""
    ids = np.take_along_axis(enc.raw_candidates[:, None, :], np.maximum(lists, 0), axis=2)  # (B, G, L)
    out = {"lists": [ids[i][mask[i]].tolist() for i in range(len(ids))]}
    for name, v in (values or {}).items():
        out[name] = [v[i][mask[i]].tolist() for i in range(len(v))]
    return out
