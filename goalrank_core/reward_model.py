"""The list-aware reward model r(u, l): click probability per position of a whole list.

Each list item is its candidate embedding (item, category, target attention over the
user's history; with `context_layers` > 0 then a Transformer over the user and all N
candidates, so an item is judged against what else the request could show, as the
generator's encoder does) plus a position embedding; a Transformer runs over [user token, item 1..L]
with full self-attention, so an item's click probability depends on what is shown before
and after it. The list score is sum_k p_k / log2(k + 2) (DCG weights, k from 0), or with
`list_value: clicks` the expected number of clicks, sum_k p_k.

It scores any list of positions into the candidates, logged or not; -1 entries (short
lists) are masked out and score 0.

With `item_features` each candidate also carries the collaborative statistics the heuristic
policies are fitted from (`policies.fit_heuristics`): its similarity to the user's history in
the low-rank item space, its log popularity and its CTR. The click labels of logged lists are
few (L per request) and only on shown items; these statistics summarise every training
positive, so the model knows an unshown candidate's relevance from more than its id embedding.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from goalrank_core.batch import RequestBatch
from goalrank_core.config_sections import RewardConfig
from goalrank_core.group import dcg_weights
from goalrank_core.layers import (N_ITEM_FEATURES, ItemFeatures, RequestEmbedder, gather_positions,
                                  same_category_and_cosine, transformer)


_PAIR_FEATURES = 4  # same category, cosine, earlier item's attractiveness, distance


class RewardModel(nn.Module):
    def __init__(self, cfg: RewardConfig, n_items: int, n_users: int, n_categories: int, slate_len: int,
                 feature_dim: int = 32):
        super().__init__()
        d = cfg.d_model
        self.cfg, self.slate_len = cfg, slate_len
        self.embed = RequestEmbedder(d, n_items, n_users, n_categories, cfg.dropout)
        self.pos = nn.Embedding(slate_len + 1, d)  # 0 = user token
        # Optional: candidates encoded together first (what else the request could have shown).
        self.context = (transformer(d, cfg.context_layers, cfg.n_heads, cfg.ff_mult, cfg.dropout)
                        if cfg.context_layers > 0 else None)
        self.encoder = transformer(d, cfg.n_layers, cfg.n_heads, cfg.ff_mult, cfg.dropout)
        # One output per feedback type: the click (`labels`) first, then reward.feedback_names.
        self.n_feedback = len(cfg.feedback_names)
        self.head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1 + self.n_feedback))
        self.register_buffer("feedback_weight", torch.tensor([cfg.feedback[n] for n in cfg.feedback_names],
                                                             dtype=torch.float32), persistent=False)
        # Pairwise context: what each earlier item of the list does to this one.
        self.pair = (nn.Sequential(nn.Linear(_PAIR_FEATURES, 16), nn.GELU(), nn.Linear(16, 1))
                     if cfg.pairwise else None)
        self.point = nn.Linear(d, 1) if cfg.pairwise else None  # an item's attractiveness alone
        if cfg.exposure_prior:  # P(logged click | u, i) over all N candidates, and its weight in the click logit
            self.prior = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
            self.prior_scale = nn.Parameter(torch.tensor(0.5))
        if cfg.examination:  # per item: logits of stopping after a click, after no click
            self.stop = nn.Linear(2 * d, 2)
            nn.init.zeros_(self.stop.weight)
            nn.init.constant_(self.stop.bias, -4.0)  # P(stop) ~ 0.02: a reader who reads on
        if cfg.item_features:  # filled by layers.set_item_features
            self.features = ItemFeatures(n_items, feature_dim)
            self.feat_in = nn.Linear(N_ITEM_FEATURES, d)  # into the candidate's vector
            self.feat_logit = nn.Linear(N_ITEM_FEATURES, 1)  # and straight into its click logit
        nn.init.normal_(self.pos.weight, std=0.02)
        # Position weights of the list score (reward.list_value): DCG, or 1 (expected clicks).
        weights = dcg_weights(slate_len) if cfg.list_value == "dcg" else torch.ones(slate_len)
        self.register_buffer("slot_weight", weights, persistent=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, batch: RequestBatch, lists: torch.Tensor, exposure: bool = False, feedback: bool = False):
        """lists (B, G, L) positions (-1 = empty) -> (B, G, L) click logits; with `exposure`
        (and `exposure_prior`) also the (B, N) prior logits of every candidate, for its loss;
        with `feedback` (and reward.feedback) last the (B, G, L, F) logits of the further
        feedback types. More than one output comes back as a tuple in that order."""
        b, g, l = lists.shape
        if l > self.slate_len:
            raise ValueError(f"lists have length {l}, the reward model was built for {self.slate_len}")
        user, cand = self.embed(batch)  # (B, d), (B, N, d)
        point = None
        if self.cfg.item_features:
            f = self.features(batch)  # (B, N, 4)
            cand = cand + self.feat_in(f)
            point = self.feat_logit(f)  # (B, N, 1)
        prior = self.prior(cand)[..., 0] if self.cfg.exposure_prior else None  # (B, N)
        if self.context is not None:  # once per request, shared by its G lists
            x = torch.cat([user[:, None, :], cand], dim=1)  # (B, 1 + N, d)
            pad = torch.cat([torch.zeros_like(batch.cand_mask[:, :1]), ~batch.cand_mask], dim=1)  # (B, 1 + N)
            h = self.context(x, src_key_padding_mask=pad)  # (B, 1 + N, d)
            user, cand = h[:, 0], h[:, 1:]
        items = gather_positions(cand, lists)  # (B, G, L, d)
        tok = torch.cat([user[:, None, None, :].expand(b, g, 1, -1), items], dim=2)  # (B, G, 1 + L, d)
        tok = tok + self.pos.weight[: l + 1]
        pad = torch.cat([torch.zeros_like(lists[..., :1], dtype=torch.bool), lists < 0], dim=2)  # (B, G, 1 + L)
        causal = None
        if self.cfg.causal:  # a reader goes top-down: item p sees the user and the items above it
            causal = torch.ones(l + 1, l + 1, dtype=torch.bool, device=lists.device).triu(1)
        h = self.encoder(tok.reshape(b * g, l + 1, -1), mask=causal, src_key_padding_mask=pad.reshape(b * g, l + 1))
        h = h.reshape(b, g, l + 1, -1)[:, :, 1:]  # (B, G, L, d)
        # Skip connection from the item's own encoding keeps the point-wise signal direct.
        out = self.head(torch.cat([h, items], dim=-1))  # (B, G, L, 1 + F)
        logit, extra = out[..., 0], out[..., 1:]  # (B, G, L), (B, G, L, F)
        if self.pair is not None:
            logit = logit + self._pairwise(batch, lists, items)
        if point is not None:
            logit = logit + gather_positions(point, lists)[..., 0]
        outputs = []
        if prior is not None:  # detached: the click loss calibrates the prior, only its own loss trains it
            logit = logit + self.prior_scale * gather_positions(prior.detach()[..., None], lists)[..., 0]
            if exposure:
                outputs.append(prior)
        if self.cfg.examination:
            logit = _examined_logits(logit, self.stop(torch.cat([h, items], dim=-1)), lists)
        if feedback and self.n_feedback:
            outputs.append(extra)
        if not outputs:
            return logit
        return (logit, *outputs)

    def _pairwise(self, batch: RequestBatch, lists: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(B, G, L) the summed effect of the earlier items j < p on item p, from features a
        list-wise click model needs and self-attention learns slowly from few logs: same
        category (saturation), the similarity of the two items (substitutes, complements), how
        attractive the earlier item is (a reader who stops after a click) and how far back it
        is. An additive term, so each effect is learnt once for all positions."""
        b, g, l = lists.shape
        cat = gather_positions(batch.category[..., None].to(items.dtype), lists)[..., 0]  # (B, G, L)
        same, cos = same_category_and_cosine(cat, items)  # (B, G, L, L) each
        attract = torch.sigmoid(self.point(items))[..., 0]  # (B, G, L)
        pos = torch.arange(l, device=lists.device)
        gap = (pos[:, None] - pos[None, :]).clamp(min=0).to(items.dtype) / max(self.slate_len, 1)  # (L, L)
        feats = torch.stack([same, cos, attract[..., None, :].expand(b, g, l, l), gap.expand(b, g, l, l)], dim=-1)
        earlier = torch.ones(l, l, dtype=torch.bool, device=lists.device).tril(-1)  # [p, j]: j < p
        earlier = earlier & (lists >= 0)[..., None, :]  # (B, G, L, L) real earlier items only
        return (self.pair(feats)[..., 0] * earlier).sum(-1)  # (B, G, L)

    def forward(self, batch: RequestBatch, lists: torch.Tensor, exposure: bool = False, feedback: bool = False):
        """= logits; training calls the module itself so DDP wrappers sync gradients."""
        return self.logits(batch, lists, exposure, feedback)

    def click_probs(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """(B, G, L) -> (B, G, L) click probabilities, 0 at -1 entries."""
        return torch.sigmoid(self.logits(batch, lists)) * (lists >= 0).to(torch.float32)

    def score(self, batch: RequestBatch, lists: torch.Tensor, folds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G, L) -> (B, G) sum_k (p_k + sum_f w_f p_f,k) w_k: the click and each weighted
        further feedback type, w_k the DCG weight 1 / log2(k + 2) or 1 (reward.list_value).
        `folds` is accepted for the interface of CrossFitReward and ignored: one model has no
        held-out member."""
        real = (lists >= 0).to(torch.float32)
        if self.n_feedback:
            logit, extra = self.logits(batch, lists, feedback=True)  # (B, G, L), (B, G, L, F)
            p = (torch.sigmoid(logit) + (torch.sigmoid(extra) * self.feedback_weight).sum(-1)) * real
        else:
            p = torch.sigmoid(self.logits(batch, lists)) * real
        return (p * self.slot_weight[: lists.shape[-1]]).sum(-1)

    def bce_loss(self, batch: RequestBatch, lists: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean BCE over labelled positions. Defaults to the logged `shown` / `labels`;
        `lists` (B, G, L) and `labels` (B, G, L) score extra (e.g. augmented) lists."""
        if lists is None:
            lists, labels = batch.shown[:, None, :], batch.labels[:, None, :]
        assert labels is not None
        return masked_bce(self(batch, lists), lists, labels)


def _examined_logits(attract: torch.Tensor, stop: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """(B, G, L) attraction logits a_k, (B, G, L, 2) stop logits after a click / after none ->
    (B, G, L) logits of P(click at k) = E_k sigmoid(a_k), where E_1 = 1 and the reader goes on
    from k with q_k (1 - s_click,k) + (1 - q_k)(1 - s_skip,k), q_k = sigmoid(a_k). In log space,
    so the BCE on logits, the list score and the click probabilities all keep working."""
    q = torch.sigmoid(attract)
    s_click, s_skip = torch.sigmoid(stop[..., 0]), torch.sigmoid(stop[..., 1])
    go_on = (q * (1 - s_click) + (1 - q) * (1 - s_skip)).clamp(min=1e-6)  # (B, G, L)
    go_on = torch.where(lists >= 0, go_on, torch.ones_like(go_on))  # an empty slot stops nobody
    log_exam = torch.cumsum(go_on.log(), dim=-1) - go_on.log()  # (B, G, L) log E_k: the items above k
    log_p = (log_exam + F.logsigmoid(attract)).clamp(max=-1e-6)  # log P(click at k) < 0
    return log_p - torch.log(-torch.expm1(log_p))  # logit(p) = log p - log(1 - p)


class CrossFitReward(nn.Module):
    """K reward models for cross-fitting. Member k trains only on the requests outside fold k
    (`request_folds`), so a training request's group is scored by the one member that never
    saw its labels (`score(..., folds)`); a reward model scoring its own training requests
    rewards lists that repeat the clicks it memorised. Requests outside training (G-E at
    serving, validation) get the mean of the members' scores.

    `forward` returns (K, B, G, L) logits: the loss masks each member to its own rows."""

    def __init__(self, cfg: RewardConfig, n_items: int, n_users: int, n_categories: int, slate_len: int,
                 feature_dim: int = 32):
        super().__init__()
        self.cfg, self.slate_len = cfg, slate_len
        self.members = nn.ModuleList(RewardModel(cfg, n_items, n_users, n_categories, slate_len, feature_dim)
                                     for _ in range(cfg.folds))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, batch: RequestBatch, lists: torch.Tensor, exposure: bool = False, feedback: bool = False):
        """lists (B, G, L) -> (K, B, G, L) each member's click logits (with `exposure`: and
        (K, B, N) their prior logits; with `feedback`: and (K, B, G, L, F) feedback logits),
        the outputs of RewardModel.logits stacked over members."""
        out = [m(batch, lists, exposure, feedback) for m in self.members]
        if isinstance(out[0], tuple):
            return tuple(torch.stack(parts) for parts in zip(*out))
        return torch.stack(out)

    def score(self, batch: RequestBatch, lists: torch.Tensor, folds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G, L) -> (B, G) list scores: with `folds` (B,) int64, row b scored by member
        folds[b] alone (the one that did not train on it); without, the members' mean."""
        if folds is None:
            return torch.stack([m.score(batch, lists) for m in self.members]).mean(0)
        # Each member scores only its own rows: K times less work than scoring all and picking.
        folds = folds.to(lists.device).clamp(0, len(self.members) - 1)
        out = torch.zeros(lists.shape[:2], device=lists.device)
        for k, member in enumerate(self.members):
            rows = (folds == k).nonzero()[:, 0]
            if len(rows):
                out[rows] = member.score(batch.take(rows), lists[rows]).to(out.dtype)
        return out

    def click_probs(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """(B, G, L) -> (B, G, L) the members' mean click probabilities."""
        return torch.stack([m.click_probs(batch, lists) for m in self.members]).mean(0)


def request_folds(request_ids: np.ndarray | list, k: int) -> np.ndarray:
    """(R,) request ids -> (R,) int64 fold in [0, k): a CRC-32 of the id, so every process
    (the in-process fit, each Ray worker, a rerun) puts a request in the same fold."""
    if k <= 1:
        return np.zeros(len(request_ids), np.int64)
    return np.fromiter((zlib.crc32(str(r).encode()) % k for r in request_ids), np.int64, len(request_ids))


def member_bce(logits: torch.Tensor, lists: torch.Tensor, labels: torch.Tensor, folds: torch.Tensor | None) -> torch.Tensor:
    """BCE of a reward model's logits: (B, G, L) for one model; (K, B, G, L) for a
    CrossFitReward, where member k learns only from rows whose fold (B,) is not k (the mean
    over members). Without `folds` every member learns from every row."""
    if logits.dim() == lists.dim():
        return masked_bce(logits, lists, labels)
    k = logits.shape[0]
    losses = []
    for m in range(k):
        rows = torch.ones(lists.shape[0], dtype=torch.bool, device=lists.device) if folds is None else folds != m
        keep = torch.where(rows[:, None, None], lists, torch.full_like(lists, -1))  # other folds' rows: empty
        losses.append(masked_bce(logits[m], keep, labels))
    return torch.stack(losses).mean()


def masked_bce(logits: torch.Tensor, lists: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean BCE of (B, G, L) logits against labels over the non-empty (>= 0) positions."""
    mask = (lists >= 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype).clamp(0, 1), reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1)


def can_init_from(reward: RewardModel, generator: nn.Module) -> bool:
    """True when `generator`'s embeddings and encoder have exactly the shapes of `reward`'s
    embeddings and context layers (see `init_from_generator`)."""
    if reward.context is None or not hasattr(generator, "encoder") or not hasattr(generator, "embed"):
        return False
    pairs = ((reward.embed, generator.embed), (reward.context, generator.encoder))
    for mine, theirs in pairs:
        a, b = mine.state_dict(), theirs.state_dict()
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            return False
    return True


def init_from_generator(reward: RewardModel, generator: nn.Module) -> None:
    """Copy a trained generator's request embeddings and candidate encoder into the reward
    model's embeddings and context layers. The supervised generator has learnt which
    candidates a user takes; starting the reward model there (as RLHF starts its reward model
    from the SFT model) gives its BCE head that representation instead of random features."""
    if not can_init_from(reward, generator):
        raise ValueError("the generator's embeddings/encoder do not match the reward model's shapes "
                         "(need equal d_model, n_heads, ff_mult and reward.context_layers == generator.n_layers)")
    reward.embed.load_state_dict(generator.embed.state_dict())
    reward.context.load_state_dict(generator.encoder.state_dict())
