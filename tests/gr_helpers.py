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
