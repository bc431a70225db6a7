"""Further feedback types (`labels_<name>` columns, `reward.feedback`): encoded, predicted by
the reward model beside the click, and combined into the list reward with their weights."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from goalrank_core.batch import RequestBatch, Vocab, encode_requests
from goalrank_core.bundle import build_bundle
from goalrank_core.config import GoalRankConfig
from goalrank_core.config_sections import RewardConfig
from goalrank_core.errors import ConfigError, GoalRankInputError
from goalrank_core.reward_model import CrossFitReward, RewardModel
from goalrank_core.trainer import reward_loss
from gr_helpers import random_batch


def _table(like, shown=((11, 12), (13, 11))) -> pa.Table:
    return pa.table({
        "request_id": ["a", "b"], "user_id": pa.array([1, 2], pa.int64()), "timestamp": pa.array([0, 1], pa.int64()),
        "history": pa.array([[], [11]], pa.list_(pa.int64())),
        "candidates": pa.array([[11, 12, 13], [11, 12, 13]], pa.list_(pa.int64())),
        "shown": pa.array([list(s) for s in shown], pa.list_(pa.int64())),
        "labels": pa.array([[1.0, 0.0], [0.0, 1.0]], pa.list_(pa.float32())),
        "labels_like": pa.array(like, pa.list_(pa.float32())),
    })


def test_config_feedback_is_checked_and_ordered():
    cfg = GoalRankConfig.from_dict({"reward": {"feedback": {"labels_star": 0.2, "labels_like": 0.5}}})
    assert cfg.reward.feedback_names == ("labels_like", "labels_star")
    with pytest.raises(ConfigError, match="labels_<name>"):
        GoalRankConfig.from_dict({"reward": {"feedback": {"like": 1.0}}})
    with pytest.raises(ConfigError, match="reward.feedback.labels_like"):
        GoalRankConfig.from_dict({"reward": {"feedback": {"labels_like": float("nan")}}})
    assert GoalRankConfig().reward.feedback == {}


def test_encode_reads_feedback_columns_in_order_and_refuses_values_outside_0_1():
    items, users = Vocab.build(np.array([11, 12, 13])), Vocab.build(np.array([1, 2]))
    enc = encode_requests(_table([[0.5, 1.0], [0.0, 0.25]]), items, users, 3, feedback_names=("labels_like",))
    assert enc.feedback.shape == (2, 1, 2)
    np.testing.assert_allclose(enc.feedback[:, 0], [[0.5, 1.0], [0.0, 0.25]])
    assert encode_requests(_table([[0.5, 1.0], [0.0, 0.25]]), items, users, 3).feedback is None  # not configured
    requests = _table([[0.5, 1.0], [0.0, 0.25]]).drop_columns(["shown", "labels", "labels_like"])
    assert (encode_requests(requests, items, users, 3, slate_len=2, feedback_names=("labels_like",)).feedback == 0).all()
    with pytest.raises(GoalRankInputError, match=r"'labels_like', row 1: value 3.0 at position 0 is outside \[0, 1\]"):
        encode_requests(_table([[0.5, 1.0], [3.0, 0.25]]), items, users, 3, feedback_names=("labels_like",))


def test_a_configured_feedback_column_missing_from_training_is_refused():
    cfg = GoalRankConfig.from_dict({"reward": {"feedback": {"labels_watch": 1.0}}})
    with pytest.raises(ConfigError, match="labels_watch, not a column of the training impressions.*labels_like"):
        build_bundle(_table([[0.5, 1.0], [0.0, 0.25]]), cfg)


def _model(feedback: dict, folds: int = 1):
    torch.manual_seed(0)
    cfg = RewardConfig(d_model=16, n_layers=1, n_heads=2, dropout=0.0, feedback=feedback, folds=folds)
    return (CrossFitReward if folds > 1 else RewardModel)(cfg, 40, 10, 4, 4).eval()


def test_score_adds_each_weighted_feedback_probability_to_the_click():
    model = _model({"labels_like": 0.5, "labels_star": 2.0})
    b = random_batch(b=3, n=10, l=4)
    lists = torch.tensor([[0, 1, 2, 3], [4, 5, -1, -1]]).expand(3, 2, 4)
    with torch.no_grad():
        click, extra = model.logits(b, lists, feedback=True)  # (3, 2, 4), (3, 2, 4, 2)
        p = torch.sigmoid(click) + 0.5 * torch.sigmoid(extra[..., 0]) + 2.0 * torch.sigmoid(extra[..., 1])
        want = (p * (lists >= 0) / torch.log2(torch.arange(4) + 2.0)).sum(-1)
        assert torch.allclose(model.score(b, lists), want, atol=1e-6)
        assert model.logits(b, lists).shape == (3, 2, 4)  # without the flag: the click logits alone


def test_feedback_heads_learn_their_own_target():
    """Likes only on category-1 items, clicks at random: the like head learns the category and a
    cross-fitted model learns it in each member."""
    b = random_batch(b=32, n=10, l=4, seed=1)
    cat1 = (b.category.gather(1, b.shown) == 1).float()  # (B, L)
    b = RequestBatch(**{**b._asdict(), "feedback": cat1[:, None, :]})  # (B, F=1, L)
    for folds in (1, 2):
        model = _model({"labels_like": 1.0}, folds).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        folds_t = torch.arange(32) % folds if folds > 1 else None
        for _ in range(150):
            opt.zero_grad()
            reward_loss(model, b, folds=folds_t).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            members = model.members if folds > 1 else [model]
            extra = torch.stack([m.logits(b, b.shown[:, None, :], feedback=True)[1][:, 0, :, 0] for m in members]).mean(0)
        p_like = torch.sigmoid(extra)  # (B, L)
        assert p_like[cat1 == 1].mean() > 0.8 and p_like[cat1 == 0].mean() < 0.2, folds


def test_without_feedback_the_model_and_loss_are_unchanged():
    model = _model({})
    assert model.head[-1].out_features == 1 and model.n_feedback == 0
    b = random_batch(b=4, n=10, l=4)
    with torch.no_grad():
        base = reward_loss(model, b)
        assert torch.allclose(reward_loss(model, RequestBatch(**{**b._asdict(), "feedback": torch.ones(4, 2, 4)})), base)  # not configured: ignored


def test_a_gfn4rec_style_log_with_two_requests_per_user_fits_and_ranks_with_its_feedback(tmp_path, caplog):
    """All of the peer's columns (two further feedback types, a `reward` and a `logging_logprob`
    the contract does not know), two requests per user, the default split."""
    import json

    import pyarrow.parquet as pq

    from goalrank.cli import main
    from goalrank_core.bundle import ModelBundle
    from goalrank_core.schemas import REQUESTS
    from goalrank_core.synth import synth_impressions
    from gr_helpers import tiny_config

    table, items, _ = synth_impressions(n_users=60, n_items=60, requests_per_user=2, slate_len=4, n_candidates=12,
                                       n_categories=4, history_len=10, seed=0)
    rng = np.random.default_rng(0)
    clicks = np.asarray(table.column("labels").to_pylist(), np.float32)
    like = clicks * (rng.random(clicks.shape) < 0.5)
    star = like * (rng.random(clicks.shape) < 0.3)
    lab = lambda x: pa.array(list(x), pa.list_(pa.float32()))  # noqa: E731
    table = (table.append_column("labels_is_like", lab(like)).append_column("labels_is_star", lab(star))
             .append_column("reward", pa.array((clicks + like + star).sum(1)))
             .append_column("logging_logprob", pa.array(np.full(table.num_rows, -3.0))))
    pq.write_table(table, tmp_path / "imp.parquet")
    pq.write_table(items, tmp_path / "items.parquet")
    pq.write_table(table.select(REQUESTS.names).slice(0, 10), tmp_path / "req.parquet")
    cfg = tiny_config().to_dict()
    cfg["reward"]["feedback"] = {"labels_is_like": 0.5, "labels_is_star": 0.2}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert main(["fit", "--impressions", str(tmp_path / "imp.parquet"), "--items", str(tmp_path / "items.parquet"),
                 "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "model"), "--quiet"]) == 0
    assert "ignoring column(s) ['reward', 'logging_logprob']" in caplog.text  # named in one line
    bundle = ModelBundle.load(tmp_path / "model")
    reward = bundle.require("reward")
    members = getattr(reward, "members", [reward])
    assert all(m.n_feedback == 2 and m.head[-1].out_features == 3 for m in members)
    assert main(["rank", "--model", str(tmp_path / "model"), "--requests", str(tmp_path / "req.parquet"),
                 "--out", str(tmp_path / "ranked.parquet"), "--policy", "g-e"]) == 0
    assert pq.read_table(tmp_path / "ranked.parquet").num_rows == 10
