"""Cross-fitting of the reward model: no training request is scored by a member that
trained on it, and the folds are the same in every process."""
from __future__ import annotations

import numpy as np
import torch

from goalrank_core.batch import EncodedRequests
from goalrank_core.config_sections import RewardConfig
from goalrank_core.reward_model import CrossFitReward, request_folds
from goalrank_core.trainer import batch_folds, reward_loss
from gr_helpers import random_batch


def _model(folds: int = 2) -> CrossFitReward:
    torch.manual_seed(0)
    cfg = RewardConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, context_layers=1, folds=folds)
    return CrossFitReward(cfg, 40, 10, 4, 4).eval()


def test_request_folds_are_a_stable_hash_of_the_id():
    ids = [f"r{i}" for i in range(400)]
    f = request_folds(ids, 3)
    assert f.dtype == np.int64 and set(f.tolist()) == {0, 1, 2}
    assert np.array_equal(f, request_folds(list(ids), 3))  # same ids, same folds
    # CRC-32, pinned: another process or a rerun puts "r0" in the same fold
    assert request_folds(["r0", "r1", "abc"], 2).tolist() == [int(__import__("zlib").crc32(s.encode()) % 2)
                                                             for s in ("r0", "r1", "abc")]
    assert (request_folds(ids, 1) == 0).all()
    assert abs(np.bincount(request_folds(ids, 2)).min() - 200) < 40  # balanced


def test_a_member_learns_nothing_from_its_own_fold():
    model = _model()
    b = random_batch(b=6, n=10, l=4, short_rows=0)
    folds = torch.tensor([0, 0, 0, 1, 1, 1])
    for own in (0, 1):
        model.zero_grad()
        rows = (folds == own).nonzero()[:, 0]
        sub = b.take(rows)
        reward_loss(model, sub, folds=folds[rows]).backward()
        held_out = model.members[own]
        other = model.members[1 - own]
        assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in held_out.parameters())
        assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in other.parameters())


def test_held_out_scores_come_from_the_member_that_did_not_train_on_the_row():
    model = _model(folds=3)
    b = random_batch(b=5, n=10, l=4, short_rows=0)
    lists = torch.randint(0, 10, (5, 3, 4))
    folds = torch.tensor([2, 0, 1, 1, 0])
    with torch.no_grad():
        got = model.score(b, lists, folds)
        each = torch.stack([m.score(b, lists) for m in model.members])  # (K, B, G)
    for r, f in enumerate(folds.tolist()):  # each member scores its own rows only (float noise of a smaller batch)
        assert torch.allclose(got[r], each[f, r], atol=1e-5)
        others = [k for k in range(3) if k != f]
        assert all((got[r] - each[k, r]).abs().max() > 1e-4 for k in others)
    assert torch.allclose(model.score(b, lists), each.mean(0))  # no folds: the members' mean


def test_batch_folds_key_rows_by_request_id():
    model = _model(folds=2)
    r = 4
    data = EncodedRequests(np.array(["a", "b", "c", "d"], dtype=object), *(np.zeros((r,) + s, t) for s, t in
                           (((), np.int64), ((2,), np.int64), ((3,), np.int64), ((3,), bool), ((3,), np.int64),
                            ((2,), np.int64), ((2,), np.float32), ((3,), np.int64))))
    got = batch_folds(model, data, np.array([3, 0]), "cpu")
    assert got.tolist() == request_folds(["d", "a"], 2).tolist()
    assert batch_folds(model.members[0], data, np.array([0]), "cpu") is None  # one model: no folds
