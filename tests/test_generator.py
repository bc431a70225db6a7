"""GoalRankGenerator: masking, exact log-probabilities, sampling, learning toward pi_ref."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from goalrank_core.config_sections import GeneratorConfig
from goalrank_core.generator import GoalRankGenerator
from goalrank_core.group import group_relative_loss
from gr_helpers import random_batch

CFG = GeneratorConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0)


def make(l: int = 4, seed: int = 0, cfg: GeneratorConfig = CFG) -> GoalRankGenerator:
    torch.manual_seed(seed)
    return GoalRankGenerator(cfg, n_items=40, n_users=10, n_categories=4, slate_len=l).eval()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(5, 14), l=st.integers(1, 5),
       temperature=st.sampled_from([0.3, 1.0, 5.0]))
def test_sampled_lists_never_repeat_or_pick_padding(seed, n, l, temperature):
    b = random_batch(b=5, n=n, l=l, seed=seed, short_rows=2 if n - 3 >= l else 0)
    model = make(l, seed % 7)
    lists = model.sample(b, 6, torch.Generator().manual_seed(seed), temperature)  # (B, 6, L)
    assert lists.shape == (5, 6, l)
    srt = lists.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()
    assert torch.gather(b.cand_mask[:, None, :].expand(-1, 6, -1), 2, lists).all()
    greedy = model.greedy(b)
    assert greedy.shape == (5, l)
    assert torch.gather(b.cand_mask, 1, greedy).all()


def test_chosen_items_get_zero_probability_at_later_steps():
    b = random_batch(b=3, n=8, l=4)
    model = make()
    lists = model.sample(b, 2, torch.Generator().manual_seed(1))
    # Force an already chosen item again at step 2: its log-prob must be ~ -inf (huge negative).
    bad = lists.clone()
    bad[:, :, 2] = bad[:, :, 0]
    assert (model.step_log_probs(b, bad)[:, :, 2] < -1e6).all()
    assert (model.step_log_probs(b, lists) > -1e6).all()


def _incremental_log_prob(model: GoalRankGenerator, b, lists: torch.Tensor) -> torch.Tensor:
    """Step by step, the way decoding runs: one prefix at a time on the cached encoding."""
    enc = model.encode(b)
    total = torch.zeros(lists.shape[:2])
    blocked = torch.zeros(*lists.shape[:2], b.candidates.shape[1], dtype=torch.bool)
    for t in range(lists.shape[2]):
        q = model._queries(enc, lists[:, :, :t])[:, :, -1:]
        logp = model._masked_logits(enc, q, blocked[:, :, None, :])[:, :, 0].log_softmax(-1)
        total += logp.gather(2, lists[:, :, t:t + 1]).squeeze(-1)
        blocked.scatter_(2, lists[:, :, t:t + 1], True)
    return total


def test_log_prob_of_sampled_list_equals_sum_of_step_log_probs():
    b = random_batch(b=4, n=10, l=4)
    model = make()
    with torch.no_grad():
        lists = model.sample(b, 5, torch.Generator().manual_seed(3))
        batched = model.log_prob(b, lists)
        assert torch.allclose(batched, model.step_log_probs(b, lists).sum(-1))
        assert torch.allclose(batched, _incremental_log_prob(model, b, lists), atol=1e-5)


def test_probabilities_of_all_lists_sum_to_one():
    b = random_batch(b=2, n=6, l=2, short_rows=1)  # row 0 has 3 real candidates
    model = make(l=2)
    with torch.no_grad():
        perms = torch.tensor(list(itertools.permutations(range(6), 2)))  # (30, 2)
        lists = perms[None].expand(2, -1, -1)
        p = model.log_prob(b, lists).exp()  # (2, 30)
    real = b.cand_mask[0]
    ok0 = real[perms].all(-1)
    assert math.isclose(float(p[0][ok0].sum()), 1.0, rel_tol=1e-5)
    assert float(p[0][~ok0].max()) < 1e-12
    assert math.isclose(float(p[1].sum()), 1.0, rel_tol=1e-5)


def test_unused_steps_contribute_zero():
    b = random_batch(b=3, n=8, l=4)
    model = make()
    lists = model.sample(b, 1, torch.Generator().manual_seed(0))
    partial = lists.clone()
    partial[:, :, 2:] = -1
    full_steps = model.step_log_probs(b, lists)
    assert torch.allclose(model.log_prob(b, partial), full_steps[:, :, :2].sum(-1), atol=1e-6)


def test_greedy_takes_the_most_probable_item_at_every_step():
    b = random_batch(b=4, n=9, l=3)
    model = make(l=3)
    g = model.greedy(b)[:, None, :]  # (B, 1, L)
    enc = model.encode(b)
    blocked = torch.zeros(4, 1, 9, dtype=torch.bool)
    for t in range(3):
        q = model._queries(enc, g[:, :, :t])[:, :, -1:]
        logits = model._masked_logits(enc, q, blocked[:, :, None, :])[:, 0, 0]
        assert torch.equal(logits.argmax(-1), g[:, 0, t])
        blocked.scatter_(2, g[:, :, t:t + 1], True)


def test_same_seed_same_samples():
    b = random_batch()
    a = make(seed=5).sample(b, 4, torch.Generator().manual_seed(9))
    c = make(seed=5).sample(b, 4, torch.Generator().manual_seed(9))
    assert torch.equal(a, c)


def test_gradient_steps_move_pi_theta_toward_pi_ref():
    b = random_batch(b=6, n=10, l=3)
    model = make(l=3).train()
    lists = model.sample(b, 5, torch.Generator().manual_seed(2))
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[0, 3:] = False
    pi_ref = torch.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(4)) * 2, 1) * mask
    pi_ref = pi_ref / pi_ref.sum(1, keepdim=True)

    def kl() -> float:  # KL(pi_ref || pi_theta renormalised over the group)
        with torch.no_grad():
            lp = model.log_prob(b, lists).masked_fill(~mask, -1e9).log_softmax(1)
            return float((pi_ref * (torch.log(pi_ref.clamp(min=1e-12)) - lp) * mask).sum())

    before = kl()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        loss = group_relative_loss(model.log_prob(b, lists), pi_ref, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kl() < 0.5 * before


def test_size_is_set_by_config():
    with torch.device("meta"):
        small = GoalRankGenerator(GeneratorConfig(d_model=16, n_layers=1, n_heads=2), 2000, 500, 20, 6)
        big = GoalRankGenerator(GeneratorConfig(d_model=1024, n_layers=8, n_heads=16, decoder_layers=2, ff_mult=4),
                                2000, 500, 20, 6)
    assert small.num_parameters() < 100_000
    assert big.num_parameters() > 100_000_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_cuda():
    b = random_batch().to("cuda")
    model = make().cuda()
    lists = model.sample(b, 3, torch.Generator(device="cuda").manual_seed(0))
    assert lists.device.type == "cuda"
    assert model.log_prob(b, lists).shape == (8, 3)
