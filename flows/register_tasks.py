"""After evaluation: log the run to MLflow and register its ranker (`track_and_register`), then
move the champion alias if the new version is no worse (`promote`)."""
from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact

from goalrank_core.config import GoalRankConfig
from goalrank_core.schemas import IMPRESSIONS, METRICS
from flows import promotion
from flows.retry import TASK_OPTS
from tasks.storage import join, parent, read_table

GOALRANK_POLICY = "goalrank"  # policy name of the trained generator in the METRICS table

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


@task(name="track_and_register", task_run_name="track_and_register · {run_id}", **TASK_OPTS)
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


@task(name="promote", task_run_name="promote · {run_id}", **TASK_OPTS)
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
