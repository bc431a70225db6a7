"""Building blocks shared by the generator and the reward model: embeddings of a request's
user, history and candidates, and a Transformer stack with the settings we always want.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from goalrank_core.batch import PAD, UNK, RequestBatch
from goalrank_core.policies import history_similarity_scores


def in_table(idx: torch.Tensor, n: int, fallback: int = UNK) -> torch.Tensor:
    """Indices beyond an embedding table of n rows (ids added after training) -> `fallback`
    (the UNK row), never a clamp onto the last real id."""
    return torch.where(idx < n, idx, torch.full_like(idx, fallback))


def transformer(d: int, n_layers: int, n_heads: int, ff_mult: int, dropout: float) -> nn.TransformerEncoder:
    """Pre-norm Transformer encoder, batch first. Nested tensors are off: they only help
    post-norm layers and make outputs depend on the padding layout."""
    layer = nn.TransformerEncoderLayer(
        d, n_heads, dim_feedforward=ff_mult * d, dropout=dropout, batch_first=True, norm_first=True,
        activation="gelu",
    )
    return nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False, norm=nn.LayerNorm(d))


class RequestEmbedder(nn.Module):
    """Embeds the user, the history and the N candidates of a request.

    A candidate's vector is its item and category embeddings plus a target attention over
    the user's history (how much the history speaks for this item), so relevance to the
    user is available before any Transformer layer. During training a small share of item
    and user ids is replaced by UNK so the cold-start embedding is learnt, not left random.
    """

    def __init__(self, d: int, n_items: int, n_users: int, n_categories: int, dropout: float, unk_rate: float = 0.02):
        super().__init__()
        self.n_categories = max(int(n_categories), 1)
        self.item = nn.Embedding(max(n_items, 2), d, padding_idx=PAD)
        self.user = nn.Embedding(max(n_users, 2), d, padding_idx=PAD)
        self.category = nn.Embedding(self.n_categories, d)
        self.null_hist = nn.Parameter(torch.zeros(d))  # an always-present history slot: empty histories stay finite
        self.hist_proj = nn.Linear(d, d)
        self.mix = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, d))
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.unk_rate = unk_rate
        self.d = d
        for emb in (self.item, self.user, self.category):
            nn.init.normal_(emb.weight, std=0.05)

    def _unk(self, idx: torch.Tensor) -> torch.Tensor:
        if not self.training or self.unk_rate <= 0:
            return idx
        drop = (torch.rand(idx.shape, device=idx.device) < self.unk_rate) & (idx != PAD)
        return torch.where(drop, torch.full_like(idx, UNK), idx)

    def forward(self, batch: RequestBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (user (B, d), candidates (B, N, d))."""
        n_item = self.item.num_embeddings
        cand_idx = in_table(self._unk(batch.candidates), n_item)
        hist_idx = in_table(batch.history, n_item)
        user_idx = in_table(self._unk(batch.user), self.user.num_embeddings)
        cat = in_table(batch.category, self.n_categories, 0)

        cand = self.item(cand_idx) + self.category(cat)  # (B, N, d)
        hist = self.item(hist_idx)  # (B, H, d)
        hist_mask = batch.history != PAD  # (B, H)
        user = self.user(user_idx)  # (B, d)

        # Target attention: each candidate reads the history items most similar to it.
        null = self.null_hist.expand(hist.shape[0], 1, -1)
        keys = torch.cat([null, hist], dim=1)  # (B, 1 + H, d)
        kmask = torch.cat([torch.ones_like(hist_mask[:, :1]), hist_mask], dim=1)  # (B, 1 + H)
        att = torch.einsum("bnd,bhd->bnh", cand, self.hist_proj(keys)) / math.sqrt(self.d)
        att = att.masked_fill(~kmask[:, None, :], float("-inf")).softmax(-1)  # (B, N, 1 + H)
        read = torch.einsum("bnh,bhd->bnd", att, keys)  # (B, N, d)

        hist_mean = (hist * hist_mask[..., None]).sum(1) / hist_mask.sum(1, keepdim=True).clamp(min=1)  # (B, d)
        user_ctx = user + hist_mean  # (B, d)
        feats = torch.cat([cand, read, cand * user_ctx[:, None, :]], dim=-1)  # (B, N, 3d)
        cand_vec = self.norm(cand + self.mix(feats))
        return self.drop(user_ctx), self.drop(cand_vec)


N_ITEM_FEATURES = 4  # history similarity (raw and z-scored within the request), log popularity, CTR


class ItemFeatures(nn.Module):
    """Per-candidate collaborative statistics, the ones the heuristic policies are fitted from
    (`policies.fit_heuristics`, copied in by `set_item_features`): logged lists label only L
    items per request, these summarise every training positive, so a model judges an unshown
    candidate from more than its id embedding. Tables are buffers indexed by item (saved with
    the model; zeros, no signal, until filled); ids beyond them (new items) get zeros."""

    def __init__(self, n_items: int, dim: int):
        super().__init__()
        v = max(n_items, 2)
        self.register_buffer("feat_emb", torch.zeros(v, dim))  # (V, e) low-rank item vectors
        self.register_buffer("feat_pop", torch.zeros(v))  # (V,) positive count
        self.register_buffer("feat_ctr", torch.zeros(v))  # (V,) smoothed CTR

    @staticmethod
    def _look(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        inside = idx < table.shape[0]
        out = table[torch.where(inside, idx, torch.zeros_like(idx))]
        return out * inside.reshape(*inside.shape, *([1] * (out.dim() - inside.dim()))).to(out.dtype)

    def forward(self, batch: RequestBatch) -> torch.Tensor:
        """-> (B, N, 4): cosine with the mean of the user's history in the low-rank item space,
        the same z-scored over the request's candidates (which of them fits this user best),
        log(1 + popularity) and CTR."""
        sim = history_similarity_scores(self.feat_emb, batch)  # (B, N): the history policy's own score
        m = batch.cand_mask.to(sim.dtype)
        n = m.sum(1, keepdim=True).clamp(min=1)
        mean = (sim * m).sum(1, keepdim=True) / n
        std = (((sim - mean) * m) ** 2).sum(1, keepdim=True).div(n).sqrt()
        z = (sim - mean) / (std + 1e-3) * m
        pop = torch.log1p(self._look(self.feat_pop, batch.candidates))
        return torch.stack([sim, z, pop, self._look(self.feat_ctr, batch.candidates)], dim=-1)


def set_item_features(model: nn.Module, popularity: torch.Tensor, ctr: torch.Tensor, item_emb: torch.Tensor) -> bool:
    """Copy heuristic statistics ((V,), (V,), (V, e) by item index, `policies.HeuristicStats`)
    into every ItemFeatures inside `model`. -> False when it has none. Rows by item index;
    items beyond either table get no statistics. A width that differs is a ValueError."""
    mods = [m for m in model.modules() if isinstance(m, ItemFeatures)]
    with torch.no_grad():
        for m in mods:
            for buf, t in ((m.feat_pop, popularity), (m.feat_ctr, ctr), (m.feat_emb, item_emb)):
                if tuple(t.shape[1:]) != tuple(buf.shape[1:]):
                    raise ValueError(f"item features: statistics of shape {tuple(t.shape)}, the model was built "
                                     f"for {tuple(buf.shape)}")
                n = min(len(t), len(buf))
                buf.zero_()
                buf[:n] = t[:n].to(buf.dtype)
    return bool(mods)


def same_category_and_cosine(category: torch.Tensor, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """category (..., K) int (0 = unknown, never "the same"), vectors (..., K, d) -> (..., K, K)
    each: 1.0 where items i and j share a known category, and the cosine of their vectors. The
    pair inputs of the reward model's pairwise term and of the generator's list-context term."""
    same = ((category[..., :, None] == category[..., None, :]) & (category[..., :, None] > 0)).to(vectors.dtype)
    unit = F.normalize(vectors, dim=-1)
    return same, unit @ unit.transpose(-1, -2)


def gather_positions(x: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """x (B, N, d), lists (B, G, L) positions (-1 allowed) -> (B, G, L, d), zeros at -1."""
    b, g, l = lists.shape
    idx = lists.clamp(min=0).reshape(b, g * l, 1).expand(-1, -1, x.shape[-1])
    out = torch.gather(x, 1, idx).reshape(b, g, l, x.shape[-1])
    return out * (lists >= 0)[..., None].to(out.dtype)
