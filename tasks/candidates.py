"""Stage `generate_candidates`: Ray Data `map_batches` over the training requests with a pool
of actors, each holding the auxiliary policies (heuristics, point-wise DNN and its
Plackett-Luce samples, PRM... as `policies.auxiliary` names, plus the supervised generator)
and the current generator. Per request: the logged list (`group.logged_list`), every policy's lists, then
`group.generator_samples` generator samples, deduplicated to |B| = `group.size`
(goalrank_core.group.dedup_lists; earlier proposals win). Output: `{out}/groups/`
(schemas.CANDIDATE_GROUPS). Without a generator (round 1) the supervised generator samples,
as the in-process fit starts GoalRank from it.
"""
from __future__ import annotations

import pyarrow as pa
import torch

from goalrank_core.config import GoalRankConfig
from goalrank_core.schemas import CANDIDATE_GROUPS
from tasks import object_store, storage
from tasks.stage_io import batch_seed, device, load_bundle, read_dataset, write_dataset
from tasks.group_rows import positions_to_rows
from tasks.ray_runtime import actor_pool, ensure_ray, pool_size
from tasks.storage import StageResult, run_stage


class Proposer:
    """A Ray Data actor: loads the models once, then proposes groups batch by batch."""

    def __init__(self, policies: str, generator: str | None, config_dict: dict, round: int):
        from goalrank_core.policy_registry import build_auxiliary
        from goalrank_core.ranking import policy_resources

        self.config = GoalRankConfig.from_dict(config_dict)
        self.round = round
        self.dev = device()
        self.bundle = load_bundle(object_store.join(policies, "model"), "candidates: policies", self.dev)
        res = policy_resources(self.bundle)
        self.aux = build_auxiliary(res) + ([res.extra["supervised"]] if "supervised" in res.extra else [])
        self.generator = self.bundle.models.get("supervised")
        if generator is not None:
            self.generator = load_bundle(object_store.join(generator, "model"), "candidates: generator", self.dev).require("generator")

    @torch.no_grad()
    def __call__(self, table: pa.Table) -> pa.Table:
        from goalrank_core.bundle import encode
        from goalrank_core.fit import group_proposals
        from goalrank_core.group import dedup_lists

        cfg = self.config
        enc = encode(self.bundle, table)
        b = enc.batch(slice(None), self.dev)
        gen = torch.Generator(device=self.dev).manual_seed(batch_seed(cfg.train.seed + self.round, enc.request_id))
        # The logged list (group.logged_list), the auxiliary lists, then generator samples: as in fit.
        lists, names = group_proposals(b, self.aux, self.generator, cfg, gen)  # (B, G, L)
        vocab = list(dict.fromkeys(names))
        pid = torch.tensor([vocab.index(n) for n in names], device=self.dev).expand(len(b), -1)
        lists, mask, pids = dedup_lists(lists, pid, cfg.group.size)  # (B, |B|, L), (B, |B|), (B, |B|)
        cols = positions_to_rows(enc, lists.cpu().numpy(), mask.cpu().numpy(), {"pids": pids.cpu().numpy()})
        policies = [[vocab[p] for p in row] for row in cols["pids"]]
        return pa.table({"request_id": pa.array(list(enc.request_id), pa.string()),
                         "lists": pa.array(cols["lists"], CANDIDATE_GROUPS.field("lists").type),
                         "policies": pa.array(policies, CANDIDATE_GROUPS.field("policies").type)})


def generate_candidates(prepared: str, policies: str, generator: str | None, out: str, config: GoalRankConfig,
                        round: int) -> StageResult:
    """Stage 4: see the module docstring. `round` (1-based) seeds the generator samples."""
    ensure_ray()
    inputs = {"prepared": prepared, "policies": policies, "generator": generator}

    def body(out: str) -> dict:
        compute, res = actor_pool(pool_size())
        ds = read_dataset(object_store.join(prepared, "train"), "candidates: train split")
        # One batch per block, as in `score`: a split written as one Parquet file is otherwise one
        # block, and one block feeds one actor of the pool (measured on ML-1M: 1 of 2 actors busy).
        ds = ds.repartition(target_num_rows_per_block=config.train.batch_size)
        groups = ds.map_batches(
            Proposer, fn_constructor_args=(object_store.normalize(policies), object_store.normalize(generator) if generator else None,
                                           config.to_dict(), round),
            batch_size=config.train.batch_size, batch_format="pyarrow", compute=compute, **res)
        rows = write_dataset(groups, object_store.join(out, "groups"), CANDIDATE_GROUPS, "candidate groups")
        return {"tables": {"groups": storage.table_entry(CANDIDATE_GROUPS, rows)}}

    return run_stage(out, "candidates", config, inputs, body, params={"round": round})
