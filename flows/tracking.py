"""MLflow tracking: the only module that talks to MLflow (besides flows/registry.py, which it
calls). Tracking URI and experiment are arguments, never set on import.

One pipeline run (storage run id + config hash) maps to one MLflow run: a rerun reopens it
rather than making a second one. Logged: params (the flattened config, never credentials),
per-epoch metrics from the stage manifests, per-stage timings, the evaluation table (as a
table artifact and as metrics), PNG plots, and the ranker as an `mlflow.pyfunc` model whose
artifact is the generator bundle directory.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import mlflow
import mlflow.pyfunc
import pandas as pd
import pyarrow as pa
from mlflow import MlflowClient

from flows.registry import TAG_CONFIG_HASH, TAG_RUN_ID, mlflow_key

MODEL_ARTIFACT = "ranker"  # name of the pyfunc model inside the MLflow run
BUNDLE_ARTIFACT = "bundle"  # key of the bundle directory in the pyfunc's artifacts
REQUEST_COLUMNS = ["request_id", "user_id", "timestamp", "history", "candidates"]

# Requirements of the served model; fixed so MLflow skips its slow inference (STACK.md).
PIP_REQUIREMENTS = ["torch==2.13.0", "numpy==2.4.6", "pyarrow==25.0.1", "pandas==3.1.1", "mlflow==3.17.2"]

_SECRET_NAME = re.compile(r"(secret|password|passwd|token|credential|access_key|session_key|api_key|private)", re.I)


# ---------------------------------------------------------------- credentials never logged
def redact_uri(uri: str) -> str:
    """Drop user:password@ and secret-looking query parameters from a URI."""
    if not isinstance(uri, str) or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if not _SECRET_NAME.search(k)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _secret_values() -> list[str]:
    """Values of secret-looking environment variables (AWS keys, tokens), to scrub anywhere."""
    return [v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6]


def scrub(params: dict[str, Any]) -> dict[str, Any]:
    """Params safe to log: secret-named keys dropped, URIs redacted, env secret values masked."""
    secrets = _secret_values()
    out = {}
    for key, value in params.items():
        if _SECRET_NAME.search(key):
            continue
        if isinstance(value, str):
            value = redact_uri(value)
            for s in secrets:
                value = value.replace(s, "***")
        out[key] = value
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"group": {"size": 10}} -> {"group.size": 10}."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------- runs
def default_tracking_uri(workspace: str | os.PathLike) -> str:
    """A local SQLite store under the workspace (no server needed)."""
    return f"sqlite:///{Path(workspace).resolve() / 'mlflow.db'}"


def _artifact_root(tracking_uri: str) -> str | None:
    """Keep a local store's artifacts beside its database rather than in ./mlruns of the cwd."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None  # a tracking server decides


def ensure_experiment(tracking_uri: str, experiment: str) -> str:
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    root = _artifact_root(tracking_uri)
    location = f"{root}/{experiment}" if root else None
    try:
        return client.create_experiment(experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created concurrently
        return client.get_experiment_by_name(experiment).experiment_id


@contextlib.contextmanager
def pipeline_run(tracking_uri: str, experiment: str, run_id: str, config_hash: str,
                 tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of this pipeline run (reopened on a rerun), as the active run."""
    mlflow.set_tracking_uri(tracking_uri)
    exp_id = ensure_experiment(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    found = client.search_runs(
        [exp_id],
        f"tags.`{TAG_RUN_ID}` = '{run_id}' and tags.`{TAG_CONFIG_HASH}` = '{config_hash}'",
        max_results=1,
    )
    all_tags = {TAG_RUN_ID: run_id, TAG_CONFIG_HASH: config_hash, **scrub(tags or {})}
    if found:
        run = mlflow.start_run(run_id=found[0].info.run_id)
        mlflow.set_tags(all_tags)
    else:
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_id, tags=all_tags)
    with run:
        yield run


def log_params(config: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """The flattened config plus `extra` (data set, storage...), scrubbed of credentials."""
    params = scrub({**flatten(config), **(extra or {})})
    active = mlflow.active_run()
    logged = active.data.params if active else {}
    # A reopened run may already hold them; params are immutable, so only log new keys.
    new = {k: str(v)[:6000] for k, v in params.items() if k not in logged}
    if new:
        mlflow.log_params(new)


def epoch_history(manifest: dict[str, Any]) -> list[dict[str, float]]:
    """Per-epoch rows from a stage manifest: the training stages record them under
    `training.epochs` ({"epoch", "loss", "valid", "samples_per_s", ...} per epoch)."""
    training = manifest.get("training")
    hist = training.get("epochs") if isinstance(training, dict) else None
    if hist is None:
        hist = manifest.get("history")
    return [h for h in (hist or []) if isinstance(h, dict)]


def log_stage(stage: str, summary: dict[str, Any]) -> None:
    """Per-stage timing/memory/rows as metrics, and the stage's per-epoch history."""
    numbers = {f"stage.{stage}.{k}": float(v) for k, v in summary.items()
               if k in ("wall_s", "peak_mb", "rows") and v is not None}
    # The score stage's loop diagnostics (goalrank_core/diagnostics.py): group size, spread,
    # effective size, and per policy its share of lists, of best lists and of pi_ref's mass.
    diag = (summary.get("manifest") or {}).get("diagnostics") or {}
    for k, v in diag.items():
        if isinstance(v, dict):
            numbers.update({f"loop.{stage}.{k}.{p}": float(x) for p, x in v.items()})
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            numbers[f"loop.{stage}.{k}"] = float(v)
    if numbers:
        mlflow.log_metrics({mlflow_key(k): v for k, v in numbers.items()})
    run_id = mlflow.active_run().info.run_id
    client = MlflowClient()
    logged: dict[str, set[int]] = {}  # a reopened run keeps its points: log only new steps
    for i, row in enumerate(epoch_history(summary.get("manifest") or {})):
        step = int(row.get("epoch", i))
        vals = {}
        for k, v in row.items():
            if k == "epoch" or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            key = mlflow_key(f"{stage}.{k}")
            if key not in logged:
                logged[key] = {m.step for m in client.get_metric_history(run_id, key)}
            if step not in logged[key]:
                vals[key] = float(v)
        if vals:
            mlflow.log_metrics(vals, step=step)


def log_evaluation(metrics: pa.Table) -> None:
    """The METRICS table as a table artifact and as metrics `{split}.{policy}.{metric}`."""
    df = metrics.to_pandas()
    mlflow.log_table(df, artifact_file="evaluation/metrics.json")
    mlflow.log_metrics({
        mlflow_key(f"{r.split}.{r.policy}.{r.metric}"): float(r.value) for r in df.itertuples()
    })


def log_ope(estimates: pa.Table) -> None:
    """The evaluate stage's OPE table (schemas.OPE) as a table artifact and as metrics
    `{split}.{policy}.ope_{estimator}` and `....ope_{estimator}.ess`."""
    df = estimates.to_pandas()
    mlflow.log_table(df, artifact_file="evaluation/ope.json")
    values = {}
    for r in df.itertuples():
        key = mlflow_key(f"{r.split}.{r.policy}.ope_{r.estimator}")
        values.update({key: float(r.value), f"{key}.ess": float(r.ess)})
    mlflow.log_metrics(values)


def log_decision(decision: dict[str, Any]) -> None:
    mlflow.set_tags({
        "goalrank.promotion.version": str(decision["version"]),
        "goalrank.promotion.promoted": str(decision["promoted"]).lower(),
        "goalrank.promotion.reason": str(decision["reason"])[:5000],
        "goalrank.promotion.champion_version": str(decision.get("champion_version")),
    })
    vals = {"promotion.challenger_value": decision.get("challenger_value"),
            "promotion.champion_value": decision.get("champion_value"),
            "promotion.promoted": float(bool(decision["promoted"]))}
    for side in ("challenger", "champion"):  # an ope metric's interval and ESS (None otherwise)
        vals.update({f"promotion.{side}_{part}": decision.get(f"{side}_{part}") for part in ("ci_low", "ci_high", "ess")})
    mlflow.log_metrics({k: float(v) for k, v in vals.items() if v is not None})


# ---------------------------------------------------------------- plots
def log_plots(histories: dict[str, list[dict[str, float]]], metrics: pa.Table | None,
              metric: str, split: str = "valid") -> list[str]:
    """Training curves (one panel per stage with a history) and a GoalRank-vs-baselines bar
    chart, logged as PNGs under `plots/`. Returns the artifact paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = []
    with tempfile.TemporaryDirectory() as tmp:
        curves = {s: h for s, h in histories.items() if h}
        if curves:
            fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), squeeze=False)
            for ax, (stage, hist) in zip(axes[0], curves.items()):
                keys = sorted({k for row in hist for k, v in row.items()
                               if k in ("loss", "valid") and isinstance(v, (int, float))})
                for k in keys:
                    xs = [row.get("epoch", i) for i, row in enumerate(hist) if k in row]
                    ax.plot(xs, [row[k] for row in hist if k in row], marker="o", label=k)
                ax.set_title(stage)
                ax.set_xlabel("epoch")
                if keys:
                    ax.legend(fontsize=7)
            logged.append(_log_figure(fig, Path(tmp) / "training_curves.png"))
        if metrics is not None and metrics.num_rows:
            df = metrics.to_pandas()
            df = df[(df["split"] == split) & (df["metric"] == metric)].sort_values("value")
            if len(df):
                fig, ax = plt.subplots(figsize=(6, 0.4 * len(df) + 1.5))
                colors = ["tab:red" if p.startswith("goalrank") else "tab:gray" for p in df["policy"]]
                ax.barh(df["policy"], df["value"], color=colors,
                        xerr=[df["value"] - df["ci_low"], df["ci_high"] - df["value"]])
                ax.set_xlabel(f"{metric} ({split})")
                ax.set_title("GoalRank against baselines")
                logged.append(_log_figure(fig, Path(tmp) / "goalrank_vs_baselines.png"))
    return logged


# ---------------------------------------------------------------- the served ranker
class GoalRankRanker(mlflow.pyfunc.PythonModel):
    """pyfunc ranker. Input: a DataFrame with the REQUESTS columns (request_id, user_id,
    timestamp, history, candidates); output: a DataFrame (request_id, ranked)."""

    def load_context(self, context) -> None:
        from goalrank_core.bundle import ModelBundle

        self.bundle = ModelBundle.load(context.artifacts[BUNDLE_ARTIFACT])

    def predict(self, context, model_input, params=None):
        from goalrank_core.ranking import rank

        table = requests_from_frame(pd.DataFrame(model_input))
        ranked = rank(self.bundle, table, "goalrank")
        # Plain lists (not numpy arrays) so the served JSON is a list of ids per request.
        return pd.DataFrame({"request_id": ranked.column("request_id").to_pylist(),
                             "ranked": ranked.column("ranked").to_pylist()})


def requests_from_frame(df: pd.DataFrame) -> pa.Table:
    """A DataFrame of requests (list cells as lists or arrays) -> a REQUESTS table, validated."""
    from goalrank_core.schemas import REQUESTS
    from goalrank_core.validate import validate_requests

    missing = [c for c in REQUEST_COLUMNS if c not in df.columns]
    if missing:
        from goalrank_core.errors import DataValidationError

        raise DataValidationError(f"requests: missing column(s) {missing}; expected {REQUEST_COLUMNS}")
    cols = {
        "request_id": pa.array(df["request_id"].astype(str).tolist(), pa.string()),
        "user_id": pa.array(df["user_id"].astype("int64").tolist(), pa.int64()),
        "timestamp": pa.array(df["timestamp"].astype("int64").tolist(), pa.int64()),
        "history": pa.array([[int(x) for x in v] for v in df["history"]], pa.list_(pa.int64())),
        "candidates": pa.array([[int(x) for x in v] for v in df["candidates"]], pa.list_(pa.int64())),
    }
    return validate_requests(pa.table(cols, schema=REQUESTS), "requests")


def _local_dir(uri: str, tmp: str) -> str:
    """A local directory holding `uri` (copied out of object storage when needed)."""
    if "://" not in uri or uri.startswith("file://"):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    from tasks.object_store import download_dir  # S3 settings from the AWS_* environment

    return str(download_dir(uri, Path(tmp) / BUNDLE_ARTIFACT))


def log_ranker(bundle_uri: str, example: pd.DataFrame) -> str:
    """Log the generator bundle as a pyfunc model in the active run; returns its model URI
    (models:/m-<id>), which `registry.register` takes as the version's source. `example` is a few request rows, used as the input example and to
    build the signature from a real prediction."""
    from mlflow.models import infer_signature

    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = _local_dir(bundle_uri, tmp)
        model = GoalRankRanker()
        model.load_context(type("Ctx", (), {"artifacts": {BUNDLE_ARTIFACT: bundle_dir}})())
        example = example[REQUEST_COLUMNS].reset_index(drop=True)
        signature = infer_signature(example, model.predict(None, example))
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            python_model=str(Path(__file__).with_name("ranker_model.py")),  # model from code: no pickle
            artifacts={BUNDLE_ARTIFACT: bundle_dir},
            signature=signature,
            input_example=example,
            pip_requirements=PIP_REQUIREMENTS,
        )
    return info.model_uri  # "models:/m-<id>": MLflow 3 keeps logged models outside run artifacts


def resolve_model_dir(model_uri: str, tracking_uri: str | None = None, dst: str | None = None) -> str:
    """A local bundle directory for `model_uri`: a `models:/NAME@alias`, `models:/NAME/3` or
    `runs:/...` URI is downloaded from MLflow and its bundle artifact returned; anything else
    (a local path) is returned as is."""
    if not model_uri.startswith(("models:/", "runs:/")):
        return model_uri
    dst = dst or tempfile.mkdtemp(prefix="goalrank-model-")
    local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst, tracking_uri=tracking_uri)
    from mlflow.models import Model

    try:
        flavor = Model.load(local).flavors.get("python_function", {})
        bundle = Path(local) / flavor["artifacts"][BUNDLE_ARTIFACT]["path"]
    except (KeyError, TypeError, OSError, mlflow.exceptions.MlflowException) as exc:
        raise FileNotFoundError(f"{model_uri}: no '{BUNDLE_ARTIFACT}' artifact (not a GoalRank ranker model)") from exc
    if not bundle.is_dir():
        raise FileNotFoundError(f"{model_uri}: its '{BUNDLE_ARTIFACT}' artifact is missing")
    return str(bundle)


def load_bundle_from(model_uri: str, tracking_uri: str | None = None):
    """A ModelBundle, in memory, from a local folder or a `models:/` / `runs:/` URI. A
    registered model is downloaded into a temporary folder that is removed once loaded."""
    from goalrank_core.bundle import ModelBundle

    if not model_uri.startswith(("models:/", "runs:/")):
        return ModelBundle.load(model_uri)
    with tempfile.TemporaryDirectory(prefix="goalrank-model-") as dst:
        return ModelBundle.load(resolve_model_dir(model_uri, tracking_uri, dst))


def _log_figure(fig, path: Path) -> str:
    """Save a matplotlib figure as PNG, close it, log it under plots/; returns its artifact path."""
    import matplotlib.pyplot as plt
    import mlflow

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    mlflow.log_artifact(str(path), "plots")
    return f"plots/{path.name}"
