"""Shared pieces of the evidence benchmarks (issue 7): provenance of every result, summary
statistics over seeds, and ranking any list policy through the project's own code paths.

A result JSON (one per benchmark and mode, in bench/results/) holds:
    benchmark, mode, command, started_at, finished_at, wall_s, git {sha, dirty}, machine
    {cpus, cpu_model, mem_gb, platform, python, torch, cuda, load_avg_start, load_avg_end},
    config (what was run), tables [{title, columns, rows, notes}], plots [paths], notes [text],
    and the raw numbers under `data`.
`bench/report.py` renders every such file into docs/results.md; nothing there is typed by hand.
"""
from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
MODES = ("quick", "full")

# Two-sided 95% Student-t quantiles t_{0.975, df}, df = 1..30 (standard table values).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


# ---------------------------------------------------------------- statistics


def t975(df: int) -> float:
    """Two-sided 95% t quantile; the normal 1.960 beyond df = 30 (within 2% of t there)."""
    if df < 1:
        return float("nan")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def seed_summary(values: list[float]) -> dict[str, float]:
    """Mean, sample std (ddof 1) and 95% t-interval of the mean over seeds; one seed gives
    std and interval NaN (a spread needs two)."""
    v = np.asarray([x for x in values if x == x], dtype=np.float64)
    n = len(v)
    mean = float(v.mean()) if n else float("nan")
    std = float(v.std(ddof=1)) if n >= 2 else float("nan")
    half = t975(n - 1) * std / math.sqrt(n) if n >= 2 else float("nan")
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def paired_cell(a: list[float], b: list[float]) -> str:
    """Per-seed differences a - b as "mean [95% t-interval]" (the mean alone for one seed)."""
    s = seed_summary([x - y for x, y in zip(a, b)])
    return f"{s['mean']:+.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]" if s["n"] >= 2 else f"{s['mean']:+.4f}"


def percentiles(samples_s: list[float] | np.ndarray) -> dict[str, float]:
    """Seconds -> {p50_ms, p99_ms, mean_ms, n}."""
    a = np.asarray(samples_s, np.float64) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean()), "n": int(len(a))}


# ---------------------------------------------------------------- provenance


def this_tree_env(env: dict[str, str]) -> dict[str, str]:
    """`env` with this checkout first on PYTHONPATH: a benchmark's subprocesses (and the Ray
    workers they start) run the code whose commit the result file records, even when the
    virtual environment's editable install points at another checkout."""
    paths = [str(ROOT), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    return {**env, "PYTHONPATH": os.pathsep.join(paths)}


def git_info() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "HEAD")
    return {"sha": sha or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def load_avg() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "mem_gb": _mem_gb(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def command_line() -> str:
    """The command that produced a result, as typed (python -m bench.X ...)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py") and "bench" in Path(argv[0]).parts:
        argv[0] = f"-m bench.{Path(argv[0]).stem}"
        return "python " + " ".join([argv[0]] + [shlex.quote(a) for a in argv[1:]])
    return "python " + " ".join(shlex.quote(a) for a in argv)


class Recorder:
    """Collects one benchmark's provenance; `write(result)` adds it and saves the JSON."""

    def __init__(self, name: str, mode: str, command: str | None = None, tag: str = ""):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if tag and not tag.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"tag must be letters, digits, '-' or '_', got {tag!r}")
        self.name, self.mode, self.tag = name, mode, tag
        self.command = command or command_line()
        self.started = time.time()
        self.load_start = load_avg()

    def write(self, result: dict[str, Any], results_dir: Path | None = None) -> Path:
        out_dir = Path(results_dir or RESULTS)
        out_dir.mkdir(parents=True, exist_ok=True)
        m = machine()
        m.update(load_avg_start=self.load_start, load_avg_end=load_avg())
        doc = {"benchmark": self.name, "mode": self.mode, "command": self.command,
               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "wall_s": round(time.time() - self.started, 1),
               "git": git_info(), "machine": m, **result}
        path = out_dir / f"{self.name}_{self.mode}{'_' + self.tag if self.tag else ''}.json"
        path.write_text(json.dumps(_jsonable(doc), indent=1, sort_keys=True, allow_nan=True))
        print(f"[{self.name}] wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
              f"({doc['wall_s']:.0f}s)", flush=True)
        return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN; the report shows None as "-"
    return x


def table(title: str, columns: list[str], rows: list[list[Any]], notes: str = "") -> dict[str, Any]:
    return {"title": title, "columns": columns, "rows": rows, "notes": notes}


def log_to(prefix: str, quiet: bool = True) -> Callable[[str], None]:
    """A log function for the trainers: epoch lines printed with a prefix, or dropped."""
    return (lambda m: None) if quiet else (lambda m: print(f"[{prefix}] {m}", flush=True))


# ---------------------------------------------------------------- data and ranking


def data_available(name: str) -> bool:
    from goalrank_core.datasets.registry import dataset_dir

    try:
        path = dataset_dir(name)
    except Exception:  # noqa: BLE001 - any lookup failure means "not here"
        return False
    return path.is_dir() and any(path.iterdir())


def rank_with_policy(bundle, policy, requests, seed: int = 0, batch_size: int = 512, device=None):
    """Any ListPolicy object (not only the bundle's named ones) -> RANKED table, the way
    goalrank_core.ranking.rank does it: encode with the bundle, propose one list per request,
    positions -> raw ids. `device`: where the batches go (the policy's models' device; CPU default)."""
    import pyarrow as pa
    import torch

    from goalrank_core.bundle import encode
    from goalrank_core.schemas import RANKED, conform

    data = encode(bundle, requests)
    dev = torch.device(device or "cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            out.append(policy.propose(data.batch(slice(i, i + batch_size), dev), 1, gen)[:, 0].cpu().numpy())
    ids = data.positions_to_ids(slice(None), np.concatenate(out))
    tbl = pa.table({"request_id": pa.array(list(data.request_id), pa.string()),
                    "ranked": pa.array(list(ids), pa.list_(pa.int64()))})
    return conform(tbl, RANKED, f"ranked lists ({getattr(policy, 'name', 'policy')})")


def evaluate(ranked, truth, ks=(6,), n_boot: int = 200, seed: int = 0) -> dict[str, float]:
    """metrics.evaluate_lists -> {"hr@6": value, ...} (means over requests with a positive)."""
    from goalrank_core.metrics import evaluate_lists

    return {k: v.value for k, v in evaluate_lists(ranked, truth, ks, n_boot=n_boot, seed=seed).items()}
