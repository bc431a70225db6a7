"""Rated or clicked interactions -> requests (history, shown slate, labels, candidates), the
first half of the protocol (`goalrank_core.protocol.make_splits`; docs/protocol.md has every
choice). Explicit ratings (MovieLens) go through `explicit_requests`, implicit feedback
(Amazon-Book, `RawData.implicit`) through `implicit_requests`; both return one impressions
table per split and their statistics.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from goalrank_core.config_sections import ProtocolConfig
from goalrank_core.datasets.registry import RawData
from goalrank_core.errors import GoalRankInputError
from goalrank_core.retriever import Retriever, fit_retriever
from goalrank_core.schemas import IMPRESSIONS
from goalrank_core.splits import SPLITS


# ---------------------------------------------------------------- helpers


def kcore(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """(E,) bool mask keeping events whose user and item both have >= k events, iterated to a
    fixed point (dropping a user can push an item under k and back)."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep
    _, u = np.unique(users, return_inverse=True)
    _, i = np.unique(items, return_inverse=True)
    while True:
        cu = np.bincount(u[keep], minlength=u.max() + 1)
        ci = np.bincount(i[keep], minlength=i.max() + 1)
        new = keep & (cu[u] >= k) & (ci[i] >= k)
        if new.sum() == keep.sum():
            return new
        keep = new


def _gather(values: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate values[s:s+n] for each (s, n): returns (flat values, (R+1,) offsets)."""
    lengths = np.asarray(lengths, np.int64)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    idx = np.repeat(np.asarray(starts, np.int64) - offsets[:-1], lengths) + np.arange(offsets[-1])
    return values[idx], offsets


def _split_lists(flat: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, offsets[1:-1]) if len(offsets) > 1 else []


def _list_array(rows: np.ndarray, dtype: pa.DataType = pa.int64()) -> pa.Array:
    """(R, W) array with -1 (or NaN for floats) padding on the right -> list array without it."""
    valid = rows >= 0 if rows.dtype.kind == "i" else ~np.isnan(rows)
    offsets = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(valid.sum(1), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(rows[valid], type=dtype))


def _flat_list_array(flat: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(flat, type=pa.int64()))


def _subsample_users(users: np.ndarray, max_users: int, seed: int) -> np.ndarray:
    """(E,) mask keeping `max_users` users drawn by seed (all when 0 or fewer exist)."""
    uniq = np.unique(users)
    if max_users <= 0 or len(uniq) <= max_users:
        return np.ones(len(users), dtype=bool)
    chosen = np.random.default_rng(seed).choice(uniq, size=max_users, replace=False)
    return np.isin(users, chosen)


def _rank_union(retriever: Retriever, history: list[np.ndarray], exclude: list[np.ndarray], shown: np.ndarray,
                k: int, pool: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For a chunk of B requests: the (B, L + k) union of the shown items and the top-k
    retrieved (excluded items never retrieved), ordered by retriever score (ties by id),
    -1 padded on the right; and, when pool > 0, the (B, pool) top retrieved ids in order
    (the implicit protocol draws negatives from it)."""
    s = torch.from_numpy(retriever.scores(history))  # (B, I)
    cols = retriever.index(np.maximum(shown, 0))
    sh_val = torch.gather(s, 1, torch.from_numpy(np.maximum(cols, 0))).numpy()  # (B, L)
    sh_val = np.where((cols >= 0) & (shown >= 0), sh_val, -np.inf)
    rows = np.repeat(np.arange(len(exclude)), [len(e) for e in exclude])
    ecols = retriever.index(np.concatenate(exclude) if exclude else np.zeros(0, np.int64))
    s[torch.from_numpy(rows[ecols >= 0]), torch.from_numpy(ecols[ecols >= 0])] = -np.inf
    kk = min(max(k, pool), s.shape[1])
    val, idx = torch.topk(s, kk, dim=1)  # (B, kk)
    val, idx = val.numpy(), idx.numpy()
    top = np.where(np.isfinite(val), retriever.item_ids[idx], -1)
    pooled = top[:, :pool] if pool else None
    ids = np.concatenate([shown, top[:, :k]], axis=1)
    vals = np.concatenate([sh_val, val[:, :k]], axis=1)
    pad = ids < 0
    order = np.lexsort((ids, -vals, pad), axis=-1)  # pad last, then score desc, then id
    return np.take_along_axis(np.where(pad, -1, ids), order, axis=1), pooled


def _shuffle_rows(cand: np.ndarray, shown: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Seeded random order within each candidate row (padding stays last). Score order would
    leak which items were shown: they are the user's real items, not the retriever's top, so
    they mostly score below the retrieved ones. Returns the share of shown items that sat in
    the last L score-ordered slots (recorded in stats as evidence)."""
    n_real = (cand >= 0).sum(1, keepdims=True)
    pos = np.arange(cand.shape[1])[None, :]
    tail = (pos >= n_real - shown.shape[1]) & (cand >= 0)
    is_shown = (cand[:, :, None] == shown[:, None, :]).any(-1) & (cand >= 0)
    share = float((tail & is_shown).sum() / max(is_shown.sum(), 1))
    order = np.argsort(np.where(cand >= 0, rng.random(cand.shape), np.inf), axis=1, kind="stable")
    return np.take_along_axis(cand, order, 1), share


def _table(user, slate, ts, hist_flat, hist_off, cand, shown, labels, split_of) -> dict[str, pa.Table]:
    rid = pa.array([f"u{u}-s{s}" for u, s in zip(user.tolist(), slate.tolist())], pa.string())
    full = pa.table(
        {
            "request_id": rid,
            "user_id": pa.array(user, pa.int64()),
            "timestamp": pa.array(ts, pa.int64()),
            "history": _flat_list_array(hist_flat, hist_off),
            "candidates": _list_array(cand),
            "shown": _list_array(shown),
            "labels": _list_array(labels, pa.float32()),
        }
    ).cast(IMPRESSIONS)
    return {name: full.filter(pa.array(split_of == j)) for j, name in enumerate(SPLITS)}


# ---------------------------------------------------------------- explicit ratings


def explicit_requests(raw: RawData, cfg: ProtocolConfig, chunk: int) -> tuple[dict[str, pa.Table], dict]:
    r = raw.ratings
    u, i = r.column("user_id").to_numpy(), r.column("item_id").to_numpy()
    rating, t = r.column("rating").to_numpy(), r.column("timestamp").to_numpy()
    order = np.lexsort((i, t, u))  # per user by time; same-second ties by item id (deterministic)
    u, i, rating, t = u[order], i[order], rating[order], t[order]
    first = np.ones(len(u), bool)  # a re-rated item keeps its first rating
    key_order = np.lexsort((np.arange(len(u)), i, u))
    dup = np.zeros(len(u), bool)
    dup[key_order[1:]] = (u[key_order[1:]] == u[key_order[:-1]]) & (i[key_order[1:]] == i[key_order[:-1]])
    first &= ~dup
    keep = first.copy()
    keep[first] = kcore(u[first], i[first], cfg.min_core)
    keep[keep] = _subsample_users(u[keep], cfg.max_users, cfg.seed)
    u, i, rating, t = u[keep], i[keep], rating[keep], t[keep]
    if len(u) == 0:
        raise GoalRankInputError(f"{raw.name}: no ratings left after the {cfg.min_core}-core filter")

    L, H = cfg.slate_len, cfg.history_len
    users, start, count = np.unique(u, return_index=True, return_counts=True)
    n_slates = count // L
    ok = n_slates >= 3  # train, valid and test need a slate each
    skip = count - n_slates * L  # oldest ratings that form no slate
    pos_in_user = np.arange(len(u)) - np.repeat(start, count)
    user_idx = np.repeat(np.arange(len(users)), count)
    slate_of = np.where(pos_in_user >= skip[user_idx], (pos_in_user - skip[user_idx]) // L, -1)  # (E,)
    split_ev = np.where(slate_of < 0, 0, np.clip(slate_of - (n_slates[user_idx] - 3), 0, 2))  # 0 train, 1 valid, 2 test
    positive = rating >= cfg.positive_rating

    # Retriever: train-period ratings (any rating: what the user was exposed to), never valid/test.
    fit_mask = ok[user_idx] & (split_ev == 0)
    retriever = fit_retriever(cfg.retriever, u[fit_mask], i[fit_mask], seed=cfg.seed)

    # Requests: one per (user, slate) for users with >= 3 slates.
    ru = np.repeat(np.flatnonzero(ok), n_slates[ok])  # (R,) user index
    rs = np.arange(len(ru)) - np.repeat(np.cumsum(n_slates[ok]) - n_slates[ok], n_slates[ok])  # slate number
    ev0 = start[ru] + skip[ru] + rs * L  # (R,) first event of each slate
    shown = i[ev0[:, None] + np.arange(L)]  # (R, L) in time order
    labels = positive[ev0[:, None] + np.arange(L)].astype(np.float32)
    split_of = np.clip(rs - (n_slates[ru] - 3), 0, 2)

    # History: the user's positives strictly before the slate, last H.
    pos_events = np.flatnonzero(positive)
    cum_pos = np.concatenate([[0], np.cumsum(positive)])  # positives before event e = cum_pos[e]
    n_before = cum_pos[ev0] - cum_pos[start[ru]]
    h_len = np.minimum(n_before, H)
    h_flat, h_off = _gather(i[pos_events], cum_pos[ev0] - h_len, h_len)
    # Exclusion: everything the user rated up to the end of the slate.
    ex_flat, ex_off = _gather(i, start[ru], ev0 + L - start[ru])

    hist, excl = _split_lists(h_flat, h_off), _split_lists(ex_flat, ex_off)
    cand = np.full((len(ru), cfg.n_candidates), -1, np.int64)
    for a in range(0, len(ru), chunk):
        b = min(a + chunk, len(ru))
        cand[a:b], _ = _rank_union(retriever, hist[a:b], excl[a:b], shown[a:b], cfg.n_candidates - L)
    cand, tail_share = _shuffle_rows(cand, shown, np.random.default_rng(cfg.seed))
    tables = _table(users[ru], rs, t[ev0], h_flat, h_off, cand, shown, labels, split_of)
    stats = dict(users=int(ok.sum()), items=int(len(np.unique(i[ok[user_idx]]))), events=int(ok[user_idx].sum()),
                 retriever_events=int(fit_mask.sum()), positive_rating=cfg.positive_rating,
                 shown_in_score_tail=round(tail_share, 4))
    return tables, stats


# ---------------------------------------------------------------- implicit feedback


def _implicit_slates(retriever: Retriever, hist: list[np.ndarray], excl: list[np.ndarray], pos_items: np.ndarray,
                     clicked: list[np.ndarray], n_pos: np.ndarray, cfg: ProtocolConfig,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One chunk of implicit requests: (n, P) positives -> shown (n, L), labels (n, L), candidates (n, N).
    Negatives are unclicked items among the first `negative_pool` eligible retrieved ones."""
    n, L, P, k = len(pos_items), cfg.slate_len, cfg.implicit_positives, cfg.n_candidates - cfg.slate_len
    ex = [np.concatenate([e, p[p >= 0]]) for e, p in zip(excl, pos_items)]
    _, pool = _rank_union(retriever, hist, ex, pos_items, 0, pool=cfg.negative_pool + k + L)
    rows = np.repeat(np.arange(n), [len(c) for c in clicked])
    ever = np.isin(pool, -1)  # (n, T)
    if len(rows):
        key_pool = (np.arange(n)[:, None] * (retriever.item_ids.max() + 2) + pool + 1)
        key_click = rows * (retriever.item_ids.max() + 2) + np.concatenate(clicked) + 1
        ever |= np.isin(key_pool, key_click)
    eligible = ~ever & (np.cumsum(~ever, axis=1) <= cfg.negative_pool)
    draw = np.where(eligible, rng.random(pool.shape), np.inf)
    pick = np.argsort(draw, axis=1, kind="stable")[:, : L]  # best L draws per row
    n_neg = L - n_pos
    take = (np.arange(L) < n_neg[:, None]) & np.isfinite(np.take_along_axis(draw, pick, 1))
    negs = np.where(take, np.take_along_axis(pool, pick, 1), -1)  # (n, L)
    slate = np.concatenate([pos_items, negs], axis=1)  # (n, P + L)
    lab = np.concatenate([np.ones((n, P), np.float32), np.zeros((n, L), np.float32)], axis=1)
    perm = np.argsort(np.where(slate >= 0, rng.random(slate.shape), np.inf), axis=1, kind="stable")[:, :L]
    sl = np.take_along_axis(slate, perm, 1)
    labels = np.where(sl >= 0, np.take_along_axis(lab, perm, 1), np.nan)
    # Further candidates: the top retrieved items not shown (they may include future clicks: unlabelled).
    chosen = np.zeros(pool.shape, bool)
    np.put_along_axis(chosen, pick, take, axis=1)
    rest = np.where(chosen | (pool < 0), -1, pool)
    rest = np.take_along_axis(rest, np.argsort(rest < 0, axis=1, kind="stable"), 1)[:, :k]  # keep order, drop gaps
    ids = np.concatenate([sl, rest], axis=1)
    scores = retriever.score_items(hist, np.maximum(ids, 0))
    pad = ids < 0
    order = np.lexsort((ids, -np.where(pad, -np.inf, scores), pad), axis=-1)
    cand = np.full((n, cfg.n_candidates), -1, np.int64)
    cand[:, : ids.shape[1]] = np.take_along_axis(np.where(pad, -1, ids), order, 1)[:, : cfg.n_candidates]
    return sl, labels, cand


def implicit_requests(raw: RawData, cfg: ProtocolConfig, chunk: int) -> tuple[dict[str, pa.Table], dict]:
    """Amazon-Book has positives only, no ratings and no time. Per user, the train line's order
    stands in for time: it is cut into chunks of P = implicit_positives consecutive positives
    (oldest `n mod P` only history); the last chunk is valid, earlier ones train; the test slate
    holds the user's first P test.txt items. Each slate is completed to L items with L - P
    unclicked negatives drawn (seeded) from the retriever's top `negative_pool` items the user
    never interacted with (in train or test), then shuffled (seeded) into a display order.
    Candidates = shown + (N - L) further retrieved items, ordered by retriever score."""
    tr, te = raw.ratings, raw.test if raw.test is not None else raw.ratings.slice(0, 0)
    u = np.concatenate([tr.column("user_id").to_numpy(), te.column("user_id").to_numpy()])
    i = np.concatenate([tr.column("item_id").to_numpy(), te.column("item_id").to_numpy()])
    t = np.concatenate([tr.column("timestamp").to_numpy(), te.column("timestamp").to_numpy()])
    is_test = np.concatenate([np.zeros(tr.num_rows, bool), np.ones(te.num_rows, bool)])
    order = np.lexsort((t, is_test, u))
    u, i, t, is_test = u[order], i[order], t[order], is_test[order]
    key_order = np.lexsort((np.arange(len(u)), i, u))  # drop repeats of (user, item): first wins
    dup = np.zeros(len(u), bool)
    dup[key_order[1:]] = (u[key_order[1:]] == u[key_order[:-1]]) & (i[key_order[1:]] == i[key_order[:-1]])
    keep = ~dup
    keep[keep] = kcore(u[keep], i[keep], cfg.min_core)
    keep[keep] = _subsample_users(u[keep], cfg.max_users, cfg.seed)
    u, i, t, is_test = u[keep], i[keep], t[keep], is_test[keep]

    L, H, P = cfg.slate_len, cfg.history_len, cfg.implicit_positives
    users, start, count = np.unique(u, return_index=True, return_counts=True)
    n_train = np.bincount(np.searchsorted(users, u[~is_test]), minlength=len(users))
    n_test = count - n_train
    n_chunks = n_train // P
    ok = (n_chunks >= 2) & (n_test >= 1)
    skip = n_train - n_chunks * P
    user_idx = np.repeat(np.arange(len(users)), count)
    pos_in_user = np.arange(len(u)) - start[user_idx]
    chunk_of = np.where(is_test, -2, np.where(pos_in_user >= skip[user_idx], (pos_in_user - skip[user_idx]) // P, -1))
    fit_mask = ok[user_idx] & ~is_test & (chunk_of < n_chunks[user_idx] - 1)  # never the valid chunk or test
    if not fit_mask.any():
        raise GoalRankInputError(f"{raw.name}: no user has enough interactions after the {cfg.min_core}-core filter")
    retriever = fit_retriever(cfg.retriever, u[fit_mask], i[fit_mask], seed=cfg.seed)

    # Requests: n_chunks per user (train..., valid) plus one test slate.
    okn = np.flatnonzero(ok)
    per = n_chunks[okn] + 1
    ru = np.repeat(okn, per)
    rs = np.arange(len(ru)) - np.repeat(np.cumsum(per) - per, per)
    test_req = rs == n_chunks[ru]
    split_of = np.where(test_req, 2, np.where(rs == n_chunks[ru] - 1, 1, 0))
    ev0 = np.where(test_req, start[ru] + n_train[ru], start[ru] + skip[ru] + rs * P)
    n_pos = np.where(test_req, np.minimum(n_test[ru], P), P)
    pos_items = np.where(np.arange(P) < n_pos[:, None], i[np.minimum(ev0[:, None] + np.arange(P), len(i) - 1)], -1)  # (R, P)
    h_len = np.minimum(ev0 - start[ru], H)  # every earlier train event is a positive
    h_flat, h_off = _gather(i, ev0 - h_len, h_len)
    ex_flat, ex_off = _gather(i, start[ru], ev0 - start[ru])  # all earlier positives
    a_flat, a_off = _gather(i, start[ru], count[ru])  # every item the user ever clicked
    hist, excl, clicked = _split_lists(h_flat, h_off), _split_lists(ex_flat, ex_off), _split_lists(a_flat, a_off)

    rng = np.random.default_rng(cfg.seed)
    k = cfg.n_candidates - L
    shown = np.full((len(ru), L), -1, np.int64)
    labels = np.full((len(ru), L), np.nan, np.float32)
    cand = np.full((len(ru), cfg.n_candidates), -1, np.int64)
    for a in range(0, len(ru), chunk):
        b = min(a + chunk, len(ru))
        shown[a:b], labels[a:b], cand[a:b] = _implicit_slates(retriever, hist[a:b], excl[a:b], pos_items[a:b],
                                                              clicked[a:b], n_pos[a:b], cfg, rng)
    cand, tail_share = _shuffle_rows(cand, shown, rng)
    tables = _table(users[ru], rs, t[np.minimum(ev0, len(t) - 1)], h_flat, h_off, cand, shown, labels, split_of)
    stats = dict(users=int(ok.sum()), items=int(len(np.unique(i[ok[user_idx]]))), events=int(ok[user_idx].sum()),
                 retriever_events=int(fit_mask.sum()), implicit_positives=P, negative_pool=cfg.negative_pool,
                 shown_in_score_tail=round(tail_share, 4))
    return tables, stats
