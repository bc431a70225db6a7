"""The local stack against the real servers: up on free loopback ports in a temp folder, each
service checked through its own API, then down with no process left behind."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from infra.stack import LocalStack, StackError, StackPorts, listening_sockets

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name=env["AWS_DEFAULT_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def test_busy_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        ports = StackPorts.free()
        ports.s3 = s.getsockname()[1]
        stack = LocalStack(tmp_path / "stack", ports, services=("s3",))
        with pytest.raises(StackError, match="GOALRANK_STACK_S3_PORT"):
            stack.up()
    assert not (tmp_path / "stack" / "state.json").exists()


def test_ports_from_env_and_bad_values():
    assert StackPorts.from_env({"GOALRANK_STACK_PREFECT_PORT": "4999"}).prefect == 4999
    assert StackPorts.from_env({}).mlflow == StackPorts().mlflow
    with pytest.raises(StackError, match="GOALRANK_STACK_RAY_PORT"):
        StackPorts.from_env({"GOALRANK_STACK_RAY_PORT": "abc"})


def test_a_service_that_dies_at_start_takes_the_others_down(tmp_path):
    class Broken(LocalStack):
        def _argv(self, name, ray_tmp):
            if name == "mlflow":  # a server that exits at once, as a bad flag or a crash would
                return [sys.executable, "-c", "import sys; print('mlflow: cannot start'); sys.exit(3)"]
            return super()._argv(name, ray_tmp)

    stack = Broken(tmp_path / "stack", StackPorts.free(), services=("s3", "mlflow"), timeout_s=60)
    with pytest.raises(StackError, match="(?s)mlflow exited during start-up.*cannot start"):
        stack.up()
    assert stack.pids() == {} and not stack.env_file.exists() and not stack.state_file.exists()


def test_s3_only_stack_serves_buckets_and_stops(tmp_path):
    with LocalStack(tmp_path / "stack", StackPorts.free(), services=("s3",)) as stack:
        env = stack.env()
        assert set(env) >= {"AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "GOALRANK_STORAGE"}
        assert "PREFECT_API_URL" not in env and "RAY_ADDRESS" not in env
        s3 = _s3(env)
        s3.put_object(Bucket="goalrank", Key="pipeline/x", Body=b"1")
        assert [o["Key"] for o in s3.list_objects_v2(Bucket="goalrank")["Contents"]] == ["pipeline/x"]
        pids = [p for ps in stack.pids().values() for p in ps]
    assert pids and not any(_alive(p) for p in pids)


@pytest.mark.slow
@pytest.mark.s3
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_full_stack_up_healthy_through_each_api_then_down(tmp_path):
    stack = LocalStack(tmp_path / "stack", StackPorts.free(), ray_num_cpus=2)
    try:
        stack.up()
        env = stack.env()
        status = stack.status()
        assert all(s["healthy"] for s in status.values()), status

        # The env file: loopback URLs, owner-only, and what `source .stack/env` exports.
        assert stat.S_IMODE(stack.env_file.stat().st_mode) == 0o600
        assert env["PREFECT_API_URL"].startswith("http://127.0.0.1:") and env["RAY_ADDRESS"].startswith("127.0.0.1:")
        sourced = subprocess.run(["bash", "-c", f"source {stack.env_file} && env"], capture_output=True, text=True,
                                 check=True).stdout
        assert f"MLFLOW_TRACKING_URI={env['MLFLOW_TRACKING_URI']}" in sourced

        # Prefect: health and version through its REST API.
        assert _get(env["PREFECT_API_URL"] + "/health") == (200, "true")
        assert _get(env["PREFECT_API_URL"] + "/admin/version")[0] == 200

        # S3: buckets listed with boto3.
        s3 = _s3(env)
        assert {"goalrank", "goalrank-mlflow"} <= {b["Name"] for b in s3.list_buckets()["Buckets"]}

        # MLflow: health, then an artifact logged through the server lands in the S3 bucket,
        # from a client with no S3 credentials at all (the server proxies artifacts).
        assert _get(env["MLFLOW_TRACKING_URI"] + "/health")[0] == 200
        client_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        client_env["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
        code = ("import mlflow, tempfile, pathlib\n"
                "mlflow.set_experiment('stack-check')\n"
                "with mlflow.start_run() as r:\n"
                "    p = pathlib.Path(tempfile.mkdtemp()) / 'hello.txt'; p.write_text('hi')\n"
                "    mlflow.log_artifact(str(p)); mlflow.log_param('a', 1)\n"
                "print(r.info.run_id)\n")
        run = subprocess.run([sys.executable, "-c", code], env=client_env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-2000:]
        run_id = run.stdout.strip().splitlines()[-1]
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="goalrank-mlflow").get("Contents", [])]
        assert any(k.endswith(f"{run_id}/artifacts/hello.txt") for k in keys), keys

        # Ray: a driver joins the head at RAY_ADDRESS; its task reaches S3 with the
        # environment the head was started with (the driver passes no AWS variables).
        ray_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        ray_env.update({k: v for k, v in env.items() if k.startswith("RAY_")}, RAY_AUTH_MODE="disabled")
        code = ("import ray, json\n"
                "ray.init(address='auto', log_to_driver=False)\n"
                "@ray.remote(num_cpus=0.5)\n"
                "def buckets():\n"
                "    import boto3; return sorted(b['Name'] for b in boto3.client('s3').list_buckets()['Buckets'])\n"
                "print(json.dumps({'cpus': ray.cluster_resources().get('CPU'), 'buckets': ray.get(buckets.remote())}))\n")
        run = subprocess.run([sys.executable, "-c", code], env=ray_env, capture_output=True, text=True, timeout=240)
        assert run.returncode == 0, run.stderr[-2000:]
        out = json.loads(run.stdout.strip().splitlines()[-1])
        assert out["cpus"] == 2 and {"goalrank", "goalrank-mlflow"} <= set(out["buckets"])

        # Security: every listening socket of every stack process is on loopback.
        listening = stack.listening()
        assert all(listening.values()), listening
        wide = {n: [a for a in socks if a[0] not in LOOPBACK] for n, socks in listening.items()}
        assert not any(wide.values()), f"bound beyond loopback: {wide}"
        # and the stack's secret is in no log
        secret = env["AWS_SECRET_ACCESS_KEY"]
        for log in (stack.workdir / "logs").iterdir():
            assert secret not in log.read_text(errors="replace"), log

        pids = [p for ps in stack.pids().values() for p in ps]
        assert len(pids) >= 4
    finally:
        stopped = stack.down()
    assert set(pids) <= set(stopped)
    assert not [p for p in pids if _alive(p)]
    assert not stack.env_file.exists() and not stack.state_file.exists()
    assert listening_sockets(pids) == []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_local_stack_script_up_status_down(tmp_path):
    ports = StackPorts.free()
    env = {**os.environ, "GOALRANK_STACK_DIR": str(tmp_path / "stack"),
           **{f"GOALRANK_STACK_{k.upper()}_PORT": str(v) for k, v in vars(ports).items()}}
    script = str(ROOT / "infra" / "local-stack")
    try:
        up = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=400)
        assert up.returncode == 0, up.stderr[-3000:]
        assert "source" in up.stdout and (tmp_path / "stack" / "env").exists()
        st = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=120)
        assert st.returncode == 0 and st.stdout.count(" ok ") == 4, st.stdout
        again = subprocess.run([script, "up"], env=env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0  # already up: no second copy started
    finally:
        down = subprocess.run([script, "down"], env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and "stopped" in down.stdout
    st = subprocess.run([script, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert st.returncode == 3 and "no stack" in st.stdout
