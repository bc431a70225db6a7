"""The GoalRank generator pi_theta(l | u, V_u): an autoregressive pointer network.

Encoder: the N candidates, each embedded with the user's history (target attention), go
through a Transformer together with a user token, so every candidate is encoded in the
context of the user and of the other candidates. This runs once per request.

Decoder: a small causal Transformer over [user state, chosen item 1, ..., chosen item t]
gives the query for step t + 1; the step is a softmax of query . key(candidate) over the
candidates not yet chosen. The decoder sees what is already in the list (list-aware: it
can learn diversity or complementarity), yet a list costs only L one-token decoder passes
on top of the cached candidate encoding: inference (`decode`) keeps each decoder layer's
keys and values, so step t computes its new token alone.

With `list_bias` each item already in the list also adds a learned amount to every remaining
candidate's pointer logit, from whether the two share a category and the cosine of their
encodings (as the reward model's pairwise term): saturation, substitutes and complements
become one additive term per chosen item, which the dot product of one query with each key
expresses only approximately. The (N, N) table is computed once per request with the
encoding, so decoding adds one row gather per step.

Teacher forcing (`log_prob`) runs all G lists and all L steps of a batch at once.
A list entry of -1 marks an unused step (lists shorter than L, e.g. the logged positives
of a request): it contributes 0 to the log-probability.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from goalrank_core.batch import RequestBatch
from goalrank_core.config_sections import GeneratorConfig
from goalrank_core.layers import (N_ITEM_FEATURES, ItemFeatures, RequestEmbedder, gather_positions,
                                  same_category_and_cosine, transformer)


class Encoded(NamedTuple):
    """A batch's cached candidate encoding (what inference reuses at every step)."""

    keys: torch.Tensor  # (B, N, d) pointer keys of the candidates
    values: torch.Tensor  # (B, N, d) candidate encodings fed to the decoder once chosen
    user: torch.Tensor  # (B, d) user state: the decoder's start token
    valid: torch.Tensor  # (B, N) bool, real candidates
    pair: torch.Tensor | None = None  # (B, N, N) [j, n]: logit added to candidate n once j is chosen


class GoalRankGenerator(nn.Module):
    def __init__(self, cfg: GeneratorConfig, n_items: int, n_users: int, n_categories: int, slate_len: int,
                 feature_dim: int = 32):
        super().__init__()
        d = cfg.d_model
        self.cfg, self.slate_len = cfg, slate_len
        self.embed = RequestEmbedder(d, n_items, n_users, n_categories, cfg.dropout)
        # Collaborative statistics per candidate (layers.ItemFeatures), added to its embedding.
        self.features = ItemFeatures(n_items, feature_dim) if cfg.item_features else None
        self.feat_in = nn.Linear(N_ITEM_FEATURES, d) if cfg.item_features else None
        self.encoder = transformer(d, cfg.n_layers, cfg.n_heads, cfg.ff_mult, cfg.dropout)
        self.decoder = transformer(d, cfg.decoder_layers, cfg.n_heads, cfg.ff_mult, cfg.dropout)
        self.pos = nn.Embedding(slate_len + 1, d)
        self.key = nn.Linear(d, d)
        self.query = nn.Linear(d, d)
        self.scale = 1.0 / math.sqrt(d)
        # Inputs per (chosen j, candidate n): same category, cosine of their encodings.
        self.list_bias = (nn.Sequential(nn.Linear(2, 16), nn.GELU(), nn.Linear(16, 1))
                          if cfg.list_bias else None)
        if self.list_bias is not None:  # starts as no term at all: the plain pointer network
            nn.init.zeros_(self.list_bias[2].weight)
            nn.init.zeros_(self.list_bias[2].bias)
        nn.init.normal_(self.pos.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- encoder -----------------------------------------------------------------------------

    def encode(self, batch: RequestBatch) -> Encoded:
        user, cand = self.embed(batch)  # (B, d), (B, N, d)
        if self.features is not None:
            cand = cand + self.feat_in(self.features(batch))  # (B, N, d)
        x = torch.cat([user[:, None, :], cand], dim=1)  # (B, 1 + N, d)
        pad = torch.cat([torch.zeros_like(batch.cand_mask[:, :1]), ~batch.cand_mask], dim=1)  # (B, 1 + N)
        h = self.encoder(x, src_key_padding_mask=pad)  # (B, 1 + N, d)
        values = h[:, 1:]  # (B, N, d)
        pair = None
        if self.list_bias is not None:
            same, cos = same_category_and_cosine(batch.category, values)  # (B, N, N) each
            pair = self.list_bias(torch.stack([same, cos], dim=-1))[..., 0]  # (B, N, N)
        return Encoded(keys=self.key(values), values=values, user=h[:, 0], valid=batch.cand_mask, pair=pair)

    # -- decoder -----------------------------------------------------------------------------

    def _queries(self, enc: Encoded, prefix: torch.Tensor) -> torch.Tensor:
        """prefix (B, G, T) chosen positions -> (B, G, T + 1, d) queries for steps 1..T+1."""
        b, g, t = prefix.shape
        start = enc.user[:, None, None, :].expand(b, g, 1, -1)  # (B, G, 1, d)
        chosen = gather_positions(enc.values, prefix)  # (B, G, T, d)
        x = torch.cat([start, chosen], dim=2) + self.pos.weight[: t + 1]  # (B, G, T + 1, d)
        x = x.reshape(b * g, t + 1, -1)
        causal = torch.triu(torch.ones(t + 1, t + 1, dtype=torch.bool, device=x.device), diagonal=1)
        q = self.decoder(x, mask=causal, is_causal=True)  # (B*G, T + 1, d)
        return self.query(q).reshape(b, g, t + 1, -1)

    def list_bias_of(self, enc: Encoded, lists: torch.Tensor) -> torch.Tensor | None:
        """lists (B, G, T) positions, -1 = unused -> (B, G, T, N): at step t the summed
        `pair` rows of the items chosen before t (None without list_bias)."""
        if enc.pair is None:
            return None
        rows = enc.pair[torch.arange(lists.shape[0], device=lists.device)[:, None, None], lists.clamp(min=0)]  # (B, G, T, N)
        rows = rows * (lists >= 0)[..., None].to(rows.dtype)
        return rows.cumsum(2) - rows  # exclusive: step t sees steps < t

    def _masked_logits(self, enc: Encoded, q: torch.Tensor, blocked: torch.Tensor, temperature: float = 1.0,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
        """q (B, G, S, d), blocked (B, G, S, N), bias (B, G, S, N) or None -> (B, G, S, N)
        logits, blocked ones at a huge negative value (finite, so a request with no choice
        left gives no NaN)."""
        logits = torch.einsum("bgsd,bnd->bgsn", q, enc.keys) * self.scale
        if bias is not None:
            logits = logits + bias
        logits = logits / temperature
        blocked = blocked | ~enc.valid[:, None, None, :]
        return logits.masked_fill(blocked, torch.finfo(logits.dtype).min / 4)

    def step_log_probs(self, batch: RequestBatch, lists: torch.Tensor, enc: Encoded | None = None) -> torch.Tensor:
        """lists (B, G, L) positions, -1 = unused step -> (B, G, L) log pi(l_t | l_<t), 0 at -1."""
        enc = enc if enc is not None else self.encode(batch)
        b, g, l = lists.shape
        n = enc.keys.shape[1]
        q = self._queries(enc, lists[:, :, :-1])  # (B, G, L, d)
        # blocked[b, g, t, n]: candidate n was chosen at a step before t.
        onehot = torch.zeros(b, g, l, n, dtype=torch.bool, device=lists.device)
        onehot.scatter_(3, lists.clamp(min=0)[..., None], (lists >= 0)[..., None])
        before = torch.cumsum(onehot.to(torch.int32), dim=2) - onehot.to(torch.int32)  # (B, G, L, N)
        logp = self._masked_logits(enc, q, before > 0, bias=self.list_bias_of(enc, lists)).log_softmax(-1)  # (B, G, L, N)
        step = logp.gather(3, lists.clamp(min=0)[..., None]).squeeze(-1)  # (B, G, L)
        return step * (lists >= 0).to(step.dtype)

    def log_prob(self, batch: RequestBatch, lists: torch.Tensor, enc: Encoded | None = None) -> torch.Tensor:
        """lists (B, G, L) -> (B, G) log pi_theta(list), all steps in one batched pass."""
        return self.step_log_probs(batch, lists, enc).sum(-1)

    def forward(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """= log_prob; training calls the module itself so DDP wrappers sync gradients."""
        return self.log_prob(batch, lists)

    # -- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, enc: Encoded, n: int, greedy: bool, generator: torch.Generator | None = None,
               temperature: float = 1.0, length: int | None = None,
               with_log_probs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """n lists per request from a cached encoding -> (B, n, L) positions; with
        `with_log_probs` also the (B, n, L) step log-probabilities log pi(l_t | l_<t) of the
        temperature-scaled policy the lists were drawn from.

        Incremental: step t runs the decoder on its one new token only, against a per-layer
        key/value cache of the earlier tokens (`_cached_layer_step`), so a list costs L
        one-token passes, not L passes over ever longer prefixes."""
        b, nc, d = enc.keys.shape
        length = min(length or self.slate_len, nc)
        dev, m = enc.keys.device, b * n
        if length == 0:
            empty = torch.empty(b, n, 0, dtype=torch.long, device=dev)
            return (empty, empty.to(enc.keys.dtype)) if with_log_probs else empty
        # The query projection folded into the keys, scaled once: query(y) . k * s / tau =
        # y . (W_q^T k s / tau) + b_q . k s / tau, one batched matmul per step.
        keys = enc.keys * (self.scale / temperature)  # (B, N, d)
        keys_q = (keys @ self.query.weight).transpose(1, 2)  # (B, d, N)
        neg = torch.finfo(keys.dtype).min / 4  # finite: a request with no choice left gives no NaN
        # Per-list logit offsets: b_q . k, and `neg` at padding and at items already chosen.
        offset = (keys @ self.query.bias).masked_fill(~enc.valid, neg)[:, None, :].expand(b, n, nc).contiguous()  # (B, n, N)
        pair = None if enc.pair is None else enc.pair / temperature  # (B, N, N)
        rows = torch.arange(b, device=dev)[:, None]  # (B, 1) row index of each list's request
        layers = [_LayerTensors.of(layer) for layer in self.decoder.layers]  # looked up once, not per step
        caches = [torch.empty(m, 2, w.heads, length, d // w.heads, dtype=keys.dtype, device=dev)
                  for w in layers]  # per layer (M, 2, H, L, dh)
        final = self.decoder.norm
        pos = self.pos.weight  # (L + 1, d)
        x = (enc.user + pos[0]).repeat_interleave(n, dim=0)  # (M, d) token 0: the user state
        picks, step_logp = [], []
        for t in range(length):
            for w, cache in zip(layers, caches):
                x = _cached_layer_step(w, x, cache, t)
            y = x if final is None else F.layer_norm(x, final.normalized_shape, final.weight, final.bias, final.eps)
            logits = torch.baddbmm(offset, y.view(b, n, d), keys_q)  # (B, n, N)
            if greedy:
                nxt = logits.argmax(-1)  # (B, n)
            else:  # Gumbel-max; noise drawn where the generator lives (a CPU one may drive CUDA)
                u = torch.rand(logits.shape, generator=generator,
                               device=generator.device if generator is not None else dev)
                gumbel = u.to(dev).clamp_(1e-12, 1 - 1e-7).log_().neg_().log_().neg_()
                nxt = (logits.float() + gumbel).argmax(-1)  # (B, n)
            picks.append(nxt)
            if with_log_probs:
                step_logp.append(logits.log_softmax(-1).gather(2, nxt[..., None])[..., 0])
            if pair is not None:  # the chosen item's row of the table, for every later step
                offset += pair[rows, nxt]  # (B, n, N)
            offset.scatter_(2, nxt[..., None], neg)
            if t + 1 < length:  # the next token: the chosen item's encoding at position t + 1
                x = (torch.gather(enc.values, 1, nxt[..., None].expand(-1, -1, d)) + pos[t + 1]).view(m, d)
        chosen = torch.stack(picks, dim=2)  # (B, n, L)
        return (chosen, torch.stack(step_logp, dim=2)) if with_log_probs else chosen

    @torch.no_grad()
    def _decode(self, batch: RequestBatch, n: int, greedy: bool, generator: torch.Generator | None,
                temperature: float, length: int | None) -> torch.Tensor:
        return self.decode(self.encode(batch), n, greedy, generator, temperature, length)  # encoded once

    def sample(self, batch: RequestBatch, n: int, generator: torch.Generator | None = None,
               temperature: float = 1.0, length: int | None = None) -> torch.Tensor:
        """-> (B, n, L) positions; no item repeats inside a list. Call under eval() for
        dropout-free samples."""
        return self._decode(batch, n, False, generator, temperature, length)

    def greedy(self, batch: RequestBatch, length: int | None = None) -> torch.Tensor:
        """-> (B, L) positions, the most probable item at every step."""
        return self._decode(batch, 1, True, None, 1.0, length)[:, 0]


# -- one decoder layer, one token at a time ----------------------------------------------------
#
# `_cached_layer_step` redoes the arithmetic of the nn.TransformerEncoderLayer that
# `layers.transformer` builds (pre- or post-norm, self-attention over the tokens so far, the
# layer's activation, dropout only in training mode) for the newest token alone. Tests hold it
# to the teacher-forced path (`_queries`), which stays the reference.


class _LayerTensors(NamedTuple):
    """A decoder layer's weights, fetched once per decode: at one token per step, module
    attribute look-ups cost as much as the arithmetic."""

    norm_first: bool
    heads: int
    norm1: tuple  # (normalized_shape, weight, bias, eps)
    norm2: tuple
    in_proj: tuple  # (weight (3d, d), bias (3d,))
    out_proj: tuple  # (weight (d, d), bias (d,))
    linear1: tuple
    linear2: tuple
    activation: object  # the layer's activation function
    dropout: float  # residual and feed-forward dropout; 0 outside training
    attn_dropout: float

    @classmethod
    def of(cls, layer: nn.TransformerEncoderLayer) -> "_LayerTensors":
        a = layer.self_attn
        assert a._qkv_same_embed_dim and a.bias_k is None, "decoder attention of an unexpected kind"
        ln = lambda n: (n.normalized_shape, n.weight, n.bias, n.eps)  # noqa: E731
        lin = lambda l: (l.weight, l.bias)  # noqa: E731
        return cls(layer.norm_first, a.num_heads, ln(layer.norm1), ln(layer.norm2), (a.in_proj_weight, a.in_proj_bias),
                   lin(a.out_proj), lin(layer.linear1), lin(layer.linear2), layer.activation,
                   layer.dropout.p if layer.training else 0.0, a.dropout if layer.training else 0.0)


def _cached_layer_step(w: _LayerTensors, x: torch.Tensor, cache: torch.Tensor, t: int) -> torch.Tensor:
    """One decoder layer on the newest token. x (M, d) token t; cache (M, 2, H, T, dh) keys
    and values of tokens 0..t-1; token t's are written into it -> (M, d)."""
    m, d = x.shape

    def drop(v: torch.Tensor) -> torch.Tensor:
        return F.dropout(v, w.dropout, True) if w.dropout > 0 else v

    def self_attention(v: torch.Tensor) -> torch.Tensor:
        qkv = F.linear(v, *w.in_proj).view(m, 3, w.heads, 1, d // w.heads)  # (M, 3, H, 1, dh)
        cache[:, :, :, t:t + 1] = qkv[:, 1:]
        if t == 0 and w.attn_dropout == 0:  # one key: its softmax weight is exactly 1
            o = qkv[:, 2]
        else:
            o = F.scaled_dot_product_attention(qkv[:, 0], cache[:, 0, :, :t + 1], cache[:, 1, :, :t + 1],
                                               dropout_p=w.attn_dropout)  # (M, H, 1, dh)
        return drop(F.linear(o.reshape(m, d), *w.out_proj))

    def feed_forward(v: torch.Tensor) -> torch.Tensor:
        return drop(F.linear(drop(w.activation(F.linear(v, *w.linear1))), *w.linear2))

    if w.norm_first:
        x = x + self_attention(F.layer_norm(x, *w.norm1))
        return x + feed_forward(F.layer_norm(x, *w.norm2))
    x = F.layer_norm(x + self_attention(x), *w.norm1)
    return F.layer_norm(x + feed_forward(x), *w.norm2)
