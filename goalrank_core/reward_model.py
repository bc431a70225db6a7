"""The list-aware reward model r(u, l): click probability per position of a whole list.

Each list item is its candidate embedding (item, category, target attention over the
user's history; with `context_layers` > 0 then a Transformer over the user and all N
candidates, so an item is judged against what else the request could show, as the
generator's encoder does) plus a position embedding; a Transformer runs over [user token, item 1..L]
with full self-attention, so an item's click probability depends on what is shown before
and after it. The list score is sum_k p_k / log2(k + 2) (DCG weights, k from 0).

It scores any list of positions into the candidates, logged or not; -1 entries (short
lists) are masked out and score 0.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from goalrank_core.batch import RequestBatch
from goalrank_core.config import RewardConfig
from goalrank_core.group import dcg_weights
from goalrank_core.layers import RequestEmbedder, gather_positions, transformer


class RewardModel(nn.Module):
    def __init__(self, cfg: RewardConfig, n_items: int, n_users: int, n_categories: int, slate_len: int):
        super().__init__()
        d = cfg.d_model
        self.cfg, self.slate_len = cfg, slate_len
        self.embed = RequestEmbedder(d, n_items, n_users, n_categories, cfg.dropout)
        self.pos = nn.Embedding(slate_len + 1, d)  # 0 = user token
        # Optional: candidates encoded together first (what else the request could have shown).
        self.context = (transformer(d, cfg.context_layers, cfg.n_heads, cfg.ff_mult, cfg.dropout)
                        if cfg.context_layers > 0 else None)
        self.encoder = transformer(d, cfg.n_layers, cfg.n_heads, cfg.ff_mult, cfg.dropout)
        self.head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 1))
        nn.init.normal_(self.pos.weight, std=0.02)
        self.register_buffer("dcg", dcg_weights(slate_len), persistent=False)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def logits(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """lists (B, G, L) positions (-1 = empty) -> (B, G, L) click logits."""
        b, g, l = lists.shape
        if l > self.slate_len:
            raise ValueError(f"lists have length {l}, the reward model was built for {self.slate_len}")
        user, cand = self.embed(batch)  # (B, d), (B, N, d)
        if self.context is not None:  # once per request, shared by its G lists
            x = torch.cat([user[:, None, :], cand], dim=1)  # (B, 1 + N, d)
            pad = torch.cat([torch.zeros_like(batch.cand_mask[:, :1]), ~batch.cand_mask], dim=1)  # (B, 1 + N)
            h = self.context(x, src_key_padding_mask=pad)  # (B, 1 + N, d)
            user, cand = h[:, 0], h[:, 1:]
        items = gather_positions(cand, lists)  # (B, G, L, d)
        tok = torch.cat([user[:, None, None, :].expand(b, g, 1, -1), items], dim=2)  # (B, G, 1 + L, d)
        tok = tok + self.pos.weight[: l + 1]
        pad = torch.cat([torch.zeros_like(lists[..., :1], dtype=torch.bool), lists < 0], dim=2)  # (B, G, 1 + L)
        h = self.encoder(tok.reshape(b * g, l + 1, -1), src_key_padding_mask=pad.reshape(b * g, l + 1))
        h = h.reshape(b, g, l + 1, -1)[:, :, 1:]  # (B, G, L, d)
        # Skip connection from the item's own encoding keeps the point-wise signal direct.
        return self.head(torch.cat([h, items], dim=-1)).squeeze(-1)

    def forward(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """= logits; training calls the module itself so DDP wrappers sync gradients."""
        return self.logits(batch, lists)

    def click_probs(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """(B, G, L) -> (B, G, L) click probabilities, 0 at -1 entries."""
        return torch.sigmoid(self.logits(batch, lists)) * (lists >= 0).to(torch.float32)

    def score(self, batch: RequestBatch, lists: torch.Tensor) -> torch.Tensor:
        """(B, G, L) -> (B, G) sum_k p_k / log2(k + 2)."""
        p = self.click_probs(batch, lists)
        return (p * self.dcg[: lists.shape[-1]]).sum(-1)

    def bce_loss(self, batch: RequestBatch, lists: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Mean BCE over labelled positions. Defaults to the logged `shown` / `labels`;
        `lists` (B, G, L) and `labels` (B, G, L) score extra (e.g. augmented) lists."""
        if lists is None:
            lists, labels = batch.shown[:, None, :], batch.labels[:, None, :]
        assert labels is not None
        return masked_bce(self(batch, lists), lists, labels)


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
