"""The whole `goalrank-daily` flow on the S3 server, with fake credentials in the environment
(issue 8, slow: three flow runs, several minutes on 2 cores):

- Rerun: the same run id again redoes no stage (manifests and config hash), registers no
  second version, and leaves every stored object byte-identical.
- Determinism: a second run id with the same data, config and seed gives the same stage
  outputs (tables equal row for row, model files byte for byte) and the same metrics.
- Secrets: the fake AWS key id, secret and session token appear in no log (driver output,
  Prefect logs, Ray worker logs), no Prefect parameter or artifact, no MLflow param, tag or
  artifact, and no manifest.
"""
from __future__ import annotations

import io
import json
import os
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flow_helpers import TINY_OVERRIDES, synth_source

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3]

FAKE_TOKEN = "FwoFAKEsessionTOKEN-goalrank-test-9c1e"


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"][len(prefix):]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out


def _stage_outputs(objs: dict[str, bytes]) -> tuple[dict, dict]:
    """Parquet tables (parts of one folder concatenated, rows sorted) and other files, by path
    relative to the run folder; manifests and checkpoints left out (they hold times/URIs)."""
    tables: dict[str, list] = {}
    files = {}
    for key, data in objs.items():
        if key.endswith("_manifest.json") or "/_checkpoints/" in f"/{key}" or key.endswith("/") \
                or key.startswith("registry/"):
            continue
        if key.endswith(".parquet"):
            folder = key.rsplit("/", 1)[0]
            tables.setdefault(folder, []).extend(pq.read_table(io.BytesIO(data)).to_pylist())
        else:
            files[key] = data
    return {k: sorted(v, key=lambda r: json.dumps(r, sort_keys=True, default=str)) for k, v in tables.items()}, files


def _texts(root: Path) -> str:
    out = []
    for p in root.rglob("*"):
        if p.is_file() and p.stat().st_size < 5_000_000:
            out.append(p.read_bytes().decode("utf-8", "replace"))
    return "\n".join(out)


def test_rerun_determinism_and_no_leaked_credentials(prefect_harness, ray_session, s3_server, tmp_path, monkeypatch,
                                                     capfd):
    import ray
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    from flows.daily import goalrank_daily

    monkeypatch.setenv("AWS_SESSION_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("GOALRANK_DATA_ACTORS", "1")
    secrets = [s3_server["key_id"], s3_server["secret"], FAKE_TOKEN]
    bucket, client = s3_server["bucket"], s3_server["client"]
    prefix = f"flow-{uuid.uuid4().hex[:8]}"
    imp, items = synth_source(tmp_path / "data")
    common = dict(impressions=str(imp), items=str(items), storage=f"s3://{bucket}/{prefix}",
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="reliability", model_name="rel",
                  overrides=TINY_OVERRIDES, cold=True)

    first = goalrank_daily(run_id="a", **common)
    run_a = f"{prefix}/impressions/a/"
    objs_a = _objects(client, bucket, run_a)
    assert any(k.endswith("_manifest.json") for k in objs_a)

    # Rerun of the same run id: nothing redone, nothing registered, nothing rewritten.
    again = goalrank_daily(run_id="a", **common)
    assert all(s["skipped"] for s in again["stages"]), [(s["stage"], s["skipped"]) for s in again["stages"]]
    assert again["registered_version"] == first["registered_version"] and not again["newly_registered"]
    ml = MlflowClient(common["tracking_uri"])
    assert len(ml.search_model_versions("name = 'rel'")) == 1
    # Byte-identical, except the run record of the registry step (flows.daily: it records the
    # latest promotion decision, which a rerun makes again).
    same = lambda objs: {k: v for k, v in objs.items() if not k.startswith("registry/")}  # noqa: E731
    assert same(_objects(client, bucket, run_a)) == same(objs_a)

    # Another run id, same data/config/seed: the same outputs and metrics.
    second = goalrank_daily(run_id="b", **common)
    assert not any(s["skipped"] for s in second["stages"])
    tables_a, files_a = _stage_outputs(objs_a)
    tables_b, files_b = _stage_outputs(_objects(client, bucket, f"{prefix}/impressions/b/"))
    assert sorted(tables_a) == sorted(tables_b) and sorted(files_a) == sorted(files_b)
    differ = [k for k in tables_a if tables_a[k] != tables_b[k]] + [k for k in files_a if files_a[k] != files_b[k]]
    assert not differ, differ
    key = lambda rows: sorted((r["split"], r["policy"], r["metric"], r["value"]) for r in rows)  # noqa: E731
    assert key(first["metrics"]) == key(second["metrics"])

    # Secrets: search everything the runs left behind.
    out = capfd.readouterr()
    haystacks = {"driver output": out.out + out.err}
    haystacks["manifests"] = "\n".join(v.decode("utf-8", "replace") for k, v in
                                       _objects(client, bucket, f"{prefix}/").items() if k.endswith(".json"))
    with get_client(sync_client=True) as pc:
        runs = pc.read_flow_runs()
        haystacks["prefect parameters"] = json.dumps([r.parameters for r in runs], default=str)
        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        logs = pc.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs])))
        haystacks["prefect logs"] = "\n".join(log.message for log in logs)
        haystacks["prefect artifacts"] = json.dumps([a.data for a in pc.read_artifacts()], default=str)
    assert len(logs) > 10
    mlruns = ml.search_runs([e.experiment_id for e in ml.search_experiments()])
    haystacks["mlflow params/tags"] = json.dumps([[r.data.params, r.data.tags] for r in mlruns])
    haystacks["mlflow model versions"] = json.dumps([v.tags for v in ml.search_model_versions("name = 'rel'")])
    haystacks["mlflow artifacts"] = _texts(tmp_path / "mlartifacts") if (tmp_path / "mlartifacts").exists() else ""
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    haystacks["ray logs"] = _texts(session / "logs")
    assert mlruns and haystacks["ray logs"]
    leaks = {name: [s for s in secrets if s in text] for name, text in haystacks.items()}
    assert not any(leaks.values()), leaks
    # The credentials were really in use: the S3 client in this process holds them.
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == s3_server["secret"]
