"""The daily retraining flow `goalrank-daily`: one Prefect task per stage, URIs between them.

prepare -> train_policies -> train_reward_model (on the policies' lists, as the in-process fit)
-> rounds x (generate_candidates -> score -> train_generator) -> evaluate -> track_and_register
-> promote.

The stage tasks (flows/stage_tasks.py) are thin wrappers over the stage functions in
`tasks/stages.py`, retried with exponential backoff only when the failure is transient
(flows/retry.py); a validation error fails at once. The stages themselves skip work whose
manifest matches, so a retry or a rerun of the same run id redoes only what did not complete,
and the registry (flows/register_tasks.py) finds the run's version by tag instead of
registering it twice. This module only checks the parameters and wires the tasks.
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

from prefect import flow

from goalrank_core.config import GoalRankConfig
from goalrank_core.errors import ConfigError, GoalRankInputError
from goalrank_core.partitions import parse_date
from flows import console, daily_ops, promotion, report
from flows.register_tasks import promote_task, track_and_register_task
from flows.settings import resolve_settings
from flows.stage_tasks import (evaluate_task, generate_candidates_task, prepare_task, score_task, step,
                               train_generator_task, train_policies_task, train_reward_model_task)
from tasks.partitions import is_partitioned
from tasks.storage import stage_uri

FLOW_NAME = "goalrank-daily"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_run_id(run_id: str) -> str:
    """A run id becomes a storage folder: letters, digits, '.', '_' or '-', at most 100."""
    if not _RUN_ID.match(run_id):
        raise ConfigError(f"run id '{run_id}' must be letters, digits, '.', '_' or '-' (at most 100)")
    return run_id


def flow_settings(**given: Any) -> dict[str, str]:
    """Storage, tracking URI, experiment, model name and data dir: the flow's parameters
    where given, else flows.settings (env > defaults under the working folder)."""
    st = resolve_settings(cli=given)
    return {k: getattr(st, k) for k in ("storage", "tracking_uri", "experiment", "model_name", "data_dir")}


def resolve_config(config: dict | None, overrides: dict | None) -> GoalRankConfig:
    """The flow's config: a full config mapping (default: the defaults) with dotted overrides."""
    cfg = GoalRankConfig.from_dict(config or {})
    return cfg.override(dict(overrides or {})) if overrides else cfg


def run_config(config: dict | None, overrides: dict | None, dataset: str | None) -> GoalRankConfig:
    """The config a run trains with, and whose hash its run record keeps (backfill compares it):
    reward.unshown auto -> negative for a named data set (built from what users chose), unknown
    for impression logs (what a system showed)."""
    return resolve_config(config, overrides).for_source("interactions" if dataset else "impressions")


def dataset_name(dataset: str | None, impressions: str | None) -> str:
    if dataset:
        return dataset
    if impressions:
        stem = Path(impressions.rstrip("/")).name.split(".")[0]
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem) or "impressions"
    raise ConfigError("give a data set name (--dataset) or an impressions path (--impressions)")


class RunPlan(NamedTuple):
    """The checked parameters of one run."""
    settings: dict[str, str]
    cfg: GoalRankConfig
    run_date: str
    run_id: str
    name: str  # the data set's name in storage and tags
    metric: str  # the promotion metric


def check_parameters(dataset: str | None, impressions: str | None, settings: dict[str, str], config: dict | None,
                     overrides: dict | None, run_date: str | None, run_id: str | None,
                     promotion_metric: str | None) -> RunPlan:
    """Every parameter checked before anything is written; a bad one is a GoalRankInputError."""
    if (dataset is None) == (impressions is None):
        raise ConfigError("give exactly one of dataset or impressions")
    cfg = run_config(config, overrides, dataset)
    if cfg.reward.feedback:  # the prepare stage re-writes impressions with the contract's columns only
        raise ConfigError("reward.feedback (labels_<name> columns) is supported by the in-process fit "
                          "(goalrank fit) only, not yet by the daily flow's stages")
    run_date = parse_date(run_date or datetime.now(timezone.utc).strftime("%Y-%m-%d"), "run_date").isoformat()
    metric = promotion.check_metric(promotion_metric or f"ndcg@{cfg.protocol.slate_len}", dataset, impressions,
                                    run_date, cfg.window.days)
    return RunPlan(settings, cfg, run_date, check_run_id(run_id or run_date), dataset_name(dataset, impressions),
                   metric)


def train_rounds(plan: RunPlan, uri: Any, prep: dict, pol: dict, rew: dict, generator: str | None,
                 c: dict) -> tuple[list[dict], str]:
    """rounds x (generate_candidates -> score -> train_generator): their summaries, last generator."""
    summaries = []
    for r in range(1, plan.cfg.group.rounds + 1):
        cand = generate_candidates_task(plan.run_id, r, prep["uri"], pol["uri"], generator, uri(f"candidates_r{r}"), c)
        sc = score_task(plan.run_id, r, cand["uri"], prep["uri"], rew["uri"], uri(f"scored_r{r}"), c)
        # Round 1 starts from the champion (warm) or the supervised generator (policies stage).
        init = generator or pol["uri"]
        gen = train_generator_task(plan.run_id, r, sc["uri"], prep["uri"], init, uri(f"generator_r{r}"), c)
        generator = gen["uri"]
        summaries += [cand, sc, gen]
    return summaries, generator


def register_and_promote(plan: RunPlan, summaries: list[dict], c: dict, params: dict, tags: dict,
                         uris: dict, margin: float) -> tuple[dict, dict]:
    """track_and_register then promote, each with its progress line."""
    s, run_id = plan.settings, plan.run_id
    reg = step("track_and_register", lambda: track_and_register_task(
        run_id, plan.name, summaries, c, params, s["tracking_uri"], s["experiment"], s["model_name"], tags),
        lambda r: f"{s['model_name']} v{r['version']}" + ("" if r["created"] else " (existing)"))
    decision = step("promote", lambda: promote_task(
        run_id, reg, uris, c, s["tracking_uri"], s["experiment"], s["model_name"], plan.metric, margin),
        lambda d: "promoted to champion" if d["promoted"] else "not promoted")
    return reg, decision


def logged_plan(dataset: str | None, impressions: str | None, settings: dict[str, Any], config: dict | None,
                overrides: dict | None, run_date: str | None, run_id: str | None,
                promotion_metric: str | None) -> RunPlan:
    """check_parameters inside a flow run: a bad parameter is one line an operator reads in the
    run's logs (a run started from the UI with a bad override); the exception, and its
    traceback, follow from Prefect."""
    try:
        return check_parameters(dataset, impressions, flow_settings(**settings), config, overrides, run_date,
                                run_id, promotion_metric)
    except GoalRankInputError as exc:
        from prefect import get_run_logger

        get_run_logger().error(f"bad parameters, nothing run or written: {exc}")
        raise


def record_run(plan: RunPlan, run_cfg: GoalRankConfig, reg: dict, decision: dict, warm_info: dict,
               window: dict | None, prepared: str, evaluated: str) -> None:
    """The run record, written last: it marks the run complete for backfills (daily_ops)."""
    daily_ops.write_record(plan.settings["storage"], plan.name, plan.run_id, {
        "config_hash": plan.cfg.hash(), "run_config_hash": run_cfg.hash(), "run_id": plan.run_id,
        "run_date": plan.run_date, "version": reg["version"], "data_version": reg["data_version"],
        "decision": decision, "warm_start": warm_info, "window": window["window"] if window else None,
        "gates": window["gates"] if window else None, "prepare": prepared, "evaluate": evaluated})


@flow(name=FLOW_NAME, log_prints=True, validate_parameters=True)
def goalrank_daily(
    dataset: str | None = None,
    impressions: str | None = None,
    items: str | None = None,
    storage: str | None = None,
    run_id: str | None = None,
    run_date: str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    model_name: str | None = None,
    data_dir: str | None = None,
    config: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
    promotion_metric: str | None = None,
    promotion_margin: float = 0.0,
    cold: bool = False,
) -> dict[str, Any]:
    """Retrain GoalRank on a data set (`dataset`, e.g. "ml-100k") or an impressions file, log
    to MLflow, register the model and promote it if it is no worse than the champion.

    storage: local folder or s3://bucket/prefix; run_id: the storage run folder (default the
    run date, YYYY-MM-DD UTC, so a second run on the same day resumes/skips); config: a full
    config mapping; overrides: dotted keys such as {"group.size": 10, "train.epochs": 2};
    promotion_metric: validation metric (default ndcg@L), or "ope:<estimator>" (ips, snips, pi,
    snpi) for an off-policy estimate on logs with propensities (flows/promotion.py);
    promotion_margin: the new model must reach champion + margin.

    Daily operations (flows/daily_ops.py): when `impressions` is a folder of `date=YYYY-MM-DD`
    partitions, the run for `run_date` D reads the window [D - W, D - 1] after the data gates
    pass on D - 1; training warm-starts from the champion unless `cold`. A run record
    (`{run}/registry/_manifest.json`) written last marks the run complete for backfills.
    """
    t_flow = time.time()
    settings = dict(storage=storage, tracking_uri=tracking_uri, experiment=experiment, model_name=model_name,
                    data_dir=data_dir)
    plan = logged_plan(dataset, impressions, settings, config, overrides, run_date, run_id, promotion_metric)
    s, cfg, run_id = plan.settings, plan.cfg, plan.run_id
    c = cfg.to_dict()
    uri = lambda stage: stage_uri(s["storage"], plan.name, run_id, stage)  # noqa: E731

    source = {"dataset": dataset, "impressions": impressions, "items": items, "data_dir": s["data_dir"]}
    window = None
    partitioned = impressions is not None and is_partitioned(impressions)
    # Stages: [gates], prepare, warm start, policies, reward model, rounds x 3, evaluate,
    # register, promote.
    console.start(int(partitioned) + 7 + 3 * cfg.group.rounds)
    if partitioned:
        # Gates before anything is written or trained: a bad day stops here, champion untouched.
        window = step("data_gates", lambda: daily_ops.data_gates_task(run_id, impressions, plan.run_date, c),
                      lambda w: f"{len(w['partitions'])} partition(s) pass")
        source["partitions"] = tuple(window["partitions"])
    prep = prepare_task(run_id, source, uri("prepare"), c)
    warm = step("warm_start", lambda: daily_ops.warm_start_task(
        run_id, prep["uri"], uri(daily_ops.WARM_STAGE), c, s["tracking_uri"], s["model_name"], plan.run_date, cold),
        lambda w: f"from champion v{w['version']}" if w["warm"] else "cold start")
    run_cfg = daily_ops.effective_config(cfg, warm)  # fewer epochs for what starts warm
    c = run_cfg.to_dict()
    pol = train_policies_task(run_id, prep["uri"], uri("policies"), c)
    # After the policies: the reward model also learns from their lists (reward.group_lists).
    rew = train_reward_model_task(run_id, prep["uri"], pol["uri"], uri("reward_model"), c, warm["reward"])
    # Round 1 samples from the champion's generator when warm.
    rounds, generator = train_rounds(plan, uri, prep, pol, rew, warm["generator"], c)
    ev = evaluate_task(run_id, prep["uri"], rew["uri"], pol["uri"], generator, uri("evaluate"), c)
    summaries = [prep, pol, rew, *rounds, ev]

    params = {"dataset": plan.name, "impressions": impressions, "items": items, "storage": s["storage"],
              "run_id": run_id, "run_date": plan.run_date, "promotion.metric": plan.metric,
              "promotion.margin": promotion_margin, "cold": cold, "warm_start": bool(warm["warm"]),
              "warm_start.version": warm["version"] if warm["warm"] else None}
    tags = daily_ops.warm_tags(warm, plan.run_date, window["window"] if window else None)
    uris = {"prepared": prep["uri"], "reward_model": rew["uri"], "policies": pol["uri"]}
    reg, decision = register_and_promote(plan, summaries, c, params, tags, uris, promotion_margin)
    warm_info = {k: warm[k] for k in ("warm", "version", "reason", "stats", "uri")}
    record_run(plan, run_cfg, reg, decision, warm_info, window, prep["uri"], ev["uri"])
    summary = report.run_summary(run_id, plan.name, s["model_name"], reg, decision, summaries,
                                 time.time() - t_flow, plan.run_date, warm_info, window)
    print(report.format_stages(summary["stages"]), flush=True)  # the log (and the flow run's logs) only
    console.emit(report.format_summary(summary))
    return summary
