"""The daily retraining flow `goalrank-daily`: one Prefect task per stage, URIs between them.

prepare -> train_policies -> train_reward_model (on the policies' lists, as the in-process fit)
-> rounds x (generate_candidates -> score -> train_generator) -> evaluate -> track_and_register
-> promote.

Each stage task is a thin wrapper over the stage function in `tasks/stages.py`, retried with exponential backoff only when the failure is transient (storage or
network I/O, a lost Ray worker or connection); a validation error fails at once. The stages
themselves skip work whose manifest matches, so a retry or a rerun of the same run id redoes
only what did not complete, and the registry finds the run's version by tag instead of
registering it twice.
"""
from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff

from goalrank_core.config import GoalRankConfig
from goalrank_core.errors import ConfigError, GoalRankInputError
from goalrank_core.schemas import IMPRESSIONS, METRICS
from flows import console, daily_ops, promotion
from flows.settings import resolve_settings
from tasks import stages
from tasks.partitions import is_partitioned
from tasks.storage import join, parent, read_table, stage_uri

FLOW_NAME = "goalrank-daily"
GOALRANK_POLICY = "goalrank"  # policy name of the trained generator in the METRICS table
RETRIES = 3
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


def check_run_id(run_id: str) -> str:
    """A run id becomes a storage folder: letters, digits, '.', '_' or '-', at most 100."""
    if not _RUN_ID.match(run_id):
        raise ConfigError(f"run id '{run_id}' must be letters, digits, '.', '_' or '-' (at most 100)")
    return run_id

# Exception class names (anywhere in the MRO or the cause chain) that mean "try again later".
_TRANSIENT_NAMES = {
    # Ray: a worker, actor, node or the connection went away
    "RaySystemError", "RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
    "NodeDiedError", "ObjectLostError", "OwnerDiedError", "GetTimeoutError", "RayChannelTimeoutError",
    "WorkerGroupError", "ControllerError",
    # botocore / urllib3 / requests / httpx
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ConnectionError", "Timeout", "ReadTimeout", "ConnectTimeout", "RemoteDisconnected", "ProtocolError",
}
# OSErrors that are not going to fix themselves.
_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def is_transient(exc: BaseException) -> bool:
    """True for failures worth retrying: I/O and connection errors, lost Ray workers. Never for
    bad input or config (GoalRankInputError), missing files or programming errors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, GoalRankInputError):
            return False
        if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS):
            return True  # includes ConnectionError, TimeoutError, pyarrow's I/O errors
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_if_transient(task_obj, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry only a transient failure."""
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - classifying, not handling
        transient = is_transient(exc)
        if not transient:
            print(f"[{task_run.name}] not retried: {type(exc).__name__}: {exc}", flush=True)
        return transient
    return False


# ---------------------------------------------------------------- stage tasks
def _summary(stage: str, result: Any, wall_s: float) -> dict[str, Any]:
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


def _run_stage(label: str, run_id: str, fn: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run the stage function `fn(*args, **kwargs)` with its progress line and artifact."""
    console.begin(label)
    t0 = time.time()
    result = fn(*args, **kwargs)
    s = _summary(label, result, time.time() - t0)
    _artifact(label, run_id, s)
    console.done(label, console.stage_detail(s), s["wall_s"])
    return s


def _step(label: str, call: Any, detail: Any = None) -> Any:
    """A flow step that is not a `_run_stage` stage (gates, warm start, registry): its
    progress line, with `detail(result)` after the time."""
    console.begin(label)
    t0 = time.time()
    out = call()
    console.done(label, detail(out) if detail else "", time.time() - t0)
    return out


_TASK_OPTS = dict(
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2, 4, 8 s
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,  # stages skip completed work themselves (manifests)
    log_prints=True,
)


@task(name="prepare", task_run_name="prepare · {run_id}", **_TASK_OPTS)
def prepare_task(run_id: str, source: dict, out: str, config: dict) -> dict:
    return _run_stage("prepare", run_id, stages.prepare, stages.DataSource(**source), out, GoalRankConfig.from_dict(config))


@task(name="train_policies", task_run_name="train_policies · {run_id}", **_TASK_OPTS)
def train_policies_task(run_id: str, prepared: str, out: str, config: dict) -> dict:
    return _run_stage("train_policies", run_id, stages.train_policies, prepared, out, GoalRankConfig.from_dict(config))


@task(name="train_reward_model", task_run_name="train_reward_model · {run_id}", **_TASK_OPTS)
def train_reward_model_task(run_id: str, prepared: str, policies: str, out: str, config: dict,
                            init: str | None = None) -> dict:
    kw = {"init": init} if init else {}  # warm start (flows/daily_ops.py)
    return _run_stage("train_reward_model", run_id, stages.train_reward_model, prepared, policies, out,
                      GoalRankConfig.from_dict(config), **kw)


@task(name="generate_candidates", task_run_name="generate_candidates r{round} · {run_id}", **_TASK_OPTS)
def generate_candidates_task(run_id: str, round: int, prepared: str, policies: str, generator: str | None,
                             out: str, config: dict) -> dict:
    return _run_stage(f"generate_candidates r{round}", run_id, stages.generate_candidates, prepared, policies,
                      generator, out, GoalRankConfig.from_dict(config), round=round)


@task(name="score", task_run_name="score r{round} · {run_id}", **_TASK_OPTS)
def score_task(run_id: str, round: int, candidates: str, prepared: str, reward_model: str, out: str,
               config: dict) -> dict:
    return _run_stage(f"score r{round}", run_id, stages.score, candidates, prepared, reward_model, out,
                      GoalRankConfig.from_dict(config))


@task(name="train_generator", task_run_name="train_generator r{round} · {run_id}", **_TASK_OPTS)
def train_generator_task(run_id: str, round: int, scored: str, prepared: str, init: str | None, out: str,
                         config: dict) -> dict:
    return _run_stage(f"train_generator r{round}", run_id, stages.train_generator, scored, prepared, init, out,
                      GoalRankConfig.from_dict(config))


@task(name="evaluate", task_run_name="evaluate · {run_id}", **_TASK_OPTS)
def evaluate_task(run_id: str, prepared: str, reward_model: str, policies: str, generator: str, out: str,
                  config: dict) -> dict:
    return _run_stage("evaluate", run_id, stages.evaluate, prepared, reward_model, policies, generator, out,
                      GoalRankConfig.from_dict(config))


# ---------------------------------------------------------------- tracking and registry
def read_metrics(evaluate_uri: str, manifest: dict) -> Any:
    """The METRICS table written by the evaluate stage."""
    tables = list((manifest.get("tables") or {}).keys())
    name = "metrics" if "metrics" in tables else next((t for t in tables if "metric" in t), tables[0] if tables else "")
    return read_table(join(evaluate_uri, name), METRICS, f"evaluate metrics {evaluate_uri}")


def data_version(prepare_manifest: dict) -> str:
    """What identifies the prepared data (validation split included): the prepare stage's
    inputs' fingerprints, its parameters and the protocol config, hashed. The generator or
    training config does not change it, so models trained differently on the same data
    compare directly."""
    import hashlib
    import json

    key = {
        "inputs": {k: (v or {}).get("fingerprint") for k, v in (prepare_manifest.get("inputs") or {}).items()},
        "params": prepare_manifest.get("params"),
        "protocol": (prepare_manifest.get("config") or {}).get("protocol"),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def bundle_uri(summary: dict) -> str:
    """The model bundle a training stage saved (`models` in its manifest, e.g. `{out}/model`)."""
    models = summary["manifest"].get("models") or {}
    name = "model" if "model" in models else next(iter(models), None)
    return join(summary["uri"], name) if name else summary["uri"]


def metric_values(metrics_table: Any, policy: str = GOALRANK_POLICY) -> dict[str, float]:
    """{"valid.ndcg@6": ..., "test.hr@6": ...} of one policy."""
    return {f"{r['split']}.{r['metric']}": float(r["value"])
            for r in metrics_table.to_pylist() if r["policy"] == policy}


def _request_example(prepared: str, manifest: dict, n: int = 3) -> Any:
    """A few real requests (no feedback columns) for the pyfunc's input example."""
    from flows.tracking import REQUEST_COLUMNS

    tables = list((manifest.get("tables") or {}).keys())
    name = next((t for t in ("test", "valid", "train") if t in tables), None)
    if name is None:
        name = next(t for t in tables if any(s in t for s in ("test", "valid", "train")))
    table = read_table(join(prepared, name), IMPRESSIONS, f"prepared {name}", columns=REQUEST_COLUMNS)
    return table.slice(0, n).to_pandas()


@task(name="track_and_register", task_run_name="track_and_register · {run_id}", **_TASK_OPTS)
def track_and_register_task(run_id: str, dataset: str, summaries: list[dict], config: dict, params: dict,
                            tracking_uri: str, experiment: str, model_name: str,
                            extra_tags: dict | None = None) -> dict:
    """Log the run to MLflow and register its ranker (a `challenger`); promotion comes next."""
    from mlflow import MlflowClient

    from flows import registry, tracking

    by_stage = {s["stage"]: s for s in summaries}
    prep, ev = by_stage["prepare"], by_stage["evaluate"]
    final_gen = [s for s in summaries if s["stage"].startswith("train_generator")][-1]
    metrics = read_metrics(ev["uri"], ev["manifest"])
    dv = data_version(prep["manifest"])
    cfg = GoalRankConfig.from_dict(config)
    values = metric_values(metrics)
    if not values:
        raise ValueError(f"evaluate wrote no rows for policy '{GOALRANK_POLICY}'; nothing to register")
    ope = promotion.read_ope(ev["uri"], ev["manifest"])  # None unless the logs carry propensities
    values.update(promotion.ope_values(ope, GOALRANK_POLICY))
    with tracking.pipeline_run(tracking_uri, experiment, run_id, cfg.hash(),
                               tags={registry.TAG_DATASET: dataset, registry.TAG_DATA_VERSION: dv,
                                     **(extra_tags or {})}) as run:
        tracking.log_params(config, params)
        histories = {}
        for s in summaries:
            tracking.log_stage(s["stage"].replace(" ", "_"), s)
            histories[s["stage"]] = tracking.epoch_history(s["manifest"])
        tracking.log_evaluation(metrics)
        if ope is not None:
            tracking.log_ope(ope)
        tracking.log_plots(histories, metrics, metric=f"ndcg@{cfg.protocol.slate_len}")
        client = MlflowClient(tracking_uri)
        existing = registry.find_version(client, model_name, run_id, cfg.hash())
        if existing is None:
            source = tracking.log_ranker(bundle_uri(final_gen), _request_example(prep["uri"], prep["manifest"]))
        else:
            source = existing.source
        mv, created = registry.register(
            client, model_name, source, run.info.run_id, run_id, cfg.hash(), values,
            tags={registry.TAG_DATASET: dataset, registry.TAG_DATA_VERSION: dv,
                  "goalrank.storage_prefix": tracking.redact_uri(parent(prep["uri"])), **(extra_tags or {})},
        )
        return {"mlflow_run_id": run.info.run_id, "version": str(mv.version), "created": created,
                "data_version": dv, "metrics": metrics.to_pylist()}


@task(name="promote", task_run_name="promote · {run_id}", **_TASK_OPTS)
def promote_task(run_id: str, registered: dict, uris: dict, config: dict, tracking_uri: str, experiment: str,
                 model_name: str, metric: str, margin: float) -> dict:
    """Champion moves to the new version only if it is no worse (registry.decide); the
    decision and both numbers (for an ope metric with their intervals and ESS) are logged on
    the run."""
    import mlflow
    from mlflow import MlflowClient

    from flows import registry, tracking

    client = MlflowClient(tracking_uri)
    cfg = GoalRankConfig.from_dict(config)
    # Used only when the champion was evaluated on other validation data (flows/promotion.py).
    reevaluate = promotion.reevaluator(metric, model_name, tracking_uri, uris["prepared"], cfg.train.seed,
                                       GOALRANK_POLICY)
    decision = registry.promote(client, model_name, registered["version"], metric=metric, margin=margin,
                                reevaluate=reevaluate)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=registered["mlflow_run_id"]):
        tracking.log_decision(decision.to_dict())
    d = decision.to_dict()
    md = "\n".join([f"### promotion · run `{run_id}`", "", "| | |", "|---|---|",
                    *(f"| {k} | {v} |" for k, v in d.items())])
    create_markdown_artifact(md, key=re.sub(r"[^a-z0-9-]+", "-", f"promote-{run_id}".lower())[:100])
    return d


# ---------------------------------------------------------------- the flow
def flow_settings(**given: Any) -> dict[str, str]:
    """Storage, tracking URI, experiment, model name and data dir: the flow's parameters
    where given, else flows.settings (env > defaults under the working folder)."""
    st = resolve_settings(cli=given)
    return {k: getattr(st, k) for k in ("storage", "tracking_uri", "experiment", "model_name", "data_dir")}


def resolve_config(config: dict | None, overrides: dict | None) -> GoalRankConfig:
    """The flow's config: a full config mapping (default: the defaults) with dotted overrides."""
    cfg = GoalRankConfig.from_dict(config or {})
    return cfg.override(dict(overrides or {})) if overrides else cfg


def dataset_name(dataset: str | None, impressions: str | None) -> str:
    if dataset:
        return dataset
    if impressions:
        stem = Path(impressions.rstrip("/")).name.split(".")[0]
        return re.sub(r"[^A-Za-z0-9._-]+", "-", stem) or "impressions"
    raise ConfigError("give a data set name (--dataset) or an impressions path (--impressions)")


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
    try:
        if (dataset is None) == (impressions is None):
            raise ConfigError("give exactly one of dataset or impressions")
        s = flow_settings(storage=storage, tracking_uri=tracking_uri, experiment=experiment,
                          model_name=model_name, data_dir=data_dir)
        # reward.unshown: auto -> negative for a named data set (built from what users chose),
        # unknown for impression logs (what a system showed).
        cfg = resolve_config(config, overrides).for_source("interactions" if dataset else "impressions")
        if cfg.group.search_lists:  # refused, not ignored: the stages build groups without it
            raise ConfigError("group.search_lists is supported by the in-process fit (goalrank fit) only, "
                              "not yet by the daily flow's stages")
        if cfg.reward.feedback:  # the prepare stage re-writes impressions with the contract's columns only
            raise ConfigError("reward.feedback (labels_<name> columns) is supported by the in-process fit "
                              "(goalrank fit) only, not yet by the daily flow's stages")
        run_date = run_date or datetime.now(timezone.utc).strftime("%Y-%m-%d")
        from goalrank_core.partitions import parse_date

        run_date = parse_date(run_date, "run_date").isoformat()
        run_id = check_run_id(run_id or run_date)
        name = dataset_name(dataset, impressions)
        metric = promotion.check_metric(promotion_metric or f"ndcg@{cfg.protocol.slate_len}", dataset, impressions,
                                        run_date, cfg.window.days)
    except GoalRankInputError as exc:
        # One line an operator reads in the run's logs (a run started from the UI with a bad
        # override); the exception, and its traceback, follow from Prefect.
        from prefect import get_run_logger

        get_run_logger().error(f"bad parameters, nothing run or written: {exc}")
        raise
    c = cfg.to_dict()
    uri = lambda stage: stage_uri(s["storage"], name, run_id, stage)  # noqa: E731

    source = {"dataset": dataset, "impressions": impressions, "items": items, "data_dir": s["data_dir"]}
    window = None
    partitioned = impressions is not None and is_partitioned(impressions)
    # Stages: [gates], prepare, warm start, policies, reward model, rounds x 3, evaluate,
    # register, promote.
    console.start(int(partitioned) + 7 + 3 * cfg.group.rounds)
    if partitioned:
        # Gates before anything is written or trained: a bad day stops here, champion untouched.
        window = _step("data_gates", lambda: daily_ops.data_gates_task(run_id, impressions, run_date, c),
                       lambda w: f"{len(w['partitions'])} partition(s) pass")
        source["partitions"] = tuple(window["partitions"])
    prep = prepare_task(run_id, source, uri("prepare"), c)
    warm = _step("warm_start", lambda: daily_ops.warm_start_task(
        run_id, prep["uri"], uri(daily_ops.WARM_STAGE), c, s["tracking_uri"], s["model_name"], run_date, cold),
        lambda w: f"from champion v{w['version']}" if w["warm"] else "cold start")
    run_cfg = daily_ops.effective_config(cfg, warm)  # fewer epochs for what starts warm
    c = run_cfg.to_dict()
    pol = train_policies_task(run_id, prep["uri"], uri("policies"), c)
    # After the policies: the reward model also learns from their lists (reward.group_lists).
    rew = train_reward_model_task(run_id, prep["uri"], pol["uri"], uri("reward_model"), c, warm["reward"])
    summaries = [prep, pol, rew]
    generator = warm["generator"]  # round 1 samples from the champion's generator when warm
    for r in range(1, cfg.group.rounds + 1):
        cand = generate_candidates_task(run_id, r, prep["uri"], pol["uri"], generator, uri(f"candidates_r{r}"), c)
        sc = score_task(run_id, r, cand["uri"], prep["uri"], rew["uri"], uri(f"scored_r{r}"), c)
        # Round 1 starts from the champion (warm) or the supervised generator (policies stage).
        init = generator or pol["uri"]
        gen = train_generator_task(run_id, r, sc["uri"], prep["uri"], init, uri(f"generator_r{r}"), c)
        generator = gen["uri"]
        summaries += [cand, sc, gen]
    ev = evaluate_task(run_id, prep["uri"], rew["uri"], pol["uri"], generator, uri("evaluate"), c)
    summaries.append(ev)

    params = {"dataset": name, "impressions": impressions, "items": items, "storage": s["storage"],
              "run_id": run_id, "run_date": run_date, "promotion.metric": metric,
              "promotion.margin": promotion_margin, "cold": cold, "warm_start": bool(warm["warm"]),
              "warm_start.version": warm["version"] if warm["warm"] else None}
    tags = daily_ops.warm_tags(warm, run_date, window["window"] if window else None)
    reg = _step("track_and_register", lambda: track_and_register_task(
        run_id, name, summaries, c, params, s["tracking_uri"], s["experiment"], s["model_name"], tags),
        lambda r: f"{s['model_name']} v{r['version']}" + ("" if r["created"] else " (existing)"))
    uris = {"prepared": prep["uri"], "reward_model": rew["uri"], "policies": pol["uri"]}
    decision = _step("promote", lambda: promote_task(
        run_id, reg, uris, c, s["tracking_uri"], s["experiment"], s["model_name"], metric, promotion_margin),
        lambda d: "promoted to champion" if d["promoted"] else "not promoted")
    warm_info = {k: warm[k] for k in ("warm", "version", "reason", "stats", "uri")}
    daily_ops.write_record(s["storage"], name, run_id, {
        "config_hash": cfg.hash(), "run_config_hash": run_cfg.hash(), "run_id": run_id, "run_date": run_date,
        "version": reg["version"], "data_version": reg["data_version"], "decision": decision,
        "warm_start": warm_info, "window": window["window"] if window else None,
        "gates": window["gates"] if window else None, "prepare": prep["uri"], "evaluate": ev["uri"]})
    summary = {
        "run_id": run_id,
        "dataset": name,
        "model_name": s["model_name"],
        "registered_version": reg["version"],
        "newly_registered": reg["created"],
        "mlflow_run_id": reg["mlflow_run_id"],
        "data_version": reg["data_version"],
        "decision": decision,
        "metrics": reg["metrics"],
        "stages": [{k: v for k, v in x.items() if k in ("stage", "uri", "skipped", "wall_s", "peak_mb", "driver_peak_mb", "workers_peak_mb", "rows")}
                   for x in summaries],
        "wall_s": round(time.time() - t_flow, 1),
        "run_date": run_date,
        "warm_start": warm_info,
        "window": window["window"] if window else None,
        "gates": window["gates"] if window else None,
    }
    console.emit(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report: metrics table, stage timings, registered version, decision."""
    rows = summary["metrics"]
    metrics = sorted({r["metric"] for r in rows})
    out = [f"\n== GoalRank run {summary['run_id']} on {summary['dataset']} ({summary['wall_s']} s) =="]
    for split in ("valid", "test"):
        policies = sorted({r["policy"] for r in rows if r["split"] == split})
        if not policies:
            continue
        val = {(r["policy"], r["metric"]): r["value"] for r in rows if r["split"] == split}
        width = max(len(p) for p in policies + ["policy"])
        out.append(f"\n{split} metrics")
        out.append(f"{'policy':<{width}}  " + "  ".join(f"{m:>9}" for m in metrics))
        for p in policies:
            out.append(f"{p:<{width}}  " + "  ".join(f"{val.get((p, m), float('nan')):9.4f}" for m in metrics))
    out.append("\nstages")
    out.append(f"{'stage':<24} {'wall s':>8} {'driver MB':>10} {'workers MB':>10} {'rows':>9}  skipped")

    def mb(x):
        return "-" if x is None else f"{x:.0f}"
    for s in summary["stages"]:
        rows_ = str(s["rows"]) if s.get("rows") is not None else "-"
        out.append(f"{s['stage']:<24} {s['wall_s']:>8.1f} {mb(s.get('driver_peak_mb')):>10} "
                   f"{mb(s.get('workers_peak_mb')):>10} {rows_:>9}  {s['skipped']}")
    out.append("(peak resident memory: driver process; summed Ray worker processes)")
    d = summary["decision"]
    new = "new" if summary["newly_registered"] else "existing (rerun)"
    ws = summary.get("warm_start")
    if ws:
        out.append(f"\nwarm start: from champion v{ws['version']} ({ws['reason']})" if ws["warm"]
                   else f"\ncold start: {ws['reason']}")
    if summary.get("window"):
        w = summary["window"]
        out.append(f"window: {w['start']}..{w['end']}, {len(w['partitions'])} partition(s) read, "
                   f"{w['holdout']} validates; data gates passed")
    out.append(f"\nregistered: {summary['model_name']} version {summary['registered_version']} ({new})")

    def num(x):
        return "-" if x is None else f"{x:.4f}"
    verdict = "PROMOTED to champion" if d["promoted"] else "not promoted"
    out.append(f"decision: {verdict}: {d['metric']} challenger {num(d['challenger_value'])} vs champion "
               f"{num(d['champion_value'])} (v{d['champion_version']}); {d['reason']}")
    return "\n".join(out)
