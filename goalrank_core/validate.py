"""Strict validation of impressions, requests and items before any work.

Every problem raises DataValidationError naming the file, the column and the first offending
row (0-based, in file order). Checks are vectorised over flattened list columns.

Decisions (docs/protocol.md repeats them):
- Integer columns of another width (int32, uint64, ...) are accepted when every value fits
  int64 and cast; a value beyond int64 is an error. Float ids are an error. Labels may be any
  float or integer type; they must be finite and >= 0 (a positive is a label > 0).
- Item ids must be >= 0 (negative ids are reserved for padding downstream).
- `candidates` and `shown` must not repeat an item; `history` may (a user can re-consume),
  and may be of any length (encoders keep the most recent `history_len`).
- Request ids must be unique and non-empty; any unicode string is fine.
- Users and items never seen in training are valid input (cold start).
- Optional columns (schemas.IMPRESSIONS_OPTIONAL, `labels_<name>`) are checked like the rest
  when present and kept; any other column is dropped with one logged line naming it, so a
  logger's extra fields neither fail the file nor vanish unannounced.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from goalrank_core.errors import DataValidationError
from goalrank_core.schemas import (
    IMPRESSIONS,
    ITEMS,
    RANKED,
    REQUESTS,
    SchemaError,
    conform,
    impressions_schema,
    is_extra_label,
    unknown_impression_columns,
)

log = logging.getLogger("goalrank")
_FLOAT_NAMES = {pa.float32(): "float32", pa.float64(): "float64"}
_INT64_MAX = np.iinfo(np.int64).max
_ID_LISTS = ("history", "candidates", "shown")


def _conform(table: pa.Table, schema: pa.Schema, source: str) -> pa.Table:
    """schemas.conform after integer/label normalisation; its SchemaError becomes a
    DataValidationError (same message: file, column, row)."""
    try:
        return conform(_normalise(table, schema, source), schema, source)
    except SchemaError as exc:
        raise DataValidationError(str(exc)) from exc


def _err(source: str, column: str, row: int, what: str) -> DataValidationError:
    return DataValidationError(f"{source}: column '{column}' row {row}: {what}")


# ---------------------------------------------------------------- reading


def _read(path: str | os.PathLike) -> tuple[pa.Table, str]:
    """A Parquet file, or a directory of Parquet parts (read in name order)."""
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise DataValidationError(f"{source}: no such file or directory")
    files = sorted(f for f in p.rglob("*.parquet") if f.is_file()) if p.is_dir() else [p]
    if not files:
        raise DataValidationError(f"{source}: directory holds no .parquet files")
    parts = []
    for f in files:
        if f.stat().st_size == 0:
            raise DataValidationError(f"{f}: empty file (0 bytes), not Parquet")
        try:
            parts.append(pq.read_table(f))
        except (pa.ArrowException, OSError) as exc:
            raise DataValidationError(f"{f}: not a readable Parquet file (truncated or corrupt?): {exc}") from exc
    if len(parts) > 1:
        first = parts[0].schema
        for f, t in zip(files[1:], parts[1:]):
            if not t.schema.equals(first):
                raise DataValidationError(f"{f}: schema differs from {files[0].name}: {t.schema} vs {first}")
        return pa.concat_tables(parts), source
    return parts[0], source


def _note_ignored(source: str, names: list[str]) -> None:
    """One line naming the columns a reader ignores (never a silent drop)."""
    if names:
        log.warning("%s: ignoring column(s) %s: not in the impressions contract (docs/protocol.md), so not used "
                    "and not carried into any split or file written from this input", source, names)


def read_impressions(path: str | os.PathLike, require_feedback: bool = True) -> pa.Table:
    """Read and validate an impressions file or folder -> table conforming to IMPRESSIONS plus
    the optional columns it holds (schemas.impressions_schema); other columns are dropped with
    a logged line. With require_feedback=False a file without `shown`/`labels` is accepted and
    returned as a REQUESTS table (one with them is still fully validated)."""
    table, source = _read(path)
    _note_ignored(source, unknown_impression_columns(table.column_names))
    if not require_feedback and "shown" not in table.column_names and "labels" not in table.column_names:
        return validate_requests(table, source)
    return validate_impressions(table, source)


def read_requests(path: str | os.PathLike) -> pa.Table:
    """Read and validate requests -> REQUESTS table. An impressions file is accepted: its
    feedback and optional columns are dropped unread, any other column with a logged line."""
    table, source = _read(path)
    _note_ignored(source, unknown_impression_columns(table.column_names))
    return validate_requests(table, source)


def read_items(path: str | os.PathLike) -> pa.Table:
    table, source = _read(path)
    return validate_items(table, source)


def read_ranked(path: str | os.PathLike) -> pa.Table:
    """Ranked lists (schemas.RANKED); checked against their requests by metrics.evaluate_lists."""
    table, source = _read(path)
    if table.num_rows == 0:
        raise DataValidationError(f"{source}: no rows")
    return _conform(table, RANKED, source)


# ---------------------------------------------------------------- type normalisation


def _first_true(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _int_column(col: pa.ChunkedArray, source: str, name: str, nrows: int, is_list: bool) -> pa.ChunkedArray:
    """Accept any integer width whose values fit int64; reject floats and the rest."""
    typ = col.type
    inner = typ.value_type if is_list else typ
    if inner == pa.int64():
        return col
    if not pa.types.is_integer(inner):
        want = "list<int64>" if is_list else "int64"
        raise DataValidationError(f"{source}: column '{name}' has type {typ}, expected {want}")
    values = pc.list_flatten(col) if is_list else col
    if pa.types.is_unsigned_integer(inner) and len(values):
        too_big = pc.greater(values, pa.scalar(_INT64_MAX, inner if inner.bit_width == 64 else pa.uint64())).to_numpy(zero_copy_only=False)
        if too_big.any():
            j = _first_true(np.asarray(too_big, bool))
            row = int(pc.list_parent_indices(col.combine_chunks())[j].as_py()) if is_list else j
            raise _err(source, name, row, f"id {values[j].as_py()} is beyond int64")
    target = pa.list_(pa.int64()) if is_list else pa.int64()
    if is_list and pa.types.is_large_list(typ):
        target = pa.large_list(pa.int64())
    return col.cast(target)


def _normalise(table: pa.Table, schema: pa.Schema, source: str) -> pa.Table:
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if name in schema.names:
            field = schema.field(name)
            is_list = pa.types.is_list(field.type)
            listy = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            if is_list and not listy:
                raise DataValidationError(f"{source}: column '{name}' has type {col.type}, expected {field.type}")
            inner = field.type.value_type if is_list else field.type
            if inner == pa.int64():
                col = _int_column(col, source, name, table.num_rows, is_list)
            elif pa.types.is_floating(inner):
                col = _float_column(col, source, name, field.type)
        cols[name] = col
    return pa.table(cols)


def _float_column(col: pa.ChunkedArray, source: str, name: str, target: pa.DataType) -> pa.ChunkedArray:
    """Any float or integer (list) column -> `target`; labels are checked for finiteness first,
    as a float64 -> float32 cast could overflow to inf."""
    listy = pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
    vt = col.type.value_type if listy else col.type
    if listy != pa.types.is_list(target) or not (pa.types.is_floating(vt) or pa.types.is_integer(vt)):
        want = f"list<{_FLOAT_NAMES[target.value_type]}>" if pa.types.is_list(target) else _FLOAT_NAMES[target]
        raise DataValidationError(f"{source}: column '{name}' has type {col.type}, expected {want}")
    if listy and target.value_type == pa.float32() and pa.types.is_floating(vt):
        _check_labels(col, source, name)
    return col.cast(target)


# ---------------------------------------------------------------- checks


def _flat(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A list column -> (values (E,), parent row of each value (E,), lengths (R,))."""
    arr = col.combine_chunks()
    if isinstance(arr, pa.ChunkedArray):
        arr = pa.concat_arrays(arr.chunks) if arr.num_chunks else pa.array([], arr.type)
    values = arr.flatten()
    parents = pc.list_parent_indices(arr).to_numpy()
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    return values, parents, np.asarray(lengths, np.int64)


def _pair_keys(parents: np.ndarray, values: np.ndarray, universe: np.ndarray) -> np.ndarray:
    """(E,) int64 keys, one per (row, item), ordered by (row, item). `universe` holds every
    item that keys will be compared across; when rows * (max id + 1) fits int64 (always for
    real logs) the key is arithmetic, else items are first coded densely."""
    top = int(universe.max()) + 1 if len(universe) else 1
    rows = int(parents.max()) + 1 if len(parents) else 1
    if rows * top < 2**62:
        return parents.astype(np.int64) * top + values
    codes = np.unique(universe)
    return parents.astype(np.int64) * len(codes) + np.searchsorted(codes, values)


def _sorted_pair_keys(parents: np.ndarray, values: np.ndarray, lengths: np.ndarray, universe: np.ndarray) -> np.ndarray:
    """_pair_keys, sorted. Rows of one length (the usual case) sort row-wise, which is several
    times faster than one global sort; parents are already in row order."""
    if len(lengths) and (lengths == lengths[0]).all() and lengths[0] > 0:
        values = np.sort(values.reshape(len(lengths), -1), axis=1).ravel()
        return _pair_keys(parents, values, universe)
    return np.sort(_pair_keys(parents, values, universe))


def _float_values(col: pa.ChunkedArray, source: str, name: str, what: str) -> tuple[np.ndarray, np.ndarray]:
    """A float list column -> ((E,) float64 values, (E,) parent rows); NaN and inf are errors."""
    values, parents, _ = _flat(col)
    if values.null_count:
        raise _err(source, name, int(parents[_first_true(values.is_null().to_numpy(zero_copy_only=False))]), f"null {what}")
    v = values.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = ~np.isfinite(v)
    if bad.any():
        j = _first_true(bad)
        raise _err(source, name, int(parents[j]), f"{what} {v[j]} is not finite (NaN or inf)")
    return v, parents


def _check_labels(col: pa.ChunkedArray, source: str, name: str = "labels") -> None:
    v, parents = _float_values(col, source, name, "label")
    if (v < 0).any():
        j = _first_true(v < 0)
        raise _err(source, name, int(parents[j]), f"label {v[j]} is negative (labels are feedback >= 0)")


def _check_probabilities(v: np.ndarray, rows: np.ndarray, source: str, name: str) -> None:
    """(E,) float64 values that must lie in (0, 1] (NaN fails both comparisons)."""
    bad = ~((v > 0) & (v <= 1))
    if bad.any():
        j = _first_true(bad)
        raise _err(source, name, int(rows[j]), f"{v[j]} is not a probability in (0, 1]")


def _check_optional(table: pa.Table, source: str, n_shown: np.ndarray) -> None:
    """The optional columns present: per-position lists as long as `shown` ((R,) lengths),
    probabilities in (0, 1], log-probabilities finite and <= 0."""
    names = table.column_names
    if "propensity" in names and "log_propensity" in names:
        raise DataValidationError(f"{source}: columns 'propensity' and 'log_propensity' both given; keep one")
    for name in names:
        if not (is_extra_label(name) or name == "position_propensities"):
            continue
        n = np.asarray(pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False), np.int64)
        if (n != n_shown).any():
            r = _first_true(n != n_shown)
            raise _err(source, name, r, f"{n[r]} values for {n_shown[r]} shown items (lengths must match)")
        if is_extra_label(name):
            _check_labels(table.column(name), source, name)
        else:
            v, parents = _float_values(table.column(name), source, name, "propensity")
            _check_probabilities(v, parents, source, name)
    rows = np.arange(table.num_rows)
    if "propensity" in names:
        _check_probabilities(table.column("propensity").to_numpy(), rows, source, "propensity")
    if "log_propensity" in names:
        v = table.column("log_propensity").to_numpy()
        bad = ~(np.isfinite(v) & (v <= 0))
        if bad.any():
            j = _first_true(bad)
            raise _err(source, "log_propensity", j, f"{v[j]} is not a finite log-probability <= 0")


def _check_id_list(col: pa.ChunkedArray, source: str, name: str, unique: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    values, parents, lengths = _flat(col)
    if values.null_count:
        raise _err(source, name, int(parents[_first_true(values.is_null().to_numpy(zero_copy_only=False))]), "null item id inside the list")
    v = values.to_numpy()
    if len(v) and v.min() < 0:
        j = _first_true(v < 0)
        raise _err(source, name, int(parents[j]), f"negative item id {v[j]} (ids must be >= 0)")
    if unique and len(v):
        key = _sorted_pair_keys(parents, v, lengths, v)  # one int64 per (row, item), sorted
        dup = key[1:] == key[:-1]
        if dup.any():
            k = key[1:][dup][0]  # smallest duplicated key = first offending row
            hit = _first_true(_pair_keys(parents, v, v) == k)
            raise _err(source, name, int(parents[hit]), f"item {v[hit]} appears more than once (a list must not repeat items)")
    return v, parents, lengths


def _check_common(table: pa.Table, source: str) -> None:
    if table.num_rows == 0:
        raise DataValidationError(f"{source}: no rows")
    rid = table.column("request_id")
    empty = pc.equal(pc.utf8_length(rid), 0).to_numpy(zero_copy_only=False)
    if empty.any():
        raise _err(source, "request_id", _first_true(np.asarray(empty, bool)), "empty request id")
    if pc.count_distinct(rid).as_py() != table.num_rows:
        ids = np.asarray(rid.to_pylist(), dtype=object)
        _, first_idx, inv = np.unique(ids.astype(str), return_index=True, return_inverse=True)
        seen_before = first_idx[inv] != np.arange(len(ids))
        row = _first_true(seen_before)
        raise _err(source, "request_id", row, f"duplicate request id {ids[row]!r} (first at row {first_idx[inv[row]]})")
    _check_id_list(table.column("history"), source, "history", unique=False)
    _, _, n_cand = _check_id_list(table.column("candidates"), source, "candidates", unique=True)
    if (n_cand == 0).any():
        raise _err(source, "candidates", _first_true(n_cand == 0), "empty candidates list")


def validate_requests(table: pa.Table, source: str) -> pa.Table:
    """Validate a requests table and return it conformed to REQUESTS (other columns dropped:
    the file readers name the unknown ones)."""
    table = _conform(table.select([n for n in table.column_names if n in REQUESTS.names]), REQUESTS, source)
    _check_common(table, source)
    return table


def validate_impressions(table: pa.Table, source: str) -> pa.Table:
    """Validate an impressions table and return it conformed to IMPRESSIONS plus the optional
    columns it holds; unknown columns are dropped (the file readers name them)."""
    schema = impressions_schema(table.column_names)
    table = _conform(table.select([n for n in table.column_names if n in schema.names]), schema, source)
    _check_common(table, source)
    n_cand = np.asarray(pc.list_value_length(table.column("candidates")).to_numpy(zero_copy_only=False), np.int64)
    n_shown = np.asarray(pc.list_value_length(table.column("shown")).to_numpy(zero_copy_only=False), np.int64)
    n_lab = np.asarray(pc.list_value_length(table.column("labels")).to_numpy(zero_copy_only=False), np.int64)
    if (n_shown == 0).any():
        raise _err(source, "shown", _first_true(n_shown == 0), "empty shown list")
    if (n_lab != n_shown).any():
        r = _first_true(n_lab != n_shown)
        raise _err(source, "labels", r, f"{n_lab[r]} labels for {n_shown[r]} shown items (lengths must match)")
    if (n_cand < n_shown).any():
        r = _first_true(n_cand < n_shown)
        raise _err(source, "candidates", r, f"N={n_cand[r]} candidates < L={n_shown[r]} shown items (need N >= L)")
    _check_labels(table.column("labels"), source)
    _check_optional(table, source, n_shown)
    sv, sp, _ = _check_id_list(table.column("shown"), source, "shown", unique=True)
    cv, cp, _ = _flat(table.column("candidates"))
    cv = cv.to_numpy()
    # Is each (row, shown item) among that row's (row, candidate) pairs?
    both = np.concatenate([cv, sv])
    ckey = _sorted_pair_keys(cp, cv, n_cand, both)
    skey = _pair_keys(sp, sv, both)
    pos = np.minimum(np.searchsorted(ckey, skey), len(ckey) - 1)
    inside = ckey[pos] == skey
    if not inside.all():
        j = _first_true(~inside)
        raise _err(source, "shown", int(sp[j]), f"item {sv[j]} is not in candidates")
    return table


def validate_items(table: pa.Table, source: str) -> pa.Table:
    table = _conform(table, ITEMS, source)
    if table.num_rows == 0:
        raise DataValidationError(f"{source}: no rows")
    ids = table.column("item_id").to_numpy()
    if (ids < 0).any():
        raise _err(source, "item_id", _first_true(ids < 0), f"negative item id {ids[ids < 0][0]}")
    cat = table.column("category").to_numpy()
    if (cat < 0).any():
        raise _err(source, "category", _first_true(cat < 0), "negative category (0 = none, categories from 1)")
    order = np.argsort(ids, kind="stable")
    dup = ids[order][1:] == ids[order][:-1]
    if dup.any():
        row = int(order[1:][dup].min())
        raise _err(source, "item_id", row, f"duplicate item id {ids[row]}")
    return table

