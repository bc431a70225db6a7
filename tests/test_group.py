"""Reward normalisation, pi_ref, the group-relative loss and deduplication."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from goalrank_core.errors import GoalRankInputError
from goalrank_core.group import dedup_lists, group_relative_loss, normalise_rewards, reference_policy

rewards_st = st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=2, max_size=8)


@settings(max_examples=60, deadline=None)
@given(r=rewards_st, shift=st.floats(-1e3, 1e3, allow_nan=False), n_masked=st.integers(0, 3))
def test_pi_ref_unchanged_by_adding_a_constant(r, shift, n_masked):
    rewards = torch.tensor([r], dtype=torch.float64)
    mask = torch.ones_like(rewards, dtype=torch.bool)
    mask[0, len(r) - min(n_masked, len(r) - 1):] = False if n_masked else True
    a = reference_policy(rewards, mask, tau=1.0, eps=1e-6)
    b = reference_policy(rewards + shift, mask, tau=1.0, eps=1e-6)
    assert torch.allclose(a, b, atol=1e-6)
    assert math.isclose(float(a.sum()), 1.0, rel_tol=1e-9)
    assert float(a[~mask].abs().sum()) == 0.0


def test_pi_ref_matches_the_formula():
    r = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    z = (torch.tensor([1.0, 2.0, 4.0]) - 7 / 3) / (torch.tensor([1.0, 2.0, 4.0]).std(unbiased=False) + 1e-6)
    expect = torch.softmax(z / 0.5, 0)
    got = reference_policy(r, mask, tau=0.5, eps=1e-6)
    assert torch.allclose(got[0, :3], expect, atol=1e-6) and got[0, 3] == 0
    assert torch.allclose(normalise_rewards(r, mask)[0, :3], z, atol=1e-6)


def test_equal_rewards_give_uniform_pi_ref():
    r = torch.full((2, 5), 0.7)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    pi = reference_policy(r, mask)
    assert torch.allclose(pi[0], torch.full((5,), 0.2))
    assert torch.allclose(pi[1], torch.tensor([0.5, 0.5, 0, 0, 0]))


def test_group_of_one_gives_no_signal():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[True, False], [True, True]])
    pi = reference_policy(torch.tensor([[5.0, 0.0], [1.0, 2.0]]), mask)
    assert pi[0, 0] == 1.0  # a valid distribution, but...
    loss = group_relative_loss(logp, pi, mask)
    loss.backward()
    assert logp.grad[0].abs().sum() == 0  # ... the request has weight 0
    assert math.isclose(float(loss), float(-(pi[1] * logp[1]).sum()), rel_tol=1e-6)


def test_no_request_with_signal_gives_zero_loss():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    mask = torch.tensor([[True, False]])
    assert float(group_relative_loss(logp, reference_policy(torch.zeros(1, 2), mask), mask)) == 0.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_reward_raises_naming_it(bad):
    r = torch.tensor([[0.0, 1.0], [2.0, bad]])
    with pytest.raises(GoalRankInputError, match="request 1, list 1"):
        reference_policy(r, torch.ones(2, 2, dtype=torch.bool))
    # ...but a masked-out slot may hold anything.
    reference_policy(r, torch.tensor([[True, True], [True, False]]))


def test_loss_is_cross_entropy_not_expected_probability():
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    pi = torch.tensor([[0.2, 0.3, 0.5]])
    loss = group_relative_loss(logp, pi, torch.ones(1, 3, dtype=torch.bool))
    assert math.isclose(float(loss), float(-(pi * logp).sum()), rel_tol=1e-6)


def test_dedup_keeps_first_occurrence_and_pads():
    lists = torch.tensor([[[0, 1], [2, 3], [0, 1], [1, 0], [2, 3], [4, -1]]])
    pids = torch.tensor([[0, 1, 2, 3, 4, 5]])
    out, mask, p = dedup_lists(lists, pids, size=5)
    assert out.tolist() == [[[0, 1], [2, 3], [1, 0], [-1, -1], [-1, -1]]]
    assert mask.tolist() == [[True, True, True, False, False]]
    assert p.tolist() == [[0, 1, 3, -1, -1]]
    out, mask, p = dedup_lists(lists, pids, size=2)  # truncation keeps the earliest
    assert out.tolist() == [[[0, 1], [2, 3]]] and p.tolist() == [[0, 1]] and mask.all()


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 1000), size=st.integers(1, 12))
def test_dedup_output_is_unique_and_from_input(seed, size):
    g = torch.Generator().manual_seed(seed)
    lists = torch.randint(0, 3, (3, 10, 2), generator=g)
    out, mask, _ = dedup_lists(lists, torch.zeros(3, 10, dtype=torch.long), size)
    assert out.shape == (3, size, 2)
    for b in range(3):
        kept = [tuple(x) for x, m in zip(out[b].tolist(), mask[b].tolist()) if m]
        assert len(kept) == len(set(kept))
        assert set(kept) <= {tuple(x) for x in lists[b].tolist()}
        assert len(kept) == min(size, len({tuple(x) for x in lists[b].tolist()}))
