"""`goalrank run | serve | promote | backfill`: the daily flow once, as a scheduled deployment, the
registry's promotion by hand, and the daily flow over a range of dates.

`run` needs no server: with no PREFECT_API_URL, Prefect starts a temporary local server whose
database lives under the workspace (PREFECT_HOME), Ray starts locally, MLflow writes a
SQLite store under the workspace and storage is a local folder (flows.settings).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_CRON = "0 3 * * *"  # 03:00 UTC daily
DEFAULT_DEPLOYMENT = "daily"


def register(sub: argparse._SubParsersAction) -> None:
    from goalrank.cli.common import add_data_source_args, add_split_arg

    p = sub.add_parser("run", help="run the daily retraining flow once (no server needed)",
                       description="Run the goalrank-daily flow once: prepare, train, evaluate, register, promote.")
    add_data_source_args(p)
    _add_flow_args(p)
    p.add_argument("--verbose", action="store_true",
                   help="show Prefect's and Ray's own output on the terminal too (default: only progress, "
                        "results, warnings and errors; the rest goes to the run's log file)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("serve", help="serve the daily flow as a Prefect deployment with a cron schedule",
                       description="Register a deployment of goalrank-daily with a daily cron schedule (UTC) and "
                                   "serve it until interrupted. Point PREFECT_API_URL at a Prefect server so its UI "
                                   "shows the deployment and can start runs with edited parameters.")
    p.add_argument("--cron", default=DEFAULT_CRON, help=f"cron schedule, UTC (default {DEFAULT_CRON!r})")
    p.add_argument("--name", default=DEFAULT_DEPLOYMENT, help=f"deployment name (default {DEFAULT_DEPLOYMENT!r})")
    p.add_argument("--paused", action="store_true", help="register the schedule paused")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=None, help="default data set of scheduled runs (default ml-100k)")
    src.add_argument("--impressions", metavar="PATH", help="default impressions path of scheduled runs")
    p.add_argument("--items", metavar="PATH", help="item table for --impressions")
    add_split_arg(p)
    p.add_argument("--data-dir", metavar="DIR", help="where data sets live")
    _add_flow_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("promote", help="promote a registered version to champion (exit 1 if not promoted)",
                       description="Move the champion alias to a version (default: the challenger) if its "
                                   "validation metric is no worse than the champion's, or unconditionally with --force.")
    p.add_argument("--version", help="model version (default: the current challenger)")
    p.add_argument("--force", action="store_true", help="promote without comparing (an unevaluated version never)")
    p.add_argument("--metric", default=None, help="validation metric to compare (default ndcg@L), or ope:<estimator> "
                   "(ips, snips, pi, snpi): an off-policy estimate the run recorded from logged propensities")
    p.add_argument("--margin", type=float, default=0.0, help="promote if new >= champion + margin (default 0)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: settings)")
    p.add_argument("--model-name", help="registered model name (default: settings)")
    p.add_argument("--config", metavar="FILE", help="config file (for L in the default metric)")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("backfill", help="run the daily flow for each date of a range, skipping completed dates",
                       description="Run goalrank-daily for every run date from --from to --to (inclusive), in order, "
                                   "with the date as run id. A date whose run record ({storage}/{dataset}/{date}/"
                                   "registry/_manifest.json) exists with the same config hash is skipped. Stops at "
                                   "the first failed date.")
    add_data_source_args(p)
    p.add_argument("--from", dest="date_from", required=True, metavar="YYYY-MM-DD", help="first run date")
    p.add_argument("--to", dest="date_to", required=True, metavar="YYYY-MM-DD", help="last run date (inclusive)")
    _add_flow_args(p)
    p.set_defaults(func=cmd_backfill)


def _add_flow_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", metavar="URI", help="artifact storage: folder or s3://bucket/prefix (default: settings)")
    p.add_argument("--run-id", help="storage run folder (default: the run date); a rerun resumes it")
    p.add_argument("--run-date", help="run date YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: SQLite under the workspace)")
    p.add_argument("--experiment", help="MLflow experiment (default: settings)")
    p.add_argument("--model-name", help="registered model name (default: settings)")
    p.add_argument("--config", metavar="FILE", help="YAML/JSON config file (GoalRankConfig)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set group.size=10 (repeatable)")
    p.add_argument("--promotion-metric", help="validation metric deciding promotion (default ndcg@L), or "
                   "ope:<estimator> (ips, snips, pi, snpi): an off-policy estimate of GoalRank's expected slate reward "
                   "on the logged validation split, for impressions with propensity/log_propensity (pi, snpi: also "
                   "position_propensities)")
    p.add_argument("--promotion-margin", type=float, default=0.0,
                   help="new model must reach champion + margin (default 0: no worse)")
    p.add_argument("--cold", action="store_true",
                   help="train from scratch instead of warm-starting from the champion's weights")


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """["group.size=10", "train.lr=1e-3"] -> {"group.size": 10, "train.lr": 0.001}."""
    import yaml

    from goalrank_core.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        value = yaml.safe_load(raw) if raw.strip() else raw
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        out[key.strip()] = value
    return out


def _use_local_prefect(workspace: Path) -> None:
    """No Prefect server configured: keep the temporary server's database in the workspace."""
    if not os.environ.get("PREFECT_API_URL") and not os.environ.get("PREFECT_HOME"):
        home = (workspace / "prefect").resolve()
        home.mkdir(parents=True, exist_ok=True)  # Prefect creates only the last folder itself
        os.environ["PREFECT_HOME"] = str(home)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's default 20 s start-up limit is too short on a busy 2-core machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def flow_parameters(args: argparse.Namespace) -> dict[str, Any]:
    """The flow's parameters from the parsed flags, the config file (its `settings:` section
    and model sections) and the environment (flags > env > file > defaults). Validated here,
    so a bad config fails before anything starts. A setting holding a credential (a password
    inside a tracking URI) is left out: the flow reads it from the environment itself, so it
    never becomes a Prefect parameter."""
    from flows.settings import load_config_file, mask_uri, resolve_settings
    from goalrank_core.config import GoalRankConfig

    file_settings, model = load_config_file(args.config)
    from goalrank.cli.common import split_override

    overrides = {**parse_overrides(args.overrides), **split_override(args)}
    if args.promotion_metric:  # an unknown off-policy estimator fails here, before Prefect starts
        from flows.promotion import estimator

        estimator(args.promotion_metric)
    base = GoalRankConfig.from_dict(model)
    if overrides:
        base.override(overrides)
    flags = {"storage": args.storage, "tracking_uri": args.tracking_uri, "experiment": args.experiment,
             "model_name": args.model_name, "data_dir": args.data_dir}
    st = resolve_settings(cli=flags, file_settings=file_settings, file_name=str(args.config or "config file"))
    params = {
        "dataset": args.dataset, "impressions": args.impressions, "items": args.items,
        "run_id": args.run_id, "run_date": args.run_date,
        "config": model or None, "overrides": overrides or None,
        "promotion_metric": args.promotion_metric, "promotion_margin": args.promotion_margin,
        "cold": True if getattr(args, "cold", False) else None,
    }
    for name in ("storage", "tracking_uri", "experiment", "model_name", "data_dir"):
        value = getattr(st, name)
        if value is not None and mask_uri(str(value)) == str(value):
            params[name] = value
    return {k: v for k, v in params.items() if v is not None}


def _workspace() -> Path:
    """Settings' defaults live under the current folder; so does the local Prefect database."""
    return Path.cwd() / ".goalrank"


def preflight_inputs(args: argparse.Namespace, data_dir: str | None = None) -> None:
    """Validate local impressions (and items) before Prefect, Ray or MLflow start, so bad
    input fails in a second with one line and nothing written; likewise a named data set
    missing from `data_dir` (the resolved setting) when Ray is local, i.e. reads the same
    disk. Inputs on S3, and data sets on a Ray cluster's nodes, are checked by the prepare
    stage on the Ray workers instead (it writes nothing before they pass)."""
    from goalrank_core.validate import read_impressions, read_items

    if getattr(args, "dataset", None) and not os.environ.get("RAY_ADDRESS"):
        from goalrank_core.datasets.registry import dataset_dir

        dataset_dir(args.dataset, data_dir)
    if args.impressions and "://" not in args.impressions:
        read_impressions(args.impressions)
    if getattr(args, "items", None) and "://" not in args.items:
        read_items(args.items)


def run_log_path(params: dict[str, Any]) -> Path:
    """Where `goalrank run` writes the output it keeps off the terminal: the run's folder,
    `{storage}/{dataset}/{run_id}/_logs/goalrank-run.log` (appended by reruns), when storage is
    a local folder; else `.goalrank/logs/{dataset}/{run_id}.log` under the working folder."""
    from datetime import datetime, timezone

    from flows.daily import check_run_id, dataset_name
    from goalrank_core.partitions import parse_date

    name = dataset_name(params.get("dataset"), params.get("impressions"))
    date = params.get("run_date") or datetime.now(timezone.utc).strftime("%Y-%m-%d")
    run_id = check_run_id(params.get("run_id") or parse_date(date, "run_date").isoformat())  # before a folder is made
    storage = params.get("storage")
    if storage and "://" not in storage:
        return Path(storage) / name / run_id / "_logs" / "goalrank-run.log"
    return _workspace() / "logs" / name / f"{run_id}.log"


def cmd_run(args: argparse.Namespace) -> int:
    params = flow_parameters(args)
    preflight_inputs(args, params.get("data_dir"))
    _use_local_prefect(_workspace())
    if args.verbose:
        from flows.daily import goalrank_daily

        summary = goalrank_daily(**params)
        return 0 if summary.get("registered_version") else 1
    from goalrank.cli.console import quiet_console

    log_path = run_log_path(params)
    print(f"goalrank run: {params.get('dataset') or params.get('impressions')}; Prefect's and Ray's own output "
          f"goes to {log_path} (--verbose shows it here)", flush=True)
    with quiet_console(log_path):
        from flows.daily import goalrank_daily

        summary = goalrank_daily(**params)
    print(f"full log: {log_path}")
    return 0 if summary.get("registered_version") else 1


def cmd_backfill(args: argparse.Namespace) -> int:
    from goalrank_core.errors import ConfigError
    from goalrank_core.partitions import date_range, parse_date

    first, last = parse_date(args.date_from, "--from"), parse_date(args.date_to, "--to")
    if last < first:
        raise ConfigError(f"--to {last.isoformat()} is before --from {first.isoformat()}")
    if args.run_id or args.run_date:
        raise ConfigError("backfill sets the run date and run id of each run to the date; drop --run-id/--run-date")
    params = flow_parameters(args)
    _use_local_prefect(_workspace())
    from flows.backfill import backfill

    rows = backfill(date_range(first, last), params)
    ran = [r["date"] for r in rows if r["ran"]]
    print(f"backfill {first.isoformat()}..{last.isoformat()}: ran {len(ran)} flow(s) {ran}, "
          f"skipped {len(rows) - len(ran)} complete date(s)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    if args.dataset is None and args.impressions is None:
        args.dataset = "ml-100k"
    params = flow_parameters(args)
    _use_local_prefect(_workspace())
    from prefect.flows import EntrypointType
    from prefect.schedules import Cron

    from flows.daily import goalrank_daily

    if not os.environ.get("PREFECT_API_URL"):
        print("goalrank serve: no PREFECT_API_URL set; using a temporary local Prefect server "
              "(start one with `prefect server start` and set PREFECT_API_URL to see it in the UI)", flush=True)
    goalrank_daily.serve(
        name=args.name,
        schedules=[Cron(args.cron, timezone="UTC")],
        paused=args.paused,
        parameters=params,
        description="GoalRank daily retraining: prepare, train, evaluate, register, promote.",
        tags=["goalrank"],
        # Runs import the flow by module path, so any working directory works.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.settings import load_config_file, resolve_settings
    from goalrank_core.config import GoalRankConfig

    file_settings, model = load_config_file(args.config)
    st = resolve_settings(cli={"tracking_uri": args.tracking_uri, "model_name": args.model_name},
                          file_settings=file_settings, file_name=str(args.config or "config file"))
    metric = args.metric or f"ndcg@{GoalRankConfig.from_dict(model).protocol.slate_len}"
    from mlflow import MlflowClient

    from flows import registry
    from flows.promotion import estimator

    estimator(metric)  # "ope:<unknown>" is a one-line error

    decision = registry.promote(MlflowClient(st.tracking_uri), st.model_name, args.version, metric=metric,
                                margin=args.margin, force=args.force)
    print(json.dumps(decision.to_dict(), indent=2))
    return 0 if decision.promoted else 1
