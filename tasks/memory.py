"""Peak memory of a stage: the driver's own high-water mark, and the summed resident memory
of the local Ray worker processes (`ray::...`), sampled in a thread while the stage runs.

Ray workers are children of the raylet, not of the driver, so `RUSAGE_CHILDREN` misses
them; on a remote cluster (RAY_ADDRESS) they are not visible here and the sample is None.
Training workers also report their own `getrusage` peaks through `ray.train.report`.
"""
from __future__ import annotations

import os
import resource
import threading

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def self_peak_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _ppid(pid: str) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])  # the name may hold spaces


def _ray_workers_rss_mb() -> tuple[float, int]:
    """Summed RSS of the `ray::` processes of the Ray this process started: their parent is a
    raylet whose parent is us (other Ray instances on the machine are not counted)."""
    me, total, n = os.getpid(), 0, 0
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return 0.0, 0
    parents, workers = {}, []
    for pid in pids:
        try:
            parents[pid] = _ppid(pid)
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read(5).startswith(b"ray::"):
                    workers.append(pid)
        except (OSError, ValueError, IndexError):
            continue  # the process ended between listing and reading
    for pid in workers:
        raylet = str(parents.get(pid, -1))
        if parents.get(raylet) != me:
            continue
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * _PAGE
            n += 1
        except (OSError, ValueError, IndexError):
            continue
    return total / 2**20, n


class PeakMemory:
    """`with PeakMemory() as m: ...` then `m.result()`."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._peak_workers = 0.0
        self._seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            mb, n = _ray_workers_rss_mb()
            self._peak_workers = max(self._peak_workers, mb)
            self._seen = max(self._seen, n)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def result(self) -> dict:
        return {
            "driver_peak_rss_mb": round(self_peak_mb(), 1),
            "ray_workers_peak_rss_mb": round(self._peak_workers, 1) if self._seen else None,
            "ray_worker_processes": self._seen,
        }
