"""Storage layer: URIs, validated tables, manifests and the run/skip/redo rules, on the local
disk and on a moto S3 server on loopback."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from goalrank_core.config import GoalRankConfig
from goalrank_core.schemas import RANKED, SchemaError
from tasks import object_store, storage
from tasks.object_store import StorageError
from tasks.storage import run_stage, stage_uri


def _ranked(n: int = 5) -> pa.Table:
    return pa.table({"request_id": [f"r{i}" for i in range(n)], "ranked": [[i, i + 1, i + 2] for i in range(n)]})


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "artifacts")
    return request.getfixturevalue("s3_storage")


def _writer(table: pa.Table, seen: dict | None = None):
    def body(out: str) -> dict:
        if seen is not None:  # the manifest must not exist while the stage writes
            seen["manifest_during_body"] = storage.read_manifest(out)
        rows = storage.write_table(table, object_store.join(out, "ranked"), RANKED, "test ranked")
        return {"tables": {"ranked": storage.table_entry(RANKED, rows)}}

    return body


def _counted(calls: list[str]):
    """A stage body writing `_ranked()` that appends its output URI to `calls`."""
    def body(o):
        calls.append(o)
        return _writer(_ranked())(o)

    return body


def test_stage_uri_layout_and_bad_names(tmp_path):
    assert stage_uri("s3://b/p/", "ml-100k", "2024-01-02", "prepare") == "s3://b/p/ml-100k/2024-01-02/prepare"
    local = stage_uri(str(tmp_path / "a"), "ds", "run1", "score")
    assert local == str(tmp_path / "a" / "ds" / "run1" / "score")
    for bad in ("", "a/b", "..", "_tmp"):
        with pytest.raises(StorageError, match="stage"):
            stage_uri(str(tmp_path), "ds", "run", bad)


def test_uris_with_credentials_or_other_schemes_are_refused():
    with pytest.raises(StorageError, match="credentials"):
        object_store.filesystem("s3://KEY:SECRET@bucket/prefix")
    with pytest.raises(StorageError, match="not supported"):
        object_store.filesystem("gs://bucket/prefix")


def test_s3_filesystem_follows_the_endpoint_variable(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    fs, path = object_store.filesystem("s3://bucket/a/b/")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/a/b"
    opts = fs.__reduce__()[1][0]  # the options the filesystem was built with
    assert opts["endpoint_override"] == "127.0.0.1:9" and opts["scheme"] == "http"
    assert opts["access_key"] == "k" and opts["region"] == "us-east-1"


def test_table_round_trip_and_manifest_gate(root):
    out = stage_uri(root, "ds", "run", "stage")
    res = run_stage(out, "stage", GoalRankConfig(), {}, _writer(_ranked()))
    got = storage.read_table(object_store.join(out, "ranked"), RANKED, "ranked")
    assert got.equals(_ranked().cast(RANKED))
    assert res.manifest["tables"]["ranked"]["rows"] == 5 and not res.skipped
    # Without the manifest the same bytes are refused.
    object_store.delete(storage.manifest_uri(out))
    with pytest.raises(StorageError, match="no _manifest.json"):
        storage.read_table(object_store.join(out, "ranked"), RANKED, "ranked")


def test_read_refuses_a_table_the_manifest_does_not_list(tmp_path):
    out = stage_uri(str(tmp_path), "ds", "run", "stage")
    run_stage(out, "stage", GoalRankConfig(), {}, _writer(_ranked()))
    storage.write_table(_ranked(2), object_store.join(out, "stray"), RANKED, "stray")
    with pytest.raises(StorageError, match="not a table of the stage"):
        storage.read_table(object_store.join(out, "stray"), RANKED, "stray")


def test_read_checks_the_contract_of_the_table_and_of_a_column_subset(tmp_path):
    """A stage output rewritten by other code (here: `ranked` as strings) is refused on read,
    for the whole table and for a subset of its columns, with the column named."""
    import pyarrow.parquet as pq

    from goalrank_core.schemas import SchemaError

    out = stage_uri(str(tmp_path), "ds", "run", "stage")
    run_stage(out, "stage", GoalRankConfig(), {}, _writer(_ranked()))
    part = next((tmp_path / "ds" / "run" / "stage" / "ranked").glob("*.parquet"))
    t = pq.read_table(part)
    pq.write_table(t.set_column(1, "ranked", pa.array([str(v) for v in t.column("ranked").to_pylist()])), part)
    uri = object_store.join(out, "ranked")
    with pytest.raises(SchemaError, match="column 'ranked' has type string"):
        storage.read_table(uri, RANKED, "ranked")
    with pytest.raises(SchemaError, match="column 'ranked' has type string"):
        storage.read_table(uri, RANKED, "ranked", columns=["ranked"])
    assert storage.read_table(uri, RANKED, "ranked", columns=["request_id"]).num_rows == 5


def test_write_table_validates_before_writing(tmp_path):
    bad = _ranked().append_column("score", pa.array([0.1] * 5))
    target = str(tmp_path / "x" / "ranked")
    with pytest.raises(SchemaError, match="unexpected column.*score"):
        storage.write_table(bad, target, RANKED, "bad ranked")
    assert not object_store.exists(target)


def test_manifest_is_written_last_and_holds_provenance(tmp_path):
    seen: dict = {}
    inp = tmp_path / "raw.parquet"
    inp.write_bytes(b"not really parquet, only fingerprinted")
    out = stage_uri(str(tmp_path), "ds", "run", "stage")
    res = run_stage(out, "stage", GoalRankConfig(), {"impressions": str(inp)}, _writer(_ranked(), seen))
    assert seen["manifest_during_body"] is None
    m = storage.read_manifest(out)
    assert m == res.manifest
    assert m["config_hash"] == GoalRankConfig().hash()
    assert m["inputs"]["impressions"]["uri"] == str(inp) and m["inputs"]["impressions"]["fingerprint"].startswith("raw:")
    assert m["code_version"].startswith(("git:", "pkg:"))
    assert m["wall_s"] >= 0 and m["memory"]["driver_peak_rss_mb"] > 10
    assert m["tables"]["ranked"]["schema"] == {"request_id": "string", "ranked": "list<item: int64>"}


def test_rerun_skips_and_changes_redo(root):
    out = stage_uri(root, "ds", "run", "stage")
    calls: list[str] = []
    body = _counted(calls)
    cfg = GoalRankConfig()
    first = run_stage(out, "stage", cfg, {}, body)
    again = run_stage(out, "stage", cfg, {}, body)
    assert again.skipped and again.manifest == first.manifest and len(calls) == 1
    # Another config hash, other params: redone.
    assert not run_stage(out, "stage", cfg.override({"group.size": 7}), {}, body).skipped
    assert not run_stage(out, "stage", cfg.override({"group.size": 7}), {}, body, params={"round": 1}).skipped
    assert len(calls) == 3


def test_upstream_redo_invalidates_downstream(tmp_path):
    cfg = GoalRankConfig()
    up = stage_uri(str(tmp_path), "ds", "run", "up")
    down = stage_uri(str(tmp_path), "ds", "run", "down")
    run_stage(up, "up", cfg, {}, _writer(_ranked()))
    assert not run_stage(down, "down", cfg, {"up": up}, _writer(_ranked())).skipped
    assert run_stage(down, "down", cfg, {"up": up}, _writer(_ranked())).skipped
    # Same URI, but the upstream stage was redone with another config: downstream reruns.
    run_stage(up, "up", cfg, {}, _writer(_ranked()), params={"v": 2})
    assert not run_stage(down, "down", cfg, {"up": up}, _writer(_ranked())).skipped


def test_folder_without_manifest_is_cleared_and_redone(root):
    out = stage_uri(root, "ds", "run", "stage")
    # An interrupted earlier attempt: parts written, no manifest.
    storage.write_table(_ranked(3), object_store.join(out, "ranked"), RANKED, "partial")
    object_store.write_bytes(object_store.join(out, "leftover.bin"), b"junk")
    res = run_stage(out, "stage", GoalRankConfig(), {}, _writer(_ranked(5)))
    assert not res.skipped
    assert storage.read_table(object_store.join(out, "ranked"), RANKED, "ranked").num_rows == 5
    assert "leftover.bin" not in object_store.list_files(out)


def test_failing_body_leaves_no_manifest(tmp_path):
    out = stage_uri(str(tmp_path), "ds", "run", "stage")
    run_stage(out, "stage", GoalRankConfig(), {}, _writer(_ranked()))

    def crash(o):
        storage.write_table(_ranked(1), object_store.join(o, "ranked"), RANKED, "half")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        run_stage(out, "stage", GoalRankConfig().override({"train.seed": 1}), {}, crash)
    assert storage.read_manifest(out) is None  # the old manifest went first
    with pytest.raises(StorageError):
        storage.read_table(object_store.join(out, "ranked"), RANKED, "ranked")


def test_model_folder_round_trip(root, tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(bytes(range(256)) * 10)
    (src / "sub" / "config.json").write_text(json.dumps({"d": 4}))
    uri = object_store.join(root, "models", "m1")
    object_store.upload_dir(src, uri)
    assert object_store.list_files(uri) == ["sub/config.json", "weights.bin"]
    back = object_store.download_dir(uri, tmp_path / "back")
    assert (back / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()
    assert json.loads((back / "sub" / "config.json").read_text()) == {"d": 4}


@pytest.mark.s3
def test_s3_bytes_go_through_the_server_and_no_secret_is_stored(s3_server, s3_storage):
    out = stage_uri(s3_storage, "ds", "run", "stage")
    run_stage(out, "stage", GoalRankConfig(), {}, _writer(_ranked()))
    prefix = out[len(f"s3://{s3_server['bucket']}/"):]
    objs = s3_server["client"].list_objects_v2(Bucket=s3_server["bucket"], Prefix=prefix)["Contents"]
    keys = sorted(o["Key"][len(prefix) + 1:] for o in objs)
    assert "_manifest.json" in keys and any(k.startswith("ranked/") and k.endswith(".parquet") for k in keys)
    body = s3_server["client"].get_object(Bucket=s3_server["bucket"], Key=f"{prefix}/_manifest.json")["Body"].read()
    assert s3_server["secret"].encode() not in body and s3_server["key_id"].encode() not in body


@pytest.mark.ray
@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_dataset_keeps_input_order_across_actors_and_in_each_part(ray_session, tmp_path, s3_storage, where):
    """2 actors finishing batches out of order, many blocks joined into parts: the parts, read
    back, hold the rows in input order (Ray's Parquet writer had reordered blocks inside a
    part), and the folder holds nothing else (a part from an earlier write is removed)."""
    import ray.data

    from tasks.stage_io import write_dataset

    class Jitter:  # defined here: Ray pickles it by value (workers cannot import test modules)
        """Returns its batch after a random pause, so batches finish out of order."""

        def __call__(self, batch: pa.Table) -> pa.Table:
            import random
            import time

            time.sleep(random.random() * 0.02)
            return batch

    root = str(tmp_path) if where == "local" else s3_storage
    uri = object_store.join(root, "ordered")
    schema = pa.schema([pa.field("x", pa.int64(), nullable=False)])
    storage.write_table(pa.table({"x": pa.array([-1], pa.int64())}, schema=schema), object_store.join(uri, "stale"),
                        schema, "stale")
    ds = ray.data.from_arrow(pa.table({"x": pa.array(range(6000), pa.int64())})).repartition(60)
    ds = ds.map_batches(Jitter, batch_size=100, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=2),
                        num_cpus=0.5)
    assert write_dataset(ds, uri, schema, "ordered", min_rows_per_file=2500) == 6000
    files = sorted(f for f in object_store.list_files(uri) if f.endswith(".parquet"))
    assert len(files) >= 2 and all(f.startswith("part-") for f in files)  # no stale part left
    fs, path = object_store.filesystem(uri)
    parts = [pq.read_table(f"{path}/{f}", filesystem=fs) for f in files]  # in name order, as readers list them
    assert pa.concat_tables(parts).column("x").to_pylist() == list(range(6000))


@pytest.mark.ray
def test_in_order_follows_goalrank_data_ordered(ray_session, monkeypatch):
    import ray.data

    from tasks.stage_io import in_order

    monkeypatch.delenv("GOALRANK_DATA_ORDERED", raising=False)
    assert in_order(ray.data.range(3)).context.execution_options.preserve_order is True
    monkeypatch.setenv("GOALRANK_DATA_ORDERED", "0")
    assert in_order(ray.data.range(3)).context.execution_options.preserve_order is False


def test_code_change_redoes_stage_doc_change_skips(tmp_path, monkeypatch):
    """Issue 17: the fingerprint covers the *.py of goalrank_core/ and tasks/ (a copy of them
    here), by content and relative path; a doc next to them changes nothing."""
    import shutil
    from pathlib import Path

    repo = Path(storage.__file__).resolve().parent.parent
    src = tmp_path / "src"
    for pkg in storage.CODE_PACKAGES:
        shutil.copytree(repo / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    hash_of = storage.source_hash
    assert hash_of(src) == hash_of()  # relative paths and contents only: the copy hashes as the checkout
    monkeypatch.setattr(storage, "source_hash", lambda root=None: hash_of(src))

    out = stage_uri(str(tmp_path / "artifacts"), "ds", "run", "stage")
    calls: list[str] = []
    body = _counted(calls)
    cfg = GoalRankConfig()
    first = run_stage(out, "stage", cfg, {}, body)
    assert not first.skipped and run_stage(out, "stage", cfg, {}, body).skipped
    # Only docs changed (a new .md, an edited non-.py file): skipped, same fingerprint.
    (src / "goalrank_core" / "NOTES.md").write_text("a note\n")
    (src / "README.md").write_text("docs only\n")
    again = run_stage(out, "stage", cfg, {}, body)
    assert again.skipped and again.manifest["fingerprint"] == first.manifest["fingerprint"] and len(calls) == 1
    # A source file changed: redone, with another fingerprint; then skipped again.
    edited = src / "tasks" / "storage.py"
    edited.write_text(edited.read_text() + "\n# a code fix\n")
    redone = run_stage(out, "stage", cfg, {}, body)
    assert not redone.skipped and redone.manifest["fingerprint"] != first.manifest["fingerprint"]
    assert run_stage(out, "stage", cfg, {}, body).skipped and len(calls) == 2
    # A new source file counts too.
    (src / "goalrank_core" / "extra.py").write_text("X = 1\n")
    assert not run_stage(out, "stage", cfg, {}, body).skipped and len(calls) == 3
