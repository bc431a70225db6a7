"""Any policy of a fitted bundle -> a RANKED table (request_id, ranked).

Policies: "goalrank" (the generator, greedy), "supervised" (the supervised generator,
greedy), "g-e" (Generator-Evaluator: the auxiliary policies and the supervised generator
propose, the reward model picks the best list: the same proposers as GoalRank's groups),
and every policy in policy_registry.POLICY_REGISTRY (random, popularity, ctr, mmr, history,
first-stage, dnn, dnn-pl, prm). Unseen users and items map to UNK and are ranked anyway.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from goalrank_core.baselines import GeneratorEvaluator
from goalrank_core.bundle import ModelBundle, encode
from goalrank_core.errors import GoalRankInputError
from goalrank_core.policies import GeneratorPolicy, HeuristicStats
from goalrank_core.policy_registry import PolicyResources, build_auxiliary, build_policy, known_policies
from goalrank_core.schemas import RANKED, conform


def policy_resources(bundle: ModelBundle) -> PolicyResources:
    """PolicyResources holding everything the bundle has fitted."""
    stats_t = {k[len("stats."):]: v for k, v in bundle.tensors.items() if k.startswith("stats.")}
    res = PolicyResources(
        config=bundle.config.policies,
        stats=HeuristicStats.from_tensors(stats_t) if stats_t else None,
        pointwise=bundle.models.get("pointwise"),
        prm=bundle.models.get("prm"),
        reward_model=bundle.models.get("reward"),
    )
    if "generator" in bundle.models:
        res.extra["goalrank"] = GeneratorPolicy(bundle.models["generator"], "goalrank")
    if "supervised" in bundle.models:
        res.extra["supervised"] = GeneratorPolicy(bundle.models["supervised"], "supervised")
        if res.reward_model is not None and res.stats is not None:
            res.extra["g-e"] = GeneratorEvaluator(build_auxiliary(res) + [res.extra["supervised"]], res.reward_model)
    return res


def available_policies(bundle: ModelBundle) -> list[str]:
    return known_policies(policy_resources(bundle))


@torch.no_grad()
def rank_positions(bundle: ModelBundle, data, policy: str = "goalrank", batch_size: int = 1024,
                   seed: int | None = None) -> np.ndarray:
    """EncodedRequests -> (R, L) positions into each request's candidates."""
    res = policy_resources(bundle)
    pol = build_policy(policy, res)
    dev = next((p.device for m in bundle.models.values() for p in m.parameters()), torch.device("cpu"))
    gen = torch.Generator(device=dev).manual_seed(bundle.config.train.seed if seed is None else seed)
    out = []
    for i in range(0, len(data), batch_size):
        b = data.batch(slice(i, i + batch_size), dev)
        out.append(pol.propose(b, 1, gen)[:, 0].cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, bundle.dims.slate_len), np.int64)


def rank(bundle: ModelBundle, requests: pa.Table, policy: str = "goalrank", batch_size: int = 1024,
         seed: int | None = None) -> pa.Table:
    """Rank every request of a validated requests (or impressions) table -> RANKED table."""
    data = encode(bundle, requests)
    L = bundle.dims.slate_len
    short = np.flatnonzero(data.cand_mask.sum(1) < L)
    if len(short):
        r = int(short[0])
        raise GoalRankInputError(f"requests: row {r} (request_id {data.request_id[r]!r}) has "
                                 f"{int(data.cand_mask[r].sum())} candidates, fewer than L={L}")
    pos = rank_positions(bundle, data, policy, batch_size, seed)  # (R, L)
    ids = data.positions_to_ids(slice(None), pos)
    # The contract: distinct items, all real candidates.
    assert (np.take_along_axis(data.cand_mask, pos, 1)).all(), "a policy picked a padding position"
    srt = np.sort(pos, axis=1)
    assert (srt[:, 1:] != srt[:, :-1]).all(), "a policy repeated an item"
    table = pa.table({"request_id": pa.array(list(data.request_id), pa.string()),
                      "ranked": pa.array(list(ids), pa.list_(pa.int64()))})
    return conform(table, RANKED, f"ranked lists ({policy})")
