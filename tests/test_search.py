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
