"""Stage `score`: Ray Data actor pool with the reward model over the candidate groups. Per
request: a reward per list (reward_model.score) and pi_ref = softmax of the group-normalised
rewards (goalrank_core.group.reference_policy, `group.tau`, `group.eps`). Output:
`{out}/groups/` (schemas.SCORED_GROUPS).

Throughput (issue 4): each actor loads the model and the training requests once; a batch is
`score_batch`, vectorised over Arrow buffers (no per-row Python). The input is cut into
blocks of `train.batch_size` rows first, so every actor of the pool gets batches (a stage
written as one Parquet file would otherwise be one block, fed to one actor). The manifest's
`actor_timing` keeps the actors' busy span next to the stage's wall time.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from goalrank_core.config import GoalRankConfig
from goalrank_core.schemas import CANDIDATE_GROUPS, IMPRESSIONS, SCORED_GROUPS
from tasks import object_store, storage
from tasks.stage_io import device, load_bundle, read_dataset, write_dataset
from tasks.group_rows import RequestIndex, groups_to_positions, masked_lists, positions_to_rows
from tasks.ray_runtime import actor_pool, ensure_ray, pool_size
from tasks.storage import StageResult, run_stage

_ROWS_PER_FILE = 16_384  # output parts of about 16k groups, not one small file per batch


@torch.no_grad()
def score_batch(bundle: Any, reward: torch.nn.Module, requests: RequestIndex, table: pa.Table, config: GoalRankConfig,
                dev: str = "cpu") -> pa.Table:
    """Candidate groups (CANDIDATE_GROUPS rows) -> the same rows with `rewards` and `pi_ref`:
    the per-batch work of a `Scorer` actor (the benchmark's bare loop calls it too)."""
    from goalrank_core.bundle import encode
    from goalrank_core.group import reference_policy
    from goalrank_core.trainer import batch_folds

    lists_col = table.column("lists")
    width = max(1, pc.max(pc.list_value_length(lists_col)).as_py() or 0) if table.num_rows else 1
    enc = encode(bundle, requests.take(table.column("request_id")))
    pos, mask = groups_to_positions(enc, lists_col, width, "score")  # (B, G, L), (B, G)
    b = enc.batch(slice(None), dev)
    folds = batch_folds(reward, enc, slice(None), dev)
    if config.group.search_lists:  # as fit.propose_groups: the reward-guided list leads the group
        table, pos, mask = with_search_list(enc, b, reward, table, pos, config, folds)
    m = torch.from_numpy(mask).to(dev)
    # Cross-fitting: a training request's lists scored by the member that did not train on it.
    rewards = reward.score(b, torch.from_numpy(pos).to(dev).clamp(min=0), folds)  # (B, G)
    rewards = torch.where(m, rewards, torch.zeros_like(rewards))
    pi = reference_policy(rewards, m, config.group.tau, config.group.eps)  # (B, G)
    r, p = rewards.float().cpu().numpy(), pi.float().cpu().numpy()
    return (table.append_column("rewards", masked_lists(r, mask, SCORED_GROUPS.field("rewards").type))
                 .append_column("pi_ref", masked_lists(p, mask, SCORED_GROUPS.field("pi_ref").type)))


def with_search_list(enc: Any, b: Any, reward: torch.nn.Module, table: pa.Table, pos: np.ndarray,
                     config: GoalRankConfig, folds: torch.Tensor | None) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """`group.search_lists`: put the list built by greedy search under the reward model
    (goalrank_core.search; a training request searched by the member that never saw it) first
    in each group, deduplicated and cut to |B| as `fit.propose_groups` does.
    -> (the rows with new `lists` / `policies`, positions (B, |B|, L), mask (B, |B|))."""
    from goalrank_core.group import dedup_lists
    from goalrank_core.search import greedy_search

    found = greedy_search(reward, b, pos.shape[2], folds, config.group.search_shortlist,
                          sweeps=config.group.search_sweeps).cpu()  # (B, L)
    names = table.column("policies").to_pylist()
    vocab = ["search"] + sorted({n for row in names for n in row} - {"search"})
    pid = np.full(pos.shape[:2], -1, dtype=np.int64)  # (B, G)
    for i, row in enumerate(names):
        k = min(len(row), pid.shape[1])
        pid[i, :k] = [vocab.index(n) for n in row[:k]]
    lists = torch.cat([found[:, None, :], torch.from_numpy(pos)], dim=1)  # (B, 1 + G, L)
    pids = torch.cat([torch.zeros(len(pid), 1, dtype=torch.long), torch.from_numpy(pid)], dim=1)
    lists, mask, pids = dedup_lists(lists, pids, config.group.size)
    lists, mask, pids = lists.numpy(), mask.numpy(), pids.numpy()
    cols = positions_to_rows(enc, lists, mask, {"pids": pids})
    out = pa.table({"request_id": table.column("request_id"),
                    "lists": pa.array(cols["lists"], CANDIDATE_GROUPS.field("lists").type),
                    "policies": pa.array([[vocab[p] for p in row] for row in cols["pids"]],
                                         CANDIDATE_GROUPS.field("policies").type)})
    return out, lists, mask


class Scorer:
    """A Ray Data actor holding the reward model and the training requests (groups carry only
    request ids; the candidates and history come from the prepared split)."""

    def __init__(self, prepared: str, reward_model: str, config_dict: dict):
        self.config = GoalRankConfig.from_dict(config_dict)
        self.dev = device()
        self.bundle = load_bundle(object_store.join(reward_model, "model"), "score: reward model", self.dev)
        self.reward = self.bundle.require("reward").eval()
        self.requests = RequestIndex(storage.read_table(object_store.join(prepared, "train"), IMPRESSIONS, "score: train split"),
                                     "score")

    def __call__(self, table: pa.Table) -> pa.Table:
        return score_batch(self.bundle, self.reward, self.requests, table, self.config, self.dev)


def actor_timing(ops: dict[str, dict], actors: int, rows: int, t0: float) -> dict:
    """The Scorer operator's numbers from Ray Data's stats (tasks.stage_io.operator_stats):
    `busy_s` runs from its first batch's start to its last batch's end, so actor start-up,
    the read and the write fall outside it; `first_batch_at_s` / `last_batch_end_s` place
    that span on the stage body's clock (started at perf_counter `t0`)."""
    op = next((v for k, v in ops.items() if "Scorer" in k), None)
    if not op or not op.get("busy_s"):
        return {}
    at = {k: round(op[v] - t0, 3) for k, v in (("first_batch_at_s", "start"), ("last_batch_end_s", "end"))
          if op.get(v) is not None}
    return {"actors": actors, "groups": rows, "busy_s": round(op["busy_s"], 3), **at,
            "udf_s": round(op["udf_s"], 3) if op.get("udf_s") is not None else None,
            "groups_per_busy_s": round(rows / op["busy_s"], 1)}


def score(candidates: str, prepared: str, reward_model: str, out: str, config: GoalRankConfig) -> StageResult:
    """Stage 5: see the module docstring."""
    ensure_ray()
    inputs = {"candidates": candidates, "prepared": prepared, "reward_model": reward_model}

    def body(out: str) -> dict:
        t0 = time.perf_counter()
        actors = pool_size()
        compute, res = actor_pool(actors)
        bs = config.train.batch_size
        ds = read_dataset(object_store.join(candidates, "groups"), "score: candidate groups")
        ds = ds.repartition(target_num_rows_per_block=bs)  # streaming: one batch per block
        scored = ds.map_batches(Scorer, fn_constructor_args=(object_store.normalize(prepared), object_store.normalize(reward_model),
                                                             config.to_dict()),
                                batch_size=bs, batch_format="pyarrow", zero_copy_batch=True, compute=compute, **res)
        ops: dict[str, dict] = {}
        rows = write_dataset(scored, object_store.join(out, "groups"), SCORED_GROUPS, "scored groups", stats=ops,
                             min_rows_per_file=_ROWS_PER_FILE)
        # The loop's diagnostics (who fills the groups, who pi_ref learns from), for the log and MLflow.
        from goalrank_core.diagnostics import group_summary_table

        import pyarrow.parquet as pq

        fs, path = object_store.filesystem(object_store.join(out, "groups"))  # the manifest is not written yet
        written = pq.read_table(path, filesystem=fs, columns=["policies", "rewards", "pi_ref"])
        return {"tables": {"groups": storage.table_entry(SCORED_GROUPS, rows)},
                "extra": {"actor_timing": actor_timing(ops, actors, rows, t0),
                          "diagnostics": group_summary_table(written)}}

    return run_stage(out, "score", config, inputs, body)
