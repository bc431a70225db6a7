"""Stage `score`: Ray Data actor pool with the reward model over the candidate groups. Per
request: a reward per list (reward_model.score) and pi_ref = softmax of the group-normalised
rewards (goalrank_core.group.reference_policy, `group.tau`, `group.eps`). Output:
`{out}/groups/` (schemas.SCORED_GROUPS).
"""
from __future__ import annotations

import pyarrow as pa
import torch

from goalrank_core.config import GoalRankConfig
from goalrank_core.schemas import SCORED_GROUPS
from tasks import storage
from tasks._data import device, load_bundle, read_dataset, write_dataset
from tasks._groups import RequestIndex, groups_to_positions
from tasks.candidates import pool_size
from tasks.ray_runtime import actor_pool, ensure_ray
from tasks.storage import StageResult, run_stage


class Scorer:
    """A Ray Data actor holding the reward model and the training requests (groups carry only
    request ids; the candidates and history come from the prepared split)."""

    def __init__(self, prepared: str, reward_model: str, config_dict: dict):
        self.config = GoalRankConfig.from_dict(config_dict)
        self.dev = device()
        self.bundle = load_bundle(storage.join(reward_model, "model"), "score: reward model", self.dev)
        self.reward = self.bundle.require("reward").eval()
        self.requests = RequestIndex(storage.read_table(storage.join(prepared, "train"), None, "score: train split"),
                                     "score")

    @torch.no_grad()
    def __call__(self, table: pa.Table) -> pa.Table:
        from goalrank_core.fit import encode
        from goalrank_core.group import reference_policy

        enc = encode(self.bundle, self.requests.take(table.column("request_id").to_pylist()))
        groups = table.column("lists").to_pylist()
        width = max((len(g) for g in groups), default=1)
        pos, mask = groups_to_positions(enc, groups, max(width, 1), "score")
        b = enc.batch(slice(None), self.dev)
        lists = torch.from_numpy(pos).to(self.dev)
        m = torch.from_numpy(mask).to(self.dev)
        rewards = self.reward.score(b, lists.clamp(min=0))  # (B, G)
        rewards = torch.where(m, rewards, torch.zeros_like(rewards))
        pi = reference_policy(rewards, m, self.config.group.tau, self.config.group.eps)  # (B, G)
        r, p = rewards.float().cpu().numpy(), pi.float().cpu().numpy()
        return table.append_column("rewards", pa.array([r[i][mask[i]].tolist() for i in range(len(r))],
                                                        SCORED_GROUPS.field("rewards").type)) \
                    .append_column("pi_ref", pa.array([p[i][mask[i]].tolist() for i in range(len(p))],
                                                      SCORED_GROUPS.field("pi_ref").type))


def score(candidates: str, prepared: str, reward_model: str, out: str, config: GoalRankConfig) -> StageResult:
    """Stage 5: see the module docstring."""
    ensure_ray()
    inputs = {"candidates": candidates, "prepared": prepared, "reward_model": reward_model}

    def body(out: str) -> dict:
        compute, res = actor_pool(pool_size())
        ds = read_dataset(storage.join(candidates, "groups"), "score: candidate groups")
        scored = ds.map_batches(Scorer, fn_constructor_args=(storage.normalize(prepared), storage.normalize(reward_model),
                                                             config.to_dict()),
                                batch_size=config.train.batch_size, batch_format="pyarrow", compute=compute, **res)
        rows = write_dataset(scored, storage.join(out, "groups"), SCORED_GROUPS, "scored groups")
        return {"tables": {"groups": storage.table_entry(SCORED_GROUPS, rows)}}

    return run_stage(out, "score", config, inputs, body)
