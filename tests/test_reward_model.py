"""RewardModel: list-aware click probabilities, DCG score, BCE training."""
from __future__ import annotations

import pytest
import torch

from goalrank_core.batch import RequestBatch
from goalrank_core.config_sections import RewardConfig, TrainConfig
from goalrank_core.reward_model import RewardModel
from goalrank_core.trainer import augment_lists, make_optimizer, reward_loss
from gr_helpers import random_batch

CFG = RewardConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0)


def make(l: int = 4, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(CFG, n_items=40, n_users=10, n_categories=4, slate_len=l).eval()


def test_item_probability_changes_with_its_neighbours():
    b = random_batch(b=2, n=10, l=4)
    model = make()
    assert model.cfg.causal  # the default: a top-down reader
    a = torch.tensor([[[0, 1, 2, 3]], [[0, 1, 2, 3]]])
    c = torch.tensor([[[5, 6, 7, 3]], [[5, 6, 7, 3]]])  # same item last, other items above it
    later = torch.tensor([[[0, 5, 6, 7]], [[0, 5, 6, 7]]])  # same item first, other items below it
    with torch.no_grad():
        pa_, pc_ = model.click_probs(b, a)[:, 0], model.click_probs(b, c)[:, 0]
        pl_ = model.click_probs(b, later)[:, 0]
    # Random weights give a small effect (~1e-4); a model blind to neighbours differs by float noise only.
    assert (pa_[:, 3] - pc_[:, 3]).abs().min() > 1e-6
    assert torch.allclose(pa_[:, 0], pl_[:, 0], atol=1e-6)  # causal: what comes below does not count
    torch.manual_seed(0)
    both = RewardModel(RewardConfig(**{**CFG.__dict__, "causal": False}), n_items=40, n_users=10, n_categories=4,
                       slate_len=4).eval()
    with torch.no_grad():
        diff = both.click_probs(b, a)[:, 0, 0] - both.click_probs(b, later)[:, 0, 0]
    assert diff.abs().min() > 1e-6  # non-causal: the items below count too


def test_score_is_dcg_weighted_sum_and_any_list_is_scored():
    b = random_batch(b=3, n=10, l=4)
    model = make()
    lists = torch.tensor([[9, 4, 7, 1], [2, 3, 0, 8], [5, 6, 1, 2]])[:, None, :]  # not the logged ones
    with torch.no_grad():
        p = model.click_probs(b, lists)
        s = model.score(b, lists)
    w = 1 / torch.log2(torch.arange(4) + 2.0)
    assert torch.allclose(s, (p * w).sum(-1))
    assert ((p > 0) & (p < 1)).all()


def test_empty_positions_are_masked():
    b = random_batch(b=2, n=10, l=4)
    model = make()
    lists = torch.tensor([[[0, 1, -1, -1]], [[2, 3, -1, -1]]])
    with torch.no_grad():
        p = model.click_probs(b, lists)
        short = model.click_probs(b, lists[..., :2])  # the same list without the empty slots
    assert (p[..., 2:] == 0).all()
    assert torch.allclose(p[..., :2], short, atol=1e-6)


def test_augmented_lists_mix_unshown_candidates_labelled_zero():
    b = random_batch(b=6, n=12, l=4, short_rows=2)
    lists, labels = augment_lists(b, 3, torch.Generator().manual_seed(0), p_unshown=0.5)
    assert lists.shape == (6, 3, 4)
    srt = lists.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()
    assert torch.gather(b.cand_mask[:, None].expand(-1, 3, -1), 2, lists).all()
    unshown = lists >= 4
    assert unshown.any() and (labels[unshown] == 0).all()
    shown_lab = torch.gather(b.labels[:, None].expand(-1, 3, -1), 2, lists.clamp(max=3))
    assert torch.equal(labels[~unshown], shown_lab[~unshown])


def test_training_lowers_loss_and_changes_parameters():
    b = random_batch(b=32, n=12, l=4, seed=1)
    model = make().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = make_optimizer(model, TrainConfig(lr=1e-2))
    first = float(reward_loss(model, b, augment=1, gen=torch.Generator().manual_seed(0)))
    for _ in range(40):
        loss = model.bce_loss(b)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(model.bce_loss(b)) < 0.7 * first
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_learns_a_context_effect():
    """Label = 1 unless another item of the same category is in the list: only a list-aware
    model can predict that; it must beat the best a point-wise model can do (~ base rate)."""
    g = torch.Generator().manual_seed(0)
    b = random_batch(b=128, n=8, l=4, n_categories=4, seed=2, short_rows=0)
    cat = torch.randint(1, 4, (128, 8), generator=g)
    b = RequestBatch(b.user, b.history, b.candidates, b.cand_mask, cat, b.shown, b.labels)
    lists = torch.stack([torch.randperm(8, generator=g)[:4] for _ in range(128)])[:, None, :]  # (B, 1, 4)
    c = torch.gather(cat, 1, lists[:, 0])  # (B, 4)
    labels = ((c[:, :, None] == c[:, None, :]).sum(-1) == 1).float()[:, None, :]
    torch.manual_seed(0)
    model = RewardModel(RewardConfig(d_model=32, n_layers=2, n_heads=4, dropout=0.0), 40, 10, 4, 4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        loss = model.bce_loss(b, lists, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = ((model.click_probs(b, lists) > 0.5).float() == labels).float().mean()
    base = max(float(labels.mean()), 1 - float(labels.mean()))
    assert base < 0.8
    assert float(acc) > base + 0.1


def test_list_value_clicks_scores_expected_clicks():
    b = random_batch(b=3, n=10, l=4)
    torch.manual_seed(0)
    model = RewardModel(RewardConfig(**{**CFG.__dict__, "list_value": "clicks"}), 40, 10, 4, 4).eval()
    lists = torch.tensor([[9, 4, 7, 1], [2, 3, 0, 8], [5, 6, 1, -1]])[:, None, :]
    with torch.no_grad():
        assert torch.allclose(model.score(b, lists), model.click_probs(b, lists).sum(-1))
    with pytest.raises(Exception, match="reward.list_value"):
        RewardConfig(list_value="ndcg")


def test_examination_is_a_cascade_over_the_attraction():
    """P(click at k) = E_k q_k with E_1 = 1, E_{k+1} = E_k (q_k (1 - s_c) + (1 - q_k)(1 - s_s))."""
    b = random_batch(b=2, n=10, l=4)
    cfg = RewardConfig(**{**CFG.__dict__, "examination": True})
    torch.manual_seed(0)
    model = RewardModel(cfg, 40, 10, 4, 4).eval()
    lists = torch.tensor([[[0, 1, 2, 3]], [[4, 5, 6, -1]]])
    with torch.no_grad():
        model.stop.bias.copy_(torch.tensor([0.5, -1.0]))  # stop after a click 0.62, after none 0.27
        p = model.click_probs(b, lists)[:, 0]  # (B, L)
        model.cfg = RewardConfig(**{**CFG.__dict__, "examination": False})
        q = model.click_probs(b, lists)[:, 0]  # the attraction alone (same weights)
    s_c, s_s = torch.sigmoid(torch.tensor(0.5)), torch.sigmoid(torch.tensor(-1.0))
    exam = torch.ones(2)
    for k in range(4):
        real = lists[:, 0, k] >= 0
        assert torch.allclose(p[:, k], torch.where(real, exam * q[:, k], torch.zeros(2)), atol=1e-5)
        exam = exam * (q[:, k] * (1 - s_c) + (1 - q[:, k]) * (1 - s_s))
    assert (p[:, 1:3] < q[:, 1:3]).all() and torch.allclose(p[:, 0], q[:, 0], atol=1e-5)  # the first is always read


def test_examination_starts_as_a_reader_who_reads_on():
    b = random_batch(b=2, n=10, l=4)
    torch.manual_seed(0)
    plain = RewardModel(CFG, 40, 10, 4, 4).eval()
    torch.manual_seed(0)
    exam = RewardModel(RewardConfig(**{**CFG.__dict__, "examination": True}), 40, 10, 4, 4).eval()
    exam.load_state_dict(plain.state_dict(), strict=False)
    lists = torch.tensor([[[0, 1, 2, 3]], [[4, 5, 6, 7]]])
    with torch.no_grad():
        ratio = exam.click_probs(b, lists) / plain.click_probs(b, lists)
    assert ((ratio > 0.93) & (ratio <= 1.0 + 1e-5)).all()  # P(stop) ~ 0.02 per item at the start
