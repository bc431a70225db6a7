"""layers.ItemFeatures: the collaborative statistics the reward model and the generator read per
candidate, how they are filled from the heuristic statistics, and how they travel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from goalrank_core.batch import RequestBatch, Vocab
from goalrank_core.config_sections import GeneratorConfig, RewardConfig
from goalrank_core.generator import GoalRankGenerator
from goalrank_core.layers import ItemFeatures, set_item_features
from goalrank_core.reward_model import CrossFitReward, RewardModel
from goalrank_core.warm import remap_state
from gr_helpers import random_batch, synth_tables, tiny_config


def _batch() -> RequestBatch:
    # one request: candidates items 2, 3, 4 (+ one padding slot), history items 2 and 5 (+ PAD)
    return RequestBatch(user=torch.tensor([2]), history=torch.tensor([[0, 2, 5]]),
                        candidates=torch.tensor([[2, 3, 4, 0]]), cand_mask=torch.tensor([[True, True, True, False]]),
                        category=torch.zeros(1, 4, dtype=torch.long), shown=torch.tensor([[0, 1]]),
                        labels=torch.tensor([[1.0, 0.0]]))


def test_features_are_computed_by_hand():
    f = ItemFeatures(n_items=6, dim=2)
    emb = torch.tensor([[0, 0], [0, 0], [1, 0], [0, 1], [1, 1], [1, 0]], dtype=torch.float32)
    pop = torch.tensor([0, 0, 3, 0, 7, 1], dtype=torch.float32)
    ctr = torch.tensor([0, 0, 0.5, 0.1, 0.2, 0.3])
    assert set_item_features(f, pop, ctr, emb)
    out = f(_batch())[0]  # (N, 4)
    hmean = (F.normalize(emb[2], dim=0) + F.normalize(emb[5], dim=0)) / 2  # = (1, 0)
    sim = torch.stack([F.normalize(emb[i], dim=0) @ hmean for i in (2, 3, 4)])  # 1, 0, 1/sqrt(2)
    assert torch.allclose(out[:3, 0], sim)
    z = (sim - sim.mean()) / (sim.std(unbiased=False) + 1e-3)  # over the 3 real candidates only
    assert torch.allclose(out[:3, 1], z, atol=1e-5) and out[3, 1] == 0
    assert torch.allclose(out[:3, 2], torch.log1p(pop[[2, 3, 4]]))
    assert torch.allclose(out[:3, 3], ctr[[2, 3, 4]])


def test_ids_beyond_the_tables_get_no_statistics():
    f = ItemFeatures(n_items=4, dim=2)
    set_item_features(f, torch.ones(4), torch.ones(4), torch.ones(4, 2))
    b = _batch()
    b = RequestBatch(**{**b._asdict(), "candidates": torch.tensor([[2, 9, 3, 0]])})  # item 9: added after the fit
    out = f(b)[0]
    assert torch.equal(out[1, 2:], torch.zeros(2)) and out[0, 2] > 0


def test_set_item_features_fills_every_member_and_changes_scores():
    cfg = RewardConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, folds=2)
    torch.manual_seed(0)
    model = CrossFitReward(cfg, n_items=40, n_users=10, n_categories=4, slate_len=4, feature_dim=8).eval()
    b = random_batch(b=3, n=10, l=4)
    lists = torch.arange(4).expand(3, 1, 4)
    before = model.score(b, lists)
    g = torch.Generator().manual_seed(1)
    pop, ctr, emb = torch.rand(40, generator=g) * 10, torch.rand(40, generator=g), torch.randn(40, 8, generator=g)
    assert set_item_features(model, pop, ctr, emb)
    for m in model.members:
        assert torch.equal(m.features.feat_pop, pop) and torch.equal(m.features.feat_emb, emb)
    assert not torch.allclose(model.score(b, lists), before)  # the features reach the score
    with pytest.raises(ValueError, match="shape"):
        set_item_features(model, pop, ctr, torch.randn(40, 5))  # another embedding width
    off = RewardModel(RewardConfig(d_model=16, n_layers=1, n_heads=2, item_features=False), 40, 10, 4, 4)
    assert not set_item_features(off, pop, ctr, emb)  # nothing to fill
    assert not any("feat" in k for k in off.state_dict())


def test_fit_gives_the_reward_model_and_generators_the_bundle_statistics():
    from goalrank_core.fit import fit_tables

    splits, _ = synth_tables(n_users=30, requests_per_user=6)
    bundle = fit_tables(splits.train, splits.valid, tiny_config(), splits.items, log=lambda s: None)
    pop = bundle.tensors["stats.popularity"]
    assert pop.sum() > 0
    for name in ("supervised", "generator"):
        assert torch.equal(bundle.models[name].features.feat_pop, pop)
    for m in bundle.models["reward"].members:
        assert torch.equal(m.features.feat_emb, bundle.tensors["stats.item_emb"])


def test_warm_start_remaps_the_feature_tables_by_item_id():
    old_items, new_items = Vocab(np.array([10, 20, 30])), Vocab(np.array([20, 40]))
    users = Vocab(np.array([1]))
    cfg = GeneratorConfig(d_model=8, n_heads=2, n_layers=1)
    old = GoalRankGenerator(cfg, len(old_items), len(users), 3, 4, feature_dim=2)
    fresh = GoalRankGenerator(cfg, len(new_items), len(users), 3, 4, feature_dim=2)
    set_item_features(old, torch.arange(len(old_items), dtype=torch.float32), torch.zeros(len(old_items)),
                      torch.ones(len(old_items), 2))
    state, _ = remap_state(old.state_dict(), fresh.state_dict(), old_items, new_items, users, users)
    pop = state["features.feat_pop"]
    assert pop[2] == old.features.feat_pop[3]  # item 20 keeps its row
    assert pop[3] == 0  # item 40 is new: no statistics until the next fill
