"""Promotion by estimated value (`promotion_metric="ope:<estimator>"`): the daily flow on tiny
Plackett-Luce-logged impressions carries the propensities into the prepared splits, records
GoalRank's off-policy estimate with its interval and ESS on the version and in the decision,
re-evaluates a champion from other data with the same estimator, and refuses, before anything
is written, an unknown estimator or logs without the columns it needs."""
from __future__ import annotations

import math
import os

import pytest

from flow_helpers import TINY_OVERRIDES, run_daily, synth_source

pytestmark = pytest.mark.ray


def _recorded(d: dict, side: str) -> None:
    value, lo, hi, ess = (d[f"{side}_value"], d[f"{side}_ci_low"], d[f"{side}_ci_high"], d[f"{side}_ess"])
    assert all(x is not None and math.isfinite(x) for x in (value, lo, hi, ess)), d
    assert lo <= value <= hi and ess > 0


def test_ope_promotion_records_estimate_interval_and_ess(flow_world, flow_day_one):
    from mlflow import MlflowClient

    from flows import daily_ops
    from goalrank_core.schemas import OPE
    from tasks import object_store, storage
    from tasks.stage_io import read_split

    first = flow_day_one  # day one, promoted by slate SNIPS (run_daily's default metric)
    d = first["decision"]
    assert d["metric"] == "ope:snips" and d["promoted"] and d["reason"] == "no champion yet"
    _recorded(d, "challenger")
    # The prepared valid split carries the logger's propensities; the evaluate stage estimated every policy.
    prepare = next(s["uri"] for s in first["stages"] if s["stage"] == "prepare")
    assert "log_propensity" in read_split(prepare, "valid", "valid", propensities=True).column_names
    evaluate = next(s["uri"] for s in first["stages"] if s["stage"] == "evaluate")
    ope = storage.read_table(object_store.join(evaluate, "ope"), OPE, "ope").to_pylist()
    mine = {(r["split"], r["estimator"]): r for r in ope if r["policy"] == "goalrank"}
    assert set(mine) == {(s, e) for s in ("valid", "test") for e in ("ips", "snips", "pi", "snpi")}
    assert mine[("valid", "snips")]["value"] == d["challenger_value"]
    assert mine[("valid", "snips")]["ess"] == d["challenger_ess"]
    assert len({r["policy"] for r in ope}) > 1  # the baselines too
    # Version tags, the MLflow run and the run record hold the same numbers.
    client = MlflowClient(flow_world["tracking_uri"])
    tags = client.get_model_version(flow_world["model_name"], first["registered_version"]).tags
    assert float(tags["goalrank.metric.valid.ope:snips"]) == d["challenger_value"]
    assert float(tags["goalrank.metric.valid.ope:snips.ci_low"]) == d["challenger_ci_low"]
    assert float(tags["goalrank.metric.valid.ope:snips.ess"]) == d["challenger_ess"]
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.metrics["promotion.challenger_ess"] == pytest.approx(d["challenger_ess"])
    assert run.data.metrics["promotion.challenger_ci_high"] == pytest.approx(d["challenger_ci_high"])
    assert "valid.goalrank.ope_snips" in run.data.metrics and run.data.params["promotion.metric"] == "ope:snips"
    record = storage.read_manifest(daily_ops.record_uri(flow_world["storage"], "impressions", "day-1"))
    assert record["decision"]["challenger_ess"] == d["challenger_ess"]


@pytest.mark.slow  # a second full training run (~1-2 min on 2 cores)
def test_second_run_on_other_data_reevaluates_the_champion_by_the_same_estimate(flow_world, flow_day_one):
    from mlflow import MlflowClient

    # The champion may be a later version when test_flow.py's slow test ran first in this session.
    champion = MlflowClient(flow_world["tracking_uri"]).get_model_version_by_alias(flow_world["model_name"], "champion")
    second = run_daily(flow_world, flow_world["day2"], "ope-2")
    d = second["decision"]
    assert second["newly_registered"] and d["champion_version"] == str(champion.version)
    assert "re-evaluated" in d["reason"] and "point estimates compared, intervals recorded" in d["reason"]
    _recorded(d, "challenger")
    _recorded(d, "champion")  # the champion's lists estimated on this run's logged validation split
    assert d["promoted"] == (d["challenger_value"] >= d["champion_value"] + d["margin"])


def test_ope_metric_refused_before_anything_is_written(flow_world, tmp_path):
    from goalrank_core.errors import ConfigError

    noisy, _ = synth_source(tmp_path / "noisy")  # no propensities
    list_only, _ = synth_source(tmp_path / "pl10", logger="plackett-luce")  # L = 4 of 10: no position propensities
    with pytest.raises(ConfigError, match="unknown off-policy estimator 'dr'"):
        run_daily(flow_world, flow_world["day1"], "bad-1", metric="ope:dr")
    with pytest.raises(ConfigError, match="needs a 'propensity' or 'log_propensity' column"):
        run_daily(flow_world, str(noisy), "bad-2")
    with pytest.raises(ConfigError, match="'position_propensities'"):
        run_daily(flow_world, str(list_only), "bad-3", metric="ope:snpi", overrides=TINY_OVERRIDES)
    from flows.daily import goalrank_daily

    with pytest.raises(ConfigError, match="named data set 'ml-100k' has none"):
        goalrank_daily(dataset="ml-100k", storage=flow_world["storage"], run_id="bad-4",
                       tracking_uri=flow_world["tracking_uri"], model_name=flow_world["model_name"],
                       promotion_metric="ope:ips")
    for name in ("noisy", "pl10", "impressions", "ml-100k"):
        for run_id in ("bad-1", "bad-2", "bad-3", "bad-4"):
            assert not os.path.exists(os.path.join(flow_world["storage"], name, run_id))


def test_validation_columns_of_a_partitioned_log_are_its_holdout_days(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.promotion import check_metric, validation_columns
    from goalrank_core.errors import ConfigError

    table = pa.table({"request_id": ["a"], "log_propensity": [-1.0]})
    bare = table.drop_columns(["log_propensity"])
    for day, t in (("2024-01-01", bare), ("2024-01-02", table), ("2024-01-03", bare)):
        (tmp_path / f"date={day}").mkdir()
        pq.write_table(t, tmp_path / f"date={day}" / "part-0.parquet")
    # The run of the 3rd validates on the 2nd (which has the column), the run of the 4th on the 3rd.
    assert validation_columns(str(tmp_path), "2024-01-03", 2) == {"request_id", "log_propensity"}
    assert check_metric("ope:ips", None, str(tmp_path), "2024-01-03", 2) == "ope:ips"
    with pytest.raises(ConfigError, match="log_propensity"):
        check_metric("ope:ips", None, str(tmp_path), "2024-01-04", 2)
    assert check_metric("ndcg@4", None, str(tmp_path), "2024-01-04", 2) == "ndcg@4"
    assert validation_columns(str(tmp_path), "2030-01-01", 2) is None  # no window: the data gates say why


def test_cli_refuses_an_unknown_estimator_before_prefect_starts(tmp_path, monkeypatch):
    from goalrank.cli import build_parser
    from goalrank.cli.pipeline_cmd import flow_parameters
    from goalrank_core.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["run", "--impressions", "logs.parquet", "--promotion-metric", "ope:dr"])
    with pytest.raises(ConfigError, match="unknown off-policy estimator 'dr'"):
        flow_parameters(args)
    ok = build_parser().parse_args(["run", "--impressions", "logs.parquet", "--promotion-metric", "ope:snpi"])
    assert flow_parameters(ok)["promotion_metric"] == "ope:snpi"
