"""Artifact storage: a local folder or `s3://bucket/prefix`, Parquet tables validated against
their stage contract, model folders, and the `_manifest.json` that makes a stage complete.

Layout: `{storage}/{dataset}/{run_id}/{stage}/{table}/part-*.parquet` plus
`{storage}/{dataset}/{run_id}/{stage}/_manifest.json`, written last. A reader refuses a
table whose stage folder has no manifest, or whose manifest does not list it, so a
half-written stage is never read (docs/architecture.md, "Storage layout").

S3 settings come from the standard AWS environment variables (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION / AWS_REGION,
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL). Credentials never enter a URI, a manifest or a log.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from goalrank_core.errors import GoalRankInputError
from goalrank_core.schemas import conform
from tasks._memory import PeakMemory

MANIFEST = "_manifest.json"
_MANIFEST_SEARCH_DEPTH = 3  # a table lies at most this many folders below its stage folder


class StorageError(GoalRankInputError):
    """A storage URI is malformed, or a stage folder is incomplete (no manifest)."""


# ---------------------------------------------------------------- URIs and filesystems


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """`join("s3://b/p", "x", "y") -> "s3://b/p/x/y"`; local paths stay local."""
    out = uri.rstrip("/")
    for p in parts:
        p = str(p).strip("/")
        if p:
            out = f"{out}/{p}"
    return out


def parent(uri: str) -> str:
    if is_s3(uri):
        head, _, _ = uri.rstrip("/").rpartition("/")
        return head if len(head) > len("s3:/") else uri
    return str(Path(uri).parent)


def normalize(uri: str) -> str:
    """Local paths become absolute (Ray workers may run in another folder); S3 URIs are
    checked for embedded credentials, which would leak into manifests."""
    if not uri:
        raise StorageError("storage URI is empty")
    if "://" in uri and not is_s3(uri):
        raise StorageError(f"storage URI '{uri.split('://')[0]}://...' is not supported; use a local path or s3://bucket/prefix")
    if is_s3(uri):
        parts = urlsplit(uri)
        if "@" in parts.netloc or parts.query:
            raise StorageError("storage URI must not embed credentials or a query; set the AWS_* environment variables instead")
        if not parts.netloc:
            raise StorageError(f"storage URI '{uri}' has no bucket")
        return uri.rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def _endpoint() -> tuple[str | None, str]:
    """(host[:port], scheme) from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, if set."""
    raw = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not raw:
        return None, "https"
    if "://" not in raw:
        return raw.rstrip("/"), "https"
    parts = urlsplit(raw)
    return parts.netloc, parts.scheme or "https"


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, scheme: str, region: str | None, key_id: str | None,
                   secret_digest: str | None, max_attempts: int = 6) -> pafs.S3FileSystem:
    # The secret is looked up again here rather than passed in, so it is not part of the
    # cache key (only a digest is) and never shows in a repr or a traceback's arguments.
    kwargs: dict[str, Any] = {
        "scheme": scheme,
        # Transient outages (issue 8): retry with backoff inside the client first.
        # (6 attempts ride out about 20-40 s of refused connections; beyond that the Prefect
        # task's own retries take over.)
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts),
        "connect_timeout": 5.0,
        "request_timeout": 60.0,
    }
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if region:
        kwargs["region"] = region
    if key_id:
        kwargs["access_key"] = key_id
        kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        token = os.environ.get("AWS_SESSION_TOKEN")
        if token:
            kwargs["session_token"] = token
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem configured from the AWS environment variables."""
    endpoint, scheme = _endpoint()
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    key_id = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    digest = hashlib.sha256(secret.encode()).hexdigest() if secret else None
    attempts = int(os.environ.get("GOALRANK_S3_MAX_ATTEMPTS", "6"))
    if attempts < 1:
        raise StorageError(f"GOALRANK_S3_MAX_ATTEMPTS must be >= 1, got {attempts}")
    return _s3_filesystem(endpoint, scheme, region, key_id, digest, attempts)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (pyarrow filesystem, path inside it). S3 paths come back as `bucket/key`."""
    uri = normalize(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):]
    return pafs.LocalFileSystem(), uri


def stage_uri(storage: str, dataset: str, run_id: str, stage: str) -> str:
    """`{storage}/{dataset}/{run_id}/{stage}` (the per-run, per-stage folder)."""
    for name, value in (("dataset", dataset), ("run_id", run_id), ("stage", stage)):
        if not value or "/" in value or value in (".", "..") or value.startswith("_"):
            raise StorageError(f"{name} '{value}' must be a non-empty name without '/' and not starting with '_'")
    return join(normalize(storage), dataset, run_id, stage)


# ---------------------------------------------------------------- files and folders


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def delete(uri: str) -> None:
    """Remove a folder (or file) and everything in it; a missing one is fine."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def list_files(uri: str) -> list[str]:
    """Relative paths of every file under `uri`, sorted."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file. Locally through a temporary name and a rename, so a reader sees
    the old file or the new one; an S3 PUT is already all-or-nothing."""
    fs, path = filesystem(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy a local model folder to `uri` (local or S3), replacing what was there."""
    delete(uri)
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(Path(local_dir).resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | os.PathLike) -> Path:
    """Copy the folder at `uri` into `local_dir` (created) and return it."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise StorageError(f"{uri}: no such folder")
    local = Path(local_dir)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local.resolve()), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


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
