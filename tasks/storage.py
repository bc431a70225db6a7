"""Stage storage: the per-run stage folders, the `_manifest.json` that makes a stage complete,
Parquet tables validated against their stage contract on write and on read, and running a stage
(`run_stage`: reuse a complete output of the same fingerprint, else redo it). Files and URIs
underneath are `tasks.object_store`'s.

Layout: `{storage}/{dataset}/{run_id}/{stage}/{table}/part-*.parquet` plus
`{storage}/{dataset}/{run_id}/{stage}/_manifest.json`, written last. A reader refuses a
table whose stage folder has no manifest, or whose manifest does not list it, so a
half-written stage is never read (docs/architecture.md, "Storage layout").
"""
from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from goalrank_core.schemas import conform
from tasks.memory import PeakMemory
from tasks.object_store import StorageError, delete, exists, filesystem, join, normalize, parent, read_json, write_json

MANIFEST = "_manifest.json"
_MANIFEST_SEARCH_DEPTH = 3  # a table lies at most this many folders below its stage folder


# ---------------------------------------------------------------- stage folders


def stage_uri(storage: str, dataset: str, run_id: str, stage: str) -> str:
    """`{storage}/{dataset}/{run_id}/{stage}` (the per-run, per-stage folder)."""
    for name, value in (("dataset", dataset), ("run_id", run_id), ("stage", stage)):
        if not value or "/" in value or value in (".", "..") or value.startswith("_"):
            raise StorageError(f"{name} '{value}' must be a non-empty name without '/' and not starting with '_'")
    return join(normalize(storage), dataset, run_id, stage)


# ---------------------------------------------------------------- manifests


def manifest_uri(stage: str) -> str:
    return join(stage, MANIFEST)


def read_manifest(stage: str) -> dict | None:
    """The stage's manifest, or None when it has none (incomplete or never run)."""
    fs, path = filesystem(manifest_uri(stage))
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    return read_json(manifest_uri(stage))


def find_stage(uri: str) -> tuple[str, dict] | None:
    """The stage folder holding `uri` (itself or up to 3 levels up) and its manifest."""
    here = normalize(uri)
    for _ in range(_MANIFEST_SEARCH_DEPTH + 1):
        m = read_manifest(here)
        if m is not None:
            return here, m
        up = parent(here)
        if up == here:
            break
        here = up
    return None


def require_complete(uri: str, what: str) -> tuple[str, dict]:
    """(stage folder, manifest) for `uri`, or StorageError if the stage is incomplete."""
    found = find_stage(uri)
    if found is None:
        raise StorageError(f"{what}: {uri} has no {MANIFEST} (stage incomplete or never run); refusing to read it")
    return found


# ---------------------------------------------------------------- tables


def write_table(table: pa.Table, uri: str, schema: pa.Schema, what: str) -> int:
    """Validate `table` against `schema`, then write it as the single part of folder `uri`
    (replacing earlier parts). Returns the row count."""
    table = conform(table, schema, what)
    delete(uri)
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pq.write_table(table, f"{path}/part-00000.parquet", filesystem=fs)
    return table.num_rows


def read_table(uri: str, schema: pa.Schema | None, what: str, columns: list[str] | None = None) -> pa.Table:
    """Read the Parquet folder `uri` of a completed stage and validate it against `schema`
    (the stage's contract, or those of its columns that `columns` selects; None skips
    validation, for side tables without a contract such as a vocabulary)."""
    stage, manifest = require_complete(uri, what)
    rel = normalize(uri)[len(stage):].strip("/")
    tables = manifest.get("tables", {})
    if rel and rel not in tables:
        raise StorageError(f"{what}: {uri} is not a table of the stage at {stage} (known: {sorted(tables)})")
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise StorageError(f"{what}: {uri} is listed in the manifest but missing")
    table = pq.read_table(path, filesystem=fs, partitioning=None, columns=columns)
    if schema is not None:  # a column subset is checked against those columns of the contract
        table = conform(table, schema if columns is None else pa.schema([schema.field(c) for c in columns]), what)
    expected = tables.get(rel, {}).get("rows")
    if expected is not None and columns is None and table.num_rows != expected:
        raise StorageError(f"{what}: {uri} has {table.num_rows} rows, its manifest says {expected}")
    return table


def table_entry(schema: pa.Schema | None, rows: int) -> dict:
    """What a manifest records about one table."""
    return {"rows": int(rows), "schema": {f.name: str(f.type) for f in schema} if schema is not None else None}


# ---------------------------------------------------------------- provenance


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`git:<sha>[-dirty]` of the checkout this code runs from, else the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"git:{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"pkg:{version('goalrank')}"
        except PackageNotFoundError:
            return "unknown"


# The packages whose code computes stage outputs: a change to any of their `*.py` files redoes
# every stage (the flows, the CLI, docs and tests do not).
CODE_PACKAGES = ("goalrank_core", "tasks")


def source_hash(root: str | Path | None = None) -> str:
    """A digest of the `*.py` files of CODE_PACKAGES under `root` (default: the checkout or
    install this code runs from, hashed once per process): their paths relative to `root`,
    sorted, and their contents. Not the git sha, so a commit that only touches docs changes
    nothing."""
    if root is None:
        return _own_source_hash()
    root = Path(root)
    h = hashlib.sha256()
    files = sorted(p.relative_to(root).as_posix() for pkg in CODE_PACKAGES for p in (root / pkg).rglob("*.py"))
    for rel in files:
        h.update(rel.encode() + b"\0" + hashlib.sha256((root / rel).read_bytes()).digest())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def _own_source_hash() -> str:
    return source_hash(Path(__file__).resolve().parent.parent)


def fingerprint(uri: str | None) -> str | None:
    """What identifies an input's content: a completed stage's own fingerprint, or for raw
    data (impressions, a data folder) a digest of its file names, sizes and times."""
    if uri is None:
        return None
    found = find_stage(uri)
    if found is not None and found[1].get("fingerprint"):
        stage, manifest = found
        rel = normalize(uri)[len(stage):].strip("/")
        return manifest["fingerprint"] + (f":{rel}" if rel else "")
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"input {uri} does not exist")
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(path, recursive=True))
    h = hashlib.sha256()
    for i in sorted(infos, key=lambda i: i.path):
        if i.type == pafs.FileType.File:
            h.update(f"{i.path[len(path):]}|{i.size}|{i.mtime_ns}\n".encode())
    return "raw:" + h.hexdigest()[:16]


# ---------------------------------------------------------------- running a stage


@dataclass
class StageResult:
    """What every stage returns: where its output is, its manifest, and whether a complete
    earlier output was reused."""

    uri: str
    manifest: dict
    skipped: bool


def stage_fingerprint(stage: str, config: Any, inputs: dict[str, str | None],
                      params: dict | None = None) -> tuple[str, dict]:
    """(fingerprint, recorded inputs) of a stage run: equal fingerprints mean the same stage,
    config hash, parameters, input contents and code (`source_hash`), so the earlier output
    can be reused."""
    ins = {k: {"uri": normalize(v) if v else None, "fingerprint": fingerprint(v)} for k, v in sorted(inputs.items())}
    key = json.dumps({"stage": stage, "config_hash": config.hash(), "inputs": ins, "params": dict(params or {}),
                      "code": source_hash()}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:16], ins


def run_stage(
    out: str,
    stage: str,
    config: Any,
    inputs: dict[str, str | None],
    body: Callable[[str], dict],
    params: dict | None = None,
) -> StageResult:
    """Run `body(out)` unless `out` already holds a complete result of the same stage, config
    hash, parameters, inputs and code (the `*.py` of goalrank_core/ and tasks/).

    `body` writes tables/models under `out` and returns `{"tables": {rel: table_entry}, ...}`;
    the keys of "extra" and any other keys are copied into the manifest, "memory" is merged
    with the measured peaks. A previous manifest that
    does not match is deleted first, then the folder, so a crash mid-way leaves a folder
    without a manifest: never read, and cleared on the next try.
    """
    out = normalize(out)
    params = dict(params or {})
    config_hash = config.hash()
    fp, ins = stage_fingerprint(stage, config, inputs, params)

    existing = read_manifest(out)
    if existing is not None and existing.get("fingerprint") == fp:
        print(f"[{stage}] skipped: {out} is complete (config {config_hash})", flush=True)
        return StageResult(out, existing, True)
    if existing is not None:
        delete(manifest_uri(out))  # first: from here on nothing in `out` is readable
        print(f"[{stage}] {out} holds another config, other inputs or older code: redoing it", flush=True)
    elif exists(out):
        print(f"[{stage}] {out} has no manifest (interrupted run): clearing and redoing it", flush=True)
    delete(out)
    # No folder is created up front: writers create what they write, so a body that fails on
    # bad input before writing leaves nothing in storage (issue 8).

    t0 = time.time()
    with PeakMemory() as mem:
        produced = dict(body(out) or {})
    wall = time.time() - t0
    memory = mem.result()
    memory.update(produced.pop("memory", {}) or {})
    manifest = {
        "stage": stage,
        "uri": out,
        "fingerprint": fp,
        "config_hash": config_hash,
        "config": config.to_dict(),
        "params": params,
        "inputs": ins,
        "code_version": code_version(),
        "tables": produced.pop("tables", {}),
        "started_at": datetime.fromtimestamp(t0, timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall, 3),
        "memory": memory,
    }
    manifest.update(produced.pop("extra", {}) or {})
    manifest.update(produced)
    write_json(manifest_uri(out), manifest)  # last: the stage is now complete
    rows = ", ".join(f"{k}={v['rows']}" for k, v in manifest["tables"].items() if isinstance(v, dict) and "rows" in v)
    workers = memory.get("ray_workers_peak_rss_mb")
    print(f"[{stage}] done in {wall:.1f}s; peak driver {memory['driver_peak_rss_mb']:.0f} MB, "
          f"ray workers {'n/a' if workers is None else f'{workers:.0f} MB'}; {rows}", flush=True)
    return StageResult(out, manifest, False)
