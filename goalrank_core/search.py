"""Reward-guided list search: the training group's strongest proposer.

The auxiliary policies are heuristics and light rankers; even a perfect evaluator choosing
among their lists stays far from the best list a request allows (bench/simulator.py measures
it). A list built by searching the reward model itself is the group's one proposal that can
be better than every proposer, and the generator learns it through pi_ref like any other
list. The search costs N reward-model passes per position, so it runs only inside training
(a teacher), never at serving: serving runs the generator alone, as GoalRank intends.

Greedy construction: position t takes the candidate whose addition gives the highest list
score (the reward model's sum_k p_k / log2(k + 2) over the prefix plus that candidate), all
candidates of all requests of a batch scored in one pass per position. With cross-fitting a
training request is searched with the member that never saw it (`folds`), so the search cannot
steer toward the clicks a model memorised.
"""
from __future__ import annotations

import torch
from torch import nn

from goalrank_core.batch import RequestBatch


@torch.no_grad()
def greedy_search(reward: nn.Module, batch: RequestBatch, length: int, folds: torch.Tensor | None = None,
                  shortlist: int = 0, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """-> (B, length) positions: the list built greedily under the reward model. `allowed`
    (B, N) bool limits it to some candidates (e.g. those the group's proposers chose: the
    reward model is trusted where the log and the proposers have been, not on candidates it
    has hardly seen); a row with fewer than `length` allowed candidates falls back to all.
    `shortlist` > 0 considers only each request's top-`shortlist` candidates by their score
    alone (as a one-item list), which cuts the cost by N / shortlist."""
    was = reward.training
    reward.eval()
    try:
        b, n = batch.candidates.shape
        dev = batch.candidates.device
        cand = torch.arange(n, device=dev).expand(b, n)  # (B, N) positions
        valid = batch.cand_mask.clone()
        if allowed is not None:
            enough = (allowed & valid).sum(1, keepdim=True) >= min(length, n)  # (B, 1)
            valid = torch.where(enough, allowed & valid, valid)
        if 0 < shortlist < n:
            solo = reward.score(batch, cand[:, :, None], folds)  # (B, N) one-item lists
            solo = solo.masked_fill(~valid, float("-inf"))
            keep = solo.topk(shortlist, dim=1).indices  # (B, S)
            cand, valid = keep, valid.gather(1, keep)
        s = cand.shape[1]
        chosen = torch.empty(b, 0, dtype=torch.long, device=dev)
        taken = ~valid  # (B, S) padding counts as taken
        rows = torch.arange(b, device=dev)
        for _ in range(min(length, n)):
            trial = torch.cat([chosen[:, None, :].expand(b, s, -1), cand[:, :, None]], dim=2)  # (B, S, t + 1)
            val = reward.score(batch, trial, folds).masked_fill(taken, float("-inf"))  # (B, S)
            pick = val.argmax(1)  # (B,)
            chosen = torch.cat([chosen, cand[rows, pick][:, None]], dim=1)
            taken[rows, pick] = True
        return chosen
    finally:
        if was:
            reward.train()
