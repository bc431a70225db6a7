"""A Ray Train worker dies mid-training (issue 8): with FailureConfig(max_failures=1) the
`train_generator` stage restarts its worker group from the last checkpoint and completes;
the epochs before the checkpoint are not redone, and the final metrics are within the seed
spread of uninterrupted runs.

The crash is a test hook outside production code: the stage's TrainSpec is replaced by a
subclass (this module, pickled by value to the workers) whose rank-0 validation calls
os._exit once, at a chosen epoch, after that epoch trained and before its checkpoint. Every
worker start records which checkpoint it resumed from."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from flow_helpers import TINY_OVERRIDES, synth_source
from tasks.generator import GeneratorSpec

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EPOCHS = 3
CRASH_EPOCH = 2


class CrashOnceSpec(GeneratorSpec):
    marker_dir = ""
    crash_epoch = 0

    def setup(self, rank: int):
        import ray.train

        from tasks.ray_train import load_checkpoint

        state = load_checkpoint(ray.train.get_checkpoint())
        self._epoch = state["epoch"] if state else 0  # the epoch this worker resumes after
        Path(self.marker_dir, f"start-{time.time_ns()}-rank{rank}").write_text(str(self._epoch))
        return super().setup(rank)

    def validate(self, model):
        self._epoch += 1  # rank 0 validates once per epoch, after training it
        crashed = Path(self.marker_dir, "crashed")
        if self._epoch == self.crash_epoch and not crashed.exists():
            crashed.write_text(str(self._epoch))
            # Die later in the epoch than Ray Train's controller poll (2 s): a checkpoint is only
            # registered once the controller has seen its report (docs/reliability.md).
            time.sleep(3.0)
            os._exit(1)  # the worker process dies: no exception, no cleanup
        return super().validate(model)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ray_session):
    """A prepared stage and a scored-groups stage made from it (random lists with rewards),
    enough for train_generator."""
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.schemas import IMPRESSIONS, SCORED_GROUPS
    from tasks import object_store, storage
    from tasks.stages import DataSource, prepare, stage_uri
    from tasks.storage import run_stage, table_entry

    root = tmp_path_factory.mktemp("crash-train")
    imp, items = synth_source(root / "data")
    cfg = GoalRankConfig().override({**TINY_OVERRIDES, "train.epochs": EPOCHS})
    prep = prepare(DataSource(impressions=str(imp), items=str(items)), stage_uri(str(root / "s"), "d", "r", "prepare"),
                   cfg)
    train = storage.read_table(object_store.join(prep.uri, "train"), IMPRESSIONS, "train")
    rng = np.random.default_rng(0)
    rows = []
    for rid, cand in zip(train.column("request_id").to_pylist(), train.column("candidates").to_pylist()):
        lists = [[int(x) for x in rng.permutation(cand)[:4]] for _ in range(4)]
        rewards = rng.random(4).astype(np.float32)
        pi = np.exp(rewards) / np.exp(rewards).sum()
        rows.append({"request_id": rid, "lists": lists, "policies": ["random"] * 4, "rewards": rewards.tolist(),
                     "pi_ref": pi.tolist()})
    groups = pa.Table.from_pylist(rows, schema=SCORED_GROUPS)

    def body(out: str) -> dict:
        rows = storage.write_table(groups, object_store.join(out, "groups"), SCORED_GROUPS, "scored")
        return {"tables": {"groups": table_entry(SCORED_GROUPS, rows)}}

    scored = run_stage(stage_uri(str(root / "s"), "d", "r", "scored"), "score", cfg, {"prepared": prep.uri}, body)
    return {"root": root, "prepared": prep.uri, "scored": scored.uri, "config": cfg}


def _train(inputs, name: str, seed: int, spec_cls=None, monkeypatch=None) -> dict:
    from tasks import generator
    from tasks.stages import stage_uri, train_generator

    cfg = inputs["config"].override({"train.seed": seed})
    if spec_cls is not None:
        monkeypatch.setattr(generator, "GeneratorSpec", spec_cls)
    t0 = time.time()
    res = train_generator(inputs["scored"], inputs["prepared"], None, stage_uri(str(inputs["root"] / "s"), "d", "r", name),
                          cfg, max_failures=1)
    training = res.manifest["training"]
    return {"loss": training["epochs"][-1]["loss"], "valid": training["best_valid"], "epochs": training["epochs"],
            "wall_s": time.time() - t0}


def test_worker_killed_mid_training_resumes_from_last_checkpoint(inputs, tmp_path, monkeypatch):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import test modules
    markers = tmp_path / "markers"
    markers.mkdir()
    spec = type("CrashAtEpoch", (CrashOnceSpec,), {"marker_dir": str(markers), "crash_epoch": CRASH_EPOCH})

    crashed = _train(inputs, "gen-crash", 0, spec, monkeypatch)
    monkeypatch.undo()
    assert (markers / "crashed").read_text() == str(CRASH_EPOCH)
    starts = [int(p.read_text()) for p in sorted(markers.glob("start-*"))]
    # First start from scratch; the restart resumed after the last checkpointed epoch, so only
    # the crashed epoch's work was lost.
    assert starts == [0, CRASH_EPOCH - 1], starts
    assert [e["epoch"] for e in crashed["epochs"]] == list(range(1, EPOCHS + 1))

    # Uninterrupted runs: the same seed and two others give the spread.
    plain = {s: _train(inputs, f"gen-seed{s}", s) for s in (0, 1, 2)}
    losses = [p["loss"] for p in plain.values()]
    spread = max(losses) - min(losses)
    assert min(losses) - spread <= crashed["loss"] <= max(losses) + spread, (crashed["loss"], losses)
    assert abs(crashed["loss"] - plain[0]["loss"]) <= max(spread, 1e-3), (crashed["loss"], plain[0]["loss"])
    vals = [p["valid"] for p in plain.values()]
    vspread = max(vals) - min(vals)
    assert min(vals) - vspread - 1e-9 <= crashed["valid"] <= max(vals) + vspread + 1e-9, (crashed["valid"], vals)
    print(f"crash run {crashed['wall_s']:.1f}s loss {crashed['loss']:.5f} valid {crashed['valid']:.4f}; "
          f"uninterrupted {[(round(p['loss'], 5), round(p['valid'], 4), round(p['wall_s'], 1)) for p in plain.values()]}")
