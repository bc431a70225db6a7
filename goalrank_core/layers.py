"""Building blocks shared by the generator and the reward model: embeddings of a request's
user, history and candidates, and a Transformer stack with the settings we always want.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from goalrank_core.batch import PAD, UNK, RequestBatch


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


def gather_positions(x: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """x (B, N, d), lists (B, G, L) positions (-1 allowed) -> (B, G, L, d), zeros at -1."""
    b, g, l = lists.shape
    idx = lists.clamp(min=0).reshape(b, g * l, 1).expand(-1, -1, x.shape[-1])
    out = torch.gather(x, 1, idx).reshape(b, g, l, x.shape[-1])
    return out * (lists >= 0)[..., None].to(out.dtype)
