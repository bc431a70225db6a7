"""Point-wise DNN, PRM and Generator-Evaluator: learning, context dependence, selection."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from goalrank_core.baselines import (
    PRM, GeneratorEvaluator, PointwiseDNN, evaluate_loss, pointwise_loss, pointwise_policy, prm_loss, prm_policy,
    shown_bce, train_pointwise, train_prm,
)
from goalrank_core.batch import EncodedRequests, RequestBatch
from goalrank_core.config_sections import PolicyConfig, TrainConfig
from goalrank_core.errors import GoalRankInputError
from goalrank_core.policy_registry import PolicyResources, build_policy, known_policies
from goalrank_core.policies import first_stage_policy, fit_heuristics, popularity_policy, random_policy
from test_policies import masked_batches, valid_lists

N_ITEMS, SIGNAL = 30, 2
# Shown labels only: the synthetic shown lists are random picks, so "unshown" carries no signal here.
CFG = PolicyConfig(dnn_dim=16, dnn_hidden=32, prm_d_model=16, prm_heads=2, dropout=0.0, emb_dim=4, unshown_weight=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two
    threads per process make these tests 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def synth(r: int, context: bool, seed: int, n: int = 8, L: int = 4) -> EncodedRequests:
    """Requests of n candidates, L of them shown. Without context an item's click depends on
    the item alone; with context, 'good' items are clicked only when the SIGNAL item is among
    the candidates (never shown itself): invisible to a point-wise model."""
    rng = np.random.default_rng(seed)
    good = np.random.default_rng(99).random(N_ITEMS + 2) < 0.5
    cand = np.zeros((r, n), np.int64)
    shown = np.zeros((r, L), np.int64)
    for i in range(r):
        cand[i] = rng.choice(np.arange(SIGNAL + 1, N_ITEMS + 2), n, replace=False)
        if rng.random() < 0.5:
            cand[i, rng.integers(n)] = SIGNAL
        shown[i] = rng.choice(np.flatnonzero(cand[i] != SIGNAL), L, replace=False)
    items = np.take_along_axis(cand, shown, 1)
    if context:
        has = (cand == SIGNAL).any(1, keepdims=True)
        labels = (good[items] & has).astype(np.float32)
    else:
        labels = (rng.random(items.shape) < np.where(good[items], 0.9, 0.1)).astype(np.float32)
    return EncodedRequests(
        request_id=np.array([f"q{i}" for i in range(r)], dtype=object),
        user=rng.integers(2, 12, r), history=rng.integers(0, N_ITEMS + 2, (r, 5)),
        candidates=cand, cand_mask=np.ones_like(cand, bool), category=(cand % 3) + 1,
        shown=shown, labels=labels, raw_candidates=cand + 1000,
    )


def dnn() -> PointwiseDNN:
    torch.manual_seed(0)
    return PointwiseDNN(12, N_ITEMS + 2, 4, CFG)


def prm(n: int = 8) -> PRM:
    torch.manual_seed(0)
    return PRM(12, N_ITEMS + 2, 4, n, CFG)


def test_pointwise_loss_falls_and_logs_one_line_per_epoch():
    train, valid = synth(300, False, 0), synth(100, False, 1)
    model, lines = dnn(), []
    before = evaluate_loss(model, pointwise_loss, valid, 64)
    hist = train_pointwise(train, valid, model, TrainConfig(aux_epochs=6, batch_size=32, lr=1e-2), log=lines.append)
    assert len(lines) == 6 and all("samples/s" in ln and "train loss" in ln for ln in lines)
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert hist[-1]["valid_loss"] < before - 0.15, (before, hist)
    # sorted by its scores, the DNN puts the items it learned to be good first
    good = np.random.default_rng(99).random(N_ITEMS + 2) < 0.5
    top = pointwise_policy(model, CFG).propose(valid.batch(slice(None)), 1)[:, 0]  # (R, 4)
    top_items = np.take_along_axis(valid.candidates, top.numpy(), 1)
    best_possible = np.minimum(good[valid.candidates].sum(1), 4).sum()
    assert good[top_items].sum() >= 0.9 * best_possible, (good[top_items].sum(), best_possible)


def test_prm_learns_a_context_effect_the_pointwise_model_cannot():
    train, valid = synth(600, True, 0), synth(200, True, 1)
    cfg = TrainConfig(aux_epochs=10, batch_size=32, lr=5e-3)
    p, d = prm(), dnn()
    before = evaluate_loss(p, prm_loss, valid, 64)
    train_prm(train, valid, p, cfg, log=lambda s: None)
    train_pointwise(train, valid, d, cfg, log=lambda s: None)
    prm_valid, dnn_valid = evaluate_loss(p, prm_loss, valid, 64), evaluate_loss(d, pointwise_loss, valid, 64)
    assert prm_valid < min(0.1, before - 0.4), (before, prm_valid)
    # a good item is clicked half the time whatever the DNN sees: about 0.5 * ln 2 at best
    assert dnn_valid > 0.25
    assert prm_valid < dnn_valid - 0.15, (prm_valid, dnn_valid)


def test_prm_score_of_an_item_changes_with_the_other_candidates():
    data = synth(2, False, 0)
    fresh = lambda: RequestBatch(*(t if t is None else t.clone() for t in data.batch(slice(None))))  # noqa: E731 (batches share numpy memory)
    a, b = fresh(), fresh()
    b.candidates[:, 1:] = torch.flip(b.candidates[:, 1:], [1]) % N_ITEMS + 3  # same item 0, others changed
    b.category[:, 1:] = (b.candidates[:, 1:] % 3) + 1
    p, d = prm().eval(), dnn().eval()
    with torch.no_grad():
        assert (p(a)[:, 0] - p(b)[:, 0]).abs().min() > 1e-4
        assert torch.allclose(d(a)[:, 0], d(b)[:, 0])  # the point-wise model ignores them
        # padding does not leak: masking out other candidates changes nothing but their own slots
        c, c2 = fresh(), fresh()
        c.cand_mask[:, 4:] = False
        c2.cand_mask[:, 4:] = False
        c2.candidates[:, 4:] = 0
        assert torch.allclose(p(c)[:, :4], p(c2)[:, :4], atol=1e-5)


class TableReward:
    """A hand-made reward model: DCG-weighted sum of fixed per-item values."""

    def __init__(self, n_items: int, seed: int = 0):
        self.value = torch.rand(n_items + 10, generator=torch.Generator().manual_seed(seed))

    def score(self, batch, lists):  # (B, G, L) -> (B, G)
        items = torch.gather(batch.candidates[:, None, :].expand(-1, lists.shape[1], -1), 2, lists)
        w = 1.0 / torch.log2(torch.arange(lists.shape[2], dtype=torch.float32) + 2)
        return (self.value[items] * w).sum(-1)


def test_generator_evaluator_picks_the_argmax_reward_list():
    data = synth(50, False, 3)
    stats = fit_heuristics(data, N_ITEMS + 2, CFG)
    gens = [popularity_policy(stats), first_stage_policy(), random_policy(5)]
    reward = TableReward(N_ITEMS)
    ge = GeneratorEvaluator(gens, reward)
    batch = data.batch(slice(None))
    lists, rewards, names = ge.candidates(batch, torch.Generator().manual_seed(7))
    assert lists.shape == (50, 7, 4) and names == ["popularity", "first-stage"] + ["random"] * 5
    best = ge.propose(batch, 1, torch.Generator().manual_seed(7))[:, 0]  # (B, L)
    expect = lists[torch.arange(50), rewards.argmax(1)]
    assert torch.equal(best, expect)
    assert torch.allclose(reward.score(batch, best[:, None])[:, 0], rewards.max(1).values)
    top2 = ge.propose(batch, 2, torch.Generator().manual_seed(7))
    r2 = reward.score(batch, top2)
    assert torch.equal(top2[:, 0], best) and bool((r2[:, 0] >= r2[:, 1]).all())
    with pytest.raises(GoalRankInputError):
        GeneratorEvaluator([], reward)


@settings(max_examples=25, deadline=None)
@given(masked_batches(), st.integers(1, 3))
def test_every_registered_policy_gives_valid_lists(case, n):
    batch, L, seed = case
    cfg = PolicyConfig(dnn_dim=8, dnn_hidden=8, prm_d_model=8, prm_heads=2, emb_dim=4, pl_lists=3,
                       auxiliary="popularity,ctr,mmr,history,random,dnn,dnn-pl,prm")
    res = PolicyResources(config=cfg, stats=RES_STATS, pointwise=PointwiseDNN(12, N_ITEMS + 2, 4, cfg),
                          prm=PRM(12, N_ITEMS + 2, 4, 8, cfg), reward_model=TableReward(N_ITEMS + 10))
    gen = torch.Generator().manual_seed(seed)
    for name in known_policies(res):
        valid_lists(build_policy(name, res).propose(batch, n, gen), batch, n, L)


RES_STATS = fit_heuristics(synth(40, False, 5), N_ITEMS + 2, CFG)


def test_prm_policy_sorts_by_prm_scores():
    data = synth(20, False, 4)
    p = prm()
    batch = data.batch(slice(None))
    with torch.no_grad():
        s = p.eval()(batch)
    assert torch.equal(prm_policy(p).propose(batch, 1)[:, 0], s.topk(4, dim=1).indices)


def test_training_without_shown_lists_is_an_input_error():
    data = synth(10, False, 0)
    data.shown[:] = -1
    with pytest.raises(GoalRankInputError, match="no shown lists"):
        train_pointwise(data, None, dnn(), TrainConfig(aux_epochs=1), log=lambda s: None)


def test_shown_bce_adds_unshown_candidates_as_negatives():
    # row 0: shown positions 1 (label 1) and 3 (label 0); real candidates 0..4; row 1 unlabelled
    data = synth(2, False, 0, n=6, L=2)
    data.shown[:] = [[1, 3], [-1, -1]]
    data.labels[:] = [[1.0, 0.0], [0.0, 0.0]]
    data.cand_mask[0, 5] = False
    batch = data.batch(slice(None))
    logits = torch.zeros(2, 6)
    logits[0, 1], logits[0, 3] = 2.0, -1.0
    logits[0, 0], logits[0, 2], logits[0, 4] = 0.5, -0.5, 1.5  # the unshown real candidates
    logits[0, 5], logits[1] = 50.0, 50.0  # padding and the unlabelled row: never counted
    shown_part = (F.softplus(-logits[0, 1]) + F.softplus(logits[0, 3])) / 2
    unshown_part = F.softplus(logits[0, [0, 2, 4]]).mean()
    assert torch.allclose(shown_bce(logits, batch), shown_part)
    assert torch.allclose(shown_bce(logits, batch, 0.5), shown_part + 0.5 * unshown_part)
    model = PointwiseDNN(12, N_ITEMS + 2, 4, PolicyConfig(unshown_weight=2.0))
    with torch.no_grad():
        out = model.eval()(batch)
        assert torch.allclose(pointwise_loss(model, batch), shown_bce(out, batch, 2.0))
        assert torch.allclose(pointwise_loss(model, batch, 0.0), shown_bce(out, batch))


def test_unshown_negatives_teach_the_dnn_to_rank_shown_items_first():
    """When shown items are drawn from a subset of items (as in the offline protocol, where
    shown = what the user rated), the unshown term teaches shown-vs-unshown; shown labels
    alone cannot."""
    rng = np.random.default_rng(0)
    data = synth(400, False, 0)
    watched = np.arange(N_ITEMS + 2) % 2 == 0  # only even items are ever shown
    for i in range(len(data)):
        ev = rng.choice(np.arange(4, N_ITEMS + 2, 2), 4, replace=False)
        od = rng.choice(np.arange(3, N_ITEMS + 2, 2), 4, replace=False)
        data.candidates[i] = rng.permutation(np.concatenate([ev, od]))
        data.shown[i] = np.flatnonzero(watched[data.candidates[i]])
    shares = {}
    for w in (0.0, 1.0):
        torch.manual_seed(0)
        model = PointwiseDNN(12, N_ITEMS + 2, 4, PolicyConfig(dnn_dim=16, dnn_hidden=32, dropout=0.0, unshown_weight=w))
        train_pointwise(data, None, model, TrainConfig(aux_epochs=4, batch_size=32, lr=1e-2), log=lambda s: None)
        top = pointwise_policy(model).propose(data.batch(slice(None)), 1)[:, 0].numpy()
        shares[w] = watched[np.take_along_axis(data.candidates, top, 1)].mean()
    assert shares[1.0] > 0.95 and shares[1.0] > shares[0.0] + 0.2, shares


def test_policies_over_one_model_share_its_scores_for_the_same_batch():
    model = dnn()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    res_cfg = PolicyConfig(dnn_dim=16, dnn_hidden=32, pl_lists=2)
    data = synth(8, False, 0)
    batch = data.batch(slice(None))
    sorted_lists = pointwise_policy(model, res_cfg).propose(batch, 1)
    pointwise_policy(model, res_cfg, sample=True).propose(batch, 2, torch.Generator().manual_seed(0))
    assert len(calls) == 1
    pointwise_policy(model, res_cfg).propose(data.batch(slice(None)), 1)  # new tensors: recomputed
    assert len(calls) == 2
    batch.candidates[:, [0, 1]] = batch.candidates[:, [1, 0]]  # in-place edit: recomputed
    swapped = pointwise_policy(model, res_cfg).propose(batch, 1)
    assert len(calls) == 3 and not torch.equal(swapped, sorted_lists)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an in-place update, as an optimiser step makes
    pointwise_policy(model, res_cfg).propose(batch, 1)
    assert len(calls) == 4
