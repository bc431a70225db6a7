"""Warm start: carry a trained model's weights over to a model built for new vocabularies.

Day D + 1's training data has items and users that day D's model never saw, and lacks some
it did. Embedding rows are matched by raw id: a row of an id present in both vocabularies is
copied, a new id keeps its fresh initialisation, a dropped id is discarded. PAD and UNK rows
(indices 0 and 1) are copied, so the learnt cold-start embedding carries over. Category
embeddings are matched by the items they hold (`category_alignment`: given categories keep their
numbers, learnt ones find the old cluster they continue), a number without an old row stays fresh. Every other
tensor must have the same name and shape, else the architectures differ (WarmStartMismatch)
and the caller starts cold.
"""
from __future__ import annotations

import numpy as np
import torch

from goalrank_core.batch import Vocab
from goalrank_core.errors import GoalRankInputError

# state_dict key suffix -> which vocabulary indexes its rows
VOCAB_ROWS = {"embed.item.weight": "item", "embed.user.weight": "user",
              # the reward model's item features (refreshed from the new window's statistics anyway)
              "feat_emb": "item", "feat_pop": "item", "feat_ctr": "item"}
OVERLAP_ROWS = ("embed.category.weight",)


class WarmStartMismatch(GoalRankInputError):
    """The old weights do not fit the new model (another architecture or config)."""


def _rows(old: torch.Tensor, fresh: torch.Tensor, old_vocab: Vocab, new_vocab: Vocab) -> tuple[torch.Tensor, int]:
    """(V_old, d), (V_new, d) -> (V_new, d) with rows of shared ids copied; -> (tensor, shared)."""
    out = fresh.clone()
    out[:2] = old[:2]  # PAD, UNK
    src = old_vocab.lookup(new_vocab.ids)  # (V_new - 2,) old index or UNK
    hit = src >= 2
    dst = np.flatnonzero(hit) + 2
    out[torch.from_numpy(dst)] = old[torch.from_numpy(src[hit])]
    return out, int(hit.sum())


def category_alignment(old_category: dict[int, int], new_category: dict[int, int], n_new: int) -> np.ndarray:
    """(n_new,) for each new category number the old one whose row it inherits: the old category most
    of its items (raw ids in both maps) had, else the same number. Given categories keep their numbers;
    categories learnt per fit (`policies.latent_categories`, numbered arbitrarily by each clustering)
    find the old cluster they continue."""
    out = np.arange(n_new, dtype=np.int64)
    votes: dict[int, dict[int, int]] = {}
    for item, c in new_category.items():
        if item in old_category and 0 <= c < n_new:
            votes.setdefault(c, {}).setdefault(old_category[item], 0)
            votes[c][old_category[item]] += 1
    for c, v in votes.items():
        out[c] = max(sorted(v), key=lambda o: v[o])  # ties: the lowest old number
    return out


def remap_state(old: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], old_items: Vocab, new_items: Vocab,
                old_users: Vocab, new_users: Vocab, categories: np.ndarray | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The fresh model's state_dict with every tensor taken from `old` (remapped where rows are
    vocabulary-indexed; category rows by `categories`, `category_alignment`'s map, else by number).
    -> (state, stats: shared/new/dropped items and users)."""
    missing, extra = sorted(set(fresh) - set(old)), sorted(set(old) - set(fresh))
    if missing or extra:
        raise WarmStartMismatch(f"warm start: parameter names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    vocabs = {"item": (old_items, new_items), "user": (old_users, new_users)}
    state: dict[str, torch.Tensor] = {}
    shared = {"item": None, "user": None}
    for key, f in fresh.items():
        o = old[key]
        kind = next((v for s, v in VOCAB_ROWS.items() if key.endswith(s)), None)
        if kind is not None:
            ov, nv = vocabs[kind]
            if o.shape[0] != len(ov) or f.shape[0] != len(nv) or o.shape[1:] != f.shape[1:]:
                raise WarmStartMismatch(f"warm start: '{key}' has shape {tuple(o.shape)}, expected "
                                        f"({len(ov)}, ...) for the old {kind} vocabulary and {tuple(f.shape)} now")
            state[key], shared[kind] = _rows(o, f, ov, nv)
        elif key.endswith(OVERLAP_ROWS) and o.shape[1:] == f.shape[1:]:
            src = categories if categories is not None and len(categories) == f.shape[0] else np.arange(f.shape[0])
            ok = torch.from_numpy(src < o.shape[0])  # (C_new,) rows with an old row to inherit
            t = f.clone()
            t[ok] = o[torch.from_numpy(src)[ok]]
            state[key] = t
        elif o.shape != f.shape:
            raise WarmStartMismatch(f"warm start: '{key}' has shape {tuple(o.shape)} in the old model, "
                                    f"{tuple(f.shape)} in the new one")
        else:
            state[key] = o.clone()
    stats = {}
    for kind, (ov, nv) in vocabs.items():
        s = shared[kind] or 0
        stats[f"{kind}s_shared"] = s
        stats[f"{kind}s_new"] = len(nv.ids) - s
        stats[f"{kind}s_dropped"] = len(ov.ids) - s
    return state, stats
