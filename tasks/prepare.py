"""Stage `prepare`: a data source -> validated train/valid/test impressions, the item side
table and the vocabulary every later stage encodes with.

Output (`{out}/`): `train/` (schemas.IMPRESSIONS), `valid/`, `test/` (schemas.prepared_schema:
IMPRESSIONS plus the logging propensity columns when the input has them, for the evaluate
stage's off-policy estimates), `items/`
(schemas.ITEMS, possibly empty) and `vocab/` (a model bundle with no models: item and user
vocabularies, categories, dimensions; goalrank_core.bundle).

A named data set runs the protocol (goalrank_core.protocol.make_splits) on the driver, as it
needs the whole rating log at once (k-core, retriever). Impression logs are read with Ray
Data (any number of Parquet parts, local or S3), validated batch by batch on the workers,
and split by `protocol.split` (a daily window holds out its newest partition instead). Splits are written back through Ray Data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from goalrank_core.config import GoalRankConfig
from goalrank_core.errors import DataValidationError, GoalRankInputError
from goalrank_core.schemas import IMPRESSIONS, ITEMS, PROPENSITY_COLUMNS, conform, prepared_schema
from tasks import object_store, storage
from tasks.stage_io import save_bundle, write_dataset
from tasks.ray_runtime import ensure_ray
from tasks.storage import StageResult, run_stage

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class DataSource:
    """Where the logs come from: a named data set (`dataset`, found in `data_dir` or
    GOALRANK_DATA_DIR) or impressions Parquet (`impressions`: a file or folder, local or
    s3://; `partitions` optionally names the sub-folders to read, e.g. ("date=2024-01-02",)),
    with an optional item side table (`items`)."""

    dataset: str | None = None
    impressions: str | None = None
    items: str | None = None
    data_dir: str | None = None
    partitions: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.impressions is None):
            raise GoalRankInputError("data source: give exactly one of a data set name or an impressions path")
        if self.partitions and self.impressions is None:
            raise GoalRankInputError("data source: partitions apply only to an impressions path")

    def input_uris(self) -> dict[str, str | None]:
        """What the manifest fingerprints as this source's inputs."""
        if self.dataset is not None:
            from goalrank_core.datasets.registry import dataset_dir

            return {"dataset": str(dataset_dir(self.dataset, self.data_dir))}
        paths = {"impressions": self.impressions, "items": self.items}
        for p in self.partitions:
            paths[f"partition:{p}"] = object_store.join(self.impressions, p)
        if self.partitions:
            paths.pop("impressions")
        return paths


def _validate_impressions(batch: pa.Table, what: str) -> pa.Table:
    """Per-batch input contract check on the Ray workers (the data module's validator)."""
    try:
        from goalrank_core.validate import validate_impressions
    except ModuleNotFoundError as exc:  # pragma: no cover - until the data module lands
        if exc.name != "goalrank_core.validate":
            raise
        return conform(batch, IMPRESSIONS, what)
    out = validate_impressions(batch, what)  # optional columns are checked; all but propensities left out
    schema = prepared_schema(out.column_names)
    return conform(out.select(schema.names), schema, what)


def _note_dropped(what: str, names: list[str]) -> None:
    """The stage re-writes impressions with the contract's columns and the propensity columns
    only: one line names the input columns that its splits will not hold (optional ones are
    still validated)."""
    dropped = [n for n in names if n not in prepared_schema(names).names]
    if dropped:
        print(f"[prepare] {what}: column(s) {dropped} are validated where known but not carried into the prepare "
              f"stage's splits (the pipeline re-writes impressions with the contract's columns and the logging "
              f"propensities only)", flush=True)


def _common_columns(tables: list[pa.Table], what: str) -> pa.Schema:
    """The prepared schema every part shares: a propensity column that some parts lack is
    dropped (with a notice), as the splits cannot hold it for only some rows."""
    names = [set(t.column_names) for t in tables]
    keep = [n for n in PROPENSITY_COLUMNS if all(n in s for s in names)]
    partial = [n for n in PROPENSITY_COLUMNS if n not in keep and any(n in s for s in names)]
    if partial:
        print(f"[prepare] {what}: column(s) {partial} are in some parts only: not carried into the splits", flush=True)
    return prepared_schema(keep)


def _read_impressions(source: DataSource, note: bool = True) -> pa.Table:
    import ray
    import ray.data

    fs, path = object_store.filesystem(source.impressions)
    paths: str | list[str] = [f"{path}/{p}" for p in source.partitions] if source.partitions else path
    # Bad input must surface as the validator's one-line error (not retried, exit 2), not as
    # Ray's wrapper: Ray Data re-raises the UDF's own exception with this flag (a Dataset
    # copies the context when it is created, so set it first).
    ray.data.DataContext.get_current().raise_original_map_exception = True
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None)
        if note:
            _note_dropped(source.impressions, ds.schema().names)
        ds = ds.map_batches(_validate_impressions, fn_kwargs={"what": source.impressions}, batch_format="pyarrow",
                            batch_size=None)
        tables = ray.get(ds.to_arrow_refs())
    except Exception as exc:
        bad = _input_error(exc, source.impressions)
        if bad is None:
            raise
        raise bad from None
    if not tables or sum(t.num_rows for t in tables) == 0:
        raise GoalRankInputError(f"{source.impressions}: no impressions to read")
    schema = _common_columns(tables, source.impressions)
    return pa.concat_tables([conform(t.select(schema.names), schema, source.impressions) for t in tables])


def _input_error(exc: BaseException, what: str) -> GoalRankInputError | None:
    """The bad-input error behind a Ray failure, as one clean line: the validator's own
    (DataValidationError, ...) or an unreadable Parquet file; None for anything else."""
    seen: list[BaseException] = []
    while exc is not None and all(exc is not e for e in seen):
        seen.append(exc)
        if isinstance(exc, GoalRankInputError):
            cause = getattr(exc, "cause", None)  # a RayTaskError(X) keeps the original X here
            orig = cause if isinstance(cause, GoalRankInputError) else exc
            return type(orig)(str(orig).strip().splitlines()[0])
        if isinstance(exc, pa.ArrowInvalid):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return DataValidationError(f"{what}: not a readable Parquet file (truncated or corrupt?): {first}")
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
    return None


def _read_items(uri: str | None) -> pa.Table | None:
    if uri is None:
        return None
    import pyarrow.parquet as pq

    fs, path = object_store.filesystem(uri)
    return conform(pq.read_table(path, filesystem=fs, partitioning=None), ITEMS, uri)


def load_splits(source: DataSource, config: GoalRankConfig) -> Any:
    """The source as protocol Splits (train/valid/test impressions, items, stats)."""
    from goalrank_core import protocol

    if source.dataset is not None:
        from goalrank_core import datasets

        raw = datasets.load(source.dataset, source.data_dir)
        return protocol.make_splits(raw, config.protocol)
    if source.partitions:  # a daily window (tasks/partitions.py): the last partition is held out
        from dataclasses import replace

        from goalrank_core.partitions import PartitionError, split_window

        if len(source.partitions) < 2:  # an empty partition list would mean "the whole folder"
            raise PartitionError(f"{source.impressions}: a window needs at least 2 partitions (training days and "
                                 f"the held-out newest day), got {list(source.partitions)}")
        train = _read_impressions(replace(source, partitions=tuple(source.partitions[:-1])), note=False)
        held = _read_impressions(replace(source, partitions=(source.partitions[-1],)))
        return split_window(train, held, _read_items(source.items), config.window.test_fraction,
                            source.partitions[-1])
    return protocol.split_impressions(_read_impressions(source), _read_items(source.items), config.protocol)


def prepare(source: DataSource, out: str, config: GoalRankConfig) -> StageResult:
    """Stage 1: see the module docstring."""

    def body(out: str) -> dict:
        import ray.data

        from goalrank_core.bundle import build_bundle

        ensure_ray()
        splits = load_splits(source, config)
        if splits.train.num_rows == 0:
            raise GoalRankInputError("prepare: the training split is empty")
        tables = {}
        for name in SPLITS:
            table = splits.split(name)
            # The propensities reach valid and test (off-policy estimates); train is the contract.
            schema = IMPRESSIONS if name == "train" else prepared_schema(table.column_names)
            ds = ray.data.from_arrow(table.select(schema.names))
            rows = write_dataset(ds, object_store.join(out, name), schema, f"prepare {name}")
            tables[name] = storage.table_entry(schema, rows)
        items = splits.items if splits.items is not None else ITEMS.empty_table()
        tables["items"] = storage.table_entry(ITEMS, storage.write_table(items, object_store.join(out, "items"), ITEMS, "prepare items"))
        bundle = build_bundle(splits.train, config, splits.items)
        vocab = save_bundle(bundle, object_store.join(out, "vocab"))
        vocab.update({"dims": dict(bundle.dims.__dict__)})
        extra = {"stats": splits.stats}
        if source.partitions:
            extra["partitions"] = list(source.partitions)
        return {"tables": tables, "models": {"vocab": vocab}, "extra": extra}

    ensure_ray()
    return run_stage(out, "prepare", config, source.input_uris(), body,
                     params={"source": {k: v for k, v in source.__dict__.items() if k != "data_dir"}})
