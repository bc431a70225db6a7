"""A list-wise user simulator with switchable context effects and an exact list value.

Users and items live in a d-dim taste space; items cluster by category. The point-wise logit
of item i for user u is a(u, i) = u . v_i + bias_i; at position p of a list it becomes

    a(u, i) - pos_bias[p]  +  context(p)

where the context terms are the world's effects (any combination, e.g. "saturation+cascade"):
- saturation: -gamma * (# earlier items of i's category);
- pairs: a sparse seeded set of item pairs, substitutes (w < 0: nearest neighbours in the same
  category) and complements (w > 0: nearest neighbours in other categories); the later item of
  a pair gets +w when the other is earlier in the list;
- cascade: a reader going top-down; after a click she stops with prob s_click * sat(u, i)
  (a relevant item satisfies: sat = sigmoid(sat_slope * (a(u, i) - sat_mid))), after an
  unclicked dull item (attraction < dull_level) with prob s_dull. P(click at p) =
  P(examined p) * attraction(p), computed exactly by a forward recursion.
Without cascade every position is examined and P(click at p) = attraction(p). A list's true
value is its expected number of clicks.

Default strengths are set so that sorting candidates by TRUE a(u, i) reaches at most 0.6 of
the way from a random list to the best list found (bench/simulator.py checks this).
Raw ids as in synth.py: items ITEM_ID_OFFSET + index, users index.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from goalrank_core.errors import GoalRankInputError
from goalrank_core.schemas import ITEMS
from goalrank_core.synth import DAY, ITEM_ID_OFFSET, T0, log_requests, taste_space

EFFECTS = ("saturation", "pairs", "cascade")
FORMAT_VERSION = 1


@dataclass
class Strengths:
    """Context-effect parameters; a switched-off effect ignores its own."""
    gamma: float = 0.7  # saturation: logit penalty per earlier same-category item
    n_sub: int = 10  # pairs: substitutes per item (nearest neighbours, same category)
    n_comp: int = 3  # pairs: complements per item (nearest neighbours, other categories)
    w_sub: float = 2.5  # pairs: mean |w| of a substitute pair (w ~ -w_sub * U(0.5, 1.5))
    w_comp: float = 0.7  # pairs: mean w of a complement pair
    s_click: float = 0.5  # cascade: stop prob after a click on a fully satisfying item
    sat_slope: float = 1.0  # cascade: satisfaction = sigmoid(slope * (a - sat_mid))
    sat_mid: float = 0.0
    s_dull: float = 0.5  # cascade: stop prob after an unclicked dull item
    dull_level: float = 0.2  # cascade: attraction below this is dull


@dataclass
class World:
    effects: tuple[str, ...]
    user_vec: np.ndarray  # (U, d) float64
    item_vec: np.ndarray  # (I, d) float64
    item_bias: np.ndarray  # (I,) float64
    category: np.ndarray  # (I,) int64 in [1, C]
    pos_bias: np.ndarray  # (L,) float64, increasing: later positions are seen less
    pair_key: np.ndarray  # (P,) int64 sorted keys min(i, j) * I + max(i, j) of item indices
    pair_w: np.ndarray  # (P,) float64 bonus to the later item of the pair
    strengths: Strengths = field(default_factory=Strengths)

    # ------------------------------------------------------------ ids

    @property
    def n_items(self) -> int:
        return len(self.item_bias)

    @property
    def n_users(self) -> int:
        return len(self.user_vec)

    @property
    def slate_len(self) -> int:
        return len(self.pos_bias)

    @property
    def item_ids(self) -> np.ndarray:
        return np.arange(self.n_items, dtype=np.int64) + ITEM_ID_OFFSET

    def items_table(self) -> pa.Table:
        return pa.table({"item_id": pa.array(self.item_ids), "category": pa.array(self.category)}, schema=ITEMS)

    def _items(self, ids: np.ndarray) -> np.ndarray:
        idx = np.asarray(ids, np.int64) - ITEM_ID_OFFSET
        bad = (idx < 0) | (idx >= self.n_items)
        if bad.any():
            raise GoalRankInputError(f"simulator world: item id {np.asarray(ids).ravel()[np.flatnonzero(bad.ravel())[0]]} "
                                     "is not one of its items")
        return idx

    def _users(self, user_ids: np.ndarray) -> np.ndarray:
        u = np.asarray(user_ids, np.int64)
        if u.size and (u.min() < 0 or u.max() >= self.n_users):
            raise GoalRankInputError(f"simulator world: user id {u[(u < 0) | (u >= self.n_users)][0]} is not one of its users")
        return u

    # ------------------------------------------------------------ click model

    def affinity(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """(B,) users, (B, M) raw item ids -> (B, M) point-wise logit a(u, i)."""
        u, i = self._users(user_ids), self._items(item_ids)
        return np.einsum("bd,bmd->bm", self.user_vec[u], self.item_vec[i]) + self.item_bias[i]

    def pair_bonus(self, idx: np.ndarray) -> np.ndarray:
        """(B, L) item indices -> (B, L) sum of pair weights of each item with the earlier ones."""
        L = idx.shape[1]
        lo, hi = np.minimum(idx[:, :, None], idx[:, None, :]), np.maximum(idx[:, :, None], idx[:, None, :])
        key = lo * self.n_items + hi  # (B, L, L): [p, q] = pair of item p with item q
        pos = np.minimum(np.searchsorted(self.pair_key, key), max(len(self.pair_key) - 1, 0))
        found = (self.pair_key[pos] == key) if len(self.pair_key) else np.zeros(key.shape, bool)
        w = np.where(found & np.tri(L, k=-1, dtype=bool)[None], self.pair_w[pos] if len(self.pair_w) else 0.0, 0.0)
        return w.sum(-1)

    def _logits(self, user_ids: np.ndarray, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,) users, (B, L) raw ids -> ((B, L) context logit, (B, L) point-wise a(u, i))."""
        lists = np.asarray(lists, np.int64)
        L = lists.shape[1]
        if L > self.slate_len:
            raise GoalRankInputError(f"simulator world: lists of {L} items, world built for at most {self.slate_len}")
        aff = self.affinity(user_ids, lists)
        logit = aff - self.pos_bias[None, :L]
        idx = self._items(lists)
        if "saturation" in self.effects:
            cat = self.category[idx]
            same = (cat[:, :, None] == cat[:, None, :]) & np.tri(L, k=-1, dtype=bool)[None]  # (B, L, L): q < p
            logit = logit - self.strengths.gamma * same.sum(-1)
        if "pairs" in self.effects:
            logit = logit + self.pair_bonus(idx)
        return logit, aff

    def _cascade_terms(self, user_ids: np.ndarray, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """-> (B, L) attraction, (B, L) stop prob after a click, (B, L) stop prob after no click."""
        logit, aff = self._logits(user_ids, lists)
        attr = _sigmoid(logit)
        s = self.strengths
        if "cascade" not in self.effects:
            return attr, np.zeros_like(attr), np.zeros_like(attr)
        stop_click = s.s_click * _sigmoid(s.sat_slope * (aff - s.sat_mid))
        stop_skip = s.s_dull * (attr < s.dull_level)
        return attr, stop_click, stop_skip

    def click_probs(self, user_ids: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """(B,) user ids, (B, L) raw item ids in display order -> (B, L) exact P(click at p)."""
        attr, stop_click, stop_skip = self._cascade_terms(user_ids, lists)
        cont = attr * (1.0 - stop_click) + (1.0 - attr) * (1.0 - stop_skip)  # (B, L) P(go on | examined p)
        examined = np.cumprod(np.concatenate([np.ones_like(cont[:, :1]), cont[:, :-1]], axis=1), axis=1)  # (B, L)
        return examined * attr

    def expected_clicks(self, user_ids: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """(B,) users, (B, L) lists -> (B,) the list's true value (expected clicks)."""
        return self.click_probs(user_ids, lists).sum(-1)

    def sample_clicks(self, rng: np.random.Generator, user_ids: np.ndarray, lists: np.ndarray) -> np.ndarray:
        """(B,) users, (B, L) lists -> (B, L) bool clicks of one simulated reader per list."""
        attr, stop_click, stop_skip = self._cascade_terms(user_ids, lists)
        u_click, u_stop = rng.random(attr.shape), rng.random(attr.shape)
        clicks = np.zeros(attr.shape, bool)
        reading = np.ones(attr.shape[0], bool)
        for p in range(attr.shape[1]):
            clicks[:, p] = reading & (u_click[:, p] < attr[:, p])
            stop = np.where(clicks[:, p], stop_click[:, p], stop_skip[:, p])
            reading &= u_stop[:, p] >= stop
        return clicks

    # ------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> Path:
        """dir/world.npz (arrays) + dir/world.json (effects, strengths): no pickle."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        np.savez(out / "world.npz", user_vec=self.user_vec, item_vec=self.item_vec, item_bias=self.item_bias,
                 category=self.category, pos_bias=self.pos_bias, pair_key=self.pair_key, pair_w=self.pair_w)
        meta = {"format_version": FORMAT_VERSION, "effects": list(self.effects), "strengths": asdict(self.strengths)}
        (out / "world.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return out

    @classmethod
    def load(cls, path: str | Path) -> "World":
        src = Path(path)
        if not (src / "world.json").is_file() or not (src / "world.npz").is_file():
            raise GoalRankInputError(f"{src}: not a simulator world (needs world.json and world.npz)")
        try:
            meta = json.loads((src / "world.json").read_text())
            with np.load(src / "world.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            if meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
            return cls(effects=parse_effect("+".join(meta["effects"])), strengths=Strengths(**meta["strengths"]), **arrays)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise GoalRankInputError(f"{src}: unreadable simulator world: {exc}") from exc


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def parse_effect(effect: str) -> tuple[str, ...]:
    """"saturation+cascade" -> ("saturation", "cascade") in EFFECTS order; unknown names refused."""
    names = [e.strip() for e in str(effect).split("+") if e.strip()]
    bad = [e for e in names if e not in EFFECTS]
    if not names or bad:
        raise GoalRankInputError(f"simulator: effect must be one or more of {', '.join(EFFECTS)} joined by '+', "
                                 f"got {effect!r}")
    return tuple(e for e in EFFECTS if e in names)


def _neighbours(vec: np.ndarray, allowed, k: int) -> np.ndarray:
    """(I, d) vectors -> (I, k) indices of each item's k nearest others among `allowed(rows, cols)`
    ((b, I) bool mask), -1 where fewer exist."""
    I = len(vec)
    out = np.full((I, k), -1, np.int64)
    sq = (vec ** 2).sum(1)
    for a in range(0, I, 512):
        rows = np.arange(a, min(a + 512, I))
        d2 = sq[rows, None] + sq[None, :] - 2.0 * vec[rows] @ vec.T  # (b, I)
        ok = allowed(rows) & (rows[:, None] != np.arange(I)[None, :])
        d2 = np.where(ok, d2, np.inf)
        nn = np.argsort(d2, axis=1)[:, :k]
        out[rows] = np.where(np.isfinite(np.take_along_axis(d2, nn, 1)), nn, -1)
    return out


def _make_pairs(item_vec: np.ndarray, category: np.ndarray, s: Strengths, rng: np.random.Generator):
    """Seeded substitute and complement pairs -> (P,) sorted keys, (P,) weights (first draw wins)."""
    I = len(item_vec)
    same = lambda rows: category[rows, None] == category[None, :]  # noqa: E731
    other = lambda rows: category[rows, None] != category[None, :]  # noqa: E731
    parts = []
    for nn, sign, w in ((_neighbours(item_vec, same, s.n_sub), -1.0, s.w_sub),
                        (_neighbours(item_vec, other, s.n_comp), 1.0, s.w_comp)):
        i = np.repeat(np.arange(I), nn.shape[1])
        j = nn.ravel()
        keep = j >= 0
        i, j = i[keep], j[keep]
        parts.append((np.minimum(i, j) * I + np.maximum(i, j), sign * w * rng.uniform(0.5, 1.5, len(i))))
    key = np.concatenate([p[0] for p in parts]).astype(np.int64)
    wt = np.concatenate([p[1] for p in parts])
    key, first = np.unique(key, return_index=True)  # sorted; a pair drawn twice keeps its first weight
    return key, wt[first]


def make_world(effect: str = "saturation", seed: int = 0, n_users: int = 2000, n_items: int = 1000,
               n_categories: int = 10, slate_len: int = 10, dim: int = 8, strengths: Strengths | None = None) -> World:
    """A seeded world. The taste space and items depend on `seed` only, not on `effect`, so
    worlds of different effects with one seed share their users and items."""
    effects = parse_effect(effect)
    if n_users < 1 or n_items < 1 or n_categories < 1 or slate_len < 1 or dim < 1:
        raise GoalRankInputError(f"simulator: need users, items, categories, slate_len, dim >= 1, got "
                                 f"{n_users}, {n_items}, {n_categories}, {slate_len}, {dim}")
    s = strengths or Strengths()
    user_vec, item_vec, item_bias, category = taste_space(n_users, n_items, n_categories, dim, seed)
    pos_bias = 0.1 * np.arange(slate_len, dtype=np.float64)
    if "pairs" in effects:
        pair_key, pair_w = _make_pairs(item_vec, category, s, np.random.default_rng([seed, 1]))
    else:
        pair_key, pair_w = np.zeros(0, np.int64), np.zeros(0, np.float64)
    return World(effects, user_vec, item_vec, item_bias, category, pos_bias, pair_key, pair_w, s)


def simulate_logs(world: World, n_requests: int = 16000, n_candidates: int = 50, slate_len: int | None = None,
                  history_len: int = 50, seed: int = 0, logger: str = "noisy",
                  temperature: float = 1.0) -> tuple[pa.Table, pa.Table]:
    """Logged impressions from a context-unaware, noisy logging policy (synth.log_requests;
    `logger` "plackett-luce" also logs its propensities): requests spread round-robin over the
    world's users (user-major rows, one a day), clicks sampled from the world's click model.
    Returns (impressions: IMPRESSIONS plus any propensity columns, items: ITEMS)."""
    L = world.slate_len if slate_len is None else slate_len
    if not 1 <= L <= min(n_candidates, world.slate_len) or n_candidates > world.n_items:
        raise GoalRankInputError(f"simulator: need 1 <= slate_len <= n_candidates <= n_items and slate_len <= "
                                 f"{world.slate_len}, got {L}, {n_candidates}, {world.n_items}")
    if n_requests < 1:
        raise GoalRankInputError(f"simulator: n_requests must be >= 1, got {n_requests}")
    rng = np.random.default_rng([seed, 2])
    user = np.sort(np.arange(n_requests, dtype=np.int64) % world.n_users)  # (R,) user-major
    _, start = np.unique(user, return_index=True)
    step = np.arange(n_requests) - np.repeat(start, np.diff(np.append(start, n_requests)))  # (R,) index within user
    ts = T0 + step * DAY + rng.integers(0, 3600, n_requests)
    table = log_requests(world, user, step, ts, n_candidates, L, history_len, rng, "sim", logger, temperature)
    return table, world.items_table()


class TrueReward(torch.nn.Module):
    """A reward model that knows the world: score(batch, lists) = each list's exact expected
    clicks. Plugged into the fit instead of a trained reward model (`fit_tables(reward=...)`,
    `python -m bench.simulator --reward true`), it measures the ceiling of the group-relative
    loop itself: what GoalRank reaches when pi_ref is built from true list values."""

    def __init__(self, world: World, item_ids: np.ndarray, user_ids: np.ndarray):
        super().__init__()
        self.world = world
        # dense index -> raw id (0 = PAD, 1 = UNK: not a world id, -1)
        self.items = np.concatenate([[-1, -1], np.asarray(item_ids, np.int64)])
        self.users = np.concatenate([[-1, -1], np.asarray(user_ids, np.int64)])
        self._device = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # where batches live

    @torch.no_grad()
    def score(self, batch, lists: torch.Tensor, folds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, G, L) positions into the candidates (-1 = empty) -> (B, G) expected clicks of the
        list's leading real items (a list is cut at its first empty entry)."""
        b, g, l = lists.shape
        users = self.users[batch.user.cpu().numpy()]  # (B,)
        if (users < 0).any():
            raise GoalRankInputError("TrueReward: a request's user is not in the vocabulary")
        cand = self.items[batch.candidates.cpu().numpy()]  # (B, N) raw ids
        pos = lists.cpu().numpy()
        raw = np.take_along_axis(cand, np.maximum(pos, 0).reshape(b, g * l), 1).reshape(b, g, l)
        probs = self.world.click_probs(np.repeat(users, g), np.where(pos >= 0, raw, cand[:, :1, None]).reshape(b * g, l))
        real = np.cumprod(pos.reshape(b * g, l) >= 0, axis=1)  # (B*G, L) up to the first -1
        value = (probs * real).sum(-1).reshape(b, g)
        return torch.from_numpy(value.astype(np.float32)).to(lists.device)
