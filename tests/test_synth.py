"""Synthetic logs: seeded, valid, and with a real list-context effect."""
from __future__ import annotations

import numpy as np
import pytest

from goalrank_core.errors import GoalRankInputError
from goalrank_core.synth import DAY, ITEM_ID_OFFSET, T0, make_world, synth_impressions
from goalrank_core.validate import validate_impressions, validate_items


def test_seeded_and_valid():
    a, items, _ = synth_impressions(n_users=30, n_items=120, requests_per_user=5, seed=4)
    b, _, _ = synth_impressions(n_users=30, n_items=120, requests_per_user=5, seed=4)
    c, _, _ = synth_impressions(n_users=30, n_items=120, requests_per_user=5, seed=5)
    assert a.equals(b) and not a.equals(c)
    validate_impressions(a, "synth")
    validate_items(items, "synth items")
    assert a.num_rows == 150 and min(items.column("item_id").to_pylist()) == ITEM_ID_OFFSET


def test_history_is_earlier_clicks():
    imp, _, _ = synth_impressions(n_users=10, n_items=100, requests_per_user=6, seed=0)
    rows = imp.to_pylist()
    for u in range(10):
        reqs = [r for r in rows if r["user_id"] == u]
        clicks: list[int] = []
        for r in reqs:
            assert r["history"] == clicks[-50:]
            clicks += [i for i, lab in zip(r["shown"], r["labels"]) if lab > 0]


def test_days_spread_timestamps():
    imp, _, _ = synth_impressions(n_users=5, n_items=60, requests_per_user=8, days=4, seed=0)
    ts = np.array(imp.column("timestamp").to_pylist())
    assert ts.min() >= T0 and ts.max() < T0 + 4 * DAY
    assert len(set((ts - T0) // DAY)) == 4


def test_context_effect_makes_pointwise_sort_suboptimal():
    _, _, world = synth_impressions(n_users=50, n_items=200, requests_per_user=1, seed=0)
    users = np.arange(50)
    cands = np.stack([np.random.default_rng(u).choice(200, 40, replace=False) for u in users]) + ITEM_ID_OFFSET
    aff = world.affinity(users, cands)
    point = np.take_along_axis(cands, np.argsort(-aff, 1)[:, :6], 1)
    # greedy list-wise: add the item that raises the true list value most
    chosen = np.zeros((50, 0), np.int64)
    for _ in range(6):
        gains = np.stack([world.list_value(users, np.concatenate([chosen, cands[:, j:j + 1]], 1))
                          for j in range(cands.shape[1])], 1)
        gains[np.array([[c in set(row) for c in cr] for row, cr in zip(chosen, cands)])] = -np.inf
        pick = cands[np.arange(50), gains.argmax(1)]
        chosen = np.concatenate([chosen, pick[:, None]], 1)
    assert world.list_value(users, chosen).mean() > 1.15 * world.list_value(users, point).mean()


def test_same_category_pair_worth_less_than_alone():
    w = make_world(3, 50, n_categories=2, seed=0)
    cat = w.category
    a, b = np.flatnonzero(cat == 1)[:2] + ITEM_ID_OFFSET
    other = np.flatnonzero(cat == 2)[0] + ITEM_ID_OFFSET
    p_same = w.click_probs(np.array([0]), np.array([[a, b]]))[0, 1]
    p_alone = w.click_probs(np.array([0]), np.array([[other, b]]))[0, 1]
    assert p_same < p_alone
    assert w.click_probs(np.array([0, 1]), np.array([[a, b], [b, a]])).shape == (2, 2)


def test_bad_arguments():
    with pytest.raises(GoalRankInputError, match="slate_len <= n_candidates <= n_items"):
        synth_impressions(n_users=2, n_items=10, n_candidates=50)
    w = make_world(2, 10, seed=0)
    with pytest.raises(GoalRankInputError, match="item id 5 is not one of its items"):
        w.click_probs(np.array([0]), np.array([[5]]))
