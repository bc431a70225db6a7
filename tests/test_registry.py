"""Registry and promotion on a real MLflow SQLite store: champion moves only when the new
version is no worse, a rerun registers nothing new, a crash mid-promotion leaves champion on
an evaluated version."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from flows import registry  # noqa: E402
from flows.tracking import ensure_experiment  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    exp = ensure_experiment(uri, "registry-tests")
    return uri, exp, root


@pytest.fixture()
def env(store):
    """A fresh model name per test on the shared store (creating a SQLite store takes seconds)."""
    uri, exp, root = store
    client = MlflowClient(uri)
    return client, exp, f"m-{uuid.uuid4().hex[:8]}", root


def _logged_model(client: MlflowClient, exp: str, root: Path) -> tuple[str, str]:
    """A real MLflow run holding a tiny artifact; returns (mlflow run id, source URI)."""
    run = client.create_run(exp)
    f = root / f"weights-{run.info.run_id}.txt"
    f.write_text("tiny model")
    client.log_artifact(run.info.run_id, str(f), "model")
    client.set_terminated(run.info.run_id)
    return run.info.run_id, f"runs:/{run.info.run_id}/model"


def _register(client, exp, root, name, run_id, ndcg, data="d1", config_hash="c1"):
    mlrun, source = _logged_model(client, exp, root)
    mv, created = registry.register(client, name, source, mlrun, run_id, config_hash,
                                    {"valid.ndcg@6": ndcg, "test.ndcg@6": ndcg - 0.01},
                                    tags={registry.TAG_DATA_VERSION: data, registry.TAG_DATASET: "synth"})
    return mv, created


def _champion(client, name):
    mv = registry.get_alias(client, name, registry.CHAMPION)
    return None if mv is None else mv.version


def test_first_version_becomes_champion_and_tags_hold_metrics(env):
    client, exp, name, root = env
    mv, created = _register(client, exp, root, name, "2024-01-01", 0.40)
    assert created
    assert registry.get_alias(client, name, registry.CHALLENGER).version == mv.version
    assert _champion(client, name) is None  # registering alone never sets champion
    d = registry.promote(client, name, mv.version, metric="ndcg@6")
    assert d.promoted and d.reason == "no champion yet"
    assert _champion(client, name) == mv.version
    tags = client.get_model_version(name, mv.version).tags
    assert float(tags["goalrank.metric.valid.ndcg_at_6"]) == pytest.approx(0.40)
    assert tags[registry.TAG_RUN_ID] == "2024-01-01" and tags[registry.TAG_DATA_VERSION] == "d1"


def test_better_moves_champion_worse_does_not(env):
    client, exp, name, root = env
    v1, _ = _register(client, exp, root, name, "r1", 0.40)
    registry.promote(client, name, v1.version)
    v2, _ = _register(client, exp, root, name, "r2", 0.45)
    d2 = registry.promote(client, name, v2.version)
    assert d2.promoted and d2.champion_version == str(v1.version)
    assert d2.champion_value == pytest.approx(0.40) and d2.challenger_value == pytest.approx(0.45)
    assert _champion(client, name) == v2.version
    v3, _ = _register(client, exp, root, name, "r3", 0.44)
    d3 = registry.promote(client, name, v3.version)
    assert not d3.promoted and "<" in d3.reason
    assert _champion(client, name) == v2.version
    assert registry.get_alias(client, name, registry.CHALLENGER).version == v3.version


def test_equal_is_no_worse_and_margin_demands_improvement(env):
    client, exp, name, root = env
    v1, _ = _register(client, exp, root, name, "r1", 0.40)
    registry.promote(client, name, v1.version)
    v2, _ = _register(client, exp, root, name, "r2", 0.40)
    assert not registry.decide(client, name, v2.version, "ndcg@6", margin=0.01).promoted
    assert registry.decide(client, name, v2.version, "ndcg@6", margin=-0.01).promoted
    assert registry.promote(client, name, v2.version, margin=0.0).promoted
    assert _champion(client, name) == v2.version


def test_force_promotes_a_worse_version_but_never_an_unevaluated_one(env):
    client, exp, name, root = env
    v1, _ = _register(client, exp, root, name, "r1", 0.50)
    registry.promote(client, name, v1.version)
    v2, _ = _register(client, exp, root, name, "r2", 0.10)
    assert not registry.promote(client, name).promoted  # default: the challenger
    d = registry.promote(client, name, force=True)
    assert d.promoted and d.reason == "forced" and _champion(client, name) == v2.version
    # A version created outside the pipeline, without its evaluation, is refused even forced.
    mlrun, source = _logged_model(client, exp, root)
    bare = client.create_model_version(name, source, run_id=mlrun)
    d = registry.promote(client, name, bare.version, force=True)
    assert not d.promoted and _champion(client, name) == v2.version
    with pytest.raises(ValueError, match="no version 999"):
        registry.promote(client, name, "999")


def test_rerun_of_same_run_id_registers_no_duplicate(env):
    client, exp, name, root = env
    v1, created1 = _register(client, exp, root, name, "2024-01-02", 0.30)
    v1b, created2 = _register(client, exp, root, name, "2024-01-02", 0.30)
    assert created1 and not created2 and v1b.version == v1.version
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # Another config under the same run id is another model: a new version.
    v2, created3 = _register(client, exp, root, name, "2024-01-02", 0.30, config_hash="c2")
    assert created3 and v2.version != v1.version


def test_register_refuses_without_metrics(env):
    client, exp, name, root = env
    mlrun, source = _logged_model(client, exp, root)
    with pytest.raises(ValueError, match="no evaluation metrics"):
        registry.register(client, name, source, mlrun, "r1", "c1", {})
    assert client.search_model_versions(f"name = '{name}'") == []


def test_different_validation_data_reevaluates_or_refuses(env):
    client, exp, name, root = env
    v1, _ = _register(client, exp, root, name, "day1", 0.60, data="window-1")
    registry.promote(client, name, v1.version)
    v2, _ = _register(client, exp, root, name, "day2", 0.50, data="window-2")
    # Without a way to re-evaluate, numbers from other data are not compared: champion stays.
    d = registry.decide(client, name, v2.version, "ndcg@6")
    assert not d.promoted and "different validation data" in d.reason
    # Re-evaluated on window-2, the old champion scores lower: the new version wins.
    seen = []

    def reevaluate(champ):
        seen.append(champ.version)
        return 0.45

    d = registry.promote(client, name, v2.version, reevaluate=reevaluate)
    assert seen == [v1.version] and d.promoted and d.champion_value == pytest.approx(0.45)
    assert "re-evaluated" in d.reason and _champion(client, name) == v2.version


def test_crash_between_register_and_promote_leaves_champion_valid(env, store):
    """A process registers a version and dies (os._exit) before promotion: champion still
    points at the earlier evaluated version; the rerun reuses the version and promotes it."""
    client, exp, name, root = env
    uri = store[0]
    v1, _ = _register(client, exp, root, name, "day1", 0.40)
    registry.promote(client, name, v1.version)
    mlrun, source = _logged_model(client, exp, root)
    script = textwrap.dedent(f"""
        import os
        from mlflow import MlflowClient
        from flows import registry
        c = MlflowClient({uri!r})
        mv, _ = registry.register(c, {name!r}, {source!r}, {mlrun!r}, "day2", "c1", {{"valid.ndcg@6": 0.55}},
                                  tags={{registry.TAG_DATA_VERSION: "d1"}})
        print("registered", mv.version, flush=True)
        os._exit(17)  # killed before promote
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert _champion(client, name) == v1.version
    champ = client.get_model_version_by_alias(name, registry.CHAMPION)
    assert champ.tags[registry.TAG_EVALUATED] == "true"
    # The rerun of day2 finds the version by tag, registers nothing new, and promotes it.
    mv, created = registry.register(client, name, source, mlrun, "day2", "c1", {"valid.ndcg@6": 0.55},
                                    tags={registry.TAG_DATA_VERSION: "d1"})
    assert not created and len(client.search_model_versions(f"name = '{name}'")) == 2
    assert registry.promote(client, name, mv.version).promoted
    assert _champion(client, name) == mv.version


def _register_ope(client, exp, root, name, run_id, value, ci, ess, data="d1"):
    """A version tagged as the flow tags one evaluated on logs with propensities."""
    mlrun, source = _logged_model(client, exp, root)
    key = "valid.ope:snips"
    metrics = {"valid.ndcg@6": 0.40, key: value, f"{key}.ci_low": ci[0], f"{key}.ci_high": ci[1], f"{key}.ess": ess}
    mv, _ = registry.register(client, name, source, mlrun, run_id, "c1", metrics,
                              tags={registry.TAG_DATA_VERSION: data})
    return mv


def test_ope_metric_compares_point_estimates_and_records_intervals_and_ess(env):
    client, exp, name, root = env
    old_keys = {"version", "promoted", "reason", "metric", "challenger_value", "champion_version", "champion_value",
                "margin"}
    v1 = _register_ope(client, exp, root, name, "r1", 1.20, (1.00, 1.40), 30.0)
    assert client.get_model_version(name, v1.version).tags["goalrank.metric.valid.ope:snips.ess"] == "30.0"
    d1 = registry.promote(client, name, v1.version, metric="ope:snips")
    assert d1.promoted and d1.reason == "no champion yet"
    assert (d1.challenger_value, d1.challenger_ci_low, d1.challenger_ci_high, d1.challenger_ess) == (1.20, 1.00, 1.40, 30.0)
    assert d1.champion_ci_low is None and d1.champion_ess is None
    # Overlapping intervals: the point estimates decide, and both intervals are recorded.
    v2 = _register_ope(client, exp, root, name, "r2", 1.25, (0.90, 1.60), 12.0)
    d2 = registry.promote(client, name, v2.version, metric="ope:snips")
    assert d2.promoted and _champion(client, name) == v2.version
    assert (d2.champion_value, d2.champion_ci_low, d2.champion_ci_high, d2.champion_ess) == (1.20, 1.00, 1.40, 30.0)
    assert (d2.challenger_ci_low, d2.challenger_ci_high, d2.challenger_ess) == (0.90, 1.60, 12.0)
    assert d2.reason == ("ope:snips 1.250000 [0.9000, 1.6000] ESS 12.0000 >= champion 1.200000 [1.0000, 1.4000] "
                         "ESS 30.0000 + margin 0.0 (same validation data; point estimates compared, intervals recorded)")
    d = d2.to_dict()
    assert old_keys <= set(d) and d["challenger_ess"] == 12.0 and d["champion_ci_high"] == 1.40
    # Lower estimate, or not above champion + margin: champion stays.
    v3 = _register_ope(client, exp, root, name, "r3", 1.10, (1.05, 1.15), 50.0)
    assert not registry.decide(client, name, v3.version, "ope:snips").promoted
    assert not registry.decide(client, name, v3.version, "ope:snips", margin=-0.1).promoted
    assert registry.decide(client, name, v3.version, "ope:snips", margin=-0.2).promoted
    # The NDCG gate on the same versions has no interval fields (backwards compatible dict).
    nd = registry.decide(client, name, v3.version, "ndcg@6").to_dict()
    assert old_keys <= set(nd) and nd["challenger_ess"] is None and nd["champion_ci_low"] is None and nd["promoted"]
    # Champion on other validation data: the re-evaluation gives the estimate with its interval and ESS.
    v4 = _register_ope(client, exp, root, name, "r4", 1.30, (1.10, 1.50), 25.0, data="d2")
    d4 = registry.decide(client, name, v4.version, "ope:snips",
                         reevaluate=lambda champ: registry.Measured(1.35, 1.2, 1.5, 40.0))
    assert not d4.promoted and "re-evaluated" in d4.reason
    assert (d4.champion_value, d4.champion_ci_low, d4.champion_ci_high, d4.champion_ess) == (1.35, 1.2, 1.5, 40.0)
    # An undefined estimate (no logged list matched: NaN) never promotes.
    v5 = _register_ope(client, exp, root, name, "r5", float("nan"), (float("nan"), float("nan")), 0.0)
    d5 = registry.decide(client, name, v5.version, "ope:snips", margin=-10.0)
    assert not d5.promoted and "= nan" in d5.reason and d5.challenger_value is None
