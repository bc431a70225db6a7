"""Hand-made request batches for the model tests (random ids, real shapes)."""
from __future__ import annotations

import torch

from goalrank_core.batch import RequestBatch


def random_batch(b: int = 8, n: int = 12, h: int = 5, l: int = 4, n_items: int = 40, n_users: int = 10,
                 n_categories: int = 4, seed: int = 0, short_rows: int = 1) -> RequestBatch:
    """B requests with N candidates (the first `short_rows` rows padded to N - 3), a shown
    list at positions 0..L-1 and random labels."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[:short_rows, n - 3:] = False
    cand = torch.randint(2, n_items, (b, n), generator=g) * mask
    hist = torch.randint(2, n_items, (b, h), generator=g)
    hist[0, :2] = 0  # left padding
    return RequestBatch(
        user=torch.randint(2, n_users, (b,), generator=g),
        history=hist,
        candidates=cand,
        cand_mask=mask,
        category=torch.randint(0, n_categories, (b, n), generator=g) * mask,
        shown=torch.arange(l).repeat(b, 1),
        labels=(torch.rand(b, l, generator=g) < 0.5).float(),
    )


def tiny_config(**over):
    """A config small enough to fit in a few seconds on 2 CPUs."""
    from goalrank_core.config import GoalRankConfig

    base = {
        "protocol.slate_len": 4, "protocol.n_candidates": 12, "protocol.history_len": 10,
        "generator.d_model": 16, "generator.n_layers": 1, "generator.n_heads": 2,
        "reward.d_model": 16, "reward.n_layers": 1, "reward.n_heads": 2,
        "group.size": 10, "group.generator_samples": 3, "group.rounds": 1,
        "train.epochs": 1, "train.reward_epochs": 1, "train.aux_epochs": 1, "train.batch_size": 64,
        "policies.dnn_dim": 8, "policies.dnn_hidden": 16, "policies.prm_d_model": 8, "policies.emb_dim": 8,
    }
    base.update(over)
    return GoalRankConfig().override(base)


def synth_tables(n_users: int = 40, requests_per_user: int = 6, seed: int = 0, **kw):
    """Synthetic impressions (L=4, N=12) split per user: last request test, one before valid."""
    from goalrank_core.config_sections import ProtocolConfig
    from goalrank_core.protocol import split_impressions
    from goalrank_core.synth import synth_impressions

    table, items, world = synth_impressions(n_users=n_users, n_items=80, requests_per_user=requests_per_user,
                                            slate_len=4, n_candidates=12, n_categories=4, history_len=10,
                                            seed=seed, **kw)
    return split_impressions(table, items, ProtocolConfig(split="user-last")), world
