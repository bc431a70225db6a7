"""Reward-guided greedy search (goalrank_core/search.py) and its place in the training group."""
from __future__ import annotations

import torch
from torch import nn

from goalrank_core.search import greedy_search
from gr_helpers import random_batch


class ItemValueScorer(nn.Module):
    """A list scorer with a known optimum: sum_k w_k * value[item_k] minus `penalty` for each
    earlier item of the same parity (a two-category saturation)."""

    def __init__(self, value: torch.Tensor, penalty: float = 0.0):
        super().__init__()
        self.value, self.penalty = value, penalty
        self.w = nn.Parameter(torch.ones(1))  # a parameter, so .eval()/.train() behave

    def score(self, batch, lists, folds=None):
        v = torch.where(lists >= 0, self.value[lists.clamp(min=0)], torch.zeros_like(lists, dtype=torch.float32))
        par = lists % 2
        same = (par[..., :, None] == par[..., None, :]) & torch.ones(lists.shape[-1], lists.shape[-1]).tril(-1).bool()
        v = v - self.penalty * same.sum(-1).float()
        w = 1.0 / torch.log2(torch.arange(lists.shape[-1], dtype=torch.float32) + 2)
        return (v * w).sum(-1)


def test_greedy_search_sorts_an_additive_scorer():
    b = random_batch(b=3, n=8, l=4, short_rows=0)
    value = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.0])
    got = greedy_search(ItemValueScorer(value), b, 4)
    assert got.tolist() == [[1, 6, 3, 2]] * 3  # the four best positions, best first


def test_greedy_search_diversifies_under_saturation_and_respects_the_shortlist():
    b = random_batch(b=2, n=8, l=4, short_rows=0)
    value = torch.tensor([0.0, 0.9, 0.0, 0.8, 0.6, 0.7, 0.0, 0.0])  # odd items are the best
    got = greedy_search(ItemValueScorer(value, penalty=0.5), b, 4)
    assert got[0].tolist() == [1, 4, 3, 5]  # alternate categories: 0.9, 0.6, then 0.8 - 0.5 > 0 - 0.5
    assert len(set(got[0].tolist())) == 4
    short = greedy_search(ItemValueScorer(value), b, 2, shortlist=3)  # top-3 by one-item score: 1, 3, 5
    assert set(short[0].tolist()) <= {1, 3, 5}


def test_greedy_search_never_picks_padding():
    b = random_batch(b=4, n=8, l=3, short_rows=0)
    mask = b.cand_mask.clone()
    mask[:, 5:] = False
    b = type(b)(**{**b._asdict(), "cand_mask": mask})
    value = torch.arange(8, dtype=torch.float32)  # padding holds the best values
    got = greedy_search(ItemValueScorer(value), b, 3)
    assert (got < 5).all() and got[0].tolist() == [4, 3, 2]


class StopScorer(nn.Module):
    """Expected clicks of a top-down reader who stops after item i with prob stop[i]:
    sum_k value[item_k] * prod_{j < k} (1 - stop[item_j]). Greedy puts the most valuable item
    first even when it ends the reading."""

    def __init__(self, value: torch.Tensor, stop: torch.Tensor):
        super().__init__()
        self.value, self.stop = value, stop
        self.w = nn.Parameter(torch.ones(1))

    def score(self, batch, lists, folds=None):
        real = lists >= 0
        v = torch.where(real, self.value[lists.clamp(min=0)], torch.zeros_like(lists, dtype=torch.float32))
        go_on = torch.where(real, 1 - self.stop[lists.clamp(min=0)], torch.ones_like(v))
        exam = torch.cumprod(torch.cat([torch.ones_like(go_on[..., :1]), go_on[..., :-1]], dim=-1), dim=-1)
        return (v * exam).sum(-1)


def test_local_search_fixes_what_greedy_cannot_see():
    import itertools

    b = random_batch(b=2, n=6, l=3, short_rows=0)
    value = torch.tensor([1.0, 0.9, 0.8, 0.1, 0.2, 0.0])
    stop = torch.tensor([1.0, 0.0, 0.1, 0.0, 0.0, 0.0])  # the best item ends the reading
    scorer = StopScorer(value, stop)
    greedy = greedy_search(scorer, b, 3)
    assert greedy[0, 0].item() == 0  # myopic: the best item first, nothing read after it
    best = max(itertools.permutations(range(6), 3), key=lambda p: float(scorer.score(None, torch.tensor([p]))[0]))
    local = greedy_search(scorer, b, 3, sweeps=2)
    assert local.tolist() == [list(best)] * 2 == [[1, 2, 0]] * 2
    assert (scorer.score(None, local) > scorer.score(None, greedy) + 0.5).all()
    # With an additive scorer greedy is already optimal and local search keeps it.
    plain = ItemValueScorer(value)
    assert greedy_search(plain, b, 3, sweeps=1).tolist() == greedy_search(plain, b, 3).tolist()


def test_local_search_moves_within_the_list_and_the_best_others():
    import itertools

    b = random_batch(b=1, n=10, l=3, short_rows=0)
    value = torch.tensor([1.0, 0.9, 0.0, 0.1, 0.2, 0.0, 0.0, 0.8, 0.05, 0.0])
    stop = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0, 0.0])
    scorer = StopScorer(value, stop)
    assert greedy_search(scorer, b, 3).tolist() == [[0, 1, 7]]  # 1.85
    best = max(itertools.permutations(range(10), 3), key=lambda p: float(scorer.score(None, torch.tensor([p]))[0]))
    assert list(best) == [1, 7, 0]  # 2.6, exhaustive over all 720 lists
    assert greedy_search(scorer, b, 3, sweeps=1).tolist() == [list(best)]
