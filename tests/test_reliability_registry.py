"""Crash during registration and promotion (issue 8): whichever step the process dies at, the
`champion` alias points at no version, or at an evaluated version whose model loads; the
rerun of the same pipeline run registers no second version and finishes the promotion.

The steps are the ones `flows.daily` runs (track_and_register, then promote): log the pyfunc
model -> create the version (tags hold its evaluation) -> point `challenger` at it -> decide
-> move `champion`. A crash is injected right before each MLflow write by making that client
call raise a BaseException (nothing below it catches one, exactly like a killed process);
test_registry.py covers a real os._exit between register and promote in a subprocess."""
from __future__ import annotations

import uuid

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from flows import registry, tracking  # noqa: E402


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so no handler swallows it."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny fitted bundle (a real model), a request example and an MLflow SQLite store."""
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.fit import fit_tables
    from test_tracking import TINY, _impressions

    root = tmp_path_factory.mktemp("crash")
    cfg = GoalRankConfig().override(TINY)
    bundle = fit_tables(_impressions(60, 0), _impressions(20, 1, 100), cfg, log=lambda *a: None)
    bundle.save(root / "bundle")
    example = _impressions(3, 2, 500).drop_columns(["shown", "labels"]).to_pandas()
    w = {"bundle": str(root / "bundle"), "example": example, "uri": tracking.default_tracking_uri(root),
         "exp": "crash-tests"}
    with tracking.pipeline_run(w["uri"], w["exp"], "day1", "cfg1") as run:  # the earlier champion's model
        w["day1"] = (tracking.log_ranker(w["bundle"], example), run.info.run_id)
    return w


def seed_champion(world, name: str, ndcg: float = 0.30) -> str:
    """An earlier run's evaluated version, promoted (its model logged once per module)."""
    client = MlflowClient(world["uri"])
    source, mlrun = world["day1"]
    mv, _ = registry.register(client, name, source, mlrun, "day1", "cfg1", {"valid.ndcg@3": ndcg},
                              tags={registry.TAG_DATA_VERSION: "d1"})
    assert registry.promote(client, name, mv.version, metric="ndcg@3").promoted
    return str(mv.version)


def publish(world, name: str, run_id: str, ndcg: float) -> registry.Decision:
    """What the flow does after evaluation, in its order (flows/daily.py: track_and_register_task
    then promote_task)."""
    client = MlflowClient(world["uri"])
    with tracking.pipeline_run(world["uri"], world["exp"], run_id, "cfg1") as run:
        existing = registry.find_version(client, name, run_id, "cfg1")
        source = existing.source if existing else tracking.log_ranker(world["bundle"], world["example"])
        mv, _ = registry.register(client, name, source, run.info.run_id, run_id, "cfg1",
                                  {"valid.ndcg@3": ndcg}, tags={registry.TAG_DATA_VERSION: "d1"})
    return registry.promote(client, name, mv.version, metric="ndcg@3")


def assert_champion_sound(world, name: str) -> str | None:
    """champion is unset, or an evaluated version with its metric whose model loads."""
    from goalrank_core.bundle import ModelBundle

    client = MlflowClient(world["uri"])
    champ = registry.get_alias(client, name, registry.CHAMPION)
    if champ is None:
        return None
    assert champ.tags.get(registry.TAG_EVALUATED) == "true", champ.tags
    assert registry.version_metric(champ, "ndcg@3") is not None, champ.tags
    bundle = ModelBundle.load(tracking.resolve_model_dir(f"models:/{name}@{registry.CHAMPION}", world["uri"]))
    assert "generator" in bundle.models
    return str(champ.version)


# (step, MlflowClient method, predicate on its arguments): the crash comes right before it.
STEPS = [
    ("log-model", "log_model_artifacts", lambda *a, **k: True),
    ("create-version", "create_model_version", lambda *a, **k: True),
    ("set-challenger", "set_registered_model_alias", lambda self, n, alias, v: alias == registry.CHALLENGER),
    ("decide", "get_model_version_by_alias", lambda self, n, alias: alias == registry.CHAMPION),
    ("set-champion", "set_registered_model_alias", lambda self, n, alias, v: alias == registry.CHAMPION),
]


@pytest.mark.parametrize("step, method, when", STEPS, ids=[s[0] for s in STEPS])
@pytest.mark.parametrize("has_champion", [True, pytest.param(False, marks=pytest.mark.slow)],
                         ids=["with-champion", "first-model"])
def test_crash_at_any_step_leaves_champion_sound_and_rerun_completes(world, monkeypatch, step, method, when,
                                                                      has_champion):
    name = f"m-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(world["uri"])
    before = None
    if has_champion:
        seed_champion(world, name)
        before = assert_champion_sound(world, name)

    real = getattr(MlflowClient, method)
    fired = []

    def crashing(self, *args, **kwargs):
        if not fired and when(self, *args, **kwargs):
            fired.append(step)
            raise Crash(f"process died before {method}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, crashing)
    with pytest.raises(Crash):
        publish(world, name, "day2", 0.50)
    assert fired == [step]
    monkeypatch.undo()

    # After the crash: champion unchanged, and sound.
    assert assert_champion_sound(world, name) == before
    versions = {str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    day2 = registry.find_version(client, name, "day2", "cfg1")
    if day2 is not None:  # a version that exists carries its evaluation from the start
        assert day2.tags[registry.TAG_EVALUATED] == "true"

    # The rerun of day2: at most one version for it, promoted (0.50 beats 0.30), loadable.
    d = publish(world, name, "day2", 0.50)
    assert d.promoted, d
    after = {str(v.version) for v in client.search_model_versions(f"name = '{name}'")}
    assert len(after - versions) <= 1 and len(after) == (2 if has_champion else 1)
    assert assert_champion_sound(world, name) == d.version == str(registry.find_version(client, name, "day2",
                                                                                         "cfg1").version)


def test_champion_never_moves_to_an_unevaluated_or_missing_version(world):
    """Even forced, a version without evaluation tags or one that does not exist is refused."""
    name = f"m-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(world["uri"])
    seed_champion(world, name)
    champ = assert_champion_sound(world, name)
    run = client.create_run(client.get_experiment_by_name(world["exp"]).experiment_id)
    bare = client.create_model_version(name, f"runs:/{run.info.run_id}/nothing", run_id=run.info.run_id)
    d = registry.promote(client, name, bare.version, metric="ndcg@3", force=True)
    assert not d.promoted and "no evaluation" in d.reason
    with pytest.raises(ValueError, match="no version 999"):
        registry.promote(client, name, "999", metric="ndcg@3", force=True)
    assert assert_champion_sound(world, name) == champ
