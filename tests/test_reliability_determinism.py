"""Determinism on CPU (issue 8): a seed fixes the results of the in-process fit (weights,
ranked lists, metrics); another seed changes them. Stage outputs of two whole flow runs are
compared in test_reliability_flow.py (slow)."""
from __future__ import annotations

import pytest
import torch

from gr_helpers import synth_tables, tiny_config


def _fit_and_score(splits, seed: int):
    from goalrank_core.fit import fit_tables
    from goalrank_core.metrics import evaluate_lists
    from goalrank_core.ranking import rank

    bundle = fit_tables(splits.train, splits.valid, tiny_config(**{"train.seed": seed}), splits.items,
                        log=lambda *a: None)
    test = splits.split("test")
    ranked = rank(bundle, test.drop_columns(["shown", "labels"]), "goalrank", seed=seed)
    metrics = {k: (r.value, r.ci_low, r.ci_high) for k, r in evaluate_lists(ranked, test, ks=(4,), seed=seed).items()}
    return bundle, ranked, metrics


@pytest.fixture(scope="module")
def splits():
    s, _ = synth_tables(n_users=12, requests_per_user=4)
    return s


@pytest.fixture(scope="module")
def seed3(splits):
    return _fit_and_score(splits, seed=3)


def test_same_seed_same_weights_lists_and_metrics(splits, seed3):
    a, ranked_a, metrics_a = seed3
    b, ranked_b, metrics_b = _fit_and_score(splits, seed=3)
    assert sorted(a.models) == sorted(b.models)
    for name in a.models:
        sa, sb = a.models[name].state_dict(), b.models[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert ranked_a.equals(ranked_b)
    assert metrics_a == metrics_b


def test_another_seed_gives_other_weights(splits, seed3):
    a, _, _ = seed3
    c, _, _ = _fit_and_score(splits, seed=4)
    ga, gc = a.models["generator"].state_dict(), c.models["generator"].state_dict()
    assert any(not torch.equal(ga[k], gc[k]) for k in ga)
