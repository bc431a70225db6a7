"""Hive-partitioned impressions, `{impressions}/date=YYYY-MM-DD/*.parquet`, local or on S3
(through tasks.storage's filesystems): list the partitions, plan a run's window, read exactly
its partitions, run the data gates on the newest one, and write partitions (data writers).

The prepare stage reads the window's partitions itself (Ray Data, `DataSource.partitions`);
what is read here is for the gates: the newest partition in full, Parquet footers of the
earlier ones (row counts) and their item columns (the training vocabulary).
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from goalrank_core.config import GoalRankConfig
from goalrank_core.gates import DataGateError, check_partition, report
from goalrank_core.partitions import PartitionError, Window, parse_partition, partition_name, select_window
from tasks import object_store


def list_partitions(uri: str) -> dict[date, str]:
    """{date: partition URI} of the `date=YYYY-MM-DD` folders directly under `uri` (other
    entries are ignored; a malformed `date=` folder is a PartitionError)."""
    fs, path = object_store.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.Directory:
        return {}
    out = {}
    for child in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        if child.type != pafs.FileType.Directory:
            continue
        day = parse_partition(child.base_name)
        if day is not None:
            out[day] = object_store.join(object_store.normalize(uri), child.base_name)
    return dict(sorted(out.items()))


def is_partitioned(uri: str | None) -> bool:
    """True when `uri` is a folder holding at least one `date=YYYY-MM-DD` sub-folder."""
    return uri is not None and bool(list_partitions(uri))


def plan_window(impressions: str, run_date: date, days: int) -> Window:
    """The run's window among the partitions present (goalrank_core.partitions.select_window)."""
    return select_window(list_partitions(impressions), run_date, days, where=object_store.normalize(impressions))


def _files(part_uri: str) -> tuple[pafs.FileSystem, list[str]]:
    fs, path = object_store.filesystem(part_uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return fs, sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                      and not posixpath.basename(i.path).startswith(("_", ".")))


def read_partition(part_uri: str, columns: list[str] | None = None) -> pa.Table:
    """Every Parquet file of one partition, concatenated in name order (an empty folder is an
    empty table). A file that does not read is a DataGateError (`readable`)."""
    name = part_uri.rstrip("/").rsplit("/", 1)[-1]
    fs, files = _files(part_uri)
    parts = []
    for f in files:
        try:
            parts.append(pq.read_table(f, filesystem=fs, columns=columns, partitioning=None))
        except (pa.ArrowException, OSError) as exc:
            raise DataGateError(f"{name} ({part_uri})", "readable",
                                f"{posixpath.basename(f)} is not a readable Parquet file (truncated or corrupt?): {exc}"
                                ) from exc
    if not parts:
        return pa.table({c: pa.array([], pa.null()) for c in (columns or [])})
    try:
        return pa.concat_tables(parts, promote_options="none")
    except pa.ArrowInvalid as exc:
        raise DataGateError(f"{name} ({part_uri})", "schema", f"its files have different schemas: {exc}") from exc


def partition_rows(part_uri: str) -> int:
    """Rows of a partition from its Parquet footers only."""
    fs, files = _files(part_uri)
    total = 0
    for f in files:
        try:
            with fs.open_input_file(f) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            name = part_uri.rstrip("/").rsplit("/", 1)[-1]
            raise DataGateError(f"{name} ({part_uri})", "readable", f"{posixpath.basename(f)}: {exc}") from exc
    return total


@dataclass
class WindowRead:
    table: pa.Table
    partitions: list[str]  # partition folder names read, oldest first
    rows: dict[str, int]  # rows per partition


def read_window(impressions: str, window: Window, columns: list[str] | None = None) -> WindowRead:
    """Exactly the window's partitions (unvalidated; the prepare stage and the gates validate)."""
    parts = list_partitions(impressions)
    tables, rows = [], {}
    for d in window.dates:
        if d not in parts:
            raise PartitionError(f"{impressions}: partition {partition_name(d)} disappeared while reading")
        t = read_partition(parts[d], columns)
        rows[partition_name(d)] = t.num_rows
        if t.num_rows:
            tables.append(t)
    table = pa.concat_tables(tables) if tables else pa.table({})
    return WindowRead(table, list(window.partitions), rows)


def run_gates(impressions: str, window: Window, config: GoalRankConfig) -> dict:
    """The data gates on the window's newest partition (D - 1). Raises DataGateError on the
    first failed check; returns the report (recorded by the flow) when all pass."""
    parts = list_partitions(impressions)
    new = partition_name(window.holdout)
    where = f"{new} ({parts[window.holdout]})"
    cfg = config.gates
    if not cfg.enabled:
        return {"partition": new, "checks": [], "enabled": False}
    table = read_partition(parts[window.holdout])
    trailing = [partition_rows(parts[d]) for d in window.train[-cfg.trailing_days:]]
    known = [np.zeros(0, np.int64)]
    for d in window.train:
        t = read_partition(parts[d], ["candidates", "history"])
        for c in ("candidates", "history"):
            known.append(np.unique(t.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False)))
    results = check_partition(table, where, trailing, np.unique(np.concatenate(known)), cfg)
    out = report(results, new)
    out["enabled"] = True
    out["rows"] = table.num_rows
    return out


def write_partition(table: pa.Table, dataset_uri: str, day: date) -> str:
    """Write `table` as the only file of partition `day` under `dataset_uri` (replacing it). -> URI."""
    uri = object_store.join(object_store.normalize(dataset_uri), partition_name(day))
    object_store.delete(uri)
    fs, path = object_store.filesystem(uri)
    fs.create_dir(path, recursive=True)
    pq.write_table(table, f"{path}/part-00000.parquet", filesystem=fs)
    return uri


def write_file(table: pa.Table, uri: str) -> str:
    """One Parquet file at `uri` (local or S3), e.g. a dataset's `items.parquet`."""
    uri = object_store.normalize(uri)
    fs, path = object_store.filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    pq.write_table(table, path, filesystem=fs)
    return uri
