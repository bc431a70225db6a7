"""One Prefect task per pipeline stage, each a thin wrapper over its function in `tasks/stages.py`:
it runs the stage, prints its progress line, and leaves a markdown artifact with the stage's
key numbers. The stages skip work whose manifest matches, so a retry redoes only what did not
complete."""
from __future__ import annotations

import re
import time
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from goalrank_core.config import GoalRankConfig
from flows import console
from flows.retry import TASK_OPTS
from tasks import stages


def stage_summary(stage: str, result: Any, wall_s: float) -> dict[str, Any]:
    """Key numbers of a stage: rows per table, wall time, peak memory, last losses/metrics."""
    manifest = dict(result.manifest or {})
    mem = manifest.get("memory") or {}
    peaks = [v for v in (mem.get("driver_peak_rss_mb"), mem.get("ray_workers_peak_rss_mb"),
                         mem.get("train_workers_peak_rss_mb")) if v is not None]
    tables = {k: v.get("rows") for k, v in (manifest.get("tables") or {}).items() if isinstance(v, dict)}
    from flows.tracking import epoch_history

    hist = epoch_history(manifest)
    return {
        "stage": stage,
        "uri": result.uri,
        "skipped": bool(result.skipped),
        "wall_s": round(wall_s, 2),
        "stage_wall_s": manifest.get("wall_s"),
        "peak_mb": max(peaks) if peaks else None,
        "driver_peak_mb": mem.get("driver_peak_rss_mb"),
        "workers_peak_mb": max([v for v in (mem.get("ray_workers_peak_rss_mb"), mem.get("train_workers_peak_rss_mb"))
                                if v is not None], default=None),
        "rows": sum(r for r in tables.values() if isinstance(r, int)) if tables else None,
        "tables": tables,
        "last_epoch": hist[-1] if hist else None,
        "manifest": manifest,
    }


def _artifact(label: str, run_id: str, s: dict[str, Any]) -> None:
    lines = [f"### {label} · run `{run_id}`", "", "| | |", "|---|---|",
             f"| output | `{s['uri']}` |", f"| skipped (complete earlier) | {s['skipped']} |",
             f"| wall time (task) | {s['wall_s']:.1f} s |"]
    if s["stage_wall_s"] is not None:
        lines.append(f"| wall time (stage) | {s['stage_wall_s']:.1f} s |")
    if s["driver_peak_mb"] is not None:
        lines.append(f"| peak memory, driver | {s['driver_peak_mb']:.0f} MB |")
    if s["workers_peak_mb"] is not None:
        lines.append(f"| peak memory, Ray workers | {s['workers_peak_mb']:.0f} MB |")
    for name, rows in s["tables"].items():
        lines.append(f"| rows `{name}` | {rows} |")
    for k, v in (s["last_epoch"] or {}).items():
        if isinstance(v, (int, float)):
            lines.append(f"| last epoch `{k}` | {v:.4g} |")
    key = re.sub(r"[^a-z0-9-]+", "-", f"{label}-{run_id}".lower()).strip("-")[:100]
    create_markdown_artifact("\n".join(lines), key=key, description=f"{label} of run {run_id}")


def run_stage(label: str, run_id: str, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run the stage function `fn(*args, **kwargs)` with its progress line and artifact."""
    console.begin(label)
    t0 = time.time()
    result = fn(*args, **kwargs)
    s = stage_summary(label, result, time.time() - t0)
    _artifact(label, run_id, s)
    console.done(label, console.stage_detail(s), s["wall_s"])
    return s


def step(label: str, call: Any, detail: Any = None) -> Any:
    """A flow step that is not a `run_stage` stage (gates, warm start, registry): its
    progress line, with `detail(result)` after the time."""
    console.begin(label)
    t0 = time.time()
    out = call()
    console.done(label, detail(out) if detail else "", time.time() - t0)
    return out


@task(name="prepare", task_run_name="prepare · {run_id}", **TASK_OPTS)
def prepare_task(run_id: str, source: dict, out: str, config: dict) -> dict:
    return run_stage("prepare", run_id, stages.prepare, stages.DataSource(**source), out, GoalRankConfig.from_dict(config))


@task(name="train_policies", task_run_name="train_policies · {run_id}", **TASK_OPTS)
def train_policies_task(run_id: str, prepared: str, out: str, config: dict) -> dict:
    return run_stage("train_policies", run_id, stages.train_policies, prepared, out, GoalRankConfig.from_dict(config))


@task(name="train_reward_model", task_run_name="train_reward_model · {run_id}", **TASK_OPTS)
def train_reward_model_task(run_id: str, prepared: str, policies: str, out: str, config: dict,
                            init: str | None = None) -> dict:
    kw = {"init": init} if init else {}  # warm start (flows/daily_ops.py)
    return run_stage("train_reward_model", run_id, stages.train_reward_model, prepared, policies, out,
                      GoalRankConfig.from_dict(config), **kw)


@task(name="generate_candidates", task_run_name="generate_candidates r{round} · {run_id}", **TASK_OPTS)
def generate_candidates_task(run_id: str, round: int, prepared: str, policies: str, generator: str | None,
                             out: str, config: dict) -> dict:
    return run_stage(f"generate_candidates r{round}", run_id, stages.generate_candidates, prepared, policies,
                      generator, out, GoalRankConfig.from_dict(config), round=round)


@task(name="score", task_run_name="score r{round} · {run_id}", **TASK_OPTS)
def score_task(run_id: str, round: int, candidates: str, prepared: str, reward_model: str, out: str,
               config: dict) -> dict:
    return run_stage(f"score r{round}", run_id, stages.score, candidates, prepared, reward_model, out,
                      GoalRankConfig.from_dict(config))


@task(name="train_generator", task_run_name="train_generator r{round} · {run_id}", **TASK_OPTS)
def train_generator_task(run_id: str, round: int, scored: str, prepared: str, init: str | None, out: str,
                         config: dict) -> dict:
    return run_stage(f"train_generator r{round}", run_id, stages.train_generator, scored, prepared, init, out,
                      GoalRankConfig.from_dict(config))


@task(name="evaluate", task_run_name="evaluate · {run_id}", **TASK_OPTS)
def evaluate_task(run_id: str, prepared: str, reward_model: str, policies: str, generator: str, out: str,
                  config: dict) -> dict:
    return run_stage("evaluate", run_id, stages.evaluate, prepared, reward_model, policies, generator, out,
                      GoalRankConfig.from_dict(config))
