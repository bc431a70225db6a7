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
