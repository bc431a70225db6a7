"""The whole `goalrank-daily` flow under prefect_test_harness, on tiny synthetic data, with
local Ray, local storage and MLflow on SQLite: it completes, registers a version, a rerun
redoes nothing and registers nothing new, and champion moves only when the new model is no
worse (both ways). The first run is shared with test_flow_ope.py (conftest `flow_day_one`)."""
from __future__ import annotations

import os

import pytest

from flow_helpers import SMALL_SLATES, run_daily

pytestmark = pytest.mark.ray


def _run(world, run_id, margin=0.0, metric=None, **extra_overrides):
    """Day one's data again under `run_id`, by the flow's default promotion metric."""
    return run_daily(world, world["day1"], run_id, metric=metric, margin=margin,
                     overrides={**SMALL_SLATES, **extra_overrides})


def test_flow_registers_promotes_and_reruns_without_duplicates(flow_world, flow_day_one):
    from mlflow import MlflowClient

    client = MlflowClient(flow_world["tracking_uri"])
    from flows.report import format_stages, format_summary

    first = flow_day_one
    assert first["registered_version"] == "1" and first["newly_registered"]
    assert first["decision"]["promoted"] and first["decision"]["reason"] == "no champion yet"
    assert str(client.get_model_version_by_alias(flow_world["model_name"], "champion").version) == "1"
    stages = [s["stage"] for s in first["stages"]]
    assert stages == ["prepare", "train_policies", "train_reward_model", "generate_candidates r1", "score r1",
                      "train_generator r1", "evaluate"]
    assert not any(s["skipped"] for s in first["stages"])
    policies = {r["policy"] for r in first["metrics"]}
    assert "goalrank" in policies and len(policies) > 1  # GoalRank against baselines
    assert all(0.0 <= r["value"] <= 1.0 for r in first["metrics"])
    # The end-of-run report on the console: metrics tables, version, decision; the per-stage
    # table goes to the log only (each stage's progress line already has its numbers).
    report = format_summary(first)
    assert "valid metrics" in report and "test metrics" in report and "train_generator r1" not in report
    assert "train_generator r1" in format_stages(first["stages"])
    assert "registered: goalrank-flow version 1" in report and "PROMOTED" in report

    # MLflow: params, per-epoch metrics, stage timings, plots, evaluation table, the model.
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.params["group.size"] == str(SMALL_SLATES["group.size"])
    assert any(k.startswith("stage.train_generator_r1") for k in run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/training_curves.png", "plots/goalrank_vs_baselines.png"}
    mv = client.get_model_version(flow_world["model_name"], "1")
    assert mv.tags["goalrank.run_id"] == "day-1" and "goalrank.metric.valid.ndcg_at_2" in mv.tags

    # Rerun of the same run id: every stage skipped, no new version, same decision.
    n_versions = len(client.search_model_versions(f"name = '{flow_world['model_name']}'"))
    again = run_daily(flow_world, flow_world["day1"], "day-1")
    assert all(s["skipped"] for s in again["stages"])
    assert again["registered_version"] == "1" and not again["newly_registered"]
    assert again["mlflow_run_id"] == first["mlflow_run_id"]
    versions = client.search_model_versions(f"name = '{flow_world['model_name']}'")
    assert len(versions) == n_versions
    assert [str(v.version) for v in versions if v.tags.get("goalrank.run_id") == "day-1"] == ["1"]


@pytest.mark.slow  # a second full training run (~2-3 min on 2 cores)
def test_champion_moves_only_when_no_worse(flow_world, flow_day_one):
    from mlflow import MlflowClient

    client = MlflowClient(flow_world["tracking_uri"])
    assert flow_day_one["decision"]["promoted"]
    champ_before = client.get_model_version_by_alias(flow_world["model_name"], "champion").version
    # A margin no model can reach (NDCG <= 1): the new version is registered, champion stays.
    worse = _run(flow_world, "day-2", margin=1.0, **{"train.seed": 1})
    d = worse["decision"]
    assert worse["newly_registered"] and not d["promoted"]
    assert d["challenger_value"] < d["champion_value"] + 1.0
    assert client.get_model_version_by_alias(flow_world["model_name"], "champion").version == champ_before
    assert str(client.get_model_version_by_alias(flow_world["model_name"], "challenger").version) == \
        worse["registered_version"]
    # The same run again with a margin that tolerates any loss: nothing retrained, no new
    # version, and now the champion moves to it.
    better = _run(flow_world, "day-2", margin=-1.0, **{"train.seed": 1})
    assert all(s["skipped"] for s in better["stages"]) and not better["newly_registered"]
    assert better["registered_version"] == worse["registered_version"] and better["decision"]["promoted"]
    assert str(client.get_model_version_by_alias(flow_world["model_name"], "champion").version) == \
        worse["registered_version"]


def test_bad_config_fails_before_any_stage(flow_world):
    from goalrank_core.errors import ConfigError

    with pytest.raises(ConfigError, match="group.size"):
        _run(flow_world, "bad", **{"group.size": 0})
    with pytest.raises(ConfigError, match="reward.feedback"):  # its columns do not reach the stages: refused
        _run(flow_world, "bad", **{"reward.feedback": {"labels_like": 1.0}})
    assert not os.path.exists(os.path.join(flow_world["storage"], "impressions", "bad"))


def test_transient_failures_are_retried_and_validation_errors_are_not():
    from flows.retry import is_transient
    from goalrank_core.errors import DataValidationError

    assert is_transient(ConnectionResetError("peer reset"))
    assert is_transient(OSError("When reading s3://b/k: AWS Error NETWORK_CONNECTION"))
    wrapped = RuntimeError("stage failed")
    wrapped.__cause__ = TimeoutError("timed out")
    assert is_transient(wrapped)
    assert not is_transient(DataValidationError("impressions.parquet: column 'labels' has a NaN at row 3"))
    assert not is_transient(FileNotFoundError("no such file"))
    assert not is_transient(ValueError("bug"))
    ray_like = type("ActorDiedError", (RuntimeError,), {})
    assert is_transient(ray_like("actor died"))


def test_cli_flow_parameters_parse_overrides_and_carry_no_credentials(tmp_path, monkeypatch):
    import json

    from goalrank.cli import build_parser
    from goalrank.cli.pipeline_cmd import flow_parameters
    from goalrank_core.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:pw-do-not-leak@db:5432/mlflow")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFAKEFLOWTEST0000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-do-not-leak")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("settings: {experiment: from-file}\ngroup: {size: 7}\n")
    args = build_parser().parse_args(["run", "--impressions", "logs.parquet", "--config", str(cfg), "--set",
                                      "train.epochs=2", "--set", "train.lr=1e-3", "--run-id", "r1"])
    params = flow_parameters(args)
    assert params["overrides"] == {"train.epochs": 2, "train.lr": 0.001}
    assert params["config"] == {"group": {"size": 7}} and params["experiment"] == "from-file"
    assert params["storage"] == str(tmp_path / "artifacts")
    assert "tracking_uri" not in params  # holds a password: the flow reads it from the environment
    blob = json.dumps(params)
    assert "pw-do-not-leak" not in blob and "fake-secret" not in blob and "AKIAFAKE" not in blob
    bad = build_parser().parse_args(["run", "--dataset", "ml-100k", "--set", "group.sise=3"])
    with pytest.raises(ConfigError, match="group.sise"):
        flow_parameters(bad)
