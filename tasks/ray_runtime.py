"""Connecting to Ray, and the resource settings that keep it from hanging on small machines.

`ensure_ray()` joins the cluster at RAY_ADDRESS when that is set, else starts a local Ray
once per process with an explicit CPU count. On 2 CPUs two Ray defaults wait for ever
(../shared/STACK.md): an actor pool or a set of train workers holding every CPU leaves none
for the read tasks that feed them. Actors and train workers therefore ask for a fraction of
a CPU (GOALRANK_RAY_ACTOR_CPUS, default 0.5).
"""
from __future__ import annotations

import os
from typing import Any

# Defaults that only quiet local runs; an explicit setting in the environment wins.
_ENV_DEFAULTS = {
    "RAY_AUTH_MODE": "disabled",  # no token prompt/warning for a loopback-only local Ray
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_DEDUP_LOGS": "1",
}


# glibc malloc settings for Ray's worker processes (read once, when a process starts). By
# default glibc serves blocks over 128 KiB (most activation tensors) with their own mmap and
# unmaps them on free, so every batch page-faults its tensors in again; and Ray Data calls a
# map UDF from a pool thread, whose separate arena gives pages back the same way. A process
# running the score loop twice (2 x 9.3 s) took 1.6M minor faults and 3.6 s of kernel time
# (0.1M and 0.4 s with the settings), and two workers on two cores contend there. One arena
# that keeps its pages: bench.bench_score (quick, medians of 3) went from 15.4k to 16.0k
# lists/s with one actor and from 21.0k to 25.5k with two.
# Peak RSS is the same high-water mark, but freed memory stays with the worker process.
# GOALRANK_WORKER_MALLOC=0 turns it off; a MALLOC_* variable already set wins.
WORKER_MALLOC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                     "MALLOC_TRIM_THRESHOLD_": str(1 << 32), "MALLOC_TOP_PAD_": str(1 << 28)}


_FALSE, _TRUE = ("0", "false", "no", "off"), ("1", "true", "yes", "on")


def env_flag(name: str, default: bool) -> bool:
    """An on/off switch read from environment variable `name` (the GOALRANK_* tuning
    variables): unset or empty gives `default`; 0/false/no/off and 1/true/yes/on, in any case;
    anything else is refused, so that a typo does not silently keep the default."""
    raw = os.environ.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _FALSE or raw in _TRUE:
        return raw in _TRUE
    from goalrank_core.errors import ConfigError

    raise ConfigError(f"environment variable {name}={os.environ[name]!r} is not an on/off switch; "
                      f"use one of {', '.join(_TRUE + _FALSE)}")


def worker_env() -> dict[str, str]:
    """Environment variables every Ray worker process of this job starts with."""
    if not env_flag("GOALRANK_WORKER_MALLOC", True):
        return {}
    return {k: os.environ.get(k, v) for k, v in WORKER_MALLOC_ENV.items()}


def ensure_ray(num_cpus: int | None = None, temp_dir: str | None = None, address: str | None = None) -> dict[str, Any]:
    """Make sure this process is connected to Ray and return its cluster resources.

    address: a Ray cluster (defaults to RAY_ADDRESS); with none, a local Ray starts with
    `num_cpus` (default GOALRANK_RAY_NUM_CPUS, else all cores) and its temp files in
    `temp_dir` (default GOALRANK_RAY_TMPDIR, else Ray's). Calling it again is a no-op.
    """
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        env = worker_env()
        if address:  # a cluster's workers get the variables through the job's runtime_env
            ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env} if env else None)
        else:
            # A local Ray's raylet and workers inherit this process's environment from exec, so
            # they need no runtime_env (one makes Ray start a separate worker pool, which cost
            # about 2 s more start-up per actor pool in bench.bench_score). This process's own
            # allocator is already set up and is unaffected.
            for k, v in env.items():
                os.environ.setdefault(k, v)
            _local_ray_on_loopback()
            cpus = num_cpus or int(os.environ.get("GOALRANK_RAY_NUM_CPUS", "0")) or os.cpu_count() or 1
            kwargs: dict[str, Any] = {"num_cpus": cpus, "log_to_driver": True, **_dashboard()}
            tmp = temp_dir or os.environ.get("GOALRANK_RAY_TMPDIR")
            if tmp:
                os.makedirs(tmp, exist_ok=True)
                kwargs["_temp_dir"] = os.path.abspath(tmp)
            ray.init(**kwargs)
        _quiet_data_context()
    return dict(ray.cluster_resources())


def _dashboard() -> dict[str, Any]:
    """ray.init arguments for a local Ray's dashboard, which serves Ray's State API; off
    unless GOALRANK_RAY_DASHBOARD=1 (it needs `pip install "ray[default]==2.60.0"`).

    Ray Train V2 starts a PlacementGroupCleaner actor beside each trainer's controller; it
    asks the State API every second whether the controller is alive, to free the workers'
    placement group if the controller died. A local Ray without a dashboard has no State API,
    so every ask fails and the cleaner logs `Failed to query Ray Train Controller actor state`
    once a second of training (154 lines in one `make run`; goalrank run keeps them in its log
    file). The dashboard would answer, and with it on (ray[default] installed) a whole
    `make run` printed none of them. It stays off because the raylet aborts Ray's start when
    its dashboard agent takes over 15 s to come up (ray-project/ray#65983), which a busy
    2-core machine hit in four of seven local starts with ray[default] installed (Ray's
    minimal agent hit it too, at a load average of 23; ray[default]'s imports more). On a
    cluster (RAY_ADDRESS) the head's dashboard serves the State API as usual. With it on,
    the dashboard binds 127.0.0.1 on a free port, and RAY_API_SERVER_ADDRESS, inherited by
    the workers, points the State API client at it (left to find a dashboard alone, it
    refuses when a second Ray runs on the machine)."""
    if not env_flag("GOALRANK_RAY_DASHBOARD", False):
        return {"include_dashboard": False}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}


def _local_ray_on_loopback() -> None:
    """A local Ray binds its servers to the host's outward IP and every interface by default;
    its single-machine mode (the switch is named for the platforms where it is the default)
    keeps them on 127.0.0.1 (tests/test_reliability_security.py). Set
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 to opt out. The constant is read when ray is imported,
    so it is also set here in case ray was imported before this call."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"].strip().lower() in ("0", "false"):
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False


def _quiet_data_context() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True  # one bar per operator for data stages
    ctx.print_on_execution_start = False


def actor_cpus() -> float:
    """CPUs per Ray Data actor or Ray Train worker: a fraction, so reads still get a CPU."""
    return float(os.environ.get("GOALRANK_RAY_ACTOR_CPUS", "0.5"))


def use_gpu() -> bool:
    """Workers use a GPU when the cluster has one (GOALRANK_USE_GPU=0 turns it off)."""
    if not env_flag("GOALRANK_USE_GPU", True):
        return False
    import ray

    return ray.cluster_resources().get("GPU", 0) >= 1


def pool_size() -> int:
    """Actors of each Ray Data stage's pool (GOALRANK_DATA_ACTORS, default 2)."""
    return int(os.environ.get("GOALRANK_DATA_ACTORS", "2"))


def task_cpus() -> float:
    """CPUs of the policy-training and proposals tasks (GOALRANK_POLICY_TASK_CPUS, default 1)."""
    return float(os.environ.get("GOALRANK_POLICY_TASK_CPUS", "1"))


def actor_pool(size: int) -> tuple[Any, dict[str, float]]:
    """(compute strategy, resource kwargs) for `map_batches` with a pool of `size` actors."""
    import ray.data

    size = max(1, int(size))
    res: dict[str, float] = {"num_cpus": actor_cpus()}
    if use_gpu():
        res["num_gpus"] = 1.0 / size if size > 1 else 1.0
    return ray.data.ActorPoolStrategy(size=size), res


def train_scaling(num_workers: int) -> Any:
    """ScalingConfig for `num_workers` DDP workers with fractional CPUs (GPU each if any)."""
    from ray.train import ScalingConfig

    gpu = use_gpu()
    res = {"CPU": actor_cpus()}
    if gpu:
        res["GPU"] = 1.0
    return ScalingConfig(num_workers=num_workers, use_gpu=gpu, resources_per_worker=res,
                         placement_strategy=train_placement())


_PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def train_placement() -> str:
    """Placement group strategy of the DDP workers (GOALRANK_TRAIN_PLACEMENT, default PACK, as
    Ray's). PACK puts fractional-CPU workers on one node while it has room; SPREAD puts them on
    different nodes where it can (tests/test_multinode.py; a cluster of small nodes)."""
    raw = os.environ.get("GOALRANK_TRAIN_PLACEMENT", "").strip().upper() or "PACK"
    if raw not in _PLACEMENTS:
        from goalrank_core.errors import ConfigError

        raise ConfigError(f"environment variable GOALRANK_TRAIN_PLACEMENT={os.environ['GOALRANK_TRAIN_PLACEMENT']!r} "
                          f"is not one of {', '.join(_PLACEMENTS)}")
    return raw


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
