"""Reward-model training on the group proposers' lists (labels from the log), the logged
list in training groups, and the candidate-set context layers."""
from __future__ import annotations

import torch

from goalrank_core.batch import RequestBatch
from goalrank_core.config_sections import RewardConfig
from goalrank_core.fit import group_proposals
from goalrank_core.reward_model import RewardModel
from goalrank_core.trainer import list_rank_loss, log_labels, pick_lists, reward_loss
from gr_helpers import random_batch, tiny_config


def test_log_labels_keep_shown_labels_and_zero_unshown():
    b = random_batch(b=3, n=10, l=4)  # shown = positions 0..3
    lists = torch.tensor([[3, 9, 0, -1], [5, 6, 7, 8], [1, 2, 3, 0]])[:, None, :]
    lab = log_labels(b, lists)[:, 0]
    assert torch.equal(lab[0], torch.stack([b.labels[0, 3], torch.tensor(0.0), b.labels[0, 0], torch.tensor(0.0)]))
    assert (lab[1] == 0).all()
    assert torch.equal(lab[2], b.labels[2, [1, 2, 3, 0]])


def test_pick_lists_draws_valid_lists_without_replacement():
    props = torch.tensor([[[0, 1], [2, 3], [-1, -1], [4, 5]],
                          [[6, 7], [-1, -1], [-1, -1], [-1, -1]]])  # (2, 4, 2)
    out = pick_lists(props, 3, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 2)
    assert sorted(map(tuple, out[0].tolist())) == [(0, 1), (2, 3), (4, 5)]
    assert out[1, 0].tolist() == [6, 7] and (out[1, 1:] == -1).all()


def test_reward_loss_uses_extra_lists_and_skips_empty_ones():
    b = random_batch(b=4, n=10, l=4)
    torch.manual_seed(0)
    model = RewardModel(RewardConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0), 40, 10, 4, 4).eval()
    base = reward_loss(model, b)
    empty = torch.full((4, 2, 4), -1)
    assert torch.allclose(reward_loss(model, b, extra_lists=empty), base)
    extra = torch.tensor([4, 5, 6, 7]).expand(4, 1, 4)  # all unshown: label 0
    with torch.no_grad():
        p = model.click_probs(b, extra)
        both = reward_loss(model, b, extra_lists=extra)
    expect = (base * 16 + (-torch.log1p(-p)).sum()) / 32  # mean BCE over 32 labelled positions
    assert torch.allclose(both, expect, atol=1e-5)


def test_training_group_starts_with_the_logged_list_only_when_configured():
    b = random_batch(b=3, n=10, l=4, short_rows=0)
    b = RequestBatch(**{**b._asdict(), "shown": torch.tensor([[1, 3, 5, 7], [0, 2, 4, 6], [9, 8, -1, -1]])})
    on = tiny_config(**{"group.logged_list": True})
    lists, names = group_proposals(b, [], None, on)
    assert names == ["logged"] and torch.equal(lists[:, 0], b.shown)
    lists, names = group_proposals(b, [], None, tiny_config(**{"group.logged_list": False}))
    assert names == [] and lists.shape == (3, 0, 4)


def test_context_layers_make_an_item_depend_on_the_other_candidates():
    b = random_batch(b=2, n=10, l=4, short_rows=0)
    torch.manual_seed(0)
    cfg = RewardConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, context_layers=1)
    model = RewardModel(cfg, 40, 10, 4, 4).eval()
    lists = torch.tensor([[[0, 1, 2, 3]], [[0, 1, 2, 3]]])
    other = RequestBatch(**{**b._asdict(), "candidates": torch.cat([b.candidates[:, :4], (b.candidates[:, 4:] + 1) % 38 + 2], 1)})
    with torch.no_grad():
        p, q = model.click_probs(b, lists), model.click_probs(other, lists)
    assert (p - q).abs().max() > 1e-4  # same list, other unshown candidates
    off = RewardModel(RewardConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, context_layers=0), 40, 10, 4, 4).eval()
    with torch.no_grad():
        assert torch.allclose(off.click_probs(b, lists), off.click_probs(other, lists))


def _pair(context_layers: int, gen_layers: int = 2):
    from goalrank_core.config_sections import GeneratorConfig
    from goalrank_core.generator import GoalRankGenerator

    torch.manual_seed(0)
    gen = GoalRankGenerator(GeneratorConfig(d_model=16, n_layers=gen_layers, n_heads=2, dropout=0.0), 40, 10, 4, 4)
    reward = RewardModel(RewardConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, context_layers=context_layers),
                         40, 10, 4, 4)
    return gen, reward


def test_reward_model_starts_from_the_generators_encoder_when_shapes_match():
    from goalrank_core.reward_model import can_init_from, init_from_generator

    gen, reward = _pair(context_layers=2)
    assert can_init_from(reward, gen)
    assert not torch.equal(reward.embed.item.weight, gen.embed.item.weight)
    init_from_generator(reward, gen)
    for (k, a), (_, b) in zip(reward.context.state_dict().items(), gen.encoder.state_dict().items()):
        assert torch.equal(a, b), k
    assert torch.equal(reward.embed.item.weight, gen.embed.item.weight)
    # Copied, not shared: training the reward model leaves the generator alone.
    with torch.no_grad():
        reward.embed.item.weight.add_(1.0)
    assert not torch.equal(reward.embed.item.weight, gen.embed.item.weight)


def test_reward_init_refuses_mismatched_shapes_and_follows_the_config():
    import pytest

    from goalrank_core.bundle import Dims, ModelBundle
    from goalrank_core.fit import init_reward
    from goalrank_core.reward_model import can_init_from, init_from_generator

    gen, reward = _pair(context_layers=1)  # 1 context layer against a 2-layer encoder
    assert not can_init_from(reward, gen)
    with pytest.raises(ValueError, match="context_layers"):
        init_from_generator(reward, gen)
    assert not can_init_from(_pair(context_layers=0)[1], gen)

    gen, reward = _pair(context_layers=2)
    for flag, expect in ((False, False), (True, True)):
        cfg = tiny_config(**{"reward.init_from_supervised": flag})
        bundle = ModelBundle(cfg, None, None, {}, Dims(40, 10, 4, 4, 10))
        bundle.models["supervised"] = gen
        assert init_reward(reward, bundle, log=lambda _: None) is expect
    assert torch.equal(reward.embed.item.weight, gen.embed.item.weight)


def _two_lists(logit_good: float, logit_bad: float):
    """One request, two full lists of 2: the first holds a positive at the top, the second none."""
    lists = torch.tensor([[[0, 1], [2, 3]]])  # (1, 2, 2)
    labels = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    logits = torch.tensor([[[logit_good, 0.0], [logit_bad, 0.0]]], requires_grad=True)
    return logits, lists, labels


def test_list_rank_loss_is_small_when_the_model_orders_lists_as_the_log():
    right = list_rank_loss(*_two_lists(3.0, -3.0), eps=1e-9)
    wrong = list_rank_loss(*_two_lists(-3.0, 3.0), eps=1e-9)
    # Two lists normalise to z = +-1 on both sides: the target is softmax(1, -1).
    t = torch.softmax(torch.tensor([1.0, -1.0]), 0)
    assert torch.allclose(right, -(t * torch.log_softmax(torch.tensor([1.0, -1.0]), 0)).sum(), atol=1e-5)
    assert torch.allclose(wrong, -(t * torch.log_softmax(torch.tensor([-1.0, 1.0]), 0)).sum(), atol=1e-5)
    logits, lists, labels = _two_lists(-0.5, 0.5)
    list_rank_loss(logits, lists, labels).backward()
    assert logits.grad[0, 0, 0] < 0 < logits.grad[0, 1, 0]  # descent raises the good list, lowers the bad


def test_list_rank_loss_ignores_requests_without_a_preference_and_incomplete_lists():
    logits = torch.randn(2, 3, 2)
    lists = torch.tensor([[[0, 1], [2, 3], [4, 5]], [[0, 1], [2, -1], [4, 5]]])
    labels = torch.zeros(2, 3, 2)  # every list ties
    assert list_rank_loss(logits, lists, labels) == 0
    labels[1, 1, 0] = 1.0  # only the incomplete list differs: still no pair to learn from
    assert list_rank_loss(logits, lists, labels) == 0


def test_reward_loss_adds_the_weighted_list_term():
    b = random_batch(b=4, n=10, l=4)
    torch.manual_seed(0)
    model = RewardModel(RewardConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0), 40, 10, 4, 4).eval()
    extra = torch.tensor([[4, 5, 6, 7], [3, 2, 1, 0]]).expand(4, 2, 4)
    with torch.no_grad():
        bce = reward_loss(model, b, extra_lists=extra)
        lists = torch.cat([b.shown[:, None, :], extra], 1)
        term = list_rank_loss(model(b, lists), lists, torch.cat([b.labels[:, None, :], log_labels(b, extra)], 1))
        both = reward_loss(model, b, extra_lists=extra, list_weight=0.5)
    assert term > 0 and torch.allclose(both, bce + 0.5 * term, atol=1e-6)
