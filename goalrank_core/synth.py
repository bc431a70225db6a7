"""Seeded synthetic impression logs whose value depends on a list's composition.

World: users and items live in a d-dim taste space; items cluster by category (an item's
vector is its category's centre plus noise), so a user's best items tend to share a category.
The click logit of item i at position p of a list shown to user u is

    a(u, i) - pos_bias[p] - gamma * (# items before p in the list with i's category)

so a second item of a category is worth less than it would be alone. A point-wise sort by
a(u, i) stacks one category and loses to a list that mixes categories: list-wise models have
something to learn that point-wise ones cannot.

Raw item ids are `ITEM_ID_OFFSET + index` and user ids `index`, so raw ids are never confused
with positions or vocabulary indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from goalrank_core.errors import GoalRankInputError
from goalrank_core.schemas import ITEMS, impressions_schema

ITEM_ID_OFFSET = 1000
DAY = 86400
T0 = 1_700_006_400  # 2023-11-15 00:00:00 UTC: synthetic logs start here


@dataclass
class SynthWorld:
    user_vec: np.ndarray  # (U, d) float64
    item_vec: np.ndarray  # (I, d) float64
    item_bias: np.ndarray  # (I,) float64
    category: np.ndarray  # (I,) int64 in [1, C]
    pos_bias: np.ndarray  # (L,) float64, increasing: later positions are seen less
    gamma: float  # penalty per earlier same-category item in the list

    @property
    def item_ids(self) -> np.ndarray:
        return np.arange(len(self.item_bias), dtype=np.int64) + ITEM_ID_OFFSET

    def _items(self, lists: np.ndarray) -> np.ndarray:
        idx = np.asarray(lists, np.int64) - ITEM_ID_OFFSET
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.item_bias)):
            bad = np.asarray(lists).ravel()[np.flatnonzero((idx.ravel() < 0) | (idx.ravel() >= len(self.item_bias)))[0]]
            raise GoalRankInputError(f"synthetic world: item id {bad} is not one of its items")
        return idx

    def affinity(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """(B,) users, (B, M) raw item ids -> (B, M) point-wise logit a(u, i)."""
        u = np.asarray(user_ids, np.int64)
        i = self._items(item_ids)
        return np.einsum("bd,bmd->bm", self.user_vec[u], self.item_vec[i]) + self.item_bias[i]

    def click_probs(self, user_ids: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """(B,) user ids, (B, L) raw item ids in display order -> (B, L) click probabilities.
        L may be at most len(pos_bias)."""
        lists = np.asarray(lists, np.int64)
        L = lists.shape[1]
        if L > len(self.pos_bias):
            raise GoalRankInputError(f"synthetic world: lists of {L} items, world built for at most {len(self.pos_bias)}")
        cat = self.category[self._items(lists)]  # (B, L)
        same = (cat[:, :, None] == cat[:, None, :]) & np.tri(L, k=-1, dtype=bool)[None]  # (B, L, L): j < p, same category
        logit = self.affinity(user_ids, lists) - self.pos_bias[None, :L] - self.gamma * same.sum(-1)
        return 1.0 / (1.0 + np.exp(-logit))

    def sample_clicks(self, rng: np.random.Generator, user_ids: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """(B,) users, (B, L) lists -> (B, L) Bernoulli clicks (independent given the list)."""
        return rng.random(np.shape(lists)) < self.click_probs(user_ids, lists)

    def list_value(self, user_ids: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """(B,) users, (B, L) lists -> (B,) true expected clicks of each list."""
        return self.click_probs(user_ids, lists).sum(-1)


def make_world(n_users: int, n_items: int, n_categories: int = 8, dim: int = 8, slate_len: int = 6,
               gamma: float = 1.5, seed: int = 0) -> SynthWorld:
    if n_users < 1 or n_items < 1 or n_categories < 1:
        raise GoalRankInputError(f"synth: need users, items and categories >= 1, got {n_users}, {n_items}, {n_categories}")
    user_vec, item_vec, item_bias, category = taste_space(n_users, n_items, n_categories, dim, seed)
    pos_bias = 0.15 * np.arange(slate_len)
    return SynthWorld(user_vec, item_vec, item_bias, category, pos_bias, gamma)


def taste_space(n_users: int, n_items: int, n_categories: int, dim: int, seed: int):
    """Seeded users and category-clustered items -> ((U, d) users, (I, d) items, (I,) item
    bias, (I,) int64 category in [1, C])."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (n_categories, dim))
    category = rng.integers(0, n_categories, n_items)
    item_vec = centres[category] + 0.35 * rng.normal(0.0, 1.0, (n_items, dim))
    user_vec = 0.6 * rng.normal(0.0, 1.0, (n_users, dim))
    item_bias = rng.normal(-1.0, 0.5, n_items)
    return user_vec, item_vec, item_bias, category.astype(np.int64) + 1


def _list_column(x: np.ndarray, typ=pa.int64()) -> pa.Array:
    """(R, K) array -> list<typ> column."""
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), typ), x.shape[1]).cast(pa.list_(typ))


def _histories(user_step: np.ndarray, shown: np.ndarray, labels: np.ndarray, history_len: int) -> pa.Array:
    """(R,) request index within its user (rows user-major, time order within), (R, L) shown and
    labels -> list column of each request's history: the user's earlier clicks, last `history_len`."""
    R, slate_len = shown.shape
    flat_items, flat_click = shown.ravel(), labels.ravel() > 0
    clicked_items = flat_items[flat_click]
    cum = np.concatenate([[0], np.cumsum(flat_click)])  # clicks before flat position e
    first_of_user = (np.arange(R) - user_step) * slate_len
    n_before = cum[np.arange(R) * slate_len] - cum[first_of_user]
    h_len = np.minimum(n_before, history_len)
    h_start = cum[np.arange(R) * slate_len] - h_len
    off = np.zeros(R + 1, np.int64)
    np.cumsum(h_len, out=off[1:])
    h_idx = np.repeat(h_start - off[:-1], h_len) + np.arange(off[-1])
    return pa.ListArray.from_arrays(pa.array(off.astype(np.int32)), pa.array(clicked_items[h_idx], pa.int64()))


LOGGERS = ("noisy", "plackett-luce")
MAX_EXACT_ORDERINGS = 5000  # position propensities by enumeration up to this many ordered L-subsets of N


def _n_orderings(n: int, k: int) -> int:
    """Ordered k-subsets of n: n! / (n - k)!."""
    return int(np.prod(np.arange(n - k + 1, n + 1, dtype=np.float64)))


def plackett_luce_log_prob(score: np.ndarray, top: np.ndarray) -> np.ndarray:
    """score (B, N) Plackett-Luce logits, top (B, ..., L) drawn positions, in order -> (B, ...)
    log P(top): sum_k score[top_k] - log sum of exp(score) over the candidates not drawn before k."""
    s = score - score.max(1, keepdims=True)  # (B, N)
    flat = top.reshape(len(top), -1)  # (B, M * L)
    chosen = np.take_along_axis(s, flat, 1).reshape(top.shape)  # (B, ..., L)
    e = np.exp(chosen)
    total = np.exp(s).sum(1).reshape((-1,) + (1,) * (top.ndim - 1))  # (B, 1.., 1)
    drawn_before = np.cumsum(e, -1) - e  # exclusive cumulative sum over positions
    return (chosen - np.log(total - drawn_before)).sum(-1)


def plackett_luce_position_probs(score: np.ndarray, top: np.ndarray) -> np.ndarray:
    """score (B, N), top (B, L) -> (B, L) P(the candidate top[:, j] is drawn at position j), by
    enumerating every ordered L-subset of the N candidates (keep N!/(N-L)! small)."""
    import itertools

    n, k = score.shape[1], top.shape[1]
    perms = np.array(list(itertools.permutations(range(n), k)), np.int64)  # (P, L)
    out = np.empty(top.shape, np.float64)
    for a in range(0, len(score), 256):  # bounds the (b, P, L) intermediates
        b = min(a + 256, len(score))
        prob = np.exp(plackett_luce_log_prob(score[a:b], np.broadcast_to(perms, (b - a, *perms.shape))))  # (b, P)
        hit = perms[None, :, :] == top[a:b, None, :]  # (b, P, L): ordering p puts top[j] at j
        out[a:b] = np.einsum("bp,bpj->bj", prob, hit)
    return out

def log_requests(world, user: np.ndarray, user_step: np.ndarray, ts: np.ndarray, n_candidates: int, slate_len: int,
                 history_len: int, rng: np.random.Generator, prefix: str, logger: str = "noisy",
                 temperature: float = 1.0) -> pa.Table:
    """Logged impressions of a world (anything with `item_ids`, `affinity(users, items)` and
    `sample_clicks(rng, users, lists)`): candidates are N items drawn by affinity (Gumbel top-N
    at temperature 2: relevant, not only the best); the logging policy ignores context and
    shows, with `logger`:
    - "noisy": the top L by affinity + N(0, 1) noise (no propensity: its list probability has
      no closed form);
    - "plackett-luce": L items drawn without replacement with P proportional to
      exp(affinity / temperature) (Gumbel top-L, exactly Plackett-Luce), and the logged list's
      `log_propensity`; with at most MAX_EXACT_ORDERINGS ordered L-subsets of N also the exact
      `position_propensities` (enumerated), the inputs of the off-policy estimators.
    Labels are the world's sampled clicks. Rows are user-major in time order; `user_step` (R,)
    is a request's index within its user. Request ids are f"{prefix}-{user}-{step}". Returns an
    IMPRESSIONS table (with the propensity columns of `impressions_schema`)."""
    if logger not in LOGGERS:
        raise GoalRankInputError(f"synth: logger must be one of {', '.join(LOGGERS)}, got {logger!r}")
    if not temperature > 0:
        raise GoalRankInputError(f"synth: temperature must be > 0, got {temperature}")
    R = len(user)
    cand = np.empty((R, n_candidates), np.int64)
    shown = np.empty((R, slate_len), np.int64)
    labels = np.empty((R, slate_len), np.float32)
    pl = logger == "plackett-luce"
    exact = pl and _n_orderings(n_candidates, slate_len) <= MAX_EXACT_ORDERINGS
    log_prop = np.empty(R, np.float64)
    pos_prop = np.empty((R, slate_len), np.float64)
    all_items = world.item_ids
    n_items = len(all_items)
    for a in range(0, R, 4096):
        b = min(a + 4096, R)
        aff = world.affinity(user[a:b], np.broadcast_to(all_items, (b - a, n_items)))  # (B, I)
        gumbel = -np.log(-np.log(rng.random(aff.shape)))
        c = np.argsort(-(aff / 2.0 + gumbel), axis=1)[:, :n_candidates]  # (B, N) item index
        cand[a:b] = all_items[c]
        score = np.take_along_axis(aff, c, 1)  # (B, N)
        if pl:
            score = score / temperature
            noisy = score - np.log(-np.log(rng.random(c.shape)))  # Gumbel top-L = a Plackett-Luce draw
        else:
            noisy = score + rng.normal(0.0, 1.0, c.shape)
        top = np.argsort(-noisy, axis=1)[:, :slate_len]  # (B, L) positions into the candidates
        shown[a:b] = np.take_along_axis(cand[a:b], top, 1)
        labels[a:b] = world.sample_clicks(rng, user[a:b], shown[a:b])
        if pl:
            log_prop[a:b] = plackett_luce_log_prob(score, top)
        if exact:
            pos_prop[a:b] = plackett_luce_position_probs(score, top)
    history = _histories(user_step, shown, labels, history_len)
    # Candidates in a seeded random order: the logging policy's choice must not show in it.
    cand = np.take_along_axis(cand, np.argsort(rng.random(cand.shape), axis=1), 1)
    extra = {}
    if pl:
        extra["log_propensity"] = pa.array(log_prop)
    if exact:
        extra["position_propensities"] = _list_column(pos_prop, pa.float64())
    return pa.table(
        {
            "request_id": pa.array([f"{prefix}-{u}-{s}" for u, s in zip(user.tolist(), user_step.tolist())], pa.string()),
            "user_id": pa.array(np.asarray(user, np.int64)),
            "timestamp": pa.array(np.asarray(ts, np.int64)),
            "history": history,
            "candidates": _list_column(cand),
            "shown": _list_column(shown),
            "labels": _list_column(labels, pa.float32()),
            **extra,
        }
    ).cast(impressions_schema(list(extra)))


def synth_impressions(n_users: int = 200, n_items: int = 500, requests_per_user: int = 10, slate_len: int = 6,
                      n_candidates: int = 50, n_categories: int = 8, history_len: int = 50, gamma: float = 1.5,
                      days: int = 1, seed: int = 0, world_seed: int | None = None, logger: str = "noisy",
                      temperature: float = 1.0) -> tuple[pa.Table, pa.Table, SynthWorld]:
    """Logged impressions from the world: candidates are N items drawn by affinity (Gumbel
    top-N at temperature 2: relevant, not only the best); the logging policy shows the top L by
    a noisy affinity, ignoring context; labels are Bernoulli clicks. History = the user's
    earlier clicks. Requests are spread evenly over `days` days from T0, in per-user order.
    `world_seed` (default `seed`) fixes the world alone, so logs of several days can share one
    world while their draws differ. `logger`, `temperature`: the logging policy (log_requests;
    "plackett-luce" logs its propensities). Returns (impressions: IMPRESSIONS, with the
    propensity columns of a Plackett-Luce logger, items: ITEMS, world)."""
    if n_candidates > n_items or slate_len > n_candidates:
        raise GoalRankInputError(f"synth: need slate_len <= n_candidates <= n_items, got {slate_len}, {n_candidates}, {n_items}")
    if requests_per_user < 1 or days < 1:
        raise GoalRankInputError(f"synth: requests_per_user and days must be >= 1, got {requests_per_user}, {days}")
    world = make_world(n_users, n_items, n_categories, slate_len=slate_len, gamma=gamma,
                       seed=seed if world_seed is None else world_seed)
    rng = np.random.default_rng(seed + 1)
    R = n_users * requests_per_user
    user = np.repeat(np.arange(n_users, dtype=np.int64), requests_per_user)  # (R,) user-major, time order within
    step = np.arange(R) % requests_per_user
    ts = T0 + (step * days * DAY) // requests_per_user + rng.integers(0, 3600, R) // requests_per_user
    table = log_requests(world, user, step, ts, n_candidates, slate_len, history_len, rng, "synth", logger, temperature)
    items = pa.table({"item_id": pa.array(world.item_ids), "category": pa.array(world.category)}, schema=ITEMS)
    return table, items, world
