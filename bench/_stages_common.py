"""Shared set-up of the stage benchmarks: ML-100K prepared through the real `prepare` stage,
a reward-model stage with an untrained model (throughput does not depend on the weights),
and candidate groups of |B| random lists per training request written as a completed stage."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from goalrank_core.config import GoalRankConfig
from goalrank_core.schemas import CANDIDATE_GROUPS
from tasks import object_store, storage
from tasks.stage_io import load_bundle, read_split, save_bundle
from tasks.stages import DataSource, prepare, stage_uri

MODES = {
    # requests: ~13.5k train requests on all 943 users; quick keeps 300 users (~4.3k).
    "quick": {"protocol.max_users": 300, "train.epochs": 2},
    "full": {"protocol.max_users": 0, "train.epochs": 3},
}


def config(mode: str, **extra) -> GoalRankConfig:
    return GoalRankConfig().override({**MODES[mode], **extra})


def prepared(root: str, cfg: GoalRankConfig) -> str:
    return prepare(DataSource(dataset="ml-100k"), stage_uri(root, "ml-100k", "bench", "prepare"), cfg).uri


def untrained_reward(root: str, prep: str, cfg: GoalRankConfig) -> str:
    """A completed reward stage holding a freshly initialised reward model (seeded)."""
    from goalrank_core.trainer import set_seed

    def body(out: str) -> dict:
        bundle = load_bundle(object_store.join(prep, "vocab"), "bench vocab")
        set_seed(cfg.train.seed)
        bundle.add("reward", "reward", bundle.build("reward").eval())
        return {"models": {"model": save_bundle(bundle, object_store.join(out, "model"))}}

    return storage.run_stage(stage_uri(root, "ml-100k", "bench", "reward-untrained"), "reward", cfg,
                             {"prepared": prep}, body).uri


def random_groups(root: str, prep: str, cfg: GoalRankConfig, fraction: float = 1.0, repeat: int = 1) -> str:
    """A completed candidates stage: |B| distinct random lists of L candidates for the first
    `fraction` of the training requests; `repeat` > 1 writes the groups that many times over
    (fresh random lists each time, request ids repeated) to give a throughput benchmark more
    work than ML-100K has requests."""

    def body(out: str) -> dict:
        train = read_split(prep, "train", "bench train")
        train = train.slice(0, int(round(train.num_rows * fraction)))
        rng = np.random.default_rng(cfg.train.seed)
        lists = pa.concat_arrays([_random_lists(train.column("candidates").combine_chunks(), cfg, rng)
                                  for _ in range(repeat)]) if train.num_rows else pa.array([], _GROUPS)
        ids = pa.concat_arrays([train.column("request_id").combine_chunks().cast(pa.string())] * repeat)
        table = pa.table({"request_id": ids, "lists": lists,
                          "policies": pa.array([["random"] * cfg.group.size] * len(lists),
                                               CANDIDATE_GROUPS.field("policies").type)})
        rows = storage.write_table(table, object_store.join(out, "groups"), CANDIDATE_GROUPS, "bench groups")
        return {"tables": {"groups": storage.table_entry(CANDIDATE_GROUPS, rows)}}

    name = f"candidates-random-{int(fraction * 100)}" + (f"-x{repeat}" if repeat > 1 else "")
    return storage.run_stage(stage_uri(root, "ml-100k", "bench", name), "candidates", cfg, {"prepared": prep}, body,
                             params={"fraction": fraction, "repeat": repeat}).uri


_GROUPS = CANDIDATE_GROUPS.field("lists").type


def _random_lists(candidates: pa.Array, cfg: GoalRankConfig, rng: np.random.Generator) -> pa.Array:
    """Per request, |B| random orderings of its candidates cut to L (fewer items where it
    has fewer than L), as a list<list<int64>> array; vectorised over requests."""
    n = candidates.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)  # (R,)
    r, g, width = len(n), cfg.group.size, int(n.max())
    slots = np.arange(width) < n[:, None]  # (R, N)
    padded = np.full((r, width), -1, dtype=np.int64)
    padded[slots] = candidates.flatten().to_numpy(zero_copy_only=False)
    keys = np.where(slots[:, None, :], rng.random((r, g, width)), np.inf)  # (R, G, N)
    ell = min(cfg.protocol.slate_len, width)
    order = np.argsort(keys, axis=2)[:, :, :ell]  # (R, G, L) a random permutation's prefix
    ids = np.take_along_axis(padded[:, None, :], order, axis=2)  # (R, G, L), -1 beyond n
    k = np.repeat(np.minimum(n, ell), g)  # (R*G,) items per list
    inner = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(k)]).astype(np.int32)),
                                     pa.array(ids.reshape(r * g, ell)[np.arange(ell) < k[:, None]]))
    return pa.ListArray.from_arrays(pa.array(np.arange(0, r * g + 1, g, dtype=np.int32)), inner, type=_GROUPS)
