"""Run every benchmark (each in its own process, as its own command), then regenerate
docs/results.md from all of bench/results/*.json.

    python -m bench.run_all --mode quick|full [--only NAME,...] [--skip NAME,...]

A benchmark that fails or runs past its time limit is reported (exit code, last lines of its
output) and the others still run; the exit code is 1 if any failed. The run's own record
(per-benchmark wall time and exit code) goes to bench/results/run_all_{mode}.json.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, Recorder, table, this_tree_env

# name -> (module, time limit in seconds: quick, full). Order: cheapest evidence first.
BENCHMARKS = {
    "latency": ("bench.latency", 400, 3600),
    "throughput": ("bench.throughput", 400, 3600),
    "main_table": ("bench.main_table", 900, 6 * 3600),
    "group_size": ("bench.group_size", 700, 6 * 3600),
    "scaling": ("bench.scaling", 700, 6 * 3600),
    "pipeline_cost": ("bench.pipeline_cost", 900, 4 * 3600),
    "bench_score": ("bench.bench_score", 600, 3600),
    "bench_train_generator": ("bench.bench_train_generator", 400, 3600),
}


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    shared = ROOT.parent / "shared" / "data"
    if "GOALRANK_DATA_DIR" not in env and shared.is_dir():
        env["GOALRANK_DATA_DIR"] = str(shared)  # as the Makefile does
    for k, v in (("RAY_AUTH_MODE", "disabled"), ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
                 ("RAY_USAGE_STATS_ENABLED", "0"), ("TQDM_MININTERVAL", "5"), ("PYTHONUNBUFFERED", "1")):
        env.setdefault(k, v)
    return this_tree_env(env)


def run_one(name: str, mode: str, log_dir: Path) -> dict:
    module, quick_limit, full_limit = BENCHMARKS[name]
    limit = quick_limit if mode == "quick" else full_limit
    cmd = [sys.executable, "-m", module, "--mode", mode]
    log = log_dir / f"{name}_{mode}.log"
    print(f"[run_all] {name}: python -m {module} --mode {mode} (limit {limit}s, log {log.relative_to(ROOT)})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            # The benchmark's own group: SIGTERM first, so it can end what it started in other sessions.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - t0
    tail = log.read_text(errors="replace").splitlines()[-12:] if rc != 0 else []
    print(f"[run_all] {name}: {'ok' if rc == 0 else f'FAILED ({rc})'} in {wall:.0f}s", flush=True)
    for line in tail:
        print(f"    {line}", flush=True)
    return {"name": name, "rc": rc, "wall_s": wall, "log": str(log.relative_to(ROOT)), "log_tail": tail}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--skip", help="comma-separated benchmarks to leave out")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    names = [n for n in names if n not in set((args.skip or "").split(","))]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    rec = Recorder("run_all", args.mode)
    log_dir = ROOT / "bench" / "results" / "tmp" / "logs"  # git-ignored
    log_dir.mkdir(parents=True, exist_ok=True)
    runs = [run_one(n, args.mode, log_dir) for n in names]
    total = time.time() - rec.started
    rows = [[r["name"], "ok" if r["rc"] == 0 else f"failed ({r['rc']})", f"{r['wall_s']:.0f}"] for r in runs]
    rows.append(["total", "", f"{sum(r['wall_s'] for r in runs):.0f}"])
    rec.write({"config": {"benchmarks": names},
               "tables": [table(f"`python -m bench.run_all --mode {args.mode}`: benchmarks run", ["benchmark", "status", "wall s"],
                                rows, "Every benchmark runs in its own process; logs under bench/results/tmp/logs/ (not committed).")],
               "data": {"runs": runs, "total_s": total}})
    from bench.report import write_report

    print(f"[run_all] wrote {write_report().relative_to(ROOT)}; total {total:.0f}s", flush=True)
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
