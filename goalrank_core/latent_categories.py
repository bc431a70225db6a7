"""Categories learnt from the logs, for items that come without one (`policies.latent_categories`).

The category-aware parts of the fit (the reward model's pairwise context term, the generator's
list-context term, MMR's category mode) need to know which items are alike: a second item of a
kind is often worth less than the first. Logs without an item table (or with every category 0)
say nothing about that, and those parts then learn from the cosine of trained encodings alone,
which was measured far weaker (docs/simulator.md). Items liked by the same users sit close in the
low-rank factorisation of the user x item positives that the heuristics already use
(policies.lowrank_item_embeddings); k-means on the normalised vectors turns that closeness into
categories. Items no training user liked have a zero vector and stay without a category (0).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from goalrank_core.policies import lowrank_item_embeddings

KMEANS_ITERS = 30


def training_positives(train: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(user ids, item ids) of every positive in an impressions table: history items and shown
    items with a label > 0, as the heuristics' factorisation counts them."""
    def flat(col: str) -> tuple[np.ndarray, np.ndarray]:
        arr = train.column(col).combine_chunks()
        return arr.flatten().to_numpy(zero_copy_only=False), pc.list_parent_indices(arr).to_numpy()

    user = train.column("user_id").to_numpy()
    hist, hist_row = flat("history")
    shown, shown_row = flat("shown")
    labels, _ = flat("labels")
    clicked = labels > 0
    return (np.concatenate([user[hist_row], user[shown_row[clicked]]]).astype(np.int64),
            np.concatenate([hist, shown[clicked]]).astype(np.int64))


def kmeans(x: np.ndarray, k: int, seed: int, iters: int = KMEANS_ITERS) -> np.ndarray:
    """Seeded k-means (k-means++ start, Lloyd steps) of the rows of x (n, d). -> (n,) int64 cluster
    ids in [0, min(k, n))."""
    n = len(x)
    k = min(k, n)
    rng = np.random.default_rng([seed, 11])
    centres = [x[rng.integers(n)]]
    d2 = ((x - centres[0]) ** 2).sum(1)  # (n,) squared distance to the nearest centre so far
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centres.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - centres[-1]) ** 2).sum(1))
    c = np.stack(centres)  # (k, d)
    assign = np.zeros(n, np.int64)
    for _ in range(iters):
        assign = (((x[:, None, :] - c[None]) ** 2).sum(-1)).argmin(1)  # (n,)
        new = np.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    return assign


def latent_categories(train: pa.Table, k: int, dim: int, seed: int) -> dict[int, int]:
    """Raw item id -> category in [1, k] for every item some training user liked (k-means of
    their normalised low-rank vectors); an empty dict when k is 0 or nothing was liked."""
    users, items = training_positives(train)
    if k < 1 or len(items) == 0:
        return {}
    item_ids, item_idx = np.unique(items, return_inverse=True)
    _, user_idx = np.unique(users, return_inverse=True)
    emb = lowrank_item_embeddings(user_idx, item_idx, len(item_ids), dim, seed).numpy().astype(np.float64)  # (V, dim)
    norm = np.linalg.norm(emb, axis=1)
    keep = norm > 0
    if not keep.any():
        return {}
    cluster = kmeans(emb[keep] / norm[keep, None], k, seed)
    return {int(i): int(c) + 1 for i, c in zip(item_ids[keep], cluster)}
