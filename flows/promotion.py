"""Promotion by estimated value: the daily flow's `promotion_metric="ope:<estimator>"`.

When the logs carry the logging policy's propensities, the champion gate may compare the
challenger and the champion by an off-policy estimate (goalrank_core.ope) of the expected
slate reward (sum of labels over the list) of GoalRank's lists on the logged validation split,
instead of validation NDCG:

- `ope:ips`, `ope:snips` need `propensity` or `log_propensity`; `ope:pi`, `ope:snpi` also need
  `position_propensities`. `check_metric` refuses, before any stage runs, an unknown estimator
  or logs without the columns (a named data set carries none).
- The prepare stage carries the columns into the valid and test splits; the evaluate stage
  writes every policy's estimates (`{evaluate}/ope/`, schemas.OPE); `ope_values` turns
  GoalRank's into version tags: `valid.ope:snips` and its `.ci_low`, `.ci_high`, `.ess`.
- The registry compares point estimates (challenger >= champion + margin, as for NDCG) and
  records both sides' intervals and ESS in the Decision. A champion evaluated on other data is
  re-evaluated (`reevaluator`) with the same estimator, seed and bootstrap on this run's split.
"""
from __future__ import annotations

from typing import Any, Callable

from goalrank_core.errors import ConfigError
from goalrank_core.ope import ESTIMATORS
from flows.registry import MEASURE_PARTS, OPE_PREFIX, Measured, is_ope

LIST_PROPENSITY = ("propensity", "log_propensity")  # either one
POSITION_ESTIMATORS = ("pi", "snpi")  # also need position_propensities


def estimator(metric: str) -> str | None:
    """"ope:snips" -> "snips"; None for a metric that is not an off-policy estimate."""
    if not is_ope(metric):
        return None
    name = metric[len(OPE_PREFIX):]
    if name not in ESTIMATORS:
        raise ConfigError(f"promotion metric '{metric}': unknown off-policy estimator '{name}' "
                          f"(one of {', '.join(OPE_PREFIX + e for e in ESTIMATORS)})")
    return name


def check_metric(metric: str, dataset: str | None, impressions: str | None, run_date: str,
                 window_days: int) -> str:
    """The promotion metric, refused (ConfigError) when it is an off-policy estimate that the
    logs cannot give: an unknown estimator, a named data set, or impressions whose
    validation rows lack the propensity columns. Reads Parquet footers only."""
    name = estimator(metric)
    if name is None:
        return metric
    if dataset is not None:
        raise ConfigError(f"promotion metric '{metric}' needs logged propensities; the named data set '{dataset}' "
                          f"has none (give impressions logged with propensity or log_propensity)")
    columns = validation_columns(impressions, run_date, window_days)
    if columns is None:  # nothing readable to check: the prepare stage reports it
        return metric
    if not any(c in columns for c in LIST_PROPENSITY):
        raise ConfigError(f"promotion metric '{metric}' needs a 'propensity' or 'log_propensity' column in "
                          f"{impressions}; it has none")
    if name in POSITION_ESTIMATORS and "position_propensities" not in columns:
        raise ConfigError(f"promotion metric '{metric}' needs a 'position_propensities' column in {impressions} "
                          f"(the pseudo-inverse estimators need per-position propensities); use ope:ips or ope:snips")
    return metric


def validation_columns(impressions: str, run_date: str, window_days: int) -> set[str] | None:
    """The columns every Parquet file of the impressions that become the validation split
    holds: a file or folder, or for `date=` partitions the run's holdout day. None when
    there is no file to read (the stages then report it)."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from goalrank_core.partitions import parse_date
    from tasks import object_store
    from tasks.partitions import list_partitions, plan_window

    uri = impressions
    parts = list_partitions(impressions)
    if parts:
        try:
            uri = parts[plan_window(impressions, parse_date(run_date), window_days).holdout]
        except (ValueError, KeyError):  # no window for this date: the data gates say why
            return None
    fs, path = object_store.filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        files = [path]
    elif info.type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                       if i.type == pafs.FileType.File and i.path.endswith(".parquet")
                       and not i.path.rsplit("/", 1)[-1].startswith(("_", ".")))
    else:
        return None
    try:
        schemas = [pq.read_schema(f, filesystem=fs) for f in files]
    except Exception:  # noqa: BLE001 - an unreadable file is the prepare stage's error to report
        return None
    return set.intersection(*(set(s.names) for s in schemas)) if schemas else None


# ---------------------------------------------------------------- evaluation results
def read_ope(evaluate_uri: str, manifest: dict) -> Any:
    """The evaluate stage's OPE table, or None when the splits carried no propensities."""
    from goalrank_core.schemas import OPE
    from tasks.object_store import join
    from tasks.storage import read_table

    if "ope" not in (manifest.get("tables") or {}):
        return None
    return read_table(join(evaluate_uri, "ope"), OPE, f"evaluate off-policy estimates {evaluate_uri}")


def ope_values(table: Any, policy: str) -> dict[str, float]:
    """{"valid.ope:snips": v, "valid.ope:snips.ci_low": lo, ... ".ess": ess} of one policy:
    the version tags an ope promotion metric reads (registry.version_measure)."""
    out: dict[str, float] = {}
    for r in ([] if table is None else table.to_pylist()):
        if r["policy"] == policy:
            key = f"{r['split']}.{OPE_PREFIX}{r['estimator']}"
            out[key] = float(r["value"])
            out.update({f"{key}.{part}": float(r[part]) for part in MEASURE_PARTS})
    return out


def reevaluator(metric: str, model_name: str, tracking_uri: str, prepared: str, seed: int,
                policy: str) -> Callable[[Any], Measured]:
    """The registry's `reevaluate`: the champion was evaluated on other validation data, so
    rank this run's validation split with its generator, in process, and measure `metric`
    exactly as the evaluate stage does (NDCG/HR/MAP@K, or the same off-policy estimator with
    the same seed and bootstrap)."""

    def reevaluate(champ: Any) -> Measured:
        from flows import tracking
        from goalrank_core.metrics import evaluate_lists, evaluate_ope
        from goalrank_core.ranking import rank
        from goalrank_core.schemas import REQUESTS
        from tasks.stage_io import read_split

        bundle = tracking.load_bundle_from(f"models:/{model_name}/{champ.version}", tracking_uri)
        truth = read_split(prepared, "valid", "validation split", propensities=True)
        ranked = rank(bundle, truth.select(REQUESTS.names), policy, seed=seed)
        name = estimator(metric)
        if name is None:
            k = int(metric.rsplit("@", 1)[1])
            got = Measured(evaluate_lists(ranked, truth, ks=(k,), seed=seed)[metric].value)
        else:
            estimates = evaluate_ope(ranked, truth, seed=seed)
            if name not in estimates:
                raise ConfigError(f"promotion metric '{metric}': the validation split has no position_propensities")
            e = estimates[name]
            got = Measured(e.value, e.ci_low, e.ci_high, e.ess)
        print(f"[promote] champion v{champ.version} re-evaluated on this run's validation data: {metric} "
              f"{got.value:.4f}", flush=True)
        return got

    return reevaluate
