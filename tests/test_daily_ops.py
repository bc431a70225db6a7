"""Daily operations through the whole `goalrank-daily` flow (prefect_test_harness, local Ray,
MLflow on SQLite) on synthetic date partitions: a run for D reads exactly its window; a new
partition lands and the run for D + 1 trains on other data, warm-started from the champion;
a corrupted, empty or missing partition stops the flow before training with the champion
untouched; backfill runs each missing date once and skips completed ones."""
from __future__ import annotations

import os
from datetime import date, timedelta

import pytest

from flow_helpers import TINY_OVERRIDES

pytestmark = pytest.mark.ray

D0 = date(2023, 11, 15)
# W = 3; cold reward training takes 2 epochs, warm 1 (generator: 1 either way).
OVERRIDES = {**TINY_OVERRIDES, "window.days": 3, "train.reward_epochs": 2, "train.warm_reward_epochs": 1}


def _land(dataset: str, day: date) -> None:
    from goalrank_core.replay import synth_day
    from tasks.partitions import write_partition

    imp, _ = synth_day(day, n_users=40, n_items=60, requests_per_user=2, slate_len=4, n_candidates=10,
                       n_categories=4, history_len=8, seed=3)
    write_partition(imp, dataset, day)


def _world(root) -> dict:
    from goalrank_core.replay import synth_day
    from tasks.partitions import write_file

    dataset = str(root / "data" / "impressions")
    _, items = synth_day(D0, n_users=40, n_items=60, requests_per_user=2, slate_len=4, n_candidates=10,
                         n_categories=4, history_len=8, seed=3)
    write_file(items, str(root / "data" / "items.parquet"))
    return {"impressions": dataset, "items": str(root / "data" / "items.parquet"), "storage": str(root / "storage"),
            "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "daily-test", "model_name": "goalrank-daily"}


@pytest.fixture(scope="module")
def daily(tmp_path_factory, prefect_harness, ray_session):
    saved = os.environ.get("GOALRANK_DATA_ACTORS")
    os.environ["GOALRANK_DATA_ACTORS"] = "1"  # one Ray Data actor per pool on 2 cores
    w = _world(tmp_path_factory.mktemp("daily"))
    for k in range(4):  # 2023-11-15 .. 2023-11-18
        _land(w["impressions"], D0 + timedelta(days=k))
    _land(w["impressions"], date(2023, 11, 30))  # a later day already present: never read before its time
    yield w
    if saved is None:
        os.environ.pop("GOALRANK_DATA_ACTORS", None)
    else:
        os.environ["GOALRANK_DATA_ACTORS"] = saved


def _params(w, **extra):
    return {**dict(impressions=w["impressions"], items=w["items"], storage=w["storage"],
                   tracking_uri=w["tracking_uri"], experiment=w["experiment"], model_name=w["model_name"],
                   overrides=OVERRIDES), **extra}


def _run(w, day: str, **extra):
    from flows.daily import goalrank_daily

    return goalrank_daily(**_params(w, run_date=day, **extra))


def _stage(summary, name):
    return next(s for s in summary["stages"] if s["stage"] == name)


def _manifest(uri):
    from tasks.storage import read_manifest

    return read_manifest(uri)


@pytest.fixture(scope="module")
def two_dates(daily):
    """Two whole daily runs (~4-8 min on Ray): 2023-11-19 cold, then a day lands and 2023-11-20
    starts warm from the first run's champion. Shared by the slow tests that build on them."""
    first = _run(daily, "2023-11-19")
    _land(daily["impressions"], date(2023, 11, 19))
    return first, _run(daily, "2023-11-20")


@pytest.mark.slow  # two whole daily runs on Ray; `make test-slow` runs it
def test_window_new_partition_and_warm_start(daily, two_dates):
    import numpy as np
    from mlflow import MlflowClient

    from tasks.object_store import join
    from tasks.stage_io import load_bundle

    client = MlflowClient(daily["tracking_uri"])
    first, second = two_dates
    assert first["run_id"] == "2023-11-19"  # a dated run's id is its date
    prep1 = _manifest(_stage(first, "prepare")["uri"])
    assert prep1["partitions"] == ["date=2023-11-16", "date=2023-11-17", "date=2023-11-18"]  # not 11-15, not 11-30
    assert first["window"]["holdout"] == "date=2023-11-18"
    assert all(c["passed"] is not False for c in first["gates"]["checks"])
    assert not first["warm_start"]["warm"] and first["warm_start"]["reason"] == "no champion yet"
    assert first["decision"]["promoted"] and first["registered_version"] == "1"
    rew1 = _manifest(_stage(first, "train_reward_model")["uri"])
    assert len(rew1["training"]["epochs"]) == 2 and "init" not in rew1["inputs"]

    # A day landed; the run for the next date read the shifted window and started from the champion.
    prep2 = _manifest(_stage(second, "prepare")["uri"])
    assert prep2["partitions"] == ["date=2023-11-17", "date=2023-11-18", "date=2023-11-19"]
    assert prep2["fingerprint"] != prep1["fingerprint"] and second["data_version"] != first["data_version"]
    ws = second["warm_start"]
    assert ws["warm"] and ws["version"] == "1" and "from champion v1" in ws["reason"]
    assert ws["stats"]["reward"]["items_shared"] > 0
    rew2 = _manifest(_stage(second, "train_reward_model")["uri"])
    assert len(rew2["training"]["epochs"]) == 1  # train.warm_reward_epochs
    assert rew2["inputs"]["init"]["uri"] == join(ws["uri"], "reward")
    gen2 = _manifest(_stage(second, "train_generator r1")["uri"])
    assert gen2["inputs"]["init"]["uri"] == join(ws["uri"], "generator")
    # The warm weights are the champion's, row for row by item id.
    champ_rew = load_bundle(join(_stage(first, "train_reward_model")["uri"], "model"), "champion reward")
    warm_rew = load_bundle(join(ws["uri"], "reward", "model"), "warm reward")
    shared = np.intersect1d(champ_rew.item_vocab.ids, warm_rew.item_vocab.ids)[0]
    champ_sd, warm_sd = champ_rew.require("reward").state_dict(), warm_rew.require("reward").state_dict()
    # Every item table of the reward model (each member's, when cross-fitted) is remapped.
    tables = [k for k in champ_sd if k.endswith("embed.item.weight")]
    assert tables and set(tables) <= set(warm_sd)
    for k in tables:
        old_row = champ_sd[k][champ_rew.item_vocab.lookup([shared])[0]]
        new_row = warm_sd[k][warm_rew.item_vocab.lookup([shared])[0]]
        assert np.array_equal(old_row.numpy(), new_row.numpy()), k
    # Recorded: MLflow run and version tags, the run record.
    run = client.get_run(second["mlflow_run_id"])
    assert run.data.tags["goalrank.warm_start"] == "true" and run.data.tags["goalrank.warm_start.version"] == "1"
    assert run.data.tags["goalrank.partitions"] == "2023-11-17,2023-11-18,2023-11-19"
    mv = client.get_model_version(daily["model_name"], second["registered_version"])
    assert mv.tags["goalrank.warm_start.version"] == "1" and mv.tags["goalrank.run_date"] == "2023-11-20"
    from flows.daily_ops import record_uri

    rec = _manifest(record_uri(daily["storage"], "impressions", "2023-11-20"))
    assert rec["warm_start"]["version"] == "1" and rec["window"]["partitions"] == prep2["partitions"]

    # A rerun redoes nothing, though the champion may have moved to this run's own model.
    again = _run(daily, "2023-11-20")
    assert all(s["skipped"] for s in again["stages"]) and not again["newly_registered"]
    assert again["warm_start"]["version"] == "1"


@pytest.fixture(scope="module")
def gated(daily, tmp_path_factory):
    """The daily world under its own registered model whose `champion` alias already points at a
    version (registered here from a folder, not trained: the gates must stop a bad day before any
    model is loaded), so "champion untouched" is checked under `make test` too."""
    from mlflow import MlflowClient

    name = f"{daily['model_name']}-gates"
    client = MlflowClient(daily["tracking_uri"])
    folder = tmp_path_factory.mktemp("champion-model")
    (folder / "MLmodel").write_text("flavors: {}\n")
    client.create_registered_model(name)
    version = client.create_model_version(name, source=str(folder)).version
    client.set_registered_model_alias(name, "champion", version)
    return {**daily, "model_name": name, "champion": version}


@pytest.mark.parametrize("case", ["truncated", "empty", "no-positives", "missing"])
def test_bad_partition_stops_before_training_champion_untouched(gated, case):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from goalrank_core.gates import DataGateError, MissingPartitionError

    daily = gated
    client = MlflowClient(daily["tracking_uri"])
    n_versions = len(client.search_model_versions(f"name = '{daily['model_name']}'"))
    assert n_versions == 1
    day = date(2023, 11, 25)  # D - 1 of run date 11-26; 11-22 .. 11-24 train
    for k in (22, 23, 24):
        _land(daily["impressions"], date(2023, 11, k))
    part = os.path.join(daily["impressions"], f"date={day.isoformat()}")
    if case != "missing":
        _land(daily["impressions"], day)
        f = os.path.join(part, "part-00000.parquet")
        t = pq.read_table(f)
        if case == "truncated":
            blob = open(f, "rb").read()
            open(f, "wb").write(blob[: len(blob) // 2])
        elif case == "empty":
            pq.write_table(t.slice(0, 0), f)
        else:
            zeros = pa.array([[0.0] * 4] * t.num_rows, pa.list_(pa.float32()))
            pq.write_table(t.set_column(t.schema.get_field_index("labels"), "labels", zeros), f)
    expected = {"truncated": (DataGateError, r"'readable' failed for partition date=2023-11-25"),
                "empty": (DataGateError, r"'rows' failed for partition date=2023-11-25.*empty"),
                "no-positives": (DataGateError, r"'positive_share' failed for partition date=2023-11-25"),
                "missing": (MissingPartitionError, r"date=2023-11-25.*missing")}[case]
    try:
        with pytest.raises(expected[0], match=expected[1]):
            _run(daily, "2023-11-26")
        # Nothing trained, written, registered or promoted.
        assert not os.path.exists(os.path.join(daily["storage"], "impressions", "2023-11-26"))
        assert len(client.search_model_versions(f"name = '{daily['model_name']}'")) == n_versions
        assert client.get_model_version_by_alias(daily["model_name"], "champion").version == daily["champion"]
    finally:
        import shutil

        shutil.rmtree(part, ignore_errors=True)


@pytest.mark.slow  # builds on the two completed dates (run here when the window test did not)
def test_backfill_skips_completed_dates(daily, two_dates, prefect_harness, monkeypatch, capsys):
    from flows.backfill import backfill
    from goalrank.cli import main

    assert all(_manifest(os.path.join(daily["storage"], "impressions", d, "registry"))
               for d in ("2023-11-19", "2023-11-20"))

    def no_flow(**kw):
        raise AssertionError(f"backfill started a flow for a completed date: {kw.get('run_date')}")

    rows = backfill([date(2023, 11, 19), date(2023, 11, 20)], _params(daily), run=no_flow)
    assert [r["ran"] for r in rows] == [False, False] and rows[1]["version"] == "2"
    # The same through the command line: flags give the same config hash, so nothing runs.
    monkeypatch.setenv("PREFECT_HOME", str(prefect_harness))
    argv = ["backfill", "--impressions", daily["impressions"], "--items", daily["items"], "--from", "2023-11-19",
            "--to", "2023-11-20", "--storage", daily["storage"], "--tracking-uri", daily["tracking_uri"],
            "--experiment", daily["experiment"], "--model-name", daily["model_name"]]
    for k, v in OVERRIDES.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    assert "ran 0 flow(s) [], skipped 2 complete date(s)" in capsys.readouterr().out
    # Another config hash is another run: not complete.
    other = backfill([date(2023, 11, 19)], _params(daily, overrides={**OVERRIDES, "train.seed": 9}),
                     run=lambda **kw: {"registered_version": "x"})
    assert other[0]["ran"]
    assert main(argv[:5] + ["--from", "2023-11-20", "--to", "2023-11-19"]) == 2  # --to before --from


@pytest.mark.slow  # three whole flows (~2-3 min on 2 cores)
def test_backfill_three_days_then_nothing(tmp_path, prefect_harness, ray_session, monkeypatch):
    from mlflow import MlflowClient

    from flows.backfill import backfill

    monkeypatch.setenv("GOALRANK_DATA_ACTORS", "1")
    w = _world(tmp_path)
    for k in range(6):  # 11-15 .. 11-20: run dates 11-18 .. 11-20 each have D - 1
        _land(w["impressions"], D0 + timedelta(days=k))
    days = [date(2023, 11, 18), date(2023, 11, 19), date(2023, 11, 20)]
    rows = backfill(days, _params(w))
    assert [r["ran"] for r in rows] == [True, True, True]
    assert [r["version"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["warm_start"] is False and rows[1]["warm_start"] and rows[2]["warm_start"]
    assert backfill(days, _params(w), run=None) == [{"date": d.isoformat(), "ran": False, "version": v}
                                                     for d, v in zip(days, ["1", "2", "3"])]
    assert len(MlflowClient(w["tracking_uri"]).search_model_versions(f"name = '{w['model_name']}'")) == 3


def test_backfill_skips_a_date_whose_record_the_flow_wrote(tmp_path):
    """The record the flow writes (its resolved config's hash: reward.unshown auto resolved for
    the source) is the one backfill compares with; before, backfill hashed the unresolved config
    and re-ran every completed date."""
    from flows.backfill import backfill
    from flows.daily import check_parameters, flow_settings, record_run

    params = dict(impressions=str(tmp_path / "impressions"), storage=str(tmp_path / "storage"),
                  tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", overrides={"group.size": 5})
    settings = flow_settings(storage=params["storage"], tracking_uri=params["tracking_uri"])
    plan = check_parameters(None, params["impressions"], settings, None, params["overrides"], "2023-11-19", None, None)
    assert plan.cfg.reward.unshown != "auto"  # resolved for impression logs
    record_run(plan, plan.cfg, {"version": "4", "data_version": "d"}, {"promoted": True}, {}, None, "p", "e")

    def no_flow(**kw):
        raise AssertionError(f"backfill started a flow for a completed date: {kw.get('run_date')}")

    assert backfill([date(2023, 11, 19)], params, run=no_flow) == [{"date": "2023-11-19", "ran": False, "version": "4"}]
    other = backfill([date(2023, 11, 19)], {**params, "overrides": {"group.size": 6}},
                     run=lambda **kw: {"registered_version": "5"})
    assert other[0]["ran"] and other[0]["version"] == "5"
