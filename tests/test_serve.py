"""`goalrank serve` against a real local Prefect server: the deployment and its cron schedule
are visible through the Prefect API, and a run started through the API with parameters
completes. Both processes are started and stopped by PID."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flow_helpers import TINY_OVERRIDES, synth_source

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENT = "pytest-daily"
CRON = "15 4 * * *"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_health(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout}s: {log.read_text()[-2000:]}")


@pytest.fixture()
def prefect_server(tmp_path):
    port = _free_port()
    home = tmp_path / "prefect-server-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = tmp_path / "prefect-server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start",
                                 "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    url = f"http://127.0.0.1:{port}/api"
    try:
        _wait_health(url, proc, log)
        yield url
    finally:
        _stop(proc)


@pytest.mark.slow  # Prefect server + a whole flow run in the served process: ~3 min on 2 cores
def test_serve_registers_cron_deployment_and_runs_with_api_parameters(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    impressions, items = synth_source(tmp_path)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_HOME": str(tmp_path / "prefect-client-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GOALRANK_RAY_NUM_CPUS": "2",
           "GOALRANK_RAY_TMPDIR": f"/tmp/grray-serve-{os.getpid()}", "RAY_AUTH_MODE": "disabled",
           "GOALRANK_DATA_ACTORS": "1",
           "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-c", "import sys; from goalrank.cli import main; sys.exit(main())",
           "serve", "--name", DEPLOYMENT, "--cron", CRON, "--impressions", str(impressions), "--items", str(items),
           "--storage", str(tmp_path / "storage"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
           "--experiment", "serve-test", "--model-name", "goalrank-serve"]
    for k, v in TINY_OVERRIDES.items():
        cmd += ["--set", f"{k}={v}"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        serve = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    try:
        with temporary_settings({PREFECT_API_URL: prefect_server}):
            deployment = asyncio.run(_wait_deployment(get_client, serve, log))
            assert deployment.name == DEPLOYMENT
            (sched,) = deployment.schedules
            assert sched.schedule.cron == CRON and sched.schedule.timezone == "UTC" and sched.active
            assert deployment.parameters["impressions"] == str(impressions)
            assert deployment.parameters["overrides"]["group.size"] == TINY_OVERRIDES["group.size"]

            from prefect.deployments import run_deployment

            run = run_deployment(f"goalrank-daily/{DEPLOYMENT}",
                                 parameters={"run_id": "api-run-1", "promotion_margin": -1.0},
                                 timeout=600, poll_interval=2, as_subflow=False)
            assert run.state.is_completed(), f"{run.state}: {log.read_text()[-4000:]}"
            assert run.parameters["run_id"] == "api-run-1"
            assert run.parameters["impressions"] == str(impressions)  # deployment default kept

        from mlflow import MlflowClient

        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        champ = client.get_model_version_by_alias("goalrank-serve", "champion")
        assert champ.tags["goalrank.run_id"] == "api-run-1"
    finally:
        _stop(serve, signal.SIGINT)
    assert serve.returncode is not None


async def _wait_deployment(get_client, serve: subprocess.Popen, log: Path, timeout: float = 120):
    deadline = time.time() + timeout
    async with get_client() as client:
        while time.time() < deadline:
            if serve.poll() is not None:
                raise RuntimeError(f"goalrank serve exited {serve.returncode}: {log.read_text()[-3000:]}")
            try:
                return await client.read_deployment_by_name(f"goalrank-daily/{DEPLOYMENT}")
            except Exception:  # noqa: BLE001 - not registered yet
                await asyncio.sleep(1)
    raise RuntimeError(f"deployment not visible after {timeout}s: {log.read_text()[-3000:]}")
