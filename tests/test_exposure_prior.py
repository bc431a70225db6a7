"""The reward model's exposure prior: a point-wise head trained on every candidate (logged
click 1, else 0) whose detached logit enters each list item's click logit."""
from __future__ import annotations

import torch

from goalrank_core.config_sections import RewardConfig
from goalrank_core.reward_model import CrossFitReward, RewardModel
from goalrank_core.trainer import exposure_loss, reward_loss
from gr_helpers import random_batch


def _cfg(**kw) -> RewardConfig:
    return RewardConfig(**{"d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.0, "exposure_prior": True,
                           "folds": 1, **kw})


def test_the_prior_target_is_the_logged_clicks_over_all_candidates():
    b = random_batch(b=3, n=10, l=4, short_rows=1)
    prior = torch.zeros(3, 10)  # logit 0: every BCE term is log 2
    loss = exposure_loss(prior, b, None)
    assert torch.isclose(loss, torch.log(torch.tensor(2.0)))
    # A prior that is right on the clicked candidates and sure of 0 elsewhere has a small loss.
    target = torch.zeros(3, 10)
    target.scatter_(1, b.shown.clamp(min=0), ((b.labels > 0) & (b.shown >= 0)).float())
    good = (target * 2 - 1) * 20.0
    assert exposure_loss(good, b, None) < 1e-6 < exposure_loss(-good, b, None)


def test_the_shown_target_is_what_the_logging_policy_showed():
    b = random_batch(b=3, n=10, l=4, short_rows=1)
    shown = torch.zeros(3, 10)
    for r in range(3):  # every shown candidate, clicked or not
        shown[r, b.shown[r][b.shown[r] >= 0]] = 1.0
    good = (shown * 2 - 1) * 20.0
    assert exposure_loss(good, b, None, "shown") < 1e-6 < exposure_loss(good, b, None, "click")


def test_only_the_prior_loss_trains_the_prior_head():
    torch.manual_seed(0)
    model = RewardModel(_cfg(), 40, 10, 4, 4)
    b = random_batch(b=6, n=10, l=4, short_rows=0)
    model.zero_grad()
    model(b, b.shown[:, None, :]).sum().backward()  # the click logits alone
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.prior.parameters())
    assert model.prior_scale.grad is not None and model.prior_scale.grad.abs() > 0  # its weight is learnt from clicks
    model.zero_grad()
    reward_loss(model, b).backward()  # click BCE + the prior's own BCE
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.prior.parameters())


def test_the_prior_moves_the_click_logit_and_cross_fit_members_keep_their_folds():
    torch.manual_seed(0)
    model = RewardModel(_cfg(), 40, 10, 4, 4).eval()
    b = random_batch(b=4, n=10, l=4, short_rows=0)
    lists = b.shown[:, None, :]
    before = model(b, lists)
    with torch.no_grad():
        model.prior[-1].bias += 3.0  # a higher prior for every candidate
    assert torch.allclose(model(b, lists), before + 0.5 * 3.0, atol=1e-5)  # prior_scale starts at 0.5
    cross = CrossFitReward(_cfg(folds=2), 40, 10, 4, 4)
    logits, prior = cross(b, lists, exposure=True)
    assert logits.shape == (2, 4, 1, 4) and prior.shape == (2, 4, 10)
    folds = torch.tensor([0, 0, 1, 1])
    cross.zero_grad()
    exposure_loss(prior, b, folds).backward()
    g0 = [p.grad for p in cross.members[0].prior.parameters()]
    assert all(g is not None for g in g0)  # member 0 learns from fold 1's rows
    cross.zero_grad()
    _, prior = cross(b.take(slice(2, None)), lists[2:], exposure=True)  # fold-1 rows only
    exposure_loss(prior, b.take(slice(2, None)), folds[2:]).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in cross.members[1].prior.parameters())
