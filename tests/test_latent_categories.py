"""Categories learnt from the logs when the items come without one (`policies.latent_categories`)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from goalrank_core.bundle import build_bundle
from goalrank_core.config import GoalRankConfig
from goalrank_core.errors import ConfigError
from goalrank_core.latent_categories import kmeans, latent_categories, training_positives
from goalrank_core.schemas import IMPRESSIONS, ITEMS


def _two_tribes(n_users: int = 40) -> pa.Table:
    """Users 0..n/2-1 like items 100..109 only, the others items 200..209 only; item 300 is shown
    and never liked. Each user: one request, history of three liked items, one click."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(n_users):
        base = 100 if u < n_users // 2 else 200
        liked = rng.choice(10, 4, replace=False) + base
        cands = [int(x) for x in liked] + [300]
        rows.append({"request_id": f"r{u}", "user_id": u, "timestamp": u, "history": [int(x) for x in liked[:3]],
                     "candidates": cands, "shown": [int(liked[3]), 300], "labels": [1.0, 0.0]})
    return pa.Table.from_pylist(rows, schema=IMPRESSIONS)


def test_kmeans_separates_clear_clusters_and_is_seeded():
    x = np.concatenate([np.random.default_rng(1).normal(c, 0.05, (20, 2)) for c in ((0, 0), (5, 5), (0, 5))])
    a = kmeans(x, 3, seed=0)
    assert a.shape == (60,) and len(set(a)) == 3
    assert all(len(set(a[i:i + 20])) == 1 for i in (0, 20, 40))  # each blob one cluster
    assert np.array_equal(a, kmeans(x, 3, seed=0))
    assert len(set(kmeans(x[:2], 5, seed=0))) <= 2  # k above n: at most n clusters


def test_training_positives_are_history_and_clicked_shown_items():
    t = _two_tribes(4)
    users, items = training_positives(t)
    assert len(users) == len(items) == 4 * 3 + 4  # 3 history items and 1 click per request
    assert 300 not in set(items.tolist())  # shown, never clicked


def test_latent_categories_put_items_liked_by_the_same_users_together():
    cat = latent_categories(_two_tribes(), k=2, dim=4, seed=0)
    assert set(cat) == set(range(100, 110)) | set(range(200, 210))  # 300 was never liked: no category
    assert len({cat[i] for i in range(100, 110)}) == 1 and len({cat[i] for i in range(200, 210)}) == 1
    assert cat[100] != cat[200] and set(cat.values()) == {1, 2}
    assert latent_categories(_two_tribes(), k=0, dim=4, seed=0) == {}


def test_bundle_learns_categories_only_when_the_items_have_none():
    t = _two_tribes()
    on = GoalRankConfig().override({"policies.latent_categories": 2, "policies.emb_dim": 2})
    learnt = build_bundle(t, on, None)
    assert learnt.dims.n_categories == 3 and learnt.item_category[100] != learnt.item_category[200]
    zeros = pa.table({"item_id": pa.array([100, 200], pa.int64()), "category": pa.array([0, 0], pa.int64())}).cast(ITEMS)
    assert build_bundle(t, on, zeros).item_category == learnt.item_category  # every category 0 counts as none
    given = pa.table({"item_id": pa.array([100, 200], pa.int64()), "category": pa.array([7, 7], pa.int64())}).cast(ITEMS)
    assert build_bundle(t, on, given).item_category == {100: 7, 200: 7}  # given categories are kept as they are
    assert build_bundle(t, GoalRankConfig(), None).item_category == {}  # off by default for named data
    assert GoalRankConfig().for_source("impressions").policies.latent_categories == 16
    with pytest.raises(ConfigError, match="policies.latent_categories"):
        GoalRankConfig().override({"policies.latent_categories": -1})
