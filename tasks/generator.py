"""Stage `train_generator`: Ray Train DDP over `config.train.num_workers` workers on the scored
groups, with the group-relative loss (goalrank_core.trainer.generator_group_loss, plus
`train.supervised_weight` times the supervised term). Starts from `init` when given: a
generator stage (its "generator") or a policies stage (its "supervised" generator, as the
in-process fit does); else from fresh weights. Output: `{out}/model/`, a bundle with the
"generator" (best epoch on the validation greedy hit rate).
"""
from __future__ import annotations

from typing import Any

import torch

from goalrank_core.config import GoalRankConfig
from goalrank_core.schemas import IMPRESSIONS
from tasks import object_store, storage
from tasks.stage_io import load_bundle, read_split
from tasks.group_rows import RequestIndex, groups_to_positions, padded_values
from tasks.ray_train import TrainSpec, train_and_save
from tasks.ray_runtime import ensure_ray
from tasks.storage import StageResult, run_stage, stage_fingerprint


def init_weights(init: str, what: str) -> dict[str, torch.Tensor]:
    """Generator weights of a generator stage ("generator") or a policies stage ("supervised")."""
    bundle = load_bundle(object_store.join(init, "model"), what)
    name = "generator" if "generator" in bundle.models else "supervised"
    return bundle.require(name).state_dict()


class GeneratorSpec(TrainSpec):
    what = "generator"
    higher_is_better = True

    def __init__(self, config_dict: dict, prepared: str, init: str | None):
        train = GoalRankConfig.from_dict(config_dict).train
        super().__init__(config_dict, train.epochs)
        self.prepared, self.init = prepared, init
        self.keep_best = train.keep_best_generator  # the rule trainer.train_generator_group follows

    def setup(self, rank: int) -> torch.nn.Module:
        from goalrank_core.bundle import encode

        self.bundle = load_bundle(object_store.join(self.prepared, "vocab"), "generator: vocabulary")
        self.requests = RequestIndex(storage.read_table(object_store.join(self.prepared, "train"), IMPRESSIONS,
                                                        "generator: train split"), "generator")
        self.valid = None
        if rank == 0:
            table = read_split(self.prepared, "valid", "generator: valid split")
            self.valid = encode(self.bundle, table) if table.num_rows else None
        model = self.bundle.build("generator")
        if self.init is not None:
            model.load_state_dict(init_weights(self.init, "generator: init"))
        self.width = self.config.group.size
        self.supervised_weight = self.config.train.supervised_weight
        return model

    @staticmethod
    def loss(model: torch.nn.Module, batch: Any, lists: torch.Tensor, pi_ref: torch.Tensor, mask: torch.Tensor,
             supervised_weight: float) -> torch.Tensor:
        from goalrank_core.trainer import generator_group_loss

        return generator_group_loss(model, batch, lists, pi_ref, mask, supervised_weight)

    def batch_args(self, table: Any, device: Any, gen: torch.Generator) -> tuple:
        from goalrank_core.bundle import encode

        enc = encode(self.bundle, self.requests.take(table.column("request_id")))
        pos, mask = groups_to_positions(enc, table.column("lists"), self.width, "train_generator")  # (B, G, L), (B, G)
        pi = padded_values(table.column("pi_ref"), self.width)  # (B, G)
        return (enc.batch(slice(None), device), torch.from_numpy(pos).to(device), torch.from_numpy(pi).to(device),
                torch.from_numpy(mask).to(device), self.supervised_weight)

    def validate(self, model: torch.nn.Module) -> float:
        from goalrank_core.trainer import greedy_hit_rate

        if self.valid is None:
            return float("nan")
        return greedy_hit_rate(model, self.valid, 4 * self.config.train.batch_size)


def train_generator(scored: str, prepared: str, init: str | None, out: str, config: GoalRankConfig, *,
                    max_failures: int | None = None) -> StageResult:
    """Stage 6: see the module docstring."""
    ensure_ray()
    inputs = {"scored": scored, "prepared": prepared, "init": init}
    key, _ = stage_fingerprint("generator", config, inputs)

    def body(out: str) -> dict:
        spec = GeneratorSpec(config.to_dict(), object_store.normalize(prepared), object_store.normalize(init) if init else None)
        return train_and_save(spec, object_store.join(scored, "groups"), out, "generator", key, config, "generator",
                           "generator", object_store.join(prepared, "vocab"), max_failures)

    return run_stage(out, "generator", config, inputs, body)
