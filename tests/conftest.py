"""Shared fixtures: one local Ray per session, one moto S3 server per session (by PID)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

# Fake credentials for the loopback S3 server; tests grep for them to prove they never leak.
FAKE_KEY_ID = "AKIAGOALRANKTESTKEY0"
FAKE_SECRET = "goalrank-test-secret-do-not-log-0123456789"
S3_BUCKET = "goalrank-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not listen on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 at a free port with bucket `goalrank-test`; the AWS_*
    variables point at it for the whole session (set before Ray starts, so Ray workers
    inherit them). Stopped by PID at teardown."""
    pytest.importorskip("moto")
    pytest.importorskip("boto3")
    port = _free_port()
    exe = Path(sys.executable).with_name("moto_server")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "moto.server"]
    proc = subprocess.Popen(cmd + ["-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
                                            "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN")}
    try:
        _wait_port(port, proc)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update({
            "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint,
        })
        os.environ.pop("AWS_SESSION_TOKEN", None)
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=S3_BUCKET)
        yield {"endpoint": endpoint, "bucket": S3_BUCKET, "client": client, "pid": proc.pid,
               "key_id": FAKE_KEY_ID, "secret": FAKE_SECRET}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_storage(s3_server):
    """A fresh `s3://goalrank-test/<unique>` storage URI on the session's S3 server."""
    return f"s3://{s3_server['bucket']}/t-{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """A local Ray started once with 2 logical CPUs and its temp dir under /tmp (short, as
    Ray's socket paths must stay under 107 bytes). Depends on `s3_server` so that Ray's
    workers inherit the S3 settings."""
    pytest.importorskip("ray")
    from tasks.ray_runtime import ensure_ray, shutdown

    tmp = tempfile.mkdtemp(prefix="grray-", dir="/tmp")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    resources = ensure_ray(num_cpus=2, temp_dir=tmp)
    yield resources
    shutdown()
    subprocess.run(["rm", "-rf", tmp], check=False)


@pytest.fixture(autouse=True)
def _prefect_console_follows_capture():
    """Prefect's console handler is built with the sys.stderr of the moment its logging is set
    up, which inside pytest is one test's capture stream, closed when that test ends. A later
    test's flow logging then wrote to a closed file, and with `log_prints` the error report
    went through print again (RecursionError). Point the handlers at this test's stream."""
    import logging

    handlers = sys.modules.get("prefect.logging.handlers")
    if handlers is not None:
        loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                           if isinstance(lg, logging.Logger)]
        for h in {h for lg in loggers for h in lg.handlers if isinstance(h, handlers.PrefectConsoleHandler)}:
            with h.lock:  # not setStream(): that flushes the old, closed stream
                h.stream = sys.stderr
            h.console.file = sys.stderr
    yield


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    """One temporary Prefect server (and database) for the session, under a temp PREFECT_HOME;
    shared by every test that runs flows or tasks (starting one costs 15-30 s here)."""
    from prefect.settings import PREFECT_HOME, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_SERVER_ANALYTICS_ENABLED: False}):
        with prefect_test_harness(server_startup_timeout=120):
            yield home


@pytest.fixture(scope="session")
def flow_world(tmp_path_factory, prefect_harness, ray_session):
    """One store, MLflow registry and two days of Plackett-Luce-logged tiny impressions (L = 2
    of N = 4, propensities logged) for the whole-flow tests of test_flow.py and test_flow_ope.py:
    a daily flow run costs about two minutes on 2 cores, so those modules share the first one
    (`flow_day_one`) instead of training twice."""
    from flow_helpers import synth_source

    # One Ray Data actor per pool: on 2 cores a second one only adds start-up time and memory.
    saved = os.environ.get("GOALRANK_DATA_ACTORS")
    os.environ["GOALRANK_DATA_ACTORS"] = "1"
    root = tmp_path_factory.mktemp("flow")
    day1, items = synth_source(root / "day1", logger="plackett-luce", n_candidates=4, slate_len=2)
    day2, _ = synth_source(root / "day2", seed=1, logger="plackett-luce", n_candidates=4, slate_len=2)
    yield {"day1": str(day1), "day2": str(day2), "items": str(items), "root": root,
           "storage": str(root / "storage"), "tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
           "experiment": "flow-test", "model_name": "goalrank-flow"}
    if saved is None:
        os.environ.pop("GOALRANK_DATA_ACTORS", None)
    else:
        os.environ["GOALRANK_DATA_ACTORS"] = saved


@pytest.fixture(scope="session")
def flow_day_one(flow_world):
    """The shared store's first run (`day-1`, promotion by slate SNIPS): registers version 1 and
    makes it champion. A fixture, so each test that needs a champion has it when run alone."""
    from flow_helpers import run_daily

    return run_daily(flow_world, flow_world["day1"], "day-1")
