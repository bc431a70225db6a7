"""Reward-guided list search: the training group's strongest proposer.

The auxiliary policies are heuristics and light rankers; even a perfect evaluator choosing
among their lists stays far from the best list a request allows (bench/simulator.py measures
it). A list built by searching the reward model itself is the group's one proposal that can
be better than every proposer, and the generator learns it through pi_ref like any other
list. The search costs N reward-model passes per position, so it runs only inside training
(a teacher), never at serving: serving runs the generator alone, as GoalRank intends.

Greedy construction: position t takes the candidate whose addition gives the highest list
score (the reward model's score of the prefix plus that candidate), all candidates of all
requests of a batch scored in one pass per position. Greedy is myopic: under a top-down reader
an item's effect on the items below it (a second item of a category, a reader it satisfies and
who stops) never enters its own choice. So `sweeps` rounds of local search follow: each
position in turn tries the list's own items (a swap) and the L best other candidates by their
one-item score (a replacement), and keeps the best list whenever it scores higher, one pass per
position. With cross-fitting a training request is searched with the member that never saw it
(`folds`), so the search cannot steer toward the clicks a model memorised.
"""
from __future__ import annotations

import torch
from torch import nn

from goalrank_core.batch import RequestBatch


@torch.no_grad()
def greedy_search(reward: nn.Module, batch: RequestBatch, length: int, folds: torch.Tensor | None = None,
                  shortlist: int = 0, allowed: torch.Tensor | None = None, sweeps: int = 0) -> torch.Tensor:
    """-> (B, length) positions: the list built greedily under the reward model. `allowed`
    (B, N) bool limits it to some candidates (e.g. those the group's proposers chose: the
    reward model is trusted where the log and the proposers have been, not on candidates it
    has hardly seen); a row with fewer than `length` allowed candidates falls back to all.
    `shortlist` > 0 considers only each request's top-`shortlist` candidates by their score
    alone (as a one-item list), which cuts the cost by N / shortlist. `sweeps` rounds of local
    search then improve the greedy list (each costs as much as the greedy construction)."""
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
            keep = _top_alone(reward, batch, cand, valid, shortlist, folds).indices  # (B, S)
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
        return _local_search(reward, batch, chosen, cand, valid, folds, sweeps)
    finally:
        if was:
            reward.train()


def _local_search(reward: nn.Module, batch: RequestBatch, chosen: torch.Tensor, cand: torch.Tensor,
                  valid: torch.Tensor, folds: torch.Tensor | None, sweeps: int) -> torch.Tensor:
    """chosen (B, L) positions, cand (B, S) the candidates it may use, valid (B, S) -> (B, L)
    the list after `sweeps` passes of best-improvement moves at each position t: candidate c
    goes to t; if c was already at j, the item from t goes to j (a swap), else it leaves. The
    moves use the list's own L items and the L best others (`_move_pool`), not all N."""
    b, l = chosen.shape
    if sweeps <= 0:
        return chosen
    cand, valid = _move_pool(reward, batch, chosen, cand, valid, folds)
    s = cand.shape[1]
    rows = torch.arange(b, device=chosen.device)
    best = reward.score(batch, chosen[:, None, :], folds)[:, 0]  # (B,)
    for _ in range(sweeps):
        for t in range(l):
            trial = chosen[:, None, :].expand(b, s, l)  # (B, S, L)
            at = chosen[:, None, :] == cand[:, :, None]  # (B, S, L): candidate c sits at position j
            trial = torch.where(at, chosen[:, t, None, None].expand(b, s, l), trial)  # swap partner
            trial = torch.cat([trial[..., :t], cand[..., None], trial[..., t + 1:]], dim=-1)
            val = reward.score(batch, trial, folds).masked_fill(~valid, float("-inf"))  # (B, S)
            top, k = val.max(1)
            better = top > best + 1e-6
            chosen = torch.where(better[:, None], trial[rows, k], chosen)
            best = torch.where(better, top, best)
    return chosen


def _move_pool(reward: nn.Module, batch: RequestBatch, chosen: torch.Tensor, cand: torch.Tensor,
               valid: torch.Tensor, folds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (B, S) candidates and (B, S) valid for the local search: the L chosen items (for swaps)
    and the L unchosen valid candidates the reward model scores highest alone (for replacements),
    S = 2L, or every candidate when there are no more than that. Each move pass then costs 2L
    lists per request instead of N."""
    b, l = chosen.shape
    if cand.shape[1] <= 2 * l:
        return cand, valid
    inside = (cand[:, :, None] == chosen[:, None, :]).any(-1)  # (B, S0)
    top = _top_alone(reward, batch, cand, valid & ~inside, l, folds)
    others = cand.gather(1, top.indices)  # (B, L)
    return torch.cat([chosen, others], dim=1), torch.cat([torch.ones_like(chosen, dtype=torch.bool),
                                                          top.values > float("-inf")], dim=1)


def _top_alone(reward: nn.Module, batch: RequestBatch, cand: torch.Tensor, valid: torch.Tensor, k: int,
               folds: torch.Tensor | None):
    """cand (B, S) positions, valid (B, S) -> topk (values, indices into S) of the reward model's
    score of each valid candidate as a one-item list; invalid ones score -inf."""
    solo = reward.score(batch, cand[:, :, None], folds)  # (B, S) one-item lists
    return solo.masked_fill(~valid, float("-inf")).topk(k, dim=1)
