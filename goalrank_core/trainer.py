"""The plain in-process reference trainer (no Ray).

Per-batch loss functions (`reward_loss`, `supervised_list_loss`, `generator_group_loss`),
`make_optimizer` and `set_seed` are what the distributed Ray Train workers call inside
their DDP loops; the `train_*` functions below wrap them in a single-process epoch loop
with one log line per epoch (loss, samples/s) and keep the weights of the best epoch on
the validation split.
"""
from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from goalrank_core.batch import EncodedRequests, RequestBatch
from goalrank_core.config_sections import TrainConfig
from goalrank_core.group import dcg_weights, group_relative_loss, normalise_rewards
from goalrank_core.reward_model import CrossFitReward, member_bce, request_folds

Log = Callable[[str], None]


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch; CPU runs are then bit-for-bit repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; embeddings, norms and biases get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "embed" in name or name.startswith("pos") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def iterate_batches(n: int, batch_size: int, shuffle: bool, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    order = rng.permutation(n) if shuffle and rng is not None else np.arange(n)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# -- per-batch losses ----------------------------------------------------------------------


def augment_lists(batch: RequestBatch, n: int, gen: torch.Generator | None = None, p_unshown: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """n extra labelled lists per request: the logged list shuffled, each slot replaced with
    probability p_unshown by a distinct unshown candidate labelled 0 (unshown candidates are
    never positives in this offline protocol). -> lists (B, n, L), labels (B, n, L)."""
    b, l = batch.shown.shape
    nc = batch.candidates.shape[1]
    dev = batch.shown.device
    rand = lambda *s: torch.rand(s, generator=gen, device=gen.device if gen is not None else dev).to(dev)  # noqa: E731
    perm = rand(b, n, l).argsort(-1)  # (B, n, L)
    shown = batch.shown[:, None, :].expand(b, n, l).gather(2, perm)
    labels = batch.labels[:, None, :].expand(b, n, l).gather(2, perm)
    taken = torch.zeros(b, nc, dtype=torch.bool, device=dev)
    taken.scatter_(1, batch.shown.clamp(min=0), batch.shown >= 0)
    eligible = batch.cand_mask & ~taken  # (B, N)
    keys = rand(b, n, nc).masked_fill(~eligible[:, None, :], 2.0)
    unshown = keys.argsort(-1)[..., :l]  # (B, n, L) distinct, eligible first
    ok = torch.gather(eligible[:, None, :].expand(b, n, nc), 2, unshown)
    replace = (rand(b, n, l) < p_unshown) & ok & (shown >= 0)
    lists = torch.where(replace, unshown, shown)
    return lists, torch.where(replace, torch.zeros_like(labels), labels)


def shown_match(batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
    """lists (B, G, L) positions -> (B, G, L, L') bool: entry p of a list is the candidate the
    log showed at position q (-1 entries on either side match nothing)."""
    shown = batch.shown[:, None, None, :]  # (B, 1, 1, L')
    return (lists[..., None] == shown) & (shown >= 0) & (lists[..., None] >= 0)


def log_labels(batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
    """lists (B, G, L) positions -> (B, G, L) labels from the log: a shown candidate keeps its
    logged label, any other candidate is 0 (never a positive in this offline protocol)."""
    eq = shown_match(batch, lists)  # (B, G, L, L')
    return (eq.to(batch.labels.dtype) * batch.labels[:, None, None, :]).sum(-1)


def exposure_loss(prior: torch.Tensor, batch: RequestBatch, folds: torch.Tensor | None, target: str = "click") -> torch.Tensor:
    """BCE of the exposure prior's logits (B, N), or (K, B, N) for a CrossFitReward (member k on
    rows whose fold is not k, as member_bce), against 'the log shows a click on this candidate'
    (`target` click) or 'the log shows this candidate' (shown) over the real candidates: every
    candidate as a one-row list labelled from the log."""
    b, n = batch.cand_mask.shape
    cand = torch.arange(n, device=prior.device).expand(b, n).masked_fill(~batch.cand_mask, -1)[:, None, :]  # (B, 1, N)
    if target == "shown":
        label = shown_match(batch, cand).any(-1)  # (B, 1, N)
    else:
        label = log_labels(batch, cand) > 0  # (B, 1, N)
    return member_bce(prior[..., None, :], cand, label.to(prior.dtype), folds)


def pick_lists(proposals: torch.Tensor, k: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """k of each request's valid proposals (B, G, L) at random, without replacement ->
    (B, min(k, G), L); fewer valid ones leave -1 lists (masked by the loss)."""
    b, g, _ = proposals.shape
    dev = proposals.device
    keys = torch.rand((b, g), generator=gen, device=gen.device if gen is not None else dev).to(dev)
    keys = keys.masked_fill((proposals < 0).any(-1), 2.0)  # invalid lists last
    idx = keys.argsort(1)[:, :k]  # (B, k)
    return proposals.gather(1, idx[..., None].expand(-1, -1, proposals.shape[2]))


def list_rank_loss(logits: torch.Tensor, lists: torch.Tensor, labels: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """The group-relative view of a request's labelled lists, for the reward model: its own
    pi_ref over them (list scores sum_k p_k / log2(k + 2) from `logits`, normalised inside the
    request, softmax) against the pi_ref of their logged DCG, as cross-entropy
    -sum pi_label log pi_model. logits, lists, labels (B, G, L); a list with a -1 entry is left
    out; mean over requests with two lists of different DCG (0 if none). `eps` keeps the
    normalisation finite when the model scores a request's lists alike."""
    dcg = dcg_weights(lists.shape[-1], lists.device, logits.dtype)  # (L,)
    full = (lists >= 0).all(-1)  # (B, G)
    filled = (lists >= 0).to(logits.dtype)
    score = (torch.sigmoid(logits) * filled * dcg).sum(-1)  # (B, G)
    target = (labels.to(logits.dtype).clamp(0, 1) * filled * dcg).sum(-1)  # (B, G)
    tz = normalise_rewards(target, full)  # (B, G), 0 where all lists tie
    informative = (tz != 0).any(1) & (full.sum(1) >= 2)  # (B,)
    pi_label = torch.softmax(tz.masked_fill(~full, float("-inf")), 1).nan_to_num(0.0)
    log_pi = torch.log_softmax(normalise_rewards(score, full, eps).masked_fill(~full, float("-inf")), 1)
    ce = -(pi_label * log_pi.masked_fill(~full, 0.0)).sum(1)  # (B,)
    w = informative.to(logits.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1)


def reward_loss(model: nn.Module, batch: RequestBatch, augment: int = 0, gen: torch.Generator | None = None,
                extra_lists: torch.Tensor | None = None, list_weight: float = 0.0,
                folds: torch.Tensor | None = None) -> torch.Tensor:
    """BCE on the logged list, plus `augment` lists mixing in unshown candidates, plus
    `extra_lists` (B, K, L) (e.g. the group proposers' lists; -1 lists are skipped) labelled
    from the log (`log_labels`); plus `list_weight` x `list_rank_loss` over those same lists;
    plus, with `reward.exposure_prior`, the prior head's BCE over all candidates (`exposure_loss`).
    A CrossFitReward (logits (K, B, G, L)) learns member k from the rows whose `folds` (B,)
    is not k. Calls only `model(batch, lists)`, so `model` may be DDP-wrapped."""
    lists, labels = batch.shown[:, None, :], batch.labels[:, None, :]
    if augment > 0:
        extra, extra_labels = augment_lists(batch, augment, gen)
        lists, labels = torch.cat([lists, extra], dim=1), torch.cat([labels, extra_labels], dim=1)
    if extra_lists is not None and extra_lists.shape[1] > 0:
        lists = torch.cat([lists, extra_lists], dim=1)
        labels = torch.cat([labels, log_labels(batch, extra_lists)], dim=1)
    cfg = getattr(model, "module", model).cfg  # (a DDP wrapper holds the model in .module)
    with_fb = bool(cfg.feedback) and batch.feedback is not None
    # One forward call whatever the heads, so a DDP wrapper syncs every gradient.
    out = model(batch, lists, exposure=cfg.exposure_prior, feedback=with_fb)
    parts = list(out) if isinstance(out, tuple) else [out]
    logits = parts.pop(0)  # (B, G, L), or (K, B, G, L) for a CrossFitReward
    prior = parts.pop(0) if cfg.exposure_prior else None  # (B, N) or (K, B, N)
    loss = member_bce(logits, lists, labels, folds)
    if prior is not None:
        loss = loss + exposure_loss(prior, batch, folds, cfg.exposure_target)
    if with_fb:  # each further feedback type, on the logged list (lists[:, 0]) where it was observed
        fb = parts.pop(0)[..., 0, :, :].transpose(-1, -2)  # (B, F, L) or (K, B, F, L)
        shown = batch.shown[:, None, :].expand_as(batch.feedback)  # (B, F, L)
        loss = loss + member_bce(fb, shown, batch.feedback, folds)
    if list_weight > 0:
        member_logits = logits if logits.dim() > lists.dim() else logits[None]
        loss = loss + list_weight * torch.stack([list_rank_loss(m, lists, labels) for m in member_logits]).mean()
    return loss


def positive_lists(batch: RequestBatch) -> torch.Tensor:
    """(B, 1, L) the logged positives in display order, -1 after them."""
    pos = (batch.labels > 0) & (batch.shown >= 0)  # (B, L)
    order = (~pos).to(torch.int8).argsort(dim=1, stable=True)  # positives first, in order
    lists = batch.shown.gather(1, order)
    return torch.where(pos.gather(1, order), lists, torch.full_like(lists, -1))[:, None, :]


def supervised_list_loss(model: nn.Module, batch: RequestBatch) -> torch.Tensor:
    """Negative log-likelihood of the logged positives as a (partial) list, mean over
    requests that have at least one positive."""
    lists = positive_lists(batch)
    has = (lists[:, 0, 0] >= 0).to(torch.float32)  # (B,)
    logp = model(batch, lists)[:, 0]  # (B,) model(...) = log_prob, DDP-safe
    return -(logp * has).sum() / has.sum().clamp(min=1)


def generator_group_loss(model: nn.Module, batch: RequestBatch, lists: torch.Tensor, pi_ref: torch.Tensor,
                         mask: torch.Tensor, supervised_weight: float = 0.0) -> torch.Tensor:
    """Group-relative cross-entropy -sum pi_ref log pi_theta (mean over requests), lists
    (B, G, L), pi_ref (B, G), mask (B, G); plus supervised_weight * supervised_list_loss.
    Both terms go through one `model(batch, lists)` call (one candidate encoding, and
    DDP-safe: the model may be wrapped)."""
    lists = torch.where(mask[..., None], lists, torch.full_like(lists, -1))  # masked slots: empty lists
    if supervised_weight > 0:
        pos = positive_lists(batch)  # (B, 1, L)
        logp = model(batch, torch.cat([lists, pos], dim=1))  # (B, G + 1)
        loss = group_relative_loss(logp[:, :-1], pi_ref, mask)
        has = (pos[:, 0, 0] >= 0).to(loss.dtype)
        sup = -(logp[:, -1] * has).sum() / has.sum().clamp(min=1)
        return loss + supervised_weight * sup
    return group_relative_loss(model(batch, lists), pi_ref, mask)


# -- validation measures (quick, for logging and best-epoch selection) -----------------------


@torch.no_grad()
def hit_rate(lists: torch.Tensor, batch: RequestBatch) -> torch.Tensor:
    """lists (B, L) -> (B,) share of the request's logged positives inside the list (nan if
    it has none)."""
    pos = (batch.labels > 0) & (batch.shown >= 0)  # (B, L)
    hit = (batch.shown[:, :, None] == lists[:, None, :]).any(-1) & pos
    return hit.sum(1).float() / pos.sum(1).float()


@torch.no_grad()
def greedy_hit_rate(model: nn.Module, data: EncodedRequests, batch_size: int) -> float:
    model.eval()
    dev, hits = _device(model), []
    for idx in iterate_batches(len(data), batch_size, False):
        b = data.batch(idx, dev)
        hits.append(hit_rate(model.greedy(b), b))
    h = torch.cat(hits)
    return float(h[~h.isnan()].mean()) if len(h) else float("nan")


def batch_folds(model: nn.Module, data: EncodedRequests, idx: np.ndarray | slice, device: torch.device | str) -> torch.Tensor | None:
    """(B,) cross-fitting folds of rows `idx` of `data` for a CrossFitReward `model` (None for
    one model): what its loss and its held-out scores are keyed by."""
    inner = getattr(model, "module", model)  # DDP wraps in .module
    if not isinstance(inner, CrossFitReward):
        return None
    return torch.from_numpy(request_folds(data.request_id[idx], len(inner.members))).to(device)


@torch.no_grad()
def mean_reward_loss(model: nn.Module, data: EncodedRequests, batch_size: int, proposals: np.ndarray | None = None) -> float:
    """Mean BCE on the logged lists of `data`, and on every list of `proposals` (R, G, L)
    labelled from the log when given. (Validation requests are no member's training rows,
    so a CrossFitReward's members are all measured on every row.)"""
    model.eval()
    dev, tot, n = _device(model), 0.0, 0
    for idx in iterate_batches(len(data), batch_size, False):
        b = data.batch(idx, dev)
        extra = torch.from_numpy(proposals[idx]).to(dev) if proposals is not None else None
        tot += float(reward_loss(model, b, 0, None, extra)) * len(idx)
        n += len(idx)
    return tot / max(n, 1)


# -- epoch loops ---------------------------------------------------------------------------


@dataclass
class EpochLog:
    epoch: int
    loss: float
    valid: float
    samples_per_s: float


def _fit(model: nn.Module, n_train: int, cfg: TrainConfig, epochs: int, step_loss: Callable[[np.ndarray], torch.Tensor],
         validate: Callable[[], float] | None, higher_is_better: bool, what: str, log: Log,
         keep_best: bool = True) -> list[EpochLog]:
    """Shared loop: shuffled batches, AdamW, grad clipping, best-on-valid weights kept (with
    `keep_best`; else the last epoch's, the valid measure only logged)."""
    opt = make_optimizer(model, cfg)
    rng = np.random.default_rng(cfg.seed)
    history: list[EpochLog] = []
    best, best_state = None, None
    for epoch in range(1, epochs + 1):
        model.train()
        t0, tot, seen = time.perf_counter(), 0.0, 0
        for idx in iterate_batches(n_train, cfg.batch_size, True, rng):
            loss = step_loss(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tot += float(loss.detach()) * len(idx)
            seen += len(idx)
        dt = time.perf_counter() - t0
        val = validate() if validate is not None else float("nan")
        entry = EpochLog(epoch, tot / max(seen, 1), val, seen / max(dt, 1e-9))
        history.append(entry)
        log(f"[{what}] epoch {epoch}/{epochs} loss {entry.loss:.4f} valid {val:.4f} "
            f"{entry.samples_per_s:.0f} samples/s ({dt:.1f}s)")
        if keep_best and validate is not None and val == val:
            if best is None or (val > best if higher_is_better else val < best):
                best, best_state = val, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def train_reward_model(train: EncodedRequests, valid: EncodedRequests | None, model: nn.Module, cfg: TrainConfig,
                       log: Log = print, augment: int | None = None, epochs: int | None = None,
                       proposals: np.ndarray | None = None, valid_proposals: np.ndarray | None = None,
                       proposal_lists: int | None = None) -> list[EpochLog]:
    """BCE on logged lists (+ augmented lists and per request `proposal_lists` lists drawn from `proposals` (R, G, L),
    e.g. the group proposers' lists, labelled from the log; defaults: `model.cfg.labelled_lists`,
    0 and 0 unless unshown candidates are negatives), plus `model.cfg.list_weight` x the
    list-ranking term over them; validation = BCE on the logged valid lists and all of
    `valid_proposals` (lower is better)."""
    dev = _device(model)
    augment_n, group_n = model.cfg.labelled_lists
    augment = augment_n if augment is None else augment
    k = group_n if proposal_lists is None else proposal_lists
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)

    def step(idx: np.ndarray) -> torch.Tensor:
        extra = None
        if proposals is not None and k > 0:
            extra = pick_lists(torch.from_numpy(proposals[idx]).to(dev), k, gen)  # (B, k, L)
        return reward_loss(model, train.batch(idx, dev), augment, gen, extra, model.cfg.list_weight,
                           batch_folds(model, train, idx, dev))

    validate = None
    if valid is not None and len(valid):
        validate = lambda: mean_reward_loss(model, valid, 4 * cfg.batch_size, valid_proposals)  # noqa: E731
    return _fit(model, len(train), cfg, epochs or cfg.reward_epochs, step, validate, False, "reward", log)


def train_generator_supervised(train: EncodedRequests, valid: EncodedRequests | None, model: nn.Module, cfg: TrainConfig,
                               log: Log = print, epochs: int | None = None) -> list[EpochLog]:
    """Supervised list likelihood on the logged positives (the 'supervised' policy);
    validation = greedy hit rate on valid (higher is better)."""
    dev = _device(model)
    step = lambda idx: supervised_list_loss(model, train.batch(idx, dev))  # noqa: E731
    validate = (lambda: greedy_hit_rate(model, valid, 4 * cfg.batch_size)) if valid is not None and len(valid) else None
    return _fit(model, len(train), cfg, epochs or cfg.aux_epochs, step, validate, True, "supervised", log)


@dataclass
class Groups:
    """Scored groups aligned with the rows of an EncodedRequests (numpy, cheap to slice)."""

    lists: np.ndarray  # (R, G, L) int64 positions, -1 padding
    pi_ref: np.ndarray  # (R, G) float32
    mask: np.ndarray  # (R, G) bool
    rewards: np.ndarray | None = None  # (R, G) float32
    policy_ids: np.ndarray | None = None  # (R, G) int64 index into policy names, -1 padding

    def batch(self, idx: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(self.lists[idx]).to(device), torch.from_numpy(self.pi_ref[idx]).to(device),
                torch.from_numpy(self.mask[idx]).to(device))


def train_generator_group(train: EncodedRequests, groups: Groups, model: nn.Module, cfg: TrainConfig,
                          valid: EncodedRequests | None = None, log: Log = print, epochs: int | None = None,
                          supervised_weight: float | None = None) -> list[EpochLog]:
    """Group-relative training on precomputed groups (+ optional supervised term);
    validation = greedy hit rate on valid, which picks the kept epoch unless
    `cfg.generator_select` is `last`."""
    if len(groups.lists) != len(train):
        raise ValueError(f"groups have {len(groups.lists)} rows, train has {len(train)}")
    dev = _device(model)
    w = cfg.supervised_weight if supervised_weight is None else supervised_weight

    def step(idx: np.ndarray) -> torch.Tensor:
        lists, pi_ref, mask = groups.batch(idx, dev)
        return generator_group_loss(model, train.batch(idx, dev), lists, pi_ref, mask, w)

    validate = (lambda: greedy_hit_rate(model, valid, 4 * cfg.batch_size)) if valid is not None and len(valid) else None
    return _fit(model, len(train), cfg, epochs or cfg.epochs, step, validate, True, "generator", log,
                keep_best=cfg.keep_best_generator)
