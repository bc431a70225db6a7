"""Where artifacts live, below any notion of a stage: URIs of a local folder or
`s3://bucket/prefix`, the pyarrow filesystem behind each, and whole-file and whole-folder I/O
(bytes, JSON, model folders). `tasks.storage` builds stage folders, manifests and
contract-checked tables on top of it.

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
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from goalrank_core.errors import GoalRankInputError


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
