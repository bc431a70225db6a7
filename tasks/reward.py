"""Stage `train_reward_model`: Ray Train DDP over `config.train.num_workers` workers on the
prepared training impressions (BCE on logged lists plus augmented lists,
goalrank_core.trainer.reward_loss). Output: `{out}/model/`, a bundle with the "reward" model
(the best epoch on the validation BCE, as the in-process trainer keeps).
"""
from __future__ import annotations

from typing import Any

import torch

from goalrank_core.config import GoalRankConfig
from tasks import storage
from tasks._data import load_bundle, read_dataset, save_bundle
from tasks._train import TrainSpec, clear_checkpoints, final_state, fit, worker_loop
from tasks.ray_runtime import ensure_ray
from tasks.storage import StageResult, run_stage, stage_fingerprint


class RewardSpec(TrainSpec):
    what = "reward"
    higher_is_better = False

    def __init__(self, config_dict: dict, prepared: str):
        super().__init__(config_dict, GoalRankConfig.from_dict(config_dict).train.reward_epochs)
        self.prepared = prepared

    def setup(self, rank: int) -> torch.nn.Module:
        from goalrank_core.fit import encode

        self.bundle = load_bundle(storage.join(self.prepared, "vocab"), "reward: vocabulary")
        self.valid = None
        if rank == 0:
            table = storage.read_table(storage.join(self.prepared, "valid"), None, "reward: valid split")
            self.valid = encode(self.bundle, table) if table.num_rows else None
        model = self.bundle.build("reward")
        self.augment = model.cfg.augment_lists
        return model

    @staticmethod
    def loss(model: torch.nn.Module, batch: Any, augment: int, gen: torch.Generator) -> torch.Tensor:
        from goalrank_core.trainer import reward_loss

        return reward_loss(model, batch, augment, gen)

    def batch_args(self, table: Any, device: Any, gen: torch.Generator) -> tuple:
        from goalrank_core.fit import encode

        return encode(self.bundle, table).batch(slice(None), device), self.augment, gen

    def validate(self, model: torch.nn.Module) -> float:
        from goalrank_core.trainer import mean_reward_loss

        if self.valid is None:
            return float("nan")
        return mean_reward_loss(model, self.valid, 4 * self.config.train.batch_size)


def train_model(spec: TrainSpec, train_uri: str, out: str, stage: str, key: str, config: GoalRankConfig,
                model_name: str, kind: str, vocab_uri: str, max_failures: int | None) -> dict:
    """Shared driver of the training stages: fit on Ray Train, then save the best (else the
    last) weights as a one-model bundle in `{out}/model`. -> what the manifest records."""
    name = f"{stage}-{key}"
    # Materialised once: every epoch then splits blocks already in the object store instead
    # of reading storage again (seconds per epoch on a small machine).
    train = read_dataset(train_uri, f"{stage}: training data").materialize()
    result = fit(worker_loop, {"spec": spec}, {"train": train}, out, name, config.train.num_workers, max_failures)
    state = final_state(result)
    bundle = load_bundle(vocab_uri, f"{stage}: vocabulary")
    bundle.config = config
    model = bundle.build(kind)
    model.load_state_dict(state["best"] if state.get("best") is not None else state["model"])
    bundle.add(model_name, kind, model.eval())
    saved = save_bundle(bundle, storage.join(out, "model"))
    clear_checkpoints(out, name)
    history = state["history"]
    peak = max((h.get("worker_peak_rss_mb", 0.0) for h in history), default=None)
    return {
        "models": {"model": saved},
        "training": {"epochs": history, "best_valid": state.get("best_val"), "num_workers": config.train.num_workers},
        "memory": {"train_workers_peak_rss_mb": peak},
    }


def train_reward_model(prepared: str, out: str, config: GoalRankConfig, *, max_failures: int | None = None) -> StageResult:
    """Stage 2: see the module docstring. `max_failures`: worker failures to recover from
    (default GOALRANK_TRAIN_MAX_FAILURES or 1)."""
    ensure_ray()
    inputs = {"prepared": prepared}
    key, _ = stage_fingerprint("reward", config, inputs)

    def body(out: str) -> dict:
        spec = RewardSpec(config.to_dict(), storage.normalize(prepared))
        return train_model(spec, storage.join(prepared, "train"), out, "reward", key, config, "reward", "reward",
                           storage.join(prepared, "vocab"), max_failures)

    return run_stage(out, "reward", config, inputs, body)
