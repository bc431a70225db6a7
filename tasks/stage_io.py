"""Ray Data and model-folder helpers shared by the stages: read a completed stage's table as a
Ray Dataset, write a validated Dataset, load a model bundle from storage, seed per batch."""
from __future__ import annotations

import os
import tempfile
import zlib
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from goalrank_core.schemas import IMPRESSIONS, conform, prepared_schema
from tasks import object_store, storage


def read_dataset(uri: str, what: str) -> Any:
    """A completed stage's Parquet folder as a Ray Dataset (refused without a manifest)."""
    import ray.data

    storage.require_complete(uri, what)
    fs, path = object_store.filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, partitioning=None)


def read_split(prepared: str, split: str, what: str, propensities: bool = False) -> pa.Table:
    """A prepared split, checked against its contract (schemas.prepared_schema): the IMPRESSIONS
    columns, and with `propensities` also the logging propensity columns it carries."""
    table = storage.read_table(object_store.join(prepared, split), None, what)
    table = conform(table, prepared_schema(table.column_names), what)
    return table if propensities else table.select(IMPRESSIONS.names)


def _conform_batch(batch: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    return conform(batch, schema, what)


def ordered() -> bool:
    """Whether data stages keep input order (GOALRANK_DATA_ORDERED, default on)."""
    from tasks.ray_runtime import env_flag

    return env_flag("GOALRANK_DATA_ORDERED", True)


def in_order(ds: Any) -> Any:
    """`ds` with its blocks kept in input order when it executes. By default Ray Data emits
    blocks as tasks finish, so a stage's row order, and with it the next stage's batches,
    varied with actor timing: two runs of the same flow scored one request 3e-8 apart and
    trained different generators. A finished block may wait for the ones before it, which
    costs about 1 % (bench.bench_score full, 2 actors: 33.3k lists/s ordered, 33.7k not).
    GOALRANK_DATA_ORDERED=0 goes back to finishing order and gives up identical runs."""
    ds.context.execution_options.preserve_order = ordered()
    return ds


def write_dataset(ds: Any, uri: str, schema: pa.Schema, what: str, stats: dict | None = None,
                  min_rows_per_file: int | None = None) -> int:
    """Validate every batch against `schema`, write Parquet parts to folder `uri` (replacing
    what was there) and return the row count written. Rows keep their input order: blocks
    in order (`in_order`), and within a part through `ordered_parquet_sink`, since Ray's own
    Parquet writer hands a task's blocks to pyarrow's threaded dataset writer, which
    reorders them. A `stats` dict receives `operator_stats` of the run; `min_rows_per_file`
    joins small blocks into fewer parts (one part per block otherwise)."""
    checked = in_order(ds.map_batches(_conform_batch, fn_kwargs={"schema": schema, "what": what},
                                      batch_format="pyarrow", batch_size=None, zero_copy_batch=True))
    checked.write_datasink(ordered_parquet_sink(uri, schema, min_rows_per_file))
    if stats is not None:
        stats.update(operator_stats(checked))
    return count_rows(uri)


def ordered_parquet_sink(uri: str, schema: pa.Schema, min_rows_per_file: int | None = None) -> Any:
    """A Ray Data Datasink writing each write task's blocks, in the order they come, to one
    Parquet file `part-{task index:06d}-{write id}.parquet` under folder `uri` (names sort
    in task order, as readers list them), through `tasks.object_store.filesystem` (local or S3).
    The folder is emptied when the write starts."""
    import uuid

    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class OrderedParquetDatasink(Datasink):
        def __init__(self) -> None:
            self.write_id = uuid.uuid4().hex[:12]

        def on_write_start(self, schema_seen: pa.Schema | None = None) -> None:
            fs, path = object_store.filesystem(uri)
            fs.create_dir(path, recursive=True)
            fs.delete_dir_contents(path, missing_dir_ok=True)

        def write(self, blocks: Any, ctx: Any) -> int:
            import pyarrow.parquet as pq

            fs, path = object_store.filesystem(uri)
            rows, writer, sink = 0, None, None
            try:
                for block in blocks:
                    table = BlockAccessor.for_block(block).to_arrow()
                    if not table.num_rows:
                        continue
                    if writer is None:
                        fs.create_dir(path, recursive=True)  # local storage: this node may not have it
                        sink = fs.open_output_stream(f"{path}/part-{ctx.task_idx:06d}-{self.write_id}.parquet")
                        writer = pq.ParquetWriter(sink, schema)
                    writer.write_table(table.select(schema.names).cast(schema))
                    rows += table.num_rows
            finally:
                if writer is not None:
                    writer.close()
                if sink is not None:
                    sink.close()
            return rows

        @property
        def min_rows_per_write(self) -> int | None:
            return min_rows_per_file

    return OrderedParquetDatasink()


def operator_stats(ds: Any) -> dict[str, dict]:
    """Per operator of an executed Dataset, from Ray Data's stats: `busy_s` (first block's
    start to last block's end), `start`/`end` (those two instants, time.perf_counter: the
    same clock in every process of a machine), `udf_s` (summed time in the operator's
    functions), `rows` out. {} when Ray does not provide them (a DeveloperAPI)."""
    out: dict[str, dict] = {}
    try:
        summary = ds.get_stats_summary()
    except Exception:  # noqa: BLE001 - optional numbers, never worth failing a stage
        return out

    def walk(s: Any) -> None:
        for op in s.operators_stats:
            body = getattr(op, "function_body_time", None)
            rows = getattr(op, "output_num_rows", None)
            out[op.operator_name] = {"busy_s": float(op.time_total_s or 0.0), "start": op.earliest_start_time,
                                     "end": op.latest_end_time,
                                     "udf_s": float(body.sum) if body is not None else None,
                                     "rows": int(rows.sum) if rows is not None else None}
        for parent in s.parents:
            walk(parent)

    walk(summary)
    return out


def count_rows(uri: str) -> int:
    """Rows of a Parquet folder, from the file footers only."""
    fs, path = object_store.filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).count_rows()


def load_bundle(uri: str, what: str, map_location: str = "cpu") -> Any:
    """A ModelBundle saved by a completed stage at `uri` (a folder holding bundle.json)."""
    from goalrank_core.bundle import ModelBundle

    storage.require_complete(uri, what)
    with tempfile.TemporaryDirectory(prefix="goalrank-bundle-") as tmp:
        local = object_store.download_dir(uri, os.path.join(tmp, "b"))
        return ModelBundle.load(local, map_location=map_location)


def save_bundle(bundle: Any, uri: str) -> dict:
    """Save a ModelBundle into storage at `uri`. -> manifest entry for it."""
    with tempfile.TemporaryDirectory(prefix="goalrank-bundle-") as tmp:
        local = os.path.join(tmp, "b")
        bundle.save(local)
        object_store.upload_dir(local, uri)
    return {"models": sorted(bundle.models), "kinds": dict(bundle.kinds)}


def batch_seed(base: int, request_ids: list[str] | Any) -> int:
    """A seed fixed by the batch's first request id: the same lists whichever actor (or how
    many actors) processes the batch."""
    first = str(request_ids[0]) if len(request_ids) else ""
    return (int(base) * 1_000_003 + zlib.crc32(first.encode())) % (2**63 - 1)


def device() -> str:
    import torch

    from tasks.ray_runtime import env_flag

    return "cuda" if torch.cuda.is_available() and env_flag("GOALRANK_USE_GPU", True) else "cpu"
