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
from tasks._data import load_bundle
from tasks._train import TrainSpec, train_and_save
from tasks.ray_runtime import ensure_ray
from tasks.storage import StageResult, run_stage, stage_fingerprint


class RewardSpec(TrainSpec):
    what = "reward"
    higher_is_better = False

    def __init__(self, config_dict: dict, prepared: str, init: str | None = None):
        super().__init__(config_dict, GoalRankConfig.from_dict(config_dict).train.reward_epochs)
        self.prepared, self.init = prepared, init

    def setup(self, rank: int) -> torch.nn.Module:
        from goalrank_core.fit import encode

        self.bundle = load_bundle(storage.join(self.prepared, "vocab"), "reward: vocabulary")
        self.valid = None
        if rank == 0:
            table = storage.read_table(storage.join(self.prepared, "valid"), None, "reward: valid split")
            self.valid = encode(self.bundle, table) if table.num_rows else None
        model = self.bundle.build("reward")
        if self.init is not None:  # warm start (flows/daily_ops.py): a bundle built on this vocabulary
            model.load_state_dict(load_bundle(storage.join(self.init, "model"), "reward: init").require("reward").state_dict())
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


def train_reward_model(prepared: str, out: str, config: GoalRankConfig, *, init: str | None = None,
                       max_failures: int | None = None) -> StageResult:
    """Stage 2: see the module docstring. `init`: a folder whose `model/` bundle holds a
    "reward" model on the prepared vocabulary to start from (warm start); `max_failures`:
    worker failures to recover from (default GOALRANK_TRAIN_MAX_FAILURES or 1)."""
    ensure_ray()
    inputs = {"prepared": prepared}
    if init is not None:  # only then: a cold run's fingerprint stays what it was
        inputs["init"] = init
    key, _ = stage_fingerprint("reward", config, inputs)

    def body(out: str) -> dict:
        spec = RewardSpec(config.to_dict(), storage.normalize(prepared), storage.normalize(init) if init else None)
        return train_and_save(spec, storage.join(prepared, "train"), out, "reward", key, config, "reward", "reward",
                           storage.join(prepared, "vocab"), max_failures)

    return run_stage(out, "reward", config, inputs, body)
