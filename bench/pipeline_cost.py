"""Cost of the whole daily flow (`goalrank run`, run as a subprocess exactly as a user runs it):
wall time and peak memory per stage (read from the stage manifests) and for the whole run
(the process tree's summed resident memory, sampled every 0.5 s: the flow, the local Prefect
server, Ray's raylet and workers), per data set, and its growth with the number of requests
(1x, 4x, 16x synthetic users from `goalrank data synth`).

Every run gets its own storage folder, MLflow SQLite store and Prefect home in a temporary
folder, so runs never skip stages of each other.

    python -m bench.pipeline_cost --mode quick|full
    python -m bench.pipeline_cost --mode full --datasets ml-1m --skip-synth   # issue 19: ML-1M, default config
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import Recorder, table, this_tree_env

_PAGE_MB = (os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096) / 2**20
STAGE_ORDER = ["prepare", "policies", "reward", "candidates", "score", "generator", "evaluate"]

QUICK_SET = ["train.reward_epochs=1", "train.aux_epochs=1", "train.epochs=1", "group.rounds=1"]
MODES = {
    "quick": {"datasets": {"ml-100k": ["protocol.max_users=50", *QUICK_SET]},
              "synth": {"users": 10, "requests": 10, "scales": [1, 4, 16], "set": QUICK_SET}, "timeout": 900},
    "full": {"datasets": {"ml-100k": [], "amazon-book": ["protocol.max_users=6000"]},
             "synth": {"users": 200, "requests": 10, "scales": [1, 4, 16], "set": []}, "timeout": 7200},
}


class TreeMemory:
    """Peak summed RSS (MB) of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every, self.peak, self._stop = pid, every, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> float:
        parent, rss = {}, {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent[int(d)] = int(fields[1])
                rss[int(d)] = int(fields[21]) * _PAGE_MB
            except (OSError, IndexError, ValueError):
                continue
        tree, frontier = {self.pid}, [self.pid]
        children: dict[int, list[int]] = {}
        for p, pp in parent.items():
            children.setdefault(pp, []).append(p)
        while frontier:
            for c in children.get(frontier.pop(), []):
                if c not in tree:
                    tree.add(c)
                    frontier.append(c)
        return sum(rss.get(p, 0.0) for p in tree)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.every)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _cli() -> str:
    exe = Path(sys.executable).parent / "goalrank"
    return str(exe) if exe.exists() else "goalrank"


def run_flow(source: list[str], sets: list[str], work: Path, run_id: str, timeout: float) -> dict:
    """One `goalrank run` in `work`; -> wall, whole-run peak memory, per-stage manifest numbers."""
    storage, log = work / "artifacts", work / f"{run_id}.log"
    cmd = [_cli(), "run", *source, "--storage", str(storage), "--run-id", run_id,
           "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}"] + [a for s in sets for a in ("--set", s)]
    # A loaded machine needs longer than Prefect's default 20 s to start its temporary server.
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
               RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", TQDM_DISABLE="1")
    env.pop("PREFECT_API_URL", None)
    env = this_tree_env(env)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        with TreeMemory(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:  # timeout, or this benchmark being stopped: end the run and what it started, nothing else
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            rc = proc.returncode if rc is None else rc
    wall = time.perf_counter() - t0
    stages = []
    for m in sorted(storage.glob(f"*/{run_id}/*/_manifest.json")):
        man = json.loads(m.read_text())
        mem_ = man.get("memory") or {}
        stages.append({"stage": m.parent.name, "kind": man.get("stage"), "wall_s": man.get("wall_s"),
                       "started_at": man.get("started_at"), "driver_peak_mb": mem_.get("driver_peak_rss_mb"),
                       "ray_workers_peak_mb": mem_.get("ray_workers_peak_rss_mb"),
                       "train_workers_peak_mb": mem_.get("train_workers_peak_rss_mb"),
                       "rows": {k: v.get("rows") for k, v in (man.get("tables") or {}).items() if isinstance(v, dict)}})
    stages.sort(key=lambda s: (s["started_at"] or "", s["stage"]))
    console = log.read_text().splitlines()  # what the person at the terminal saw (stdout + stderr)
    run_logs = sorted(storage.glob(f"*/{run_id}/_logs/*.log"))
    return {"command": " ".join(cmd[1:]), "rc": rc, "wall_s": wall, "peak_mb": mem.peak, "stages": stages,
            "stage_wall_sum_s": sum(s["wall_s"] or 0 for s in stages), "log_tail": console[-15:] if rc else [],
            "console_lines": len(console), "console": console if len(console) <= 200 else console[:200],
            "log_file_lines": sum(len(f.read_text().splitlines()) for f in run_logs),
            "metrics": run_metrics(storage, run_id)}


def run_metrics(storage: Path, run_id: str) -> list[dict]:
    """The evaluate stage's METRICS rows (split, policy, metric, value) of the run, if it got there."""
    from goalrank_core.schemas import METRICS
    from tasks.storage import read_table

    found = sorted(storage.glob(f"*/{run_id}/evaluate/metrics"))
    return read_table(str(found[0]), METRICS, "evaluate metrics").to_pylist() if found else []


def metrics_table(title: str, rows: list[dict], split: str = "test") -> dict:
    """Logged-label metrics of every policy on one split, best NDCG first."""
    names = sorted({r["metric"] for r in rows if r["split"] == split})
    val = {(r["policy"], r["metric"]): r["value"] for r in rows if r["split"] == split}
    policies = sorted({p for p, _ in val}, key=lambda p: -val.get((p, names[-1]), 0.0) if names else 0.0)
    return table(title, ["policy", *names], [[p, *(f"{val.get((p, m), float('nan')):.4f}" for m in names)]
                                             for p in policies])


def synth_data(work: Path, users: int, requests: int, seed: int = 0) -> list[str]:
    """What `goalrank data synth` writes (same function, same defaults), written here."""
    import pyarrow.parquet as pq

    from goalrank_core.synth import synth_impressions

    out = work / f"synth-{users}"
    out.mkdir(parents=True, exist_ok=True)
    imp, items, _ = synth_impressions(n_users=users, requests_per_user=requests, seed=seed)
    pq.write_table(imp, out / "impressions.parquet")
    pq.write_table(items, out / "items.parquet")
    return ["--impressions", str(out / "impressions.parquet"), "--items", str(out / "items.parquet")]


def _mb(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def stage_table(title: str, run: dict) -> dict:
    rows = [[s["stage"], f"{s['wall_s']:.1f}" if s["wall_s"] is not None else "-", _mb(s["driver_peak_mb"]),
             _mb(s["ray_workers_peak_mb"]), _mb(s["train_workers_peak_mb"]),
             ", ".join(f"{k} {v}" for k, v in s["rows"].items() if v is not None)] for s in run["stages"]]
    rows.append(["whole run (subprocess)", f"{run['wall_s']:.1f}", f"{run['peak_mb']:.0f} (process tree)", "", "",
                 f"exit code {run['rc']}; {run['console_lines']} console lines, {run['log_file_lines']} in the log file"])
    return table(title, ["stage", "wall s", "driver peak MB", "Ray workers peak MB", "train workers peak MB", "rows"],
                 rows, f"`goalrank {run['command']}`. Stage walls are the manifests' `wall_s`; the rest of the run "
                       f"({run['wall_s'] - run['stage_wall_sum_s']:.0f} s) is start-up (Python, Prefect server, Ray), "
                       "tracking and registry.")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--skip-datasets", action="store_true", help="only the synthetic growth runs")
    ap.add_argument("--synth-users", type=int, help="synthetic users at scale x1 (default: the mode's)")
    ap.add_argument("--scales", help="comma-separated scales (default 1,4,16)")
    ap.add_argument("--datasets", help="comma-separated data sets to run with the default config instead of the "
                                       "mode's (result file pipeline_cost_{mode}_{datasets}.json)")
    ap.add_argument("--skip-synth", action="store_true", help="no synthetic growth runs")
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so `finally` ends a running flow
    rec = Recorder("pipeline_cost", args.mode, tag=args.datasets.replace(",", "_") if args.datasets else "")
    mode = {**MODES[args.mode], "synth": dict(MODES[args.mode]["synth"])}
    if args.datasets:
        mode["datasets"] = {d: [] for d in args.datasets.split(",")}
    if args.skip_synth:
        mode["synth"]["scales"] = []
    if args.synth_users:
        mode["synth"]["users"] = args.synth_users
    if args.scales:
        mode["synth"]["scales"] = [int(x) for x in args.scales.split(",")]
    runs: dict[str, dict] = {}
    tables = []
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        if not args.skip_datasets:
            for ds, sets in mode["datasets"].items():
                work = Path(tmp) / ds
                work.mkdir()
                run = run_flow(["--dataset", ds], sets, work, "bench", mode["timeout"])
                runs[ds] = run
                print(f"[pipeline_cost] {ds}: {run['wall_s']:.0f}s, peak {run['peak_mb']:.0f} MB, rc {run['rc']}", flush=True)
                tables.append(stage_table(f"Daily flow on {ds} ({', '.join(sets) or 'default config'})", run))
                if run["metrics"]:
                    tables.append(metrics_table(f"Test split of that run ({ds})", run["metrics"]))
        syn = mode["synth"]
        growth = []
        for scale in syn["scales"]:
            work = Path(tmp) / f"synth-x{scale}"
            work.mkdir()
            users = syn["users"] * scale
            run = run_flow(synth_data(work, users, syn["requests"]), syn["set"], work, "bench", mode["timeout"])
            run.update(scale=scale, users=users, requests=users * syn["requests"])
            runs[f"synth-x{scale}"] = run
            growth.append(run)
            print(f"[pipeline_cost] synthetic x{scale} ({run['requests']} requests): {run['wall_s']:.0f}s, "
                  f"peak {run['peak_mb']:.0f} MB, rc {run['rc']}", flush=True)
    fits: dict = {}
    if growth:  # Fixed + per-request cost: least squares of wall (and peak) on the number of requests.
        n = np.array([g["requests"] for g in growth], float)
        for key in ("wall_s", "peak_mb", "stage_wall_sum_s"):
            y = np.array([g[key] for g in growth], float)
            slope, icpt = np.polyfit(n, y, 1) if len(n) >= 2 else (float("nan"), float("nan"))
            fits[key] = {"fixed": float(icpt), "per_1k_requests": float(slope * 1000)}
        stage_names = list(dict.fromkeys(s["stage"] for g in growth for s in g["stages"]))
        rows = []
        for g in growth:
            per = {s["stage"]: s["wall_s"] for s in g["stages"]}
            rows.append([f"x{g['scale']}", g["requests"], f"{g['wall_s']:.1f}", f"{g['stage_wall_sum_s']:.1f}",
                         f"{g['peak_mb']:.0f}"] + [f"{per[s]:.1f}" if per.get(s) is not None else "-" for s in stage_names]
                        + [g["rc"]])
        tables.append(table(
            f"Growth with the number of requests (synthetic: {syn['users']} users x {syn['requests']} requests at x1)",
            ["scale", "requests", "run wall s", "stages wall s", "peak MB (tree)"] + [f"{s} s" for s in stage_names] + ["rc"],
            rows,
            f"Least-squares fit over the {len(growth)} runs: run wall = {fits['wall_s']['fixed']:.0f} s + "
            f"{fits['wall_s']['per_1k_requests']:.1f} s per 1,000 requests; stage wall = "
            f"{fits['stage_wall_sum_s']['fixed']:.0f} s + {fits['stage_wall_sum_s']['per_1k_requests']:.1f} s per 1,000; "
            f"peak memory = {fits['peak_mb']['fixed']:.0f} MB + {fits['peak_mb']['per_1k_requests']:.1f} MB per 1,000."))
    failed = [k for k, r in runs.items() if r["rc"] != 0]
    notes = [f"Runs that failed (exit code != 0; log tail in the JSON): {', '.join(failed)}."] if failed else []
    result = {"config": {"datasets": mode["datasets"], "synth": syn}, "tables": tables, "notes": notes,
              "data": {"runs": runs, "growth_fit": fits}}
    rec.write(result)
    return result


if __name__ == "__main__":
    main()
