"""End to end against real servers (issue 6): the local stack up on free loopback ports, the
daily flow run through the Prefect server with storage on S3, MLflow through its server and Ray
through its head; every claim checked through each service's own API; then everything down.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from infra.stack import LocalStack, StackPorts
from flow_helpers import TINY_OVERRIDES, synth_source

ROOT = Path(__file__).resolve().parent.parent
GOALRANK = [sys.executable, "-m", "goalrank.cli"]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _client_env(stack_env: dict[str, str], tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "PREFECT_", "RAY_ADDRESS", "GOALRANK_STORAGE"))}
    env.update(stack_env)
    env.update(RAY_AUTH_MODE="disabled", GOALRANK_DATA_ACTORS="1", PYTHONPATH=str(ROOT))
    return env


def _flow_runs(api_url: str):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs()

    with temporary_settings({PREFECT_API_URL: api_url}):
        return asyncio.run(read())


@pytest.mark.e2e
@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_daily_flow_through_real_servers(tmp_path):
    imp, items = synth_source(tmp_path / "data")
    stack = LocalStack(tmp_path / "stack", StackPorts.free(), ray_num_cpus=2)
    pids: list[int] = []
    try:
        stack.up()
        pids = [p for ps in stack.pids().values() for p in ps]
        env = _client_env(stack.env(), tmp_path)
        storage = env["GOALRANK_STORAGE"]
        assert storage.startswith("s3://")
        bucket, _, prefix = storage[len("s3://"):].partition("/")

        sets = [f"--set={k}={v}" for k, v in TINY_OVERRIDES.items()]
        run = subprocess.run(GOALRANK + ["run", "--impressions", str(imp), "--items", str(items),
                                         "--run-id", "e2e-1", *sets],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=800)
        assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:])

        # Prefect: the flow run is COMPLETED on the server.
        runs = [r for r in _flow_runs(env["PREFECT_API_URL"]) if r.name and r.flow_id]
        assert runs, "no flow run recorded on the Prefect server"
        assert all(r.state.type.value == "COMPLETED" for r in runs), [(r.name, r.state) for r in runs]

        # S3: every stage's manifest and Parquet parts, listed with boto3 from the bucket.
        import boto3

        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_DEFAULT_REGION"],
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
        manifests = [k for k in keys if k.endswith("_manifest.json")]
        stages = {k.split("/")[-2] for k in manifests}
        expected = {"prepare", "policies", "reward_model", "candidates_r1", "scored_r1", "generator_r1", "evaluate",
                    "registry"}  # one round (TINY_OVERRIDES); the run record last
        assert expected <= stages, sorted(manifests)
        assert any(k.endswith(".parquet") and "/e2e-1/" in k for k in keys)

        # MLflow: the version, its challenger and champion aliases, and its artifact in S3.
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        versions = client.search_model_versions("name='goalrank'")
        assert len(versions) == 1
        model = client.get_registered_model("goalrank")
        assert model.aliases.get("challenger") == versions[0].version
        assert model.aliases.get("champion") == versions[0].version
        mlflow_keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="goalrank-mlflow")
                       for o in page.get("Contents", [])]
        assert any(k.endswith("MLmodel") for k in mlflow_keys), mlflow_keys[:20]

        # The champion ranks: valid lists for every request.
        out = tmp_path / "ranked.parquet"
        rank = subprocess.run(GOALRANK + ["rank", "--model", "models:/goalrank@champion", "--requests", str(imp),
                                          "--out", str(out)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert rank.returncode == 0, rank.stderr[-3000:]
        ranked = pq.read_table(out).to_pylist()
        requests = {r["request_id"]: r for r in pq.read_table(imp).to_pylist()}
        assert len(ranked) == len(requests)
        for row in ranked:
            cands = set(requests[row["request_id"]]["candidates"])
            assert len(row["ranked"]) == TINY_OVERRIDES["protocol.slate_len"]
            assert len(set(row["ranked"])) == len(row["ranked"]) and set(row["ranked"]) <= cands
    finally:
        stack.down()
    assert pids and not any(_alive(p) for p in pids), [p for p in pids if _alive(p)]
