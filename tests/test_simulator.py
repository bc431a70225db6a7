"""The list-wise simulator: exact click model, known optimum on small cases, logs in the contract."""
from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from goalrank_core.errors import GoalRankInputError
from goalrank_core.metrics import _padded
from goalrank_core.protocol import split_impressions
from goalrank_core.simulator import EFFECTS, World, make_world, parse_effect, simulate_logs
from goalrank_core.simulator_search import (best_lists, exhaustive_best, move_table, normalised_value,
                                            random_value, upper_bound)
from goalrank_core.synth import ITEM_ID_OFFSET
from goalrank_core.validate import validate_impressions, validate_items

ALL = list(EFFECTS) + ["saturation+pairs+cascade"]


def small_world(effect: str, seed: int = 0) -> World:
    return make_world(effect, seed=seed, n_users=30, n_items=60, n_categories=3, slate_len=4)


def small_requests(world: World, B: int, N: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, world.n_users, B)
    cand = np.stack([rng.choice(world.n_items, N, replace=False) for _ in range(B)]) + ITEM_ID_OFFSET
    return users, cand


def test_parse_effect():
    assert parse_effect("cascade+saturation") == ("saturation", "cascade")
    for bad in ("", "boredom", "saturation+boredom"):
        with pytest.raises(GoalRankInputError, match="effect"):
            parse_effect(bad)


@pytest.mark.parametrize("effect", ALL)
def test_search_matches_exhaustive_and_bound_holds(effect):
    world = small_world(effect)
    users, cand = small_requests(world, 40, 6)
    opt_lists, opt = exhaustive_best(world, users, cand, 3)
    found_lists, found = best_lists(world, users, cand, 3, restarts=2)
    np.testing.assert_allclose(found, opt, atol=1e-9)
    np.testing.assert_allclose(world.expected_clicks(users, found_lists), found, atol=1e-12)
    assert (upper_bound(world, users, cand, 3) >= opt - 1e-12).all()
    assert (random_value(world, users, cand, 3, n_lists=32) <= opt + 1e-12).all()


def test_exhaustive_enumerates_every_ordered_list():
    world = small_world("pairs")
    users, cand = small_requests(world, 2, 5)
    _, opt = exhaustive_best(world, users, cand, 2)
    every = np.array([[world.expected_clicks(users[b:b + 1], cand[b:b + 1, list(p)])[0]
                       for p in itertools.permutations(range(5), 2)] for b in range(2)])
    np.testing.assert_allclose(opt, every.max(1))


def test_move_table_is_permutations():
    moves = move_table(7, 3)
    assert (np.sort(moves, 1) == np.arange(7)).all()
    assert len({tuple(m) for m in moves}) == len(moves)


@pytest.mark.parametrize("effect", ["cascade", "saturation+cascade"])
def test_cascade_recursion_matches_monte_carlo(effect):
    world = small_world(effect)
    users, cand = small_requests(world, 3, 4)
    exact = world.click_probs(users, cand)  # (3, 4)
    rng = np.random.default_rng(0)
    n = 20000
    clicks = world.sample_clicks(rng, np.repeat(users, n), np.repeat(cand, n, 0)).reshape(3, n, 4).mean(1)
    np.testing.assert_allclose(clicks, exact, atol=4 * np.sqrt(0.25 / n))
    assert (exact[:, 1:] < world._cascade_terms(users, cand)[0][:, 1:]).any()  # the reader does stop


def test_effects_change_only_their_term():
    plain, sat = small_world("pairs"), small_world("saturation")
    users, cand = small_requests(sat, 5, 4)
    first = sat.click_probs(users, cand)[:, 0]  # nothing before the first item: no context
    np.testing.assert_allclose(first, plain.click_probs(users, cand)[:, 0])
    cat = sat.category[cand - ITEM_ID_OFFSET]
    same = np.array([[np.sum(cat[b, :p] == cat[b, p]) for p in range(4)] for b in range(5)])
    logit = sat.affinity(users, cand) - sat.pos_bias[None] - sat.strengths.gamma * same
    np.testing.assert_allclose(sat.click_probs(users, cand), 1 / (1 + np.exp(-logit)))


def test_bad_ids_refused():
    world = small_world("saturation")
    with pytest.raises(GoalRankInputError, match="item id"):
        world.expected_clicks(np.array([0]), np.array([[ITEM_ID_OFFSET + 60, ITEM_ID_OFFSET]]))
    with pytest.raises(GoalRankInputError, match="user id"):
        world.expected_clicks(np.array([30]), np.array([[ITEM_ID_OFFSET, ITEM_ID_OFFSET + 1]]))


def test_logs_validate_and_are_seeded():
    world = make_world("saturation+cascade", seed=3, n_users=20, n_items=80, slate_len=5)
    a, items = simulate_logs(world, n_requests=100, n_candidates=12, seed=0)
    b, _ = simulate_logs(world, n_requests=100, n_candidates=12, seed=0)
    c, _ = simulate_logs(world, n_requests=100, n_candidates=12, seed=1)
    validate_impressions(a, "sim")
    validate_items(items, "sim items")
    assert a.equals(b) and not a.equals(c)
    splits = split_impressions(a, items)  # the project's own split, whichever rule is the default
    assert splits.train.num_rows + splits.valid.num_rows + splits.test.num_rows == 100
    assert np.bincount(a.column("user_id").to_numpy()).tolist() == [5] * 20
    # history = the user's earlier clicks
    rows = a.filter(pa.compute.equal(a.column("user_id"), 4)).to_pylist()
    clicked = [i for r in rows for i, l in zip(r["shown"], r["labels"]) if l > 0]
    seen = 0
    for r in rows:
        assert r["history"] == clicked[:seen][-50:]
        seen += sum(l > 0 for l in r["labels"])
    w2 = make_world("saturation+cascade", seed=3, n_users=20, n_items=80, slate_len=5)
    np.testing.assert_array_equal(world.user_vec, w2.user_vec)


def test_world_save_load_roundtrip(tmp_path):
    world = small_world("saturation+pairs+cascade")
    world.save(tmp_path / "w")
    back = World.load(tmp_path / "w")
    users, cand = small_requests(world, 6, 4)
    np.testing.assert_array_equal(world.expected_clicks(users, cand), back.expected_clicks(users, cand))
    assert back.effects == world.effects and back.strengths == world.strengths
    with pytest.raises(GoalRankInputError, match="not a simulator world"):
        World.load(tmp_path)


def _ranked(table: pa.Table, lists: np.ndarray) -> pa.Table:
    return pa.table({"request_id": table.column("request_id"), "ranked": pa.array(list(lists), pa.list_(pa.int64()))})


def test_normalised_value_orders_random_sort_best():
    world = make_world("saturation", seed=0, n_users=20, n_items=100, slate_len=4)
    imp, _ = simulate_logs(world, n_requests=40, n_candidates=8, seed=0)
    users, cand = imp.column("user_id").to_numpy(), _padded(imp.column("candidates"))
    best, _ = best_lists(world, users, cand, 4)
    tv = normalised_value(world, imp, _ranked(imp, best).take(pa.array(np.arange(40)[::-1])))  # any row order
    assert tv.score == pytest.approx(1.0)
    np.testing.assert_allclose(tv.value, tv.best)
    assert (tv.upper >= tv.best - 1e-12).all()
    worst = normalised_value(world, imp, _ranked(imp, cand[:, :4]), best=tv.best)
    assert worst.score < 0.5


@pytest.mark.slow
@pytest.mark.parametrize("effect", EFFECTS)
def test_default_worlds_are_honest(effect):
    """Sorting by true relevance reaches at most 0.6 normalised with the default strengths."""
    world = make_world(effect, seed=0)
    imp, _ = simulate_logs(world, n_requests=300, seed=0)
    users, cand = imp.column("user_id").to_numpy(), _padded(imp.column("candidates"))
    srt = np.take_along_axis(cand, np.argsort(-world.affinity(users, cand), 1)[:, :10], 1)
    assert normalised_value(world, imp, _ranked(imp, srt)).score <= 0.6


def test_cli_simulate_and_evaluate(tmp_path, capsys):
    import json

    from goalrank.cli import main

    out = tmp_path / "sim"
    assert main(["data", "simulate", "--effect", "pairs", "--seed", "0", "--out", str(out), "--users", "10",
                 "--items", "60", "--requests", "30", "--candidates", "8", "--slate-len", "4"]) == 0
    imp = pq.read_table(out / "impressions.parquet")
    assert imp.num_rows == 30 and (out / "items.parquet").is_file() and (out / "world" / "world.json").is_file()
    test = split_impressions(imp).test
    lists = _padded(test.column("candidates"))[:, :4]
    pq.write_table(_ranked(test, lists), tmp_path / "ranked.parquet")
    capsys.readouterr()
    assert main(["evaluate", "--lists", str(tmp_path / "ranked.parquet"), "--world", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) >= {"normalised", "ci_low", "ci_high", "value", "random", "best", "upper", "n_requests"}
    assert got["n_requests"] == test.num_rows and got["ci_low"] <= got["normalised"] <= got["ci_high"]
    assert main(["evaluate", "--lists", str(tmp_path / "ranked.parquet"), "--world", str(tmp_path)]) == 2
    assert main(["data", "simulate", "--effect", "boredom", "--out", str(out)]) == 2


def test_bench_scoring_shares_one_best():
    """bench.simulator's scoring without a fit: the oracle sort and the logged lists of a tiny world."""
    from bench.simulator import LOGGED, ORACLE, _ranked as bench_ranked, score_policies, summarise

    world = make_world("cascade", seed=0, n_users=10, n_items=60, slate_len=4)
    imp, _ = simulate_logs(world, n_requests=20, n_candidates=8, seed=0)
    users, cand = imp.column("user_id").to_numpy(), _padded(imp.column("candidates"))
    best, _ = best_lists(world, users, cand, 4)
    lists = {"goalrank": bench_ranked(imp, best), LOGGED: bench_ranked(imp, _padded(imp.column("shown"))),
             ORACLE: bench_ranked(imp, cand[:, :4])}
    res = score_policies(world, imp, lists, seed=0)
    assert res["goalrank"]["normalised"] == pytest.approx(1.0)
    assert res["_world"]["upper"] >= res["_world"]["best"] >= res["_world"]["search_best"]
    summary, rows = summarise("cascade", [res], 4)
    assert rows[0][1] == "goalrank" and summary[LOGGED]["goalrank_minus"]["mean"] > 0


def test_bench_world_strengths_reach_the_world(tmp_path):
    """bench.simulator --strength: named strengths change the world's click model, others are refused."""
    from bench.simulator import parse_strengths, world_and_splits
    from goalrank_core.config import GoalRankConfig

    assert parse_strengths(["gamma=1.5", "n_sub=4"]) == {"gamma": 1.5, "n_sub": 4}
    for bad in (["gama=1"], ["gamma=x"], ["gamma"]):
        with pytest.raises(SystemExit, match="--strength"):
            parse_strengths(bad)
    cfg = GoalRankConfig().for_source("impressions")
    world, _ = world_and_splits("saturation", 0, 40, 3, cfg, tmp_path, {"gamma": 1.5})
    assert world.strengths.gamma == 1.5 and world.strengths.n_sub == 10
    lists = np.tile(world.item_ids[np.flatnonzero(world.category == world.category[0])[:3]], (1, 1))  # one category
    weak = make_world("saturation", seed=0, n_users=40)
    assert world.expected_clicks(np.array([0]), lists)[0] < weak.expected_clicks(np.array([0]), lists)[0]



def test_bench_world_without_items_file_hides_categories(tmp_path):
    """bench.simulator --no-items: the splits carry no item table (models see no categories), the
    same logs otherwise."""
    from bench.simulator import world_and_splits
    from goalrank_core.bundle import build_bundle
    from goalrank_core.config import GoalRankConfig

    cfg = GoalRankConfig().for_source("impressions")
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _, with_items = world_and_splits("saturation", 0, 40, 3, cfg, tmp_path / "a")
    _, without = world_and_splits("saturation", 0, 40, 3, cfg, tmp_path / "b", with_items=False)
    assert with_items.items is not None and with_items.items.num_rows > 0 and without.items is None
    assert without.train.equals(with_items.train)
    given = build_bundle(with_items.train, cfg, with_items.items).item_category
    assert given and set(given.values()) == set(with_items.items.column("category").to_pylist())
    assert not build_bundle(without.train, cfg.override({"policies.latent_categories": 0}), None).item_category
    learnt = build_bundle(without.train, cfg, None).item_category  # the impressions recipe learns some
    assert learnt and set(learnt.values()) <= set(range(1, cfg.policies.latent_categories + 1))

def test_true_reward_scores_lists_by_their_exact_value():
    import torch

    from goalrank_core.bundle import build_bundle, encode
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.simulator import TrueReward

    w = make_world("saturation+cascade", seed=0, n_users=20, n_items=80)
    imp, items = simulate_logs(w, n_requests=40, n_candidates=20, seed=0)
    bundle = build_bundle(imp, GoalRankConfig(), items)
    batch = encode(bundle, imp).batch(np.arange(5))
    reward = TrueReward(w, bundle.item_vocab.ids, bundle.user_vocab.ids)
    lists = torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(i))[:10] for i in range(15)]).reshape(5, 3, 10)
    cand = np.array(imp.column("candidates").to_pylist())[:5]
    users = imp.column("user_id").to_numpy()[:5]
    raw = np.take_along_axis(cand, lists.numpy().reshape(5, 30), 1).reshape(5, 3, 10)
    want = np.stack([w.expected_clicks(users, raw[:, g]) for g in range(3)], 1)
    np.testing.assert_allclose(reward.score(batch, lists).numpy(), want, rtol=1e-5)
    # a list cut short (-1) is worth its leading items: the world reads top-down
    short = lists.clone()
    short[:, :, 4:] = -1
    np.testing.assert_allclose(reward.score(batch, short).numpy(),
                               np.stack([w.expected_clicks(users, raw[:, g, :4]) for g in range(3)], 1), rtol=1e-5)


def test_a_fit_with_the_true_reward_trains_no_reward_model():
    from gr_helpers import tiny_config

    from goalrank_core.fit import fit_tables
    from goalrank_core.simulator import TrueReward

    w = make_world("saturation", seed=0, n_users=20, n_items=80, slate_len=4)
    imp, items = simulate_logs(w, n_requests=80, n_candidates=12, seed=0)
    lines: list[str] = []
    bundle = fit_tables(imp, None, tiny_config(), items, log=lines.append,
                        reward_model=lambda b: TrueReward(w, b.item_vocab.ids, b.user_vocab.ids))
    assert isinstance(bundle.models["reward"], TrueReward)
    assert not any(line.startswith("reward model") for line in lines)  # nothing trained in its place
    assert bundle.fit_report and bundle.fit_report[0]["round"] == 1


def test_bench_teacher_is_the_search_under_the_bundles_reward_model():
    """bench.simulator's teacher column: the search list under the bundle's reward model, in raw ids.
    With the world's exact value as that model it must beat the sort by true point-wise relevance
    on a strong-saturation world (a teacher that ignored its model, or mapped positions wrongly,
    would not)."""
    from bench.simulator import teacher_lists
    from goalrank_core.bundle import build_bundle
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.simulator import Strengths, TrueReward

    w = make_world("saturation", seed=0, n_users=20, n_items=80, strengths=Strengths(gamma=1.5))
    imp, items = simulate_logs(w, n_requests=40, n_candidates=20, seed=0)
    bundle = build_bundle(imp, GoalRankConfig().for_source("impressions"), items)
    bundle.models["reward"] = TrueReward(w, bundle.item_vocab.ids, bundle.user_vocab.ids)
    ranked = teacher_lists(bundle, imp, batch_size=16)
    assert ranked.column("request_id").to_pylist() == imp.column("request_id").to_pylist()
    lists, cand = np.array(ranked.column("ranked").to_pylist()), _padded(imp.column("candidates"))
    assert lists.shape == (40, 10) and all(set(r) <= set(c) and len(set(r)) == 10 for r, c in zip(lists, cand))
    users = imp.column("user_id").to_numpy()
    sort = np.take_along_axis(cand, np.argsort(-w.affinity(users, cand), 1)[:, :10], 1)
    assert w.expected_clicks(users, lists).mean() > w.expected_clicks(users, sort).mean() + 0.05


def test_cascade_optimum_shows_the_most_satisfying_items_last():
    """Why the cascade world is hard to learn from its logs: with no position bias and no dull
    stops, an item i is worth q_i and stops the reader after a click with prob s_i = s_click *
    sigmoid(a_i), so swapping neighbours shows i goes first iff s_i < s_j: the optimal list is in
    ASCENDING relevance, the reverse of the context-unaware logger's order (exhaustive search)."""
    from goalrank_core.simulator import Strengths

    w = make_world("cascade", seed=3, n_users=8, n_items=40, slate_len=3, strengths=Strengths(s_dull=0.0))
    w.pos_bias[:] = 0.0
    users, cand = np.arange(8), np.stack([w.item_ids[np.random.default_rng(i).permutation(40)[:6]] for i in range(8)])
    best, value = exhaustive_best(w, users, cand, 3)
    assert (np.diff(w.affinity(users, best), axis=1) > 0).all()
    descending = best[:, ::-1]
    assert (w.expected_clicks(users, descending) < value - 1e-9).all()
