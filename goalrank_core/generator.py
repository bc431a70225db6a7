"""The GoalRank generator pi_theta(l | u, V_u): an autoregressive pointer network.

Encoder: the N candidates, each embedded with the user's history (target attention), go
through a Transformer together with a user token, so every candidate is encoded in the
context of the user and of the other candidates. This runs once per request.

Decoder: a small causal Transformer over [user state, chosen item 1, ..., chosen item t]
gives the query for step t + 1; the step is a softmax of query . key(candidate) over the
candidates not yet chosen. The decoder sees what is already in the list (list-aware: it
can learn diversity or complementarity), yet costs only O(L^2) tokens of width d per list
on top of the cached candidate encoding, so a list costs far less than L encoder passes.

Teacher forcing (`log_prob`) runs all G lists and all L steps of a batch at once.
A list entry of -1 marks an unused step (lists shorter than L, e.g. the logged positives
of a request): it contributes 0 to the log-probability.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from goalrank_core.batch import RequestBatch
from goalrank_core.config import GeneratorConfig
from goalrank_core.layers import RequestEmbedder, gather_positions, transformer


class Encoded(NamedTuple):
    """A batch's cached candidate encoding (what inference reuses at every step)."""

    keys: torch.Tensor  # (B, N, d) pointer keys of the candidates
    values: torch.Tensor  # (B, N, d) candidate encodings fed to the decoder once chosen
    user: torch.Tensor  # (B, d) user state: the decoder's start token
    valid: torch.Tensor  # (B, N) bool, real candidates


class GoalRankGenerator(nn.Module):
    def __init__(self, cfg: GeneratorConfig, n_items: int, n_users: int, n_categories: int, slate_len: int):
        super().__init__()
        d = cfg.d_model
        self.cfg, self.slate_len = cfg, slate_len
        self.embed = RequestEmbedder(d, n_items, n_users, n_categories, cfg.dropout)
        self.encoder = transformer(d, cfg.n_layers, cfg.n_heads, cfg.ff_mult, cfg.dropout)
        self.decoder = transformer(d, cfg.decoder_layers, cfg.n_heads, cfg.ff_mult, cfg.dropout)
        self.pos = nn.Embedding(slate_len + 1, d)
        self.key = nn.Linear(d, d)
        self.query = nn.Linear(d, d)
        self.scale = 1.0 / math.sqrt(d)
        nn.init.normal_(self.pos.weight, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- encoder -----------------------------------------------------------------------------

    def encode(self, batch: RequestBatch) -> Encoded:
        user, cand = self.embed(batch)  # (B, d), (B, N, d)
        x = torch.cat([user[:, None, :], cand], dim=1)  # (B, 1 + N, d)
        pad = torch.cat([torch.zeros_like(batch.cand_mask[:, :1]), ~batch.cand_mask], dim=1)  # (B, 1 + N)
        h = self.encoder(x, src_key_padding_mask=pad)  # (B, 1 + N, d)
        return Encoded(keys=self.key(h[:, 1:]), values=h[:, 1:], user=h[:, 0], valid=batch.cand_mask)

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

    def _masked_logits(self, enc: Encoded, q: torch.Tensor, blocked: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """q (B, G, S, d), blocked (B, G, S, N) -> (B, G, S, N) logits, blocked ones at a huge
        negative value (finite, so a request with no choice left gives no NaN)."""
        logits = torch.einsum("bgsd,bnd->bgsn", q, enc.keys) * self.scale / temperature
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
        logp = self._masked_logits(enc, q, before > 0).log_softmax(-1)  # (B, G, L, N)
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
    def _decode(self, batch: RequestBatch, n: int, greedy: bool, generator: torch.Generator | None,
                temperature: float, length: int | None) -> torch.Tensor:
        enc = self.encode(batch)  # once; every step reuses it
        b, nc = enc.keys.shape[:2]
        length = min(length or self.slate_len, nc)
        chosen = torch.empty(b, n, 0, dtype=torch.long, device=enc.keys.device)
        blocked = torch.zeros(b, n, nc, dtype=torch.bool, device=enc.keys.device)
        for _ in range(length):  # L small steps on the cached encoding
            q = self._queries(enc, chosen)[:, :, -1:]  # (B, n, 1, d)
            logits = self._masked_logits(enc, q, blocked[:, :, None, :], temperature)[:, :, 0]  # (B, n, N)
            if greedy:
                nxt = logits.argmax(-1)  # (B, n)
            else:  # Gumbel-max; noise drawn where the generator lives (a CPU one may drive CUDA)
                u = torch.rand(logits.shape, generator=generator,
                               device=generator.device if generator is not None else logits.device)
                gumbel = -torch.log(-torch.log(u.to(logits.device).clamp(1e-12, 1 - 1e-7)))
                nxt = (logits.float() + gumbel).argmax(-1)  # (B, n)
            chosen = torch.cat([chosen, nxt[..., None]], dim=2)
            blocked = blocked.scatter(2, nxt[..., None], True)
        return chosen

    def sample(self, batch: RequestBatch, n: int, generator: torch.Generator | None = None,
               temperature: float = 1.0, length: int | None = None) -> torch.Tensor:
        """-> (B, n, L) positions; no item repeats inside a list. Call under eval() for
        dropout-free samples."""
        return self._decode(batch, n, False, generator, temperature, length)

    def greedy(self, batch: RequestBatch, length: int | None = None) -> torch.Tensor:
        """-> (B, L) positions, the most probable item at every step."""
        return self._decode(batch, 1, True, None, 1.0, length)[:, 0]
