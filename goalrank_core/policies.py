"""List policies: anything that proposes lists of L candidates for each request.

A policy has a `name`, a default number of lists per request (`lists_per_request`) and
`propose(batch, n_lists, gen) -> (B, n_lists, L)` int64 positions into the candidates:
distinct within a list and only where `cand_mask` is True. L is the width of `batch.shown`
(the data's slate length; a requests table is encoded with an explicit `slate_len`).

The heuristic auxiliary policies here (popularity, CTR, random, MMR diversity, similarity to
history, first-stage order, logged) need only statistics fitted on the training split
(`fit_heuristics`). The neural ones and the Generator-Evaluator live in `baselines.py`;
`build_policy(name, resources)` builds any of them by name.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from goalrank_core.batch import PAD, EncodedRequests, RequestBatch
from goalrank_core.config_sections import PolicyConfig
from goalrank_core.errors import ConfigError, GoalRankInputError

_NEG = -1e30  # stands in for -inf/NaN scores of real candidates, so they still beat padding


@runtime_checkable
class ListPolicy(Protocol):
    name: str
    lists_per_request: int

    def propose(self, batch: RequestBatch, n_lists: int, gen: torch.Generator | None = None) -> torch.Tensor:
        """-> (B, n_lists, L) int64 positions into batch.candidates."""
        ...


# ---------------------------------------------------------------- shared helpers


def slate_len(batch: RequestBatch) -> int:
    return int(batch.shown.shape[1])


def check_enough(mask: torch.Tensor, L: int) -> None:
    """Every request needs at least L real candidates (validation guarantees it upstream;
    this catches hand-built batches before top-k silently picks padding)."""
    count = mask.sum(1)  # (B,)
    short = (count < L).nonzero()
    if len(short):
        row = int(short[0, 0])
        raise GoalRankInputError(f"request row {row} has {int(count[row])} real candidates, fewer than L={L}")


def _clean(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Real candidates get finite scores, padding gets -inf."""
    s = torch.nan_to_num(scores.float(), nan=_NEG, neginf=_NEG, posinf=-_NEG)
    return s.masked_fill(~mask, float("-inf"))


def topk_list(scores: torch.Tensor, mask: torch.Tensor, L: int) -> torch.Tensor:
    """scores (B, N), mask (B, N) -> (B, L) positions of the L best real candidates.
    Ties keep the first-stage order (stable sort), so equal scores are deterministic."""
    check_enough(mask, L)
    order = torch.sort(_clean(scores, mask), dim=1, descending=True, stable=True).indices  # (B, N)
    return order[:, :L].contiguous()


def _uniform(shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Draw where the generator lives, then move: a CPU generator can drive a CUDA batch.
    u = torch.rand(shape, generator=gen, device=gen.device if gen is not None else device)
    return u.to(device)


def plackett_luce_sample(
    scores: torch.Tensor, mask: torch.Tensor, L: int, n: int, gen: torch.Generator | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """n Plackett-Luce lists per request from softmax(scores / temperature), without
    replacement: top-L of scores + Gumbel noise (the Gumbel top-k trick), all at once.
    scores (B, N), mask (B, N) -> (B, n, L)."""
    check_enough(mask, L)
    s = _clean(scores, mask) / temperature  # (B, N)
    u = _uniform((s.shape[0], n, s.shape[1]), gen, s.device).clamp_(1e-12, 1.0 - 1e-7)
    gumbel = -torch.log(-torch.log(u))  # (B, n, N)
    keys = s[:, None, :] + gumbel  # padding stays -inf
    return torch.topk(keys, L, dim=-1).indices  # (B, n, L)


def _repeat(lst: torch.Tensor, n_lists: int) -> torch.Tensor:
    """(B, L) -> (B, n_lists, L): a deterministic policy gives the same list every time."""
    return lst[:, None, :].expand(-1, n_lists, -1).contiguous()


def _lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table (V, ...) indexed by item indices (any shape); indices beyond V (items added to
    the vocabulary after fitting) read row 0, the padding row (zero statistics)."""
    table = table.to(idx.device)
    safe = torch.where(idx < table.shape[0], idx, torch.zeros_like(idx))
    return table[safe]


# ---------------------------------------------------------------- fitted statistics


@dataclass
class HeuristicStats:
    """Per-item statistics from the training split, indexed by item index (PAD/UNK = 0)."""

    popularity: torch.Tensor  # (V,) float32 positive feedback count
    impressions: torch.Tensor  # (V,) float32 times shown
    ctr: torch.Tensor  # (V,) float32 smoothed positives / impressions
    item_emb: torch.Tensor  # (V, d) float32 from a low-rank factorisation of user x item positives

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in ("popularity", "impressions", "ctr", "item_emb")}

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor]) -> "HeuristicStats":
        missing = [k for k in ("popularity", "impressions", "ctr", "item_emb") if k not in d]
        if missing:
            raise GoalRankInputError(f"heuristic statistics: missing tensor(s) {missing}")
        return cls(**{k: d[k] for k in ("popularity", "impressions", "ctr", "item_emb")})


def _positives(train: EncodedRequests) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """-> (shown item indices (R, L), labels (R, L), shown valid (R, L))."""
    valid = train.shown >= 0
    items = np.take_along_axis(train.candidates, np.maximum(train.shown, 0), axis=1)
    return np.where(valid, items, PAD), np.where(valid, train.labels, 0.0), valid


def fit_heuristics(train: EncodedRequests, n_items: int, cfg: PolicyConfig | None = None, seed: int = 0) -> HeuristicStats:
    """Popularity (count of positive feedback), CTR (positives / impressions, shrunk toward
    the global CTR with `cfg.ctr_prior` pseudo-impressions) and item embeddings, all from the
    logged shown lists of the training split. n_items = len(item vocabulary)."""
    cfg = cfg or PolicyConfig()
    if len(train) == 0:
        raise GoalRankInputError("heuristic statistics: the training split has no requests")
    n_items = max(int(n_items), int(train.candidates.max()) + 1, 2)
    items, labels, valid = _positives(train)
    pos = (labels > 0) & valid
    popularity = np.bincount(items[pos], weights=labels[pos].astype(np.float64), minlength=n_items)
    impressions = np.bincount(items[valid], minlength=n_items).astype(np.float64)
    g = popularity.sum() / max(impressions.sum(), 1.0)  # global CTR
    ctr = (popularity + cfg.ctr_prior * g) / (impressions + cfg.ctr_prior)
    popularity[:2] = impressions[:2] = ctr[:2] = 0.0  # PAD and UNK carry no statistics

    # Item embeddings: user x item matrix of positives (history and clicked shown items).
    hist = train.history
    users = np.concatenate([np.repeat(train.user, hist.shape[1])[hist.ravel() >= 2],
                            np.repeat(train.user, items.shape[1])[(pos & (items >= 2)).ravel()]])
    its = np.concatenate([hist.ravel()[hist.ravel() >= 2], items[pos & (items >= 2)]])
    emb = lowrank_item_embeddings(users, its, n_items, cfg.emb_dim, seed)
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return HeuristicStats(f32(popularity), f32(impressions), f32(ctr), emb)


def lowrank_item_embeddings(users: np.ndarray, items: np.ndarray, n_items: int, dim: int, seed: int) -> torch.Tensor:
    """Randomised truncated SVD (a range finder with two power iterations) of the binary
    user x item matrix; item vectors are V * sqrt(S). Seeded, so refits are identical."""
    out = torch.zeros(n_items, dim)
    if len(users) == 0:
        return out
    key = np.unique(users.astype(np.int64) * n_items + items.astype(np.int64))
    u_idx, i_idx = key // n_items, key % n_items
    n_users = int(u_idx.max()) + 1
    m = torch.sparse_coo_tensor(torch.as_tensor(np.stack([u_idx, i_idx])), torch.ones(len(key)),
                                (n_users, n_items), check_invariants=True).coalesce()  # (U, V)
    mt = m.t().coalesce()  # (V, U)
    k = min(dim, n_users, n_items)
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.sparse.mm(m, torch.randn(n_items, k + 8, generator=gen))).Q  # (U, k+8)
    for _ in range(2):
        q = torch.linalg.qr(torch.sparse.mm(m, torch.sparse.mm(mt, q))).Q
    small = torch.sparse.mm(mt, q).t()  # (k+8, V) = Q^T M
    _, s, vh = torch.linalg.svd(small, full_matrices=False)
    s = torch.where(s[:k] > 1e-6 * s[0], s[:k], torch.zeros_like(s[:k]))  # null directions are arbitrary: drop
    out[:, :k] = (vh[:k].t() * s.sqrt()).float()
    out[torch.as_tensor(np.bincount(i_idx, minlength=n_items) == 0)] = 0.0  # items nobody liked (PAD, UNK too) stay zero
    return out


# ---------------------------------------------------------------- score-sort policies


class ScorePolicy:
    """Ranks by a per-candidate score: sorted (deterministic) or, with `sample=True`,
    Plackett-Luce lists from softmax(score / temperature)."""

    def __init__(self, name: str, score_fn: Callable[[RequestBatch], torch.Tensor], sample: bool = False,
                 lists_per_request: int = 1, temperature: float = 1.0):
        self.name, self._score_fn, self.sample = name, score_fn, sample
        self.lists_per_request, self.temperature = lists_per_request, temperature

    def scores(self, batch: RequestBatch) -> torch.Tensor:
        """-> (B, N) float scores (padding arbitrary)."""
        with torch.no_grad():
            return self._score_fn(batch)

    def propose(self, batch: RequestBatch, n_lists: int, gen: torch.Generator | None = None) -> torch.Tensor:
        s, L = self.scores(batch), slate_len(batch)
        if self.sample:
            return plackett_luce_sample(s, batch.cand_mask, L, n_lists, gen, self.temperature)
        return _repeat(topk_list(s, batch.cand_mask, L), n_lists)


def popularity_policy(stats: HeuristicStats) -> ScorePolicy:
    # log1p: same order, but a scale that MMR's min-max normalisation can use.
    return ScorePolicy("popularity", lambda b: torch.log1p(_lookup(stats.popularity, b.candidates)))


def ctr_policy(stats: HeuristicStats) -> ScorePolicy:
    return ScorePolicy("ctr", lambda b: _lookup(stats.ctr, b.candidates))


def first_stage_policy() -> ScorePolicy:
    """The retriever's order: the first L real candidates."""
    return ScorePolicy("first-stage", lambda b: -torch.arange(b.candidates.shape[1], device=b.candidates.device,
                                                               dtype=torch.float32).expand(b.candidates.shape))


def random_policy(lists_per_request: int = 1) -> ScorePolicy:
    """Uniformly random lists: Plackett-Luce over equal scores."""
    return ScorePolicy("random", lambda b: torch.zeros(b.candidates.shape, device=b.candidates.device),
                       sample=True, lists_per_request=lists_per_request)


def history_similarity_scores(item_emb: torch.Tensor, batch: RequestBatch) -> torch.Tensor:
    """(B, N) mean cosine similarity of each candidate to the user's history items (0 for an
    empty history or an item without an embedding)."""
    cand = F.normalize(_lookup(item_emb, batch.candidates), dim=-1)  # (B, N, d)
    hist = F.normalize(_lookup(item_emb, batch.history), dim=-1)  # (B, H, d); PAD row is zero
    hmask = (batch.history != PAD).to(hist.dtype)  # (B, H)
    mean = (hist * hmask[..., None]).sum(1) / hmask.sum(1, keepdim=True).clamp(min=1)  # (B, d)
    return torch.einsum("bnd,bd->bn", cand, mean)  # mean of cosines = cosine with the mean of units


def history_policy(stats: HeuristicStats) -> ScorePolicy:
    return ScorePolicy("history", lambda b: history_similarity_scores(stats.item_emb, b))


# ---------------------------------------------------------------- MMR diversity


class MMRPolicy:
    """Greedy maximal marginal relevance: step t picks argmax of
    lam * rel - (1 - lam) * max similarity to the items already picked, for the whole batch at
    once (L steps of (B, N) work). rel is the relevance policy's score min-max normalised over
    each request's real candidates; similarity is 'category' (same category = 1, category 0 =
    unknown, similar to nothing), 'embedding' (cosine of item embeddings) or 'auto'
    (category when the batch has any category, else embedding)."""

    lists_per_request = 1

    def __init__(self, relevance: ScorePolicy, lam: float = 0.7, item_emb: torch.Tensor | None = None,
                 similarity: str = "auto", name: str = "mmr"):
        if similarity not in ("auto", "category", "embedding"):
            raise ConfigError(f"config 'policies.mmr_similarity' must be auto, category or embedding, got {similarity!r}")
        if similarity == "embedding" and item_emb is None:
            raise GoalRankInputError("MMR over embeddings needs item embeddings")
        self.relevance, self.lam, self.item_emb, self.mode, self.name = relevance, lam, item_emb, similarity, name

    def similarity(self, batch: RequestBatch) -> torch.Tensor:
        """-> (B, N, N) pairwise similarity of the candidates."""
        use_cat = self.mode == "category" or (self.mode == "auto" and (self.item_emb is None or bool((batch.category != 0).any())))
        if use_cat:
            c = batch.category
            return ((c[:, :, None] == c[:, None, :]) & (c != 0)[:, :, None]).float()
        e = F.normalize(_lookup(self.item_emb, batch.candidates), dim=-1)  # (B, N, d)
        return e @ e.transpose(1, 2)

    def propose(self, batch: RequestBatch, n_lists: int, gen: torch.Generator | None = None) -> torch.Tensor:
        mask, L = batch.cand_mask, slate_len(batch)
        check_enough(mask, L)
        rel = _clean(self.relevance.scores(batch), mask)  # (B, N)
        lo = rel.masked_fill(~mask, float("inf")).min(1, keepdim=True).values
        hi = rel.masked_fill(~mask, float("-inf")).max(1, keepdim=True).values
        rel = ((rel - lo) / (hi - lo).clamp(min=1e-12)).masked_fill(~mask, 0.0)  # (B, N) in [0, 1]
        sim = self.similarity(batch)  # (B, N, N)
        rows = torch.arange(len(batch), device=mask.device)
        taken = ~mask.clone()  # (B, N) padding counts as taken
        max_sim = torch.zeros_like(rel)  # (B, N)
        out = torch.empty(len(batch), L, dtype=torch.long, device=mask.device)
        for t in range(L):
            val = (self.lam * rel - (1 - self.lam) * max_sim).masked_fill(taken, float("-inf"))
            pick = val.argmax(1)  # (B,) first maximum: ties keep first-stage order
            out[:, t] = pick
            taken[rows, pick] = True
            max_sim = torch.maximum(max_sim, sim[rows, pick])
        return _repeat(out, n_lists)


# ---------------------------------------------------------------- logged (evaluation only)


class LoggedPolicy:
    """The list that was shown, for evaluation only (needs `shown` in every row)."""

    name, lists_per_request = "logged", 1

    def propose(self, batch: RequestBatch, n_lists: int, gen: torch.Generator | None = None) -> torch.Tensor:
        bad = (batch.shown < 0).any(1).nonzero()
        if len(bad):
            raise GoalRankInputError(f"policy 'logged' needs a full shown list; request row {int(bad[0, 0])} has none")
        return _repeat(batch.shown, n_lists)


class GeneratorPolicy:
    """A generator as a list policy: greedy (one list, repeated) or sampled lists."""

    def __init__(self, model: nn.Module, name: str, sample: bool = False, lists_per_request: int = 1):
        self.model, self.name, self.sample, self.lists_per_request = model, name, sample, lists_per_request

    @torch.no_grad()
    def propose(self, batch: RequestBatch, n_lists: int, gen: torch.Generator | None = None) -> torch.Tensor:
        was = self.model.training
        if was:  # a mode switch walks every submodule (~0.1 ms): serving calls arrive in eval mode
            self.model.eval()
        try:
            if self.sample:
                return self.model.sample(batch, n_lists, gen)
            return self.model.greedy(batch)[:, None, :].expand(-1, n_lists, -1).contiguous()
        finally:
            if was:
                self.model.train()


def propose_all(policies: list[ListPolicy], batch: RequestBatch, gen: torch.Generator | None = None) -> tuple[torch.Tensor, list[str]]:
    """Every policy's default number of lists, concatenated: -> ((B, G, L), G policy names)."""
    lists, names = [], []
    for p in policies:
        lists.append(p.propose(batch, p.lists_per_request, gen))
        names += [p.name] * p.lists_per_request
    return torch.cat(lists, dim=1), names
