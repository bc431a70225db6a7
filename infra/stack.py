"""The local stack: a Prefect server, an MLflow server (SQLite backend, artifacts proxied to
S3), a moto S3 server and a Ray head (plus `ray_nodes - 1` further Ray nodes joined to it),
all on 127.0.0.1, started and stopped by PID.

`infra/local-stack up|down|status` and the end-to-end tests use this one implementation:

    with LocalStack(tmp_path / "stack", StackPorts.free()) as stack:
        env = stack.env()          # PREFECT_API_URL, MLFLOW_TRACKING_URI, RAY_ADDRESS, AWS_*, ...

Each service runs in its own session (`start_new_session`), so its PID is also its session id;
`down` signals exactly those sessions and waits until no process of theirs is left. State (PIDs
with their start times, ports, timings) lives in `<workdir>/state.json`, credentials only in
`<workdir>/env` (mode 0600), logs in `<workdir>/logs/`.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

SERVICES = ("s3", "mlflow", "prefect", "ray")
BIN = Path(sys.executable).parent  # the venv's bin: prefect, mlflow, moto_server, ray
RAY_NODE = Path(__file__).resolve().with_name("ray_node.py")  # `ray start` kept on loopback
# ray[default]'s extra packages for the dashboard (State API), outside the venv's own
# site-packages: `make ray-dashboard` installs them (infra/ray-dashboard-requirements.txt).
DASHBOARD_DEPS = Path(os.environ.get("GOALRANK_RAY_DASHBOARD_DEPS") or BIN.parent / "ray-dashboard")
REGION = "us-east-1"
# Variables that would point a child at some other service; the stack sets its own.
_POINTERS = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS", "GOALRANK_STORAGE",
             "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_PROFILE")


# Ray rewrites `--node-ip-address 127.0.0.1` to the host's outward IP and then binds its
# servers there or on every interface. Its single-machine mode (the switch is named for the
# platforms where that is the default) keeps the node on loopback. Drivers need it too, to
# find the node by that address: it goes into the env file.
_RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


class StackError(RuntimeError):
    """A service did not start, or the stack is in a state `up`/`down` cannot handle."""


@dataclass
class StackPorts:
    """Loopback ports. Defaults sit next to, not on, each tool's own default (4200, 5000,
    6379, 8265, 52365), so a developer's own servers and `ray.init()` runtimes do not clash."""

    prefect: int = 4210
    mlflow: int = 5010
    s3: int = 5011
    ray: int = 6390
    ray_dashboard: int = 8275
    ray_dashboard_agent: int = 52375  # Ray's fixed default 52365 clashes with any ray.init() on the host

    @classmethod
    def from_env(cls, env=None) -> "StackPorts":
        """GOALRANK_STACK_<NAME>_PORT overrides each default, e.g. GOALRANK_STACK_PREFECT_PORT."""
        env = os.environ if env is None else env
        kw = {}
        for f in fields(cls):
            var = f"GOALRANK_STACK_{f.name.upper()}_PORT"
            if env.get(var):
                try:
                    kw[f.name] = int(env[var])
                except ValueError:
                    raise StackError(f"{var} must be a port number, got {env[var]!r}") from None
        return cls(**kw)

    @classmethod
    def free(cls) -> "StackPorts":
        """Ports the OS reports free right now (for tests)."""
        socks = []
        try:
            for _ in fields(cls):
                s = socket.socket()
                s.bind(("127.0.0.1", 0))
                socks.append(s)
            return cls(*[s.getsockname()[1] for s in socks])
        finally:
            for s in socks:
                s.close()


class LocalStack:
    """Start, check and stop the four services. `up()` is all-or-nothing: if one service fails
    to become healthy, every one started is stopped again and StackError carries its log tail."""

    def __init__(self, workdir: str | Path, ports: StackPorts | None = None, *, bucket: str = "goalrank",
                 mlflow_bucket: str = "goalrank-mlflow", ray_num_cpus: int | None = None,
                 ray_object_store_mb: int = 512, ray_dashboard: bool = False, timeout_s: float = 240.0,
                 services: tuple[str, ...] = SERVICES, ray_nodes: int = 1):
        self.workdir = Path(workdir).resolve()
        self.ports = ports or StackPorts.from_env()
        self.bucket, self.mlflow_bucket = bucket, mlflow_bucket
        self.ray_num_cpus = ray_num_cpus or int(os.environ.get("GOALRANK_RAY_NUM_CPUS") or os.cpu_count() or 2)
        self.ray_object_store_mb = ray_object_store_mb
        self.ray_dashboard = ray_dashboard
        # Ray nodes in all: the head and ray_nodes - 1 more, each with ray_num_cpus logical CPUs
        # (service names ray-2, ray-3, ...; what a KubeRay worker group's replicas are).
        self.ray_nodes = int(ray_nodes)
        if self.ray_nodes < 1:
            raise StackError(f"ray_nodes must be at least 1, got {ray_nodes}")
        self.timeout_s = timeout_s
        unknown = set(services) - set(SERVICES)
        if unknown:
            raise StackError(f"unknown service(s) {sorted(unknown)}; known: {', '.join(SERVICES)}")
        self.services = tuple(n for n in SERVICES if n in services)  # start order: S3 first
        if "mlflow" in self.services and "s3" not in self.services:
            raise StackError("the MLflow server keeps its artifacts in S3: start s3 with it")
        self.state_file = self.workdir / "state.json"
        self.env_file = self.workdir / "env"
        self.log_dir = self.workdir / "logs"
        self._state: dict | None = None
        if self.state_file.exists():  # a stack started by an earlier command: adopt its ports
            self._state = json.loads(self.state_file.read_text())
            self.ports = StackPorts(**self._state["ports"])
            self.bucket, self.mlflow_bucket = self._state["buckets"]
            self.services = tuple(n for n in self._state["services"] if n in SERVICES)
            self.ray_nodes = int(self._state.get("ray_nodes", 1))
            self.ray_dashboard = bool(self._state.get("ray_dashboard", self.ray_dashboard))

    # --- public API --------------------------------------------------------------------

    def __enter__(self) -> "LocalStack":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def urls(self) -> dict[str, str]:
        p = self.ports
        return {
            "prefect": f"http://127.0.0.1:{p.prefect}/api",
            "mlflow": f"http://127.0.0.1:{p.mlflow}",
            "s3": f"http://127.0.0.1:{p.s3}",
            "ray": f"127.0.0.1:{p.ray}",
            **{name: f"127.0.0.1:{p.ray} (joined)" for name in self._extra_ray_nodes()},
        }

    def _extra_ray_nodes(self) -> list[str]:
        """Service names of the Ray nodes after the head: ray-2 ... ray-N."""
        return [f"ray-{k}" for k in range(2, self.ray_nodes + 1)] if "ray" in self.services else []

    def dashboard_url(self) -> str | None:
        """The Ray head's dashboard, which serves Ray's State API (None when it is off)."""
        return f"http://127.0.0.1:{self.ports.ray_dashboard}" if self.ray_dashboard and "ray" in self.services else None

    def env(self) -> dict[str, str]:
        """What points the goalrank command at this stack (the content of `<workdir>/env`)."""
        if not self.env_file.exists():
            raise StackError(f"no stack in {self.workdir}: run `infra/local-stack up` first")
        out = {}
        for line in self.env_file.read_text().splitlines():
            if line.startswith("export "):
                key, _, value = line[len("export "):].partition("=")
                out[key] = shlex.split(value)[0] if value else ""
        return out

    def up(self) -> "LocalStack":
        if self._state and any(_session_pids(s["pid"], s["start_time"]) for s in self._state["services"].values()):
            if all(h["healthy"] for h in self.status().values()):
                return self  # already up
            raise StackError(f"a stack in {self.workdir} is partly running: run `infra/local-stack down` first")
        self._check_ports_free()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        # moto keeps objects in memory, so an old MLflow database would list runs and model
        # versions whose artifacts are gone: each `up` starts a fresh one (Prefect's stays).
        (self.workdir / "mlflow.db").unlink(missing_ok=True)
        t0 = time.monotonic()
        ray_tmp = self._ray_temp_dir()
        self._state = {"ports": asdict(self.ports), "buckets": [self.bucket, self.mlflow_bucket],
                       "ray_temp_dir": str(ray_tmp), "services": {}, "ready_s": {},
                       "ray_nodes": self.ray_nodes, "ray_dashboard": self.ray_dashboard}
        # Fresh credentials per stack: moto accepts any, and a fixed pair would make a leaked
        # value impossible to spot in the security tests.
        creds = {"AWS_ACCESS_KEY_ID": "GRLOCAL" + secrets.token_hex(6).upper(),
                 "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
        self._write_env(creds)
        try:
            base = self._child_env(creds)
            for name in self.services:  # all start at once; each is checked below
                self._start(name, self._argv(name, ray_tmp), base)
            self._save()
            self._wait_healthy(t0, creds, self.services)
            extra = self._extra_ray_nodes()
            for name in extra:  # they join the head once it is up
                self._start(name, self._argv(name, ray_tmp), base)
            self._save()
            self._wait_healthy(t0, creds, extra)
        except BaseException:
            self.down()
            raise
        self._state["startup_s"] = round(time.monotonic() - t0, 2)
        self._save()
        return self

    def down(self, timeout_s: float = 60.0) -> list[int]:
        """SIGTERM each service's session, wait, SIGKILL what is left; returns every PID that
        was stopped. Safe to call twice."""
        if not self._state:
            return []
        stopped: list[int] = []
        services = self._state["services"]
        extra = sorted((n for n in services if n.startswith("ray-")), key=lambda n: -int(n.split("-")[1]))
        for name in extra + list(reversed(SERVICES)):  # Ray first, its joined nodes before the head
            svc = services.get(name)
            if not svc:
                continue
            pids = _session_pids(svc["pid"], svc["start_time"])
            stopped += pids
            if _alive(svc["pid"], svc["start_time"]):
                # `ray start --block` drains the node and stops its own children on SIGTERM;
                # signalling its whole group instead breaks the drain and costs 30 s. The
                # others get the signal in their whole group (servers with worker children).
                _signal(svc["pid"], signal.SIGTERM, group=not name.startswith("ray"))
            else:
                for pid in pids:
                    _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(_alive(p) for p in stopped):
            time.sleep(0.2)
        for pid in stopped:
            if _alive(pid):
                _signal(pid, signal.SIGKILL)
        while any(_alive(p) for p in stopped) and time.monotonic() < deadline + 10:
            time.sleep(0.1)
        left = [p for p in stopped if _alive(p)]
        if left:
            raise StackError(f"processes still alive after SIGKILL: {left}")
        ray_tmp = self._state.get("ray_temp_dir")
        if ray_tmp and Path(ray_tmp).parent == Path(tempfile.gettempdir()):
            shutil.rmtree(ray_tmp, ignore_errors=True)
        self.state_file.unlink(missing_ok=True)
        self.env_file.unlink(missing_ok=True)
        self._state = None
        return stopped

    def pids(self) -> dict[str, list[int]]:
        """Every live process of each service (leader and descendants)."""
        if not self._state:
            return {}
        return {n: _session_pids(s["pid"], s["start_time"]) for n, s in self._state["services"].items()}

    def listening(self) -> dict[str, list[tuple[str, int]]]:
        """(address, port) of every listening TCP socket each service's processes hold."""
        return {n: listening_sockets(p) for n, p in self.pids().items()}

    def status(self) -> dict[str, dict]:
        """Per service: pid, url, healthy (through its own API), rss_mb of its processes."""
        if not self._state:
            return {}
        creds = {k: v for k, v in self.env().items() if k.startswith("AWS_")} if self.env_file.exists() else {}
        out = {}
        for name, svc in self._state["services"].items():
            pids = _session_pids(svc["pid"], svc["start_time"])
            healthy = bool(pids) and self._healthy(name, creds, full=True)
            out[name] = {"pid": svc["pid"], "processes": len(pids), "url": self.urls()[name],
                         "healthy": healthy, "rss_mb": round(sum(map(_rss_bytes, pids)) / 2**20),
                         "ready_s": self._state.get("ready_s", {}).get(name)}
        return out

    # --- starting ----------------------------------------------------------------------

    def _argv(self, name: str, ray_tmp: Path) -> list[str]:
        p, w = self.ports, self.workdir
        if name == "s3":
            return [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(p.s3)]
        if name == "mlflow":
            return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(p.mlflow), "--workers", "1",
                    "--backend-store-uri", f"sqlite:///{w / 'mlflow.db'}",
                    "--artifacts-destination", f"s3://{self.mlflow_bucket}/mlflow"]
        if name == "prefect":
            return [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(p.prefect),
                    "--analytics-off"]
        node = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(self.ray_num_cpus),
                "--object-store-memory", str(self.ray_object_store_mb * 2**20),
                "--min-worker-port", "0", "--max-worker-port", "0",  # OS-chosen: no clash with other Rays
                "--disable-usage-stats"]
        if name == "ray":
            argv = ["--head", "--block", "--port", str(p.ray), *node,
                    "--include-dashboard", str(self.ray_dashboard).lower(), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(p.ray_dashboard), "--dashboard-agent-listen-port", str(p.ray_dashboard_agent),
                    "--temp-dir", str(ray_tmp)]
            if self.ray_dashboard and _dashboard_deps_missing():
                if not (DASHBOARD_DEPS / "aiohttp_cors").is_dir():
                    raise StackError(f"Ray's dashboard needs ray[default]'s extra packages: run `make ray-dashboard` "
                                     f"(installs them into {DASHBOARD_DEPS})")
                return [sys.executable, str(RAY_NODE), "--dashboard-deps", str(DASHBOARD_DEPS), "--", *argv]
            return [str(BIN / "ray"), "start", *argv]
        if name in self._extra_ray_nodes():
            # A node on the same machine: its agent needs a port of its own (the head has the
            # configured one); the session (temp dir) is the head's, as on one machine it must be.
            return [sys.executable, str(RAY_NODE), "--join", "--", "--address", f"127.0.0.1:{p.ray}", "--block", *node,
                    "--dashboard-agent-listen-port", str(_free_port())]
        raise StackError(f"unknown service {name!r}")

    def _child_env(self, creds: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _POINTERS}
        s3 = self.urls()["s3"]
        env.update(creds)
        env.update({
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": s3,  # boto3 and pyarrow in Ray workers
            "MLFLOW_S3_ENDPOINT_URL": s3,  # the MLflow server's artifact proxy
            "PREFECT_HOME": str(self.workdir / "prefect"),
            "PREFECT_API_URL": self.urls()["prefect"],
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
            "RAY_USAGE_STATS_ENABLED": "0",
            **_RAY_LOOPBACK,
            "PYTHONUNBUFFERED": "1",
            # MLflow 3's server also starts a job runner and seven huey consumers (GenAI jobs,
            # about 800 MB) that this pipeline never uses.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        })
        return env

    def _write_env(self, creds: dict[str, str]) -> None:
        u, on = self.urls(), self.services
        values: dict[str, str] = {}
        if "prefect" in on:
            values.update(PREFECT_API_URL=u["prefect"], PREFECT_HOME=str(self.workdir / "prefect"),
                          PREFECT_SERVER_ANALYTICS_ENABLED="false")
        if "mlflow" in on:
            values["MLFLOW_TRACKING_URI"] = u["mlflow"]
        if "ray" in on:
            values.update(RAY_ADDRESS=u["ray"], **_RAY_LOOPBACK)
        if "s3" in on:
            values.update(GOALRANK_STORAGE=f"s3://{self.bucket}/pipeline", **creds, AWS_DEFAULT_REGION=REGION,
                          AWS_ENDPOINT_URL_S3=u["s3"], MLFLOW_S3_ENDPOINT_URL=u["s3"])
        lines = ["# Written by infra/local-stack up: `source .stack/env` points goalrank at the local stack.",
                 "# Holds the stack's (throw-away) S3 credentials: do not commit or log it."]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in values.items()]
        fd = os.open(self.env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = open(self.log_dir / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self._state["services"][name] = {"pid": proc.pid, "start_time": _start_time(proc.pid), "argv": argv,
                                         "log": str(self.log_dir / f"{name}.log")}

    def _wait_healthy(self, t0: float, creds: dict[str, str], names) -> None:
        waiting = list(names)
        deadline = t0 + self.timeout_s
        while waiting:
            for name in list(waiting):
                svc = self._state["services"][name]
                if not _alive(svc["pid"], svc["start_time"]):
                    raise StackError(f"{name} exited during start-up; last log lines:\n{_tail(svc['log'])}")
                if self._healthy(name, creds, full=False):
                    if name == "s3":
                        self._create_buckets(creds)
                    waiting.remove(name)
                    self._state["ready_s"][name] = round(time.monotonic() - t0, 2)
            if waiting and time.monotonic() > deadline:
                name = waiting[0]
                raise StackError(f"{name} not healthy after {self.timeout_s:.0f} s; last log lines:\n"
                                 f"{_tail(self._state['services'][name]['log'])}")
            time.sleep(0.25)

    def _create_buckets(self, creds: dict[str, str]) -> None:
        s3 = _s3_client(self.urls()["s3"], creds)
        for bucket in (self.bucket, self.mlflow_bucket):
            s3.create_bucket(Bucket=bucket)

    # --- health ------------------------------------------------------------------------

    def _healthy(self, name: str, creds: dict[str, str], full: bool) -> bool:
        u = self.urls()
        try:
            if name == "prefect":
                return _http_ok(f"{u['prefect']}/health")
            if name == "mlflow":
                return _http_ok(f"{u['mlflow']}/health")
            if name == "s3":
                if not full:
                    return _http_ok(f"{u['s3']}/moto-api/data.json")
                s3 = _s3_client(u["s3"], creds)
                have = {b["Name"] for b in s3.list_buckets()["Buckets"]}
                return {self.bucket, self.mlflow_bucket} <= have
            if name == "ray":
                # `ray status` costs a second or two of imports: ask only once GCS listens. It
                # confirms that the head node's raylet registered its CPUs.
                if not _port_open(self.ports.ray):
                    return False
                if self.ray_dashboard and not _http_ok(f"{self.dashboard_url()}/api/version"):
                    return False
                return self._ray_active_nodes(creds) >= 1
            if name.startswith("ray-"):  # a joined node: registered with the head, CPUs and all
                return self._ray_active_nodes(creds) >= (int(name.split("-")[1]) if not full else self.ray_nodes)
        except Exception:
            return False
        return False

    def _ray_active_nodes(self, creds: dict[str, str]) -> int:
        """Nodes `ray status` lists as active (0 when it fails or lists no CPUs)."""
        r = subprocess.run([str(BIN / "ray"), "status", "--address", self.urls()["ray"]], capture_output=True,
                           text=True, timeout=60, env=self._child_env(creds))
        if r.returncode != 0 or "Active:" not in r.stdout or "CPU" not in r.stdout:
            return 0
        active = r.stdout.split("Active:", 1)[1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if line.strip().split(" ")[-1].startswith("node_"))

    # --- bookkeeping -------------------------------------------------------------------

    def _check_ports_free(self) -> None:
        for name, port in asdict(self.ports).items():
            if name.split("_")[0] in self.services and _port_open(port):
                raise StackError(f"port {port} ({name}) on 127.0.0.1 is in use: "
                                 f"set GOALRANK_STACK_{name.upper()}_PORT to another port")

    def _ray_temp_dir(self) -> Path:
        # Ray's Unix socket paths must stay under 107 bytes; a deep workdir would overflow them.
        path = self.workdir / "ray"
        if len(str(path)) > 40:
            return Path(tempfile.mkdtemp(prefix="goalrank-ray-"))
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, indent=2))
        tmp.replace(self.state_file)


def _dashboard_deps_missing() -> bool:
    """ray[default]'s dashboard packages are not importable from the venv itself."""
    import importlib.util

    return any(importlib.util.find_spec(m) is None for m in ("aiohttp_cors", "grpc", "opencensus"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- process helpers (Linux /proc) --------------------------------------------------------

def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()  # fields from 'state' on: comm may hold spaces


def _start_time(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[19]) if st else None  # field 22: start time in clock ticks since boot


def _alive(pid: int, start_time: int | None = None) -> bool:
    """Running (not a zombie), and the same process if its start time is given (PID reuse)."""
    st = _stat(pid)
    if st is None or st[0] == "Z":
        return False
    return start_time is None or int(st[19]) == start_time


def _session_pids(leader: int, start_time: int | None) -> list[int]:
    """Live processes in the session the leader created, the leader included. Ray's workers
    make their own process groups but stay in the session. Processes older than the leader
    cannot be its descendants, which guards against a reused session id."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st and st[0] != "Z" and int(st[3]) == leader and (start_time is None or int(st[19]) >= start_time):
                out.append(int(entry))
    return sorted(out)


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        os.killpg(pid, sig) if group else os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def listening_sockets(pids: list[int]) -> list[tuple[str, int]]:
    """Listening TCP sockets (IPv4 and IPv6) held by these processes, from /proc."""
    inodes: dict[str, tuple[str, int]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[3] != "0A":  # LISTEN
                continue
            hex_ip, hex_port = cols[1].split(":")
            inodes[cols[9]] = (_decode_ip(hex_ip), int(hex_port, 16))
    out = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                out.add(inodes[link[8:-1]])
    return sorted(out)


def _decode_ip(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    # /proc stores IPv6 as four little-endian 32-bit words
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def _rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def _s3_client(endpoint: str, creds: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"])


def _tail(path: str, n: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


# --- command line ------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(prog="infra/local-stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--workdir", default=os.environ.get("GOALRANK_STACK_DIR", str(root / ".stack")),
                        help="state, logs, databases and the env file (env GOALRANK_STACK_DIR)")
    parser.add_argument("--ray-dashboard", action="store_true",
                        help="start Ray's dashboard, which serves its State API (`make ray-dashboard` first)")
    parser.add_argument("--ray-nodes", type=int, default=int(os.environ.get("GOALRANK_STACK_RAY_NODES") or 1),
                        metavar="N", help="Ray nodes on loopback: the head and N-1 joined to it, each with "
                                          "GOALRANK_RAY_NUM_CPUS logical CPUs (env GOALRANK_STACK_RAY_NODES; default 1)")
    args = parser.parse_args(argv)
    stack = LocalStack(args.workdir, ray_dashboard=args.ray_dashboard, ray_nodes=args.ray_nodes)
    try:
        if args.action == "up":
            stack.up()
            _print_status(stack)
            if "ray" in stack.services:
                print(f"\nRAY_ADDRESS={stack.urls()['ray']} ({stack.ray_nodes} Ray node"
                      f"{'s' if stack.ray_nodes > 1 else ''}, {stack.ray_num_cpus} logical CPUs each"
                      + (f"; State API at {stack.dashboard_url()}" if stack.dashboard_url() else "") + ")")
            print(f"\nup in {stack._state.get('startup_s', 0):.1f} s. Point goalrank at it with:\n"
                  f"  source {_short(stack.env_file)}")
        elif args.action == "down":
            pids = stack.down()
            print(f"stopped {len(pids)} processes" if pids else "no stack running")
        else:
            if not stack._state:
                print("no stack running")
                return 3
            return 0 if all(s["healthy"] for s in _print_status(stack).values()) else 1
    except StackError as exc:
        print(f"local-stack {args.action}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _short(path: Path) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def _print_status(stack: LocalStack) -> dict[str, dict]:
    print(f"{'service':<8} {'health':<8} {'pid':>7} {'procs':>5} {'rss':>8} {'ready':>7}  url")
    total = 0
    status = stack.status()
    for name, s in status.items():
        total += s["rss_mb"]
        ready = f"{s['ready_s']:.1f}s" if s["ready_s"] is not None else "-"
        print(f"{name:<8} {'ok' if s['healthy'] else 'DOWN':<8} {s['pid']:>7} {s['processes']:>5} "
              f"{s['rss_mb']:>6}MB {ready:>7}  {s['url']}")
    print(f"{'total':<8} {'':<8} {'':>7} {'':>5} {total:>6}MB")
    return status


if __name__ == "__main__":
    sys.exit(main())
