"""Groups of lists, the reference policy pi_ref and the group-relative loss.

For a request u with a group B_u of lists and rewards r(l):
    z(l)      = (r(l) - mean_B r) / (std_B r + eps)        (population std over the group)
    pi_ref(l) = softmax_B(z(l) / tau)
    loss_u    = - sum_{l in B_u} pi_ref(l) * log pi_theta(l)
and the loss is the mean of loss_u over requests with a signal.

Degenerate cases, decided on purpose:
- equal rewards: z = 0 for every list, so pi_ref is uniform over the group (still a signal:
  spread probability over lists judged equally good);
- a group of one list (or none): no comparison, so no signal; pi_ref is 1 on that list (a
  valid distribution for storage) but the request gets weight 0 in the loss;
- a NaN or infinite reward on a valid list: GoalRankInputError naming the request and list.
"""
from __future__ import annotations

import torch

from goalrank_core.errors import GoalRankInputError


def dcg_weights(length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(L,) position weights 1 / log2(k + 2), k from 0: a list's value is sum_k w_k * p_k
    (the reward model's list score, the logged DCG of a labelled list)."""
    return 1.0 / torch.log2(torch.arange(length, device=device, dtype=dtype) + 2)


class RewardError(GoalRankInputError):
    """A reward is NaN or infinite."""


def _check_finite(rewards: torch.Tensor, mask: torch.Tensor) -> None:
    bad = ~torch.isfinite(rewards) & mask
    if bad.any():
        b, g = (int(i) for i in bad.nonzero()[0])
        raise RewardError(f"rewards: non-finite value {rewards[b, g].item()} at request {b}, list {g}")


def normalise_rewards(rewards: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """rewards (B, G), mask (B, G) bool -> (B, G) z-scores per group, 0 where masked."""
    if rewards.shape != mask.shape:
        raise GoalRankInputError(f"rewards shape {tuple(rewards.shape)} != mask shape {tuple(mask.shape)}")
    _check_finite(rewards, mask)
    m = mask.to(rewards.dtype)
    r = torch.where(mask, rewards, torch.zeros_like(rewards))
    n = m.sum(1, keepdim=True).clamp(min=1)
    mean = (r * m).sum(1, keepdim=True) / n
    std = ((((r - mean) * m) ** 2).sum(1, keepdim=True) / n).sqrt()
    return (r - mean) / (std + eps) * m


def reference_policy(rewards: torch.Tensor, mask: torch.Tensor, tau: float = 1.0, eps: float = 1e-6) -> torch.Tensor:
    """(B, G), (B, G) -> pi_ref (B, G): softmax over valid lists of z / tau; 0 where masked
    and all-zero for a request with no valid list."""
    if tau <= 0:
        raise GoalRankInputError(f"tau must be > 0, got {tau}")
    z = normalise_rewards(rewards, mask, eps) / tau
    z = z.masked_fill(~mask, float("-inf"))
    pi = torch.softmax(z, dim=1)
    return torch.nan_to_num(pi, nan=0.0)  # rows with no valid list


def has_signal(mask: torch.Tensor) -> torch.Tensor:
    """(B, G) -> (B,) bool: the group has at least two lists to compare."""
    return mask.sum(1) >= 2


def group_relative_loss(logp: torch.Tensor, pi_ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logp (B, G) log pi_theta(l), pi_ref (B, G), mask (B, G) -> scalar
    mean over requests with a signal of -sum_l pi_ref(l) log pi_theta(l) (0 if none has one)."""
    w = has_signal(mask).to(logp.dtype)  # (B,)
    per_request = -(pi_ref.to(logp.dtype) * torch.where(mask, logp, torch.zeros_like(logp))).sum(1)  # (B,)
    return (per_request * w).sum() / w.sum().clamp(min=1)


def dedup_lists(lists: torch.Tensor, policy_ids: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deduplicate each request's lists, keeping the first occurrence, then truncate or pad
    to `size` (earlier proposals win, so order proposals by priority).

    lists (B, G, L) positions; a list containing -1 is invalid and dropped.
    policy_ids (B, G) int64 (which policy proposed each list).
    -> lists (B, size, L) (-1 padding), mask (B, size) bool, policy_ids (B, size) (-1 padding).
    """
    b, g, l = lists.shape
    valid = (lists >= 0).all(-1)  # (B, G)
    same = (lists[:, :, None, :] == lists[:, None, :, :]).all(-1)  # (B, G, G)
    earlier = torch.tril(torch.ones(g, g, dtype=torch.bool, device=lists.device), diagonal=-1)
    dup = (same & earlier & valid[:, None, :]).any(-1)  # (B, G): equals an earlier valid list
    keep = valid & ~dup
    # Stable order: kept lists first, in their original order.
    rank = torch.where(keep, torch.arange(g, device=lists.device), g + torch.arange(g, device=lists.device))
    order = rank.argsort(dim=1)[:, :size]  # (B, min(G, size))
    out = lists.gather(1, order[..., None].expand(-1, -1, l))
    mask = keep.gather(1, order)
    pids = policy_ids.gather(1, order)
    if out.shape[1] < size:
        extra = size - out.shape[1]
        out = torch.cat([out, out.new_full((b, extra, l), -1)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(b, extra)], dim=1)
        pids = torch.cat([pids, pids.new_full((b, extra), -1)], dim=1)
    out = torch.where(mask[..., None], out, torch.full_like(out, -1))
    pids = torch.where(mask, pids, torch.full_like(pids, -1))
    return out, mask, pids
