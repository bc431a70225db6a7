"""First-stage retrievers, fit on training interactions only.

`ItemKNN`: cosine similarity over the binary user-item matrix X (U, I), kept to the top
`neighbors` per item; a request's score for item j is sum_{h in history} sim(h, j).
`PureSVD`: a rank-d truncated SVD of X (Cremonesi et al. 2010); score = q . v_j with q the sum
of the history items' factors. Both add a tiny popularity term so that an empty history still
ranks items (by popularity) and ties break the same way every run.

Items never seen in training get popularity 0 and only a zero similarity: they can still be
retrieved last, never first.
"""
from __future__ import annotations

from dataclasses import dataclass

import warnings

import numpy as np
import torch



def _csr(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], values: np.ndarray | None = None) -> torch.Tensor:
    """A float32 sparse CSR tensor with duplicates summed."""
    v = torch.ones(len(rows)) if values is None else torch.as_tensor(values, dtype=torch.float32)
    idx = torch.as_tensor(np.stack([rows, cols]), dtype=torch.int64)
    with warnings.catch_warnings():  # CSR is "beta" in torch; sparse @ sparse / dense are stable
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_coo_tensor(idx, v, shape, check_invariants=False).coalesce().to_sparse_csr()


@dataclass
class Retriever:
    """Common query code. `item_ids` (I,) sorted raw ids known to the retriever."""

    item_ids: np.ndarray  # (I,) int64 sorted
    popularity: np.ndarray  # (I,) float32 in [0, 1], training interaction counts / max

    def index(self, raw: np.ndarray) -> np.ndarray:
        """raw ids -> column in [0, I), or -1 for unknown ids."""
        raw = np.asarray(raw, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.item_ids, raw), len(self.item_ids) - 1)
        return np.where(self.item_ids[pos] == raw, pos, -1)

    def _scores(self, q_rows: np.ndarray, q_cols: np.ndarray, n: int) -> torch.Tensor:
        raise NotImplementedError

    def scores(self, history: list[np.ndarray]) -> np.ndarray:
        """(B,) histories of raw ids -> (B, I) float32 scores (popularity tie-break included)."""
        rows = np.repeat(np.arange(len(history)), [len(h) for h in history])
        cols = self.index(np.concatenate(history) if len(history) else np.zeros(0, np.int64))
        keep = cols >= 0
        s = self._scores(rows[keep], cols[keep], len(history))  # (B, I)
        s = s + 1e-4 * torch.from_numpy(self.popularity)
        return s.numpy()

    def retrieve(self, history: list[np.ndarray], exclude: list[np.ndarray], k: int, chunk: int = 2048) -> np.ndarray:
        """Top-k items per request, never an excluded one.

        history, exclude: (B,) lists of raw-id arrays. Returns (B, k) int64 raw ids in
        descending score order, -1 where fewer than k items remain.
        """
        out = np.full((len(history), k), -1, dtype=np.int64)
        for a in range(0, len(history), chunk):
            h, e = history[a : a + chunk], exclude[a : a + chunk]
            s = torch.from_numpy(self.scores(h))  # (b, I)
            rows = np.repeat(np.arange(len(e)), [len(x) for x in e])
            cols = self.index(np.concatenate(e) if len(e) else np.zeros(0, np.int64))
            keep = cols >= 0
            s[torch.from_numpy(rows[keep]), torch.from_numpy(cols[keep])] = -np.inf
            kk = min(k, s.shape[1])
            val, idx = torch.topk(s, kk, dim=1)  # (b, kk); topk is stable enough: ties broken by popularity
            ids = self.item_ids[idx.numpy()]
            out[a : a + len(h), :kk] = np.where(np.isfinite(val.numpy()), ids, -1)
        return out

    def score_items(self, history: list[np.ndarray], items: np.ndarray) -> np.ndarray:
        """(B,) histories and (B, M) raw ids -> (B, M) float32 scores (-inf for unknown ids)."""
        s = self.scores(history)  # (B, I)
        cols = self.index(items)
        got = np.take_along_axis(s, np.maximum(cols, 0), axis=1)
        return np.where(cols >= 0, got, -np.inf).astype(np.float32)


@dataclass
class ItemKNN(Retriever):
    sim: torch.Tensor | None = None  # (I, I) sparse CSR, top `neighbors` per row, zero diagonal

    @classmethod
    def fit(cls, users: np.ndarray, items: np.ndarray, neighbors: int = 100, chunk: int = 4096) -> "ItemKNN":
        """users, items: (E,) raw ids of training interactions (repeats count once)."""
        item_ids, col = np.unique(np.asarray(items, np.int64), return_inverse=True)
        _, row = np.unique(np.asarray(users, np.int64), return_inverse=True)
        n_u, n_i = int(row.max()) + 1, len(item_ids)
        pairs = np.unique(row.astype(np.int64) * n_i + col)  # binary X
        row, col = pairs // n_i, pairs % n_i
        pop = np.bincount(col, minlength=n_i).astype(np.float32)
        x = _csr(row, col, (n_u, n_i))  # (U, I)
        order = np.argsort(col, kind="stable")
        t_rows, t_cols = col[order], row[order]  # X^T as (item, user) pairs sorted by item
        norm = np.sqrt(np.maximum(pop, 1.0))
        k = min(neighbors, n_i)
        s_rows, s_cols, s_vals = [], [], []
        for a in range(0, n_i, chunk):
            b = min(a + chunk, n_i)
            lo, hi = np.searchsorted(t_rows, [a, b])
            xt_ab = _csr(t_rows[lo:hi] - a, t_cols[lo:hi], (b - a, n_u))  # (b-a, U)
            block = torch.sparse.mm(xt_ab, x).to_dense()  # (b-a, I) co-occurrence counts
            block /= torch.from_numpy(norm[a:b, None] * norm[None, :])
            block[torch.arange(b - a), torch.arange(a, b)] = 0.0  # no self-similarity
            val, idx = torch.topk(block, k, dim=1)
            keep = (val > 0).numpy()
            s_rows.append(np.repeat(np.arange(a, b), k).reshape(b - a, k)[keep])
            s_cols.append(idx.numpy()[keep])
            s_vals.append(val.numpy()[keep])
        sim = _csr(np.concatenate(s_rows), np.concatenate(s_cols), (n_i, n_i), np.concatenate(s_vals))
        return cls(item_ids=item_ids, popularity=pop / max(pop.max(), 1.0), sim=sim)

    def _scores(self, q_rows: np.ndarray, q_cols: np.ndarray, n: int) -> torch.Tensor:
        q = _csr(q_rows, q_cols, (n, len(self.item_ids)))  # (B, I) history counts
        return torch.sparse.mm(q, self.sim).to_dense()  # (B, I)


@dataclass
class PureSVD(Retriever):
    factors: torch.Tensor | None = None  # (I, d) item factors V * S^(1/2)

    @classmethod
    def fit(cls, users: np.ndarray, items: np.ndarray, dim: int = 64, seed: int = 0) -> "PureSVD":
        item_ids, col = np.unique(np.asarray(items, np.int64), return_inverse=True)
        _, row = np.unique(np.asarray(users, np.int64), return_inverse=True)
        n_u, n_i = int(row.max()) + 1, len(item_ids)
        pairs = np.unique(row.astype(np.int64) * n_i + col)
        row, col = pairs // n_i, pairs % n_i
        pop = np.bincount(col, minlength=n_i).astype(np.float32)
        x = torch.sparse_coo_tensor(torch.as_tensor(np.stack([row, col])), torch.ones(len(row)), (n_u, n_i),
                                    check_invariants=False).coalesce()
        torch.manual_seed(seed)  # svd_lowrank draws a random projection
        d = max(1, min(dim, n_i - 1, n_u - 1))
        _, s, v = torch.svd_lowrank(x, q=d, niter=4)  # v: (I, d)
        return cls(item_ids=item_ids, popularity=pop / max(pop.max(), 1.0), factors=v * s.sqrt())

    def _scores(self, q_rows: np.ndarray, q_cols: np.ndarray, n: int) -> torch.Tensor:
        q = torch.zeros(n, self.factors.shape[1])
        q.index_add_(0, torch.from_numpy(q_rows), self.factors[torch.from_numpy(q_cols)])  # (B, d)
        return q @ self.factors.T  # (B, I)


def fit_retriever(kind: str, users: np.ndarray, items: np.ndarray, seed: int = 0) -> Retriever:
    if kind == "itemknn":
        return ItemKNN.fit(users, items)
    if kind == "mf":
        return PureSVD.fit(users, items, seed=seed)
    raise ValueError(f"unknown retriever {kind!r}")
