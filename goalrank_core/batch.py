"""From Parquet rows to padded tensors, and back.

Every model sees requests as a `RequestBatch`. Lists are *positions* into a request's
candidate array (a pointer representation), so a list of length L is a (L,) int64 tensor of
indices in [0, N). Raw item ids are kept beside the tensors to map positions back.

Vocabulary: index 0 is padding, index 1 is "unknown" (an item or user never seen in
training: ranked with a shared cold-start embedding, never rejected), known ids from 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from goalrank_core.errors import GoalRankInputError

PAD = 0
UNK = 1


@dataclass
class Vocab:
    """Raw ids (int64) to dense indices; ids outside the vocabulary map to UNK."""

    ids: np.ndarray  # (V - 2,) int64 sorted raw ids; index = 2 + position

    @classmethod
    def build(cls, *id_arrays: np.ndarray) -> "Vocab":
        ids = np.unique(np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in id_arrays] or [np.zeros(0, np.int64)]))
        return cls(ids=ids)

    def __len__(self) -> int:
        return len(self.ids) + 2

    def lookup(self, raw: np.ndarray) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.int64)
        if len(self.ids) == 0:
            return np.full(raw.shape, UNK, dtype=np.int64)
        pos = np.searchsorted(self.ids, raw)
        pos_c = np.minimum(pos, len(self.ids) - 1)
        found = self.ids[pos_c] == raw
        return np.where(found, pos_c + 2, UNK).astype(np.int64)


class RequestBatch(NamedTuple):
    """A batch of B requests, padded to N candidates, H history items and L positions."""

    user: torch.Tensor  # (B,) int64 user index (UNK for unseen users)
    history: torch.Tensor  # (B, H) int64 item index, PAD-padded on the left (most recent last)
    candidates: torch.Tensor  # (B, N) int64 item index, PAD where cand_mask is False
    cand_mask: torch.Tensor  # (B, N) bool, True for a real candidate
    category: torch.Tensor  # (B, N) int64 category index of each candidate (0 = none)
    shown: torch.Tensor  # (B, L) int64 positions into candidates of the logged list (-1 if none)
    labels: torch.Tensor  # (B, L) float32 logged feedback per position (0 where none)
    # (B, F, L) float32 the further feedback types reward.feedback names (labels_<name>), or None
    feedback: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "RequestBatch":
        return RequestBatch(*(None if t is None else t.to(device) for t in self))

    def __len__(self) -> int:
        return self.user.shape[0]

    def take(self, rows: torch.Tensor | slice) -> "RequestBatch":
        """The batch of the requests `rows` (every tensor indexed on its first dimension)."""
        return RequestBatch(*(None if t is None else t[rows] for t in self))


@dataclass
class EncodedRequests:
    """A whole table of requests as numpy arrays (cheap to slice into batches)."""

    request_id: np.ndarray  # (R,) object (str)
    user: np.ndarray  # (R,) int64
    history: np.ndarray  # (R, H) int64
    candidates: np.ndarray  # (R, N) int64 item index
    cand_mask: np.ndarray  # (R, N) bool
    category: np.ndarray  # (R, N) int64
    shown: np.ndarray  # (R, L) int64 positions, -1 where unlabeled
    labels: np.ndarray  # (R, L) float32
    raw_candidates: np.ndarray  # (R, N) int64 raw item ids, -1 at padding
    feedback: np.ndarray | None = None  # (R, F, L) float32 labels_<name> columns, in reward.feedback_names order

    def __len__(self) -> int:
        return len(self.request_id)

    def batch(self, idx: np.ndarray | slice, device: torch.device | str = "cpu") -> RequestBatch:
        return RequestBatch(
            user=torch.from_numpy(self.user[idx]),
            history=torch.from_numpy(self.history[idx]),
            candidates=torch.from_numpy(self.candidates[idx]),
            cand_mask=torch.from_numpy(self.cand_mask[idx]),
            category=torch.from_numpy(self.category[idx]),
            shown=torch.from_numpy(self.shown[idx]),
            labels=torch.from_numpy(self.labels[idx]),
            feedback=None if self.feedback is None else torch.from_numpy(self.feedback[idx]),
        ).to(device)

    def positions_to_ids(self, idx: np.ndarray | slice, positions: np.ndarray) -> np.ndarray:
        """(B, L) positions into candidates -> (B, L) raw item ids."""
        raw = self.raw_candidates[idx]
        return np.take_along_axis(raw, positions, axis=1)

    def ids_to_positions(self, idx: np.ndarray | slice, lists: np.ndarray) -> np.ndarray:
        """(B, G, L) raw item ids -> (B, G, L) positions into candidates (-1 if absent)."""
        raw = self.raw_candidates[idx]  # (B, N)
        eq = lists[..., None] == raw[:, None, None, :]  # (B, G, L, N)
        return np.where(eq.any(-1), eq.argmax(-1), -1).astype(np.int64)


def _pad_lists(lists: list, width: int, fill: int, left: bool = False, dtype=np.int64) -> np.ndarray:
    out = np.full((len(lists), width), fill, dtype=dtype)
    for i, xs in enumerate(lists):
        xs = xs[-width:] if left else xs[:width]
        if len(xs):
            if left:
                out[i, width - len(xs):] = xs
            else:
                out[i, : len(xs)] = xs
    return out


def encode_requests(
    table: pa.Table,
    items: Vocab,
    users: Vocab,
    history_len: int,
    n_candidates: int | None = None,
    slate_len: int | None = None,
    item_category: dict[int, int] | None = None,
    feedback_names: tuple[str, ...] = (),
) -> EncodedRequests:
    """Encode a validated requests or impressions table. N defaults to the longest candidate
    list and L to the longest shown list; shorter rows are padded and masked. `feedback_names`:
    labels_<name> columns read into `feedback` (a table without them, e.g. requests to rank,
    gets zeros); their values must be in [0, 1]."""
    cols = table.column_names
    cand = table.column("candidates").to_pylist()
    hist = table.column("history").to_pylist()
    n = n_candidates or max((len(c) for c in cand), default=1)
    has_shown = "shown" in cols
    shown_raw = table.column("shown").to_pylist() if has_shown else None
    labels_raw = table.column("labels").to_pylist() if has_shown else None
    if slate_len is None:
        slate_len = max((len(s) for s in shown_raw), default=1) if has_shown else 1

    raw_cand = _pad_lists(cand, n, -1)
    cand_idx = np.where(raw_cand >= 0, items.lookup(np.maximum(raw_cand, 0)), PAD)
    cand_mask = raw_cand >= 0
    raw_hist = _pad_lists(hist, history_len, -1, left=True)
    hist_idx = np.where(raw_hist >= 0, items.lookup(np.maximum(raw_hist, 0)), PAD)

    category = np.zeros_like(cand_idx)
    if item_category:
        lookup = np.vectorize(lambda x: item_category.get(int(x), 0), otypes=[np.int64])
        category = np.where(cand_mask, lookup(raw_cand), 0)

    shown = np.full((len(cand), slate_len), -1, dtype=np.int64)
    labels = np.zeros((len(cand), slate_len), dtype=np.float32)
    if has_shown:
        for i, (s, lab) in enumerate(zip(shown_raw, labels_raw)):
            pos = {item: j for j, item in enumerate(cand[i])}
            k = min(len(s), slate_len)
            shown[i, :k] = [pos[x] for x in s[:k]]
            labels[i, :k] = lab[:k]

    feedback = _feedback(table, feedback_names, shown_raw, slate_len) if feedback_names else None
    return EncodedRequests(
        request_id=np.asarray(table.column("request_id").to_pylist(), dtype=object),
        user=users.lookup(table.column("user_id").to_numpy()),
        history=hist_idx.astype(np.int64),
        candidates=cand_idx.astype(np.int64),
        cand_mask=cand_mask,
        category=category.astype(np.int64),
        shown=shown,
        labels=labels,
        raw_candidates=raw_cand,
        feedback=feedback,
    )


def _feedback(table: pa.Table, names: tuple[str, ...], shown_raw: list | None, slate_len: int) -> np.ndarray:
    """(R, F, L) float32 of the labels_<name> columns (0 beyond each shown list and for a
    table without the column: requests to rank carry no feedback)."""
    out = np.zeros((table.num_rows, len(names), slate_len), np.float32)
    if shown_raw is None:
        return out
    for f, name in enumerate(names):
        if name not in table.column_names:
            continue
        for i, vals in enumerate(table.column(name).to_pylist()):
            v = np.asarray(vals[:slate_len], np.float32)
            if v.size and ((v < 0) | (v > 1)).any():
                j = int(np.flatnonzero((v < 0) | (v > 1))[0])
                raise GoalRankInputError(f"column {name!r}, row {i}: value {float(v[j])} at position {j} is outside "
                                         f"[0, 1]; the reward model predicts each feedback as a probability "
                                         f"(reward.feedback), so rescale it")
            out[i, f, : len(v)] = v
    return out
