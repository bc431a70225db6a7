"""Heuristic list policies: validity of every list, exact small cases, sampling statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from goalrank_core.batch import EncodedRequests, RequestBatch
from goalrank_core.config import GoalRankConfig
from goalrank_core.config_sections import PolicyConfig
from goalrank_core.errors import ConfigError, GoalRankInputError
from goalrank_core.policies import HeuristicStats, LoggedPolicy, MMRPolicy, ScorePolicy, check_enough, ctr_policy, first_stage_policy, fit_heuristics, history_policy, plackett_luce_sample, popularity_policy, random_policy, topk_list
from goalrank_core.policy_registry import PolicyResources, build_auxiliary, build_policy

N_ITEMS = 40


def encoded(candidates, shown, labels, history=None, user=None, category=None, mask=None) -> EncodedRequests:
    cand = np.asarray(candidates, dtype=np.int64)
    r, n = cand.shape
    mask = cand != 0 if mask is None else np.asarray(mask, dtype=bool)
    hist = np.zeros((r, 3), np.int64) if history is None else np.asarray(history, np.int64)
    return EncodedRequests(
        request_id=np.array([f"r{i}" for i in range(r)], dtype=object),
        user=np.arange(2, 2 + r, dtype=np.int64) if user is None else np.asarray(user, np.int64),
        history=hist, candidates=cand, cand_mask=mask,
        category=np.zeros_like(cand) if category is None else np.asarray(category, np.int64),
        shown=np.asarray(shown, np.int64), labels=np.asarray(labels, np.float32),
        raw_candidates=np.where(mask, cand + 1000, -1),
    )


def valid_lists(lists: torch.Tensor, batch: RequestBatch, n: int, L: int) -> None:
    assert lists.shape == (len(batch), n, L) and lists.dtype == torch.int64
    assert bool(((lists >= 0) & (lists < batch.candidates.shape[1])).all())
    real = torch.gather(batch.cand_mask[:, None, :].expand(-1, n, -1), 2, lists)
    assert bool(real.all()), "a list picked a padded candidate"
    srt = lists.sort(-1).values
    assert bool((srt[..., 1:] != srt[..., :-1]).all()), "a list repeats a candidate"


@st.composite
def masked_batches(draw):
    L = draw(st.integers(1, 5))
    n = draw(st.integers(L, 12))
    b = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    mask = np.zeros((b, n), bool)
    for i in range(b):
        k = rng.integers(L, n + 1)
        mask[i, rng.choice(n, k, replace=False)] = True
    cand = np.where(mask, rng.integers(2, N_ITEMS + 5, (b, n)), 0)  # a few items beyond the fitted vocabulary
    cat = np.where(mask, rng.integers(0, 4, (b, n)), 0)
    hist = rng.integers(0, N_ITEMS, (b, 4))
    shown = np.stack([rng.choice(np.flatnonzero(m), L, replace=False) for m in mask])
    e = encoded(cand, shown, rng.integers(0, 2, (b, L)), history=hist, category=cat, mask=mask)
    return e.batch(slice(None)), L, seed


def fitted_stats(seed: int = 0) -> HeuristicStats:
    rng = np.random.default_rng(seed)
    r, n, L = 60, 10, 4
    cand = np.stack([rng.choice(np.arange(2, N_ITEMS), n, replace=False) for _ in range(r)])
    shown = np.tile(np.arange(L), (r, 1))
    hist = rng.integers(0, N_ITEMS, (r, 5))
    e = encoded(cand, shown, rng.integers(0, 2, (r, L)), history=hist, user=rng.integers(2, 12, r))
    return fit_heuristics(e, N_ITEMS, PolicyConfig(emb_dim=8))


STATS = fitted_stats()


def heuristic_policies() -> list:
    pop = popularity_policy(STATS)
    return [pop, ctr_policy(STATS), random_policy(3), history_policy(STATS), first_stage_policy(),
            MMRPolicy(pop, 0.5, STATS.item_emb, "category"), MMRPolicy(pop, 0.5, STATS.item_emb, "embedding"),
            LoggedPolicy()]


@settings(max_examples=40, deadline=None)
@given(masked_batches(), st.integers(1, 4))
def test_every_heuristic_list_is_distinct_real_and_shaped(case, n):
    batch, L, seed = case
    gen = torch.Generator().manual_seed(seed)
    for policy in heuristic_policies():
        valid_lists(policy.propose(batch, n, gen), batch, n, L)


@settings(max_examples=40, deadline=None)
@given(masked_batches(), st.integers(1, 6))
def test_plackett_luce_never_repeats_and_stays_on_real_candidates(case, n):
    batch, L, seed = case
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch.candidates.shape, generator=gen) * 5
    valid_lists(plackett_luce_sample(scores, batch.cand_mask, L, n, gen), batch, n, L)
    valid_lists(topk_list(scores, batch.cand_mask, L)[:, None], batch, 1, L)


def test_topk_list_is_exact_and_ties_keep_first_stage_order():
    scores = torch.tensor([[0.5, 3.0, 3.0, 9.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True, False, True], [False, True, True, True, True]])
    assert topk_list(scores, mask, 3).tolist() == [[1, 2, 4], [1, 2, 3]]
    # -inf and NaN scores of real candidates still beat padding
    s = torch.tensor([[float("nan"), float("-inf"), 5.0]])
    assert topk_list(s, torch.tensor([[True, True, False]]), 2).tolist() == [[0, 1]]


def test_too_few_real_candidates_names_the_row():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    with pytest.raises(GoalRankInputError, match="request row 1 has 1 real candidates"):
        check_enough(mask, 2)


def test_popularity_and_ctr_are_exact_on_a_hand_made_log():
    # item 5 clicked 3x of 3 shows, item 6 1x of 2 shows, item 7 0x of 3, item 8 never shown.
    train = encoded(
        candidates=[[5, 6, 7, 8], [5, 7, 6, 8], [7, 5, 8, 6]],
        shown=[[0, 1, 2], [0, 1, 2], [0, 1, -1]],
        labels=[[1, 1, 0], [1, 0, 0], [0, 1, 0]],
    )
    stats = fit_heuristics(train, 10, PolicyConfig(ctr_prior=2.0, emb_dim=2))
    assert stats.popularity.tolist() == [0, 0, 0, 0, 0, 3, 1, 0, 0, 0]
    assert stats.impressions.tolist() == [0, 0, 0, 0, 0, 3, 2, 3, 0, 0]
    g = 4 / 8
    assert stats.ctr[5].item() == pytest.approx((3 + 2 * g) / (3 + 2))
    assert stats.ctr[8].item() == pytest.approx(g)  # unseen: the prior
    # UNK (1) and an index beyond the vocabulary (12) rank last, PAD is masked out
    req = encoded([[1, 7, 12, 6, 5, 8, 0]], [[-1, -1, -1]], [[0, 0, 0]]).batch(slice(None))
    assert popularity_policy(stats).propose(req, 1)[0, 0].tolist() == [4, 3, 0]
    assert ctr_policy(stats).propose(req, 2)[0].tolist() == [[4, 3, 5]] * 2


def test_first_stage_skips_padding_and_keeps_order():
    req = encoded([[9, 0, 4, 7, 3]], [[-1, -1]], [[0, 0]]).batch(slice(None))
    assert first_stage_policy().propose(req, 1)[0, 0].tolist() == [0, 2]


def _mmr_request():
    # candidates 2..7 with popularity falling by position; categories 1,1,1,2,2,3
    train = encoded([[2, 3, 4, 5, 6, 7]], [[0, 1, 2, 3, 4, 5]], [[1, 1, 1, 1, 1, 1]])
    stats = fit_heuristics(train, 10, PolicyConfig(emb_dim=2))
    stats.popularity[2:8] = torch.tensor([60.0, 50, 40, 30, 20, 10])
    req = encoded([[2, 3, 4, 5, 6, 7]], [[-1, -1, -1]], [[0, 0, 0]], category=[[1, 1, 1, 2, 2, 3]])
    return stats, req.batch(slice(None))


def test_mmr_picks_diverse_categories():
    stats, batch = _mmr_request()
    pop = popularity_policy(stats)
    assert MMRPolicy(pop, 0.5, None, "category").propose(batch, 1)[0, 0].tolist() == [0, 3, 5]
    assert MMRPolicy(pop, 1.0, None, "category").propose(batch, 1)[0, 0].tolist() == [0, 1, 2]  # relevance only
    assert pop.propose(batch, 1)[0, 0].tolist() == [0, 1, 2]


def test_mmr_over_embeddings_avoids_near_duplicates():
    stats, batch = _mmr_request()
    emb = torch.zeros(10, 2)
    emb[2] = emb[3] = emb[4] = torch.tensor([1.0, 0.0])  # three near-identical items
    emb[5], emb[6], emb[7] = torch.tensor([0.0, 1.0]), torch.tensor([0.7, 0.7]), torch.tensor([-1.0, 0.1])
    lists = MMRPolicy(popularity_policy(stats), 0.5, emb, "embedding").propose(batch, 1)[0, 0].tolist()
    assert lists[0] == 0 and 1 not in lists and 2 not in lists


def test_history_similarity_ranks_items_like_the_history_first():
    emb = torch.zeros(10, 2)
    emb[2], emb[3] = torch.tensor([1.0, 0.0]), torch.tensor([0.9, 0.1])  # history items
    emb[4], emb[5], emb[6] = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.05]), torch.tensor([-1.0, 0.0])
    stats = HeuristicStats(torch.zeros(10), torch.zeros(10), torch.zeros(10), emb)
    req = encoded([[4, 5, 6, 8]], [[-1, -1, -1]], [[0, 0, 0]], history=[[0, 2, 3]]).batch(slice(None))
    assert history_policy(stats).propose(req, 1)[0, 0].tolist() == [1, 0, 3]


def test_lowrank_embeddings_put_co_liked_items_together():
    # users 2-5 like items 2,3,4; users 6-9 like items 5,6,7: two taste groups
    hist = [[2, 3, 4]] * 4 + [[5, 6, 7]] * 4
    train = encoded([[2, 3, 4, 5, 6, 7]] * 8, [[0, 1]] * 8, [[0, 0]] * 8, history=hist, user=range(2, 10))
    e = torch.nn.functional.normalize(fit_heuristics(train, 10, PolicyConfig(emb_dim=4)).item_emb, dim=-1)
    sim = e @ e.T
    assert sim[2, 3] > 0.9 and sim[5, 6] > 0.9 and abs(sim[2, 5]) < 0.1
    assert e[8].abs().sum() == 0 and e[1].abs().sum() == 0  # never liked, UNK: zero


def test_plackett_luce_first_picks_follow_the_softmax():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, 5.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    gen = torch.Generator().manual_seed(0)
    n = 40000
    lists = plackett_luce_sample(scores, mask, 2, n, gen)[0]  # (n, 2)
    freq = torch.bincount(lists[:, 0], minlength=5).float() / n
    expect = torch.softmax(scores[0, :4], 0)
    assert freq[4] == 0
    assert torch.allclose(freq[:4], expect, atol=0.01), (freq, expect)
    # second pick given first = 0 follows the softmax over the rest
    sec = lists[lists[:, 0] == 0, 1]
    freq2 = torch.bincount(sec, minlength=5).float()[1:4] / len(sec)
    assert torch.allclose(freq2, torch.softmax(scores[0, 1:4], 0), atol=0.015)
    # temperature flattens; the same seed gives the same lists
    hot = plackett_luce_sample(scores, mask, 1, n, torch.Generator().manual_seed(1), temperature=100.0)[0, :, 0]
    assert (torch.bincount(hot, minlength=4)[:4].float() / n - 0.25).abs().max() < 0.02
    again = plackett_luce_sample(scores, mask, 2, n, torch.Generator().manual_seed(0))[0]
    assert torch.equal(again, lists)


def test_random_policy_varies_and_is_seeded():
    req = encoded([list(range(2, 12))], [[-1] * 3], [[0] * 3]).batch(slice(None))
    a = random_policy(5).propose(req, 5, torch.Generator().manual_seed(3))
    b = random_policy(5).propose(req, 5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len({tuple(x) for x in a[0].tolist()}) > 1


def test_logged_policy_returns_shown_and_rejects_missing():
    e = encoded([[2, 3, 4, 5]] * 2, [[3, 1], [2, -1]], [[1, 0], [0, 0]])
    assert LoggedPolicy().propose(e.batch([0]), 2).tolist() == [[[3, 1], [3, 1]]]
    with pytest.raises(GoalRankInputError, match="row 1"):
        LoggedPolicy().propose(e.batch(slice(None)), 1)


def test_registry_builds_by_name_and_reports_what_is_missing():
    res = PolicyResources(config=PolicyConfig(auxiliary="popularity,mmr,history,random", mmr_relevance="history"), stats=STATS)
    assert [p.name for p in build_auxiliary(res)] == ["popularity", "mmr", "history", "random"]
    assert isinstance(build_policy("first-stage", res), ScorePolicy)
    with pytest.raises(GoalRankInputError, match="unknown policy 'nope'"):
        build_policy("nope", res)
    with pytest.raises(GoalRankInputError, match="needs pointwise"):
        build_policy("dnn", res)
    with pytest.raises(GoalRankInputError, match="policy 'dnn' needs pointwise"):
        build_policy("mmr", PolicyResources(stats=STATS))  # default relevance: the DNN
    with pytest.raises(GoalRankInputError, match="needs stats"):
        build_policy("popularity", PolicyResources())
    with pytest.raises(ConfigError, match="policies.auxiliary"):
        build_auxiliary(PolicyResources(config=PolicyConfig(auxiliary="popularity,nope"), stats=STATS))
    custom = first_stage_policy()
    assert build_policy("goalrank", PolicyResources(extra={"goalrank": custom})) is custom


def test_heuristic_stats_round_trip_through_tensors():
    back = HeuristicStats.from_tensors(STATS.to_tensors())
    assert all(torch.equal(a, b) for a, b in zip(back.to_tensors().values(), STATS.to_tensors().values()))
    with pytest.raises(GoalRankInputError, match="ctr"):
        HeuristicStats.from_tensors({"popularity": STATS.popularity})


@pytest.mark.parametrize("key,value,match", [
    ("policies.mmr_lambda", 1.5, "policies.mmr_lambda"),
    ("policies.auxiliary", "popularity,,x y", "policies.auxiliary"),
    ("policies.auxiliary", "ctr,ctr", "twice"),
    ("policies.prm_heads", 3, "policies.prm_heads"),
    ("policies.mmr_similarity", "cosine", "policies.mmr_similarity"),
    ("policies.pl_lists", 0, "policies.pl_lists"),
])
def test_policy_config_rejects_bad_values(key, value, match):
    with pytest.raises(ConfigError, match=match):
        GoalRankConfig().override({key: value})
