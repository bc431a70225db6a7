"""Candidate groups between Parquet (raw item ids, one row per request) and tensors
(positions into each request's candidates), and the training requests looked up by id.

The per-batch paths are vectorised over Arrow buffers (flatten + offsets, numpy scatter):
no Python loop per request or per list, which matters in the `score` actors.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from goalrank_core.errors import GoalRankInputError

_ABSENT = np.iinfo(np.int64).min  # padding id that matches no candidate (raw pads are -1)
_GROUPS = pa.list_(pa.list_(pa.int64()))


class RequestIndex:
    """The requests of a split, fetched by request_id (groups carry only the id)."""

    def __init__(self, table: pa.Table, what: str):
        self.table, self.what = table, what
        self.ids = table.column("request_id").combine_chunks().cast(pa.string())

    def take(self, request_ids: list[str] | pa.Array | pa.ChunkedArray) -> pa.Table:
        """Rows of the split for `request_ids` (a list or an Arrow string column), in that order."""
        ids = request_ids if isinstance(request_ids, (pa.Array, pa.ChunkedArray)) else pa.array(request_ids, pa.string())
        rows = pc.index_in(ids.cast(pa.string()), value_set=self.ids)  # (B,) int32, null where absent
        if rows.null_count:
            first = ids[int(np.flatnonzero(rows.is_null().to_numpy(zero_copy_only=False))[0])].as_py()
            raise GoalRankInputError(f"{self.what}: request_id {first!r} is not in the prepared split")
        return self.table.take(rows)


def _list_array(values: Any, type_: pa.DataType) -> pa.Array:
    """An Arrow array of `type_` from a column, a chunked column or Python lists."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks() if values.num_chunks else pa.array([], type_)
    if isinstance(values, pa.Array):
        return values
    return pa.array(values, type_)


def groups_to_positions(enc, lists: list[list[list[int]]] | pa.Array | pa.ChunkedArray, width: int,
                        what: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-request lists of raw ids (Python lists or a list<list<int64>> Arrow column) ->
    positions (B, G, L) int64 (-1 padding) and mask (B, G) bool, with G = width. A list
    naming an item outside its request's candidates is an error."""
    groups = _list_array(lists, _GROUPS)
    b, l = len(groups), enc.shown.shape[1]
    raw = np.full((b, width, l), _ABSENT, dtype=np.int64)
    mask = np.zeros((b, width), dtype=bool)
    n_lists = groups.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # (B,)
    inner = groups.flatten()  # (T,) lists, T = n_lists.sum()
    lens = inner.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # (T,)
    flat = inner.flatten()
    if flat.null_count:
        raise GoalRankInputError(f"{what}: a list holds a null item id")
    ids = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)  # (V,)
    row = np.repeat(np.arange(b), n_lists)  # (T,) request of each list
    g = np.arange(len(lens)) - np.repeat(np.cumsum(n_lists) - n_lists, n_lists)  # (T,) rank in its group
    keep = g < width
    mask[row[keep], g[keep]] = True
    lst = np.repeat(np.arange(len(lens)), lens)  # (V,) list of each item
    k = np.arange(len(ids)) - np.repeat(np.cumsum(lens) - lens, lens)  # (V,) position in its list
    put = keep[lst] & (k < l)
    raw[row[lst[put]], g[lst[put]], k[put]] = ids[put]
    pos = enc.ids_to_positions(slice(None), raw)  # (B, G, L)
    bad = mask & (pos < 0).any(-1)
    if bad.any():
        i, j = (int(x) for x in np.argwhere(bad)[0])
        raise GoalRankInputError(f"{what}: request {enc.request_id[i]!r} list {j} has an item outside its candidates")
    return np.where(mask[..., None], pos, -1), mask


def masked_lists(values: np.ndarray, mask: np.ndarray, type_: pa.DataType) -> pa.Array:
    """(B, G) values + (B, G) mask -> a list array of B rows holding the masked-in values in
    order (the layout of `positions_to_rows`' value columns), built from offsets, no loop."""
    counts = mask.sum(1)  # (B,)
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values[mask], type_.value_type),
                                    type=type_)


def padded_values(values: Any, width: int, dtype: Any = np.float32) -> np.ndarray:
    """A list<number> column of B rows (e.g. pi_ref) -> (B, width) array holding each row's
    first `width` values, zero beyond: the inverse of `masked_lists`, from offsets, no loop."""
    arr = _list_array(values, pa.list_(pa.float32()))
    n = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)  # (B,)
    flat = arr.flatten().to_numpy(zero_copy_only=False)  # (T,) a sliced array's own values only
    k = np.arange(len(flat)) - np.repeat(np.cumsum(n) - n, n)  # (T,) place in its row
    keep = k < width
    out = np.zeros((len(n), width), dtype=dtype)
    out[np.repeat(np.arange(len(n)), n)[keep], k[keep]] = flat[keep]
    return out


def positions_to_rows(enc, lists: np.ndarray, mask: np.ndarray, values: dict[str, np.ndarray] | None = None) -> dict:
    """Positions (B, G, L) + mask (B, G) -> columns of raw-id lists, keeping masked lists only;
    `values` (B, G) arrays become per-request lists alongside."""
    ids = np.take_along_axis(enc.raw_candidates[:, None, :], np.maximum(lists, 0), axis=2)  # (B, G, L)
    out = {"lists": [ids[i][mask[i]].tolist() for i in range(len(ids))]}
    for name, v in (values or {}).items():
        out[name] = [v[i][mask[i]].tolist() for i in range(len(v))]
    return out
