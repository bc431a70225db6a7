"""The known optimum of a simulator world: best lists by search with the true model, a
certified upper bound, exhaustive enumeration for small cases, and normalised true value.

Search works on a per-request permutation `perm` (B, N) of candidate slots, the list being
its first L entries and the unshown candidates the rest. Every move (swap two list
positions, replace a list item by an unshown one, move a list item to another position,
insert an unshown item and drop the last) is a fixed permutation of the N slots, so one
(K, N) move table serves the whole batch: all K neighbours of every request are scored at
once and each request takes its best improving move, until none improves.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from goalrank_core.errors import GoalRankInputError
from goalrank_core.simulator import World, _sigmoid

MAX_EXHAUSTIVE = 200_000  # ordered lists per request that exhaustive_best will enumerate
_CHUNK_ELEMS = 4_000_000  # (lists x L x L) elements scored at once


def list_values(world: World, users: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """(B,) users, (B, K, L) raw ids -> (B, K) expected clicks, scored in memory-bounded chunks."""
    B, K, L = lists.shape
    flat_u = np.repeat(np.asarray(users, np.int64), K)
    flat = lists.reshape(B * K, L)
    out = np.empty(B * K)
    step = max(1, _CHUNK_ELEMS // max(1, L * L))
    for a in range(0, B * K, step):
        out[a:a + step] = world.expected_clicks(flat_u[a:a + step], flat[a:a + step])
    return out.reshape(B, K)


def move_table(n: int, L: int) -> np.ndarray:
    """(K, N) slot permutations: every swap, replacement, reordering and insertion move."""
    ident = np.arange(n)
    moves = []
    for p, q in itertools.combinations(range(n), 2):  # swaps inside the list and list <-> unshown
        if p < L:
            m = ident.copy()
            m[p], m[q] = q, p
            moves.append(m)
    for p in range(L):  # move the item at p to position q
        for q in range(L):
            if abs(p - q) > 1:
                head = [i for i in range(L) if i != p]
                head.insert(q, p)
                moves.append(np.concatenate([head, ident[L:]]))
    for c in range(L, n):  # insert unshown c at q, drop the last list item into c's slot
        for q in range(L - 1):
            head = list(range(L - 1))
            head.insert(q, c)
            rest = ident[L:].copy()
            rest[c - L] = L - 1
            moves.append(np.concatenate([head, rest]))
    return np.asarray(moves, np.int64).reshape(-1, n)


def _take(cand: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """(B, N) raw ids, (B, ..., M) slots -> (B, ..., M) raw ids."""
    B = cand.shape[0]
    return np.take_along_axis(cand, perm.reshape(B, -1), 1).reshape(perm.shape)


def _greedy(world: World, users: np.ndarray, cand: np.ndarray, L: int) -> np.ndarray:
    """(B, N) candidates -> (B, N) perm: each position takes the candidate that maximises the prefix's value."""
    B, N = cand.shape
    perm = np.tile(np.arange(N), (B, 1))
    for p in range(L):
        rest = perm[:, p:]  # (B, N - p) slots still free
        trial = np.concatenate([np.broadcast_to(perm[:, None, :p], (B, N - p, p)), rest[:, :, None]], 2)  # (B, N-p, p+1)
        j = np.argmax(list_values(world, users, _take(cand, trial)), 1)  # (B,)
        rows = np.arange(B)
        perm[rows, p], perm[rows, p + j] = rest[rows, j], perm[rows, p]
    return perm


def _local_search(world: World, users: np.ndarray, cand: np.ndarray, perm: np.ndarray, L: int,
                  max_iter: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-improvement descent over move_table from `perm` -> (perm, (B,) values)."""
    B, N = cand.shape
    moves = move_table(N, L)  # (K, N)
    value = world.expected_clicks(users, _take(cand, perm[:, :L]))
    active = np.arange(B)
    for _ in range(max_iter):
        if not len(active):
            break
        nb = perm[active][:, moves]  # (A, K, N)
        v = list_values(world, users[active], _take(cand[active], nb[:, :, :L]))  # (A, K)
        k = np.argmax(v, 1)
        gain = v[np.arange(len(active)), k] - value[active]
        better = gain > 1e-12
        perm[active[better]] = nb[np.flatnonzero(better), k[better]]
        value[active[better]] = v[better, k[better]]
        active = active[better]
    return perm, value


def best_lists(world: World, user_ids: np.ndarray, candidates: np.ndarray, L: int, restarts: int = 0,
               max_iter: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(B,) users, (B, N) raw candidate ids -> ((B, L) best list found, (B,) its true value).
    Greedy construction then local search; `restarts` more descents from seeded random lists."""
    users = np.asarray(user_ids, np.int64)
    cand = np.asarray(candidates, np.int64)
    if not 1 <= L <= cand.shape[1]:
        raise GoalRankInputError(f"simulator search: need 1 <= L <= N, got L={L}, N={cand.shape[1]}")
    rng = np.random.default_rng(seed)
    best_perm, best_v = _local_search(world, users, cand, _greedy(world, users, cand, L), L, max_iter)
    for _ in range(restarts):
        start = np.argsort(rng.random(cand.shape), axis=1)
        perm, v = _local_search(world, users, cand, start, L, max_iter)
        take = v > best_v
        best_perm[take], best_v[take] = perm[take], v[take]
    return _take(cand, best_perm[:, :L]), best_v


def exhaustive_best(world: World, user_ids: np.ndarray, candidates: np.ndarray, L: int) -> tuple[np.ndarray, np.ndarray]:
    """(B,) users, (B, N) candidates -> ((B, L) optimal list, (B,) optimum) over every ordered list."""
    cand = np.asarray(candidates, np.int64)
    N = cand.shape[1]
    n_lists = int(np.prod(np.arange(N - L + 1, N + 1)))
    if n_lists > MAX_EXHAUSTIVE:
        raise GoalRankInputError(f"simulator: {n_lists} ordered lists per request, more than {MAX_EXHAUSTIVE} to enumerate")
    slots = np.asarray(list(itertools.permutations(range(N), L)), np.int64)  # (P, L)
    lists = cand[:, slots]  # (B, P, L)
    v = list_values(world, np.asarray(user_ids, np.int64), lists)  # (B, P)
    k = np.argmax(v, 1)
    return lists[np.arange(len(cand)), k], v[np.arange(len(cand)), k]


def _position_bounds(world: World, users: np.ndarray, cand: np.ndarray, L: int) -> np.ndarray:
    """(B, N) candidates -> (B, N, L) upper bound on P(click) of candidate c at position p in any
    list: no saturation penalty, the p largest complement bonuses it could have, examined surely."""
    logit = world.affinity(users, cand)[:, :, None] - world.pos_bias[None, None, :L]  # (B, N, L)
    if "pairs" in world.effects:
        idx = world._items(cand)
        B, N = idx.shape
        both = np.concatenate([np.repeat(idx, N, 1)[:, :, None], np.tile(idx, (1, N))[:, :, None]], 2)  # (B, N*N, 2)
        w = world.pair_bonus(both.reshape(B * N * N, 2))[:, 1].reshape(B, N, N)  # (B, N, N) bonus of c after c'
        top = -np.sort(-np.maximum(w, 0.0), axis=2)[:, :, : L - 1]  # (B, N, L-1) largest positive bonuses
        bonus = np.concatenate([np.zeros((B, N, 1)), np.cumsum(top, 2)], 2)[:, :, :L]  # (B, N, L): p earlier items
        logit = logit + bonus
    return _sigmoid(logit)


def upper_bound(world: World, user_ids: np.ndarray, candidates: np.ndarray, L: int) -> np.ndarray:
    """(B,) users, (B, N) candidates -> (B,) a certified upper bound on any list's value: the best
    assignment of distinct candidates to positions under `_position_bounds` (scipy when
    installed, else the smaller of two relaxations of it)."""
    users, cand = np.asarray(user_ids, np.int64), np.asarray(candidates, np.int64)
    W = np.concatenate([_position_bounds(world, users[a:a + 256], cand[a:a + 256], L)
                        for a in range(0, len(cand), 256)] or [np.zeros((0,) + cand.shape[1:] + (L,))])  # (B, N, L)
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # each item at its best position / each position its best item
        by_item = -np.sort(-W.max(2), axis=1)[:, :L].sum(1)
        return np.minimum(by_item, W.max(1).sum(1))
    out = np.empty(len(W))
    for b in range(len(W)):
        r, c = linear_sum_assignment(W[b], maximize=True)
        out[b] = W[b][r, c].sum()
    return out


def random_value(world: World, user_ids: np.ndarray, candidates: np.ndarray, L: int, n_lists: int = 64,
                 seed: int = 0) -> np.ndarray:
    """(B,) users, (B, N) candidates -> (B,) mean value of `n_lists` seeded uniformly random lists:
    an unbiased estimate of a random list's expected value."""
    cand = np.asarray(candidates, np.int64)
    rng = np.random.default_rng(seed)
    slots = np.argsort(rng.random((cand.shape[0], n_lists, cand.shape[1])), axis=2)[:, :, :L]  # (B, n, L)
    return list_values(world, np.asarray(user_ids, np.int64), _take(cand, slots)).mean(1)


@dataclass
class TrueValue:
    """Per-request true values of ranked lists, in the requests table's row order."""
    request_id: np.ndarray  # (R,) str
    value: np.ndarray  # (R,) expected clicks of the ranked list
    random: np.ndarray  # (R,) expected clicks of a uniformly random list (estimate)
    best: np.ndarray  # (R,) best list found (or the ranked list, when better)
    upper: np.ndarray  # (R,) certified upper bound
    normalised: np.ndarray  # (R,) (value - random) / mean(best - random): its mean is the normalised score

    @property
    def score(self) -> float:
        """(mean value - mean random) / (mean best - mean random): random 0, best found 1."""
        return float(self.normalised.mean())


def _requests_arrays(requests: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    from goalrank_core.metrics import _padded

    cand = _padded(requests.column("candidates"))  # (R, N), -1 padded
    if (cand < 0).any():
        raise GoalRankInputError("simulator scoring: every request must have the same number of candidates")
    return requests.column("user_id").to_numpy().astype(np.int64), cand


def normalised_value(world: World, requests: pa.Table, ranked: pa.Table, best: np.ndarray | None = None,
                     n_random: int = 64, seed: int = 0) -> TrueValue:
    """Score a RANKED table against a world on `requests` (requests or impressions of that world;
    each one ranked exactly once). `best` (R,) reuses best-found values of these requests (from
    an earlier call's TrueValue.best), so several policies share one search."""
    from goalrank_core.metrics import _check_ranked

    where, lists = _check_ranked(ranked, requests)  # ranked row -> requests row, (R, W) raw ids
    if (lists < 0).any():
        raise GoalRankInputError("simulator scoring: every ranked list must have the same length")
    ordered = np.empty_like(lists)
    ordered[where] = lists
    users, cand = _requests_arrays(requests)
    L = ordered.shape[1]
    value = world.expected_clicks(users, ordered)
    rand = random_value(world, users, cand, L, n_random, seed)
    found = best_lists(world, users, cand, L, seed=seed)[1] if best is None else np.asarray(best, np.float64)
    found = np.maximum(found, value)
    denom = float((found - rand).mean())
    norm = (value - rand) / denom if denom > 0 else np.full(len(value), np.nan)
    rid = np.asarray(requests.column("request_id").to_pylist(), dtype=object)
    return TrueValue(rid, value, rand, found, upper_bound(world, users, cand, L), norm)
