"""Stage `train_reward_model`: Ray Train DDP over `config.train.num_workers` workers on the
prepared training impressions, after the policies stage, with the in-process fit's loss
(goalrank_core.fit.train_reward): BCE on the logged list and, when unshown candidates are
negatives (`reward.unshown`), `reward.augment_lists` augmented lists and `reward.group_lists`
of the group proposers' lists per request (goalrank_core.trainer.pick_lists, then
reward_loss), labelled from the log, so the model is trained on the kind of lists it will rank. Early stopping on the same measure as in process
(goalrank_core.trainer.mean_reward_loss on the logged valid lists plus every valid proposal).
The model starts from the policies stage's supervised generator where shapes allow
(goalrank_core.fit.init_reward, `reward.init_from_supervised`), or from `init` (warm start).
Output: `{out}/model/`, a bundle with the "reward" model (the best epoch).

The proposers' lists: computed once per stage run, in one Ray task, with the very calls of
`fit.train_reward` (`proposer_lists` over the whole train / valid split, the policies
stage's auxiliary policies plus its supervised generator, seeds `train.seed` + 101 / + 102),
so they do not depend on the number of workers and a rerun or resumed run gets the same
lists. The train lists ride as a column (`proposals`, (G, L) positions per row) of the
training Dataset, so each DDP worker's shard brings its requests' lists; the valid lists go
to rank 0 inside the spec, aligned by request id. The policies stage is an input of this
stage (its fingerprint is in the manifest), so new policies retrain the reward model.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from goalrank_core.config import GoalRankConfig
from goalrank_core.errors import ConfigError
from goalrank_core.schemas import IMPRESSIONS
from tasks import object_store, storage
from tasks.stage_io import load_bundle, read_split
from tasks.ray_train import TrainSpec, train_and_save
from tasks.ray_runtime import ensure_ray, task_cpus
from tasks.storage import StageResult, run_stage, stage_fingerprint

PROPOSALS = "proposals"  # the training Dataset's column of proposer lists


def proposals_column(lists: np.ndarray) -> pa.Array:
    """(R, G, L) positions (-1 = none) -> a fixed_size_list<fixed_size_list<int32, L>, G> column."""
    r, g, l = lists.shape
    flat = pa.array(np.ascontiguousarray(lists, dtype=np.int32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(pa.FixedSizeListArray.from_arrays(flat, l), g)


def proposals_array(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of `proposals_column`: -> (R, G, L) int64 positions."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    g, l = arr.type.list_size, arr.type.value_type.list_size
    flat = arr.flatten().flatten().to_numpy(zero_copy_only=False)  # flatten() honours slices
    return flat.astype(np.int64).reshape(len(arr), g, l)


def _proposals(prepared: str, policies: str, config_dict: dict, threads: int) -> dict:
    """Runs in a Ray task: the proposers' lists of every train and valid request, exactly as
    goalrank_core.fit.train_reward computes them. -> {"train": table + proposals column,
    "valid": (V, G, L) or None, "valid_ids", "names", "lists_per_request", "seconds"}."""
    from goalrank_core.bundle import encode
    from goalrank_core.fit import proposer_lists
    from goalrank_core.policy_registry import build_auxiliary
    from goalrank_core.ranking import policy_resources
    from tasks.stage_io import device

    t0 = time.perf_counter()
    torch.set_num_threads(max(1, threads))
    cfg = GoalRankConfig.from_dict(config_dict)
    bundle = load_bundle(object_store.join(policies, "model"), "reward: policies", device())
    sup = bundle.require("supervised")
    res = policy_resources(bundle)
    aux = build_auxiliary(res) + [res.extra["supervised"]]
    train = storage.read_table(object_store.join(prepared, "train"), IMPRESSIONS, "reward: train split")
    props = proposer_lists(encode(bundle, train), aux, sup, cfg, seed=cfg.train.seed + 101)
    # Valid (complete) lists per request, for the log and the manifest.
    per_req = float((props.lists >= 0).all(-1).sum(1).mean()) if len(props.lists) else 0.0
    out = {"train": train.append_column(PROPOSALS, proposals_column(props.lists)), "valid": None, "valid_ids": [],
           "names": props.names, "lists_per_request": per_req}
    valid = read_split(prepared, "valid", "reward: valid split")
    if valid.num_rows:
        enc = encode(bundle, valid)
        out["valid"] = proposer_lists(enc, aux, sup, cfg, seed=cfg.train.seed + 102).lists.astype(np.int32)
        out["valid_ids"] = [str(x) for x in enc.request_id]
    out["seconds"] = time.perf_counter() - t0
    return out


def _blocks(table: pa.Table, n: int) -> list[pa.Table]:
    """`table` in about `n` row slices: the Dataset's blocks (several, so shards stream)."""
    step = max(1, -(-table.num_rows // max(1, n)))
    return [table.slice(i, step) for i in range(0, table.num_rows, step)] or [table]


class RewardSpec(TrainSpec):
    what = "reward"
    higher_is_better = False

    def __init__(self, config_dict: dict, prepared: str, init: str | None = None, policies: str | None = None,
                 valid_proposals: np.ndarray | None = None, valid_ids: list[str] | None = None):
        super().__init__(config_dict, GoalRankConfig.from_dict(config_dict).train.reward_epochs)
        self.prepared, self.init, self.policies = prepared, init, policies
        self.valid_proposals, self.valid_ids = valid_proposals, valid_ids  # (V, G, L) int32, V ids

    def setup(self, rank: int) -> torch.nn.Module:
        from goalrank_core.bundle import encode

        self.bundle = load_bundle(object_store.join(self.prepared, "vocab"), "reward: vocabulary")
        self.bundle.config = self.config  # build what train_and_save will load the weights into
        self.valid, self.valid_props = None, None
        if rank == 0:
            table = read_split(self.prepared, "valid", "reward: valid split")
            self.valid = encode(self.bundle, table) if table.num_rows else None
            if self.valid is not None and self.valid_proposals is not None:
                row = {rid: i for i, rid in enumerate(self.valid_ids)}
                order = np.array([row[str(rid)] for rid in self.valid.request_id], dtype=np.int64)
                self.valid_props = self.valid_proposals[order].astype(np.int64)  # (V, G, L) in encode's order
        from goalrank_core.fit import init_reward, item_features

        model = self.bundle.build("reward")
        log = lambda msg: print(f"[reward] {msg}", flush=True) if rank == 0 else None  # noqa: E731
        pol = None
        if self.policies is not None:
            pol = load_bundle(object_store.join(self.policies, "model"), "reward: policies")
            pol.config = self.config
        if self.init is not None:  # warm start (flows/daily_ops.py): a bundle built on this vocabulary
            model.load_state_dict(load_bundle(object_store.join(self.init, "model"), "reward: init").require("reward").state_dict())
            if pol is not None:  # this window's statistics, not the champion's
                item_features(model, pol, log)
        elif pol is not None:  # as fit.train_reward: from the supervised generator when shapes match
            init_reward(model, pol, log)
        self.augment, self.k = model.cfg.labelled_lists  # k: proposer lists per request, as trainer.train_reward_model
        self.list_weight = model.cfg.list_weight
        return model

    @staticmethod
    def loss(model: torch.nn.Module, batch: Any, augment: int, gen: torch.Generator,
             extra: torch.Tensor | None, list_weight: float, folds: torch.Tensor | None) -> torch.Tensor:
        from goalrank_core.trainer import reward_loss

        return reward_loss(model, batch, augment, gen, extra, list_weight, folds)

    def batch_args(self, table: Any, device: Any, gen: torch.Generator) -> tuple:
        from goalrank_core.bundle import encode
        from goalrank_core.reward_model import request_folds
        from goalrank_core.trainer import pick_lists

        enc = encode(self.bundle, table)
        batch = enc.batch(slice(None), device)
        k = self.config.reward.folds  # cross-fitting: member k learns from rows outside fold k
        folds = torch.from_numpy(request_folds(enc.request_id, k)).to(device) if k > 1 else None
        extra = None
        if self.k > 0 and PROPOSALS in table.column_names:
            # Drawn before the augmented lists, from the same generator: trainer.train_reward_model's order.
            extra = pick_lists(torch.from_numpy(proposals_array(table.column(PROPOSALS))).to(device), self.k, gen)  # (B, k, L)
        return batch, self.augment, gen, extra, self.list_weight, folds

    def validate(self, model: torch.nn.Module) -> float:
        from goalrank_core.trainer import mean_reward_loss

        if self.valid is None:
            return float("nan")
        return mean_reward_loss(model, self.valid, 4 * self.config.train.batch_size, self.valid_props)


def train_reward_model(prepared: str, policies: str | None, out: str, config: GoalRankConfig, *,
                       init: str | None = None, max_failures: int | None = None) -> StageResult:
    """Stage 3 (after `train_policies`): see the module docstring. `policies`: the policies
    stage (needed when `reward.group_lists` > 0); `init`: a folder whose `model/` bundle
    holds a "reward" model on the prepared vocabulary to start from (warm start);
    `max_failures`: worker failures to recover from (default GOALRANK_TRAIN_MAX_FAILURES or 1)."""
    import ray

    use_props = config.reward.labelled_lists[1] > 0
    if use_props and policies is None:
        raise ConfigError("config 'reward.group_lists' > 0 with reward.unshown = negative trains the reward model "
                          "on the policies' lists: give the policies stage (or set reward.group_lists=0)")
    ensure_ray()
    inputs = {"prepared": prepared}
    if policies is not None:
        inputs["policies"] = policies
    if init is not None:  # only then: a cold run's fingerprint stays what it was
        inputs["init"] = init
    key, _ = stage_fingerprint("reward", config, inputs)

    def body(out: str) -> dict:
        spec = RewardSpec(config.to_dict(), object_store.normalize(prepared), object_store.normalize(init) if init else None,
                          object_store.normalize(policies) if policies else None)
        dataset, extra = None, {}
        if use_props:
            cpus = task_cpus()
            remote = ray.remote(num_cpus=cpus, max_retries=1)(_proposals)
            res = ray.get(remote.remote(object_store.normalize(prepared), object_store.normalize(policies), config.to_dict(),
                                        int(max(1, cpus))))
            spec.valid_proposals, spec.valid_ids = res["valid"], res["valid_ids"]
            train = res["train"]
            dataset = ray.data.from_arrow(_blocks(train, 4 * config.train.num_workers))
            per_req = res["lists_per_request"]
            print(f"[reward] proposers' lists: {', '.join(res['names'])}; {per_req:.1f} per request on "
                  f"{train.num_rows} train requests ({res['seconds']:.1f}s)", flush=True)
            extra = {"proposals": {"policies": res["names"], "lists_per_request": round(per_req, 2),
                                   "per_batch": config.reward.labelled_lists[1], "seconds": round(res["seconds"], 2)}}
        manifest = train_and_save(spec, object_store.join(prepared, "train"), out, "reward", key, config, "reward",
                                  "reward", object_store.join(prepared, "vocab"), max_failures, dataset=dataset)
        manifest["training"].update(extra)
        return manifest

    return run_stage(out, "reward", config, inputs, body)
