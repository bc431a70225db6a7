"""Off-policy estimators (goalrank_core/ope.py) on cases small enough to compute by hand."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from goalrank.cli import main
from goalrank_core.metrics import evaluate_ope
from goalrank_core.ope import estimate, estimate_all, pi_weights, position_match, slate_match

# Three requests, L = 2. Slate rewards r = [1, 2, 0].
SHOWN = np.array([[1, 2], [3, 4], [5, 6]])
LABELS = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
PROP = np.array([0.5, 0.25, 0.5])
POS_PROP = np.array([[0.5, 0.5], [0.5, 0.5], [0.5, 1.0]])
# The target repeats the logged list on requests 0 and 2 and swaps request 1's two items.
TARGET = np.array([[1, 2, 9], [4, 3, 9], [5, 6, 9]])


def test_matches():
    assert slate_match(TARGET, SHOWN).tolist() == [True, False, True]
    assert position_match(TARGET, SHOWN).tolist() == [[True, True], [False, False], [True, True]]
    assert slate_match(np.array([[1]]), np.array([[1, 2]])).tolist() == [False]  # a shorter list never matches
    assert slate_match(np.array([[1, 7]]), np.array([[1, -1]])).tolist() == [True]  # padded shown slots


def test_each_estimator_by_hand():
    est = estimate_all(TARGET, SHOWN, LABELS, np.log(PROP), POS_PROP, n_boot=200)
    # IPS weights [1/0.5, 0, 1/0.5] = [2, 0, 2]: (2*1 + 0*2 + 2*0) / 3
    assert est["ips"].value == pytest.approx(2 / 3)
    assert est["snips"].value == pytest.approx(2 / 4)  # (2*1) / (2 + 0 + 2)
    assert est["ips"].ess == pytest.approx(16 / 8) and est["snips"].ess == est["ips"].ess  # (sum w)^2 / sum w^2
    # PI weights sum_j q/p - (L - 1): [2 + 2 - 1, 0 - 1, 2 + 1 - 1] = [3, -1, 2]
    assert pi_weights(position_match(TARGET, SHOWN), POS_PROP, SHOWN).tolist() == [3.0, -1.0, 2.0]
    assert est["pi"].value == pytest.approx((3 * 1 - 1 * 2 + 2 * 0) / 3)
    assert est["snpi"].value == pytest.approx((3 - 2) / (3 - 1 + 2))
    assert est["pi"].ess == pytest.approx(16 / 14)
    for e in est.values():
        assert e.n == 3 and e.ci_low <= e.ci_high


def test_without_position_propensities_pi_is_not_estimated():
    assert set(estimate_all(TARGET, SHOWN, LABELS, np.log(PROP))) == {"ips", "snips"}


def test_logged_policy_evaluates_to_its_own_mean_and_intervals_cover_it():
    rng = np.random.default_rng(0)
    r = rng.random(500)
    e = estimate(np.full(500, 4.0), r, self_normalised=True)  # every weight equal: SN = the plain mean
    assert e.value == pytest.approx(r.mean()) and e.ci_low < r.mean() < e.ci_high and e.ess == pytest.approx(500)
    assert estimate(np.zeros(3), np.ones(3), self_normalised=True).ess == 0.0


def test_slot_wise_uniform_logging_is_estimated_without_bias():
    """Logging fills slot 1 with item 1 or 2 and slot 2 with item 3 or 4, independently and
    uniformly (mu(list) = 1/4, each position 1/2: the product case PI assumes). Item 1 in slot
    1 is always clicked, item 3 in slot 2 half the time: the target [1, 3] earns 1.5."""
    rng = np.random.default_rng(1)
    n = 40_000
    shown = np.stack([rng.choice([1, 2], n), rng.choice([3, 4], n)], 1)  # (n, 2)
    labels = np.stack([shown[:, 0] == 1, (shown[:, 1] == 3) & (rng.random(n) < 0.5)], 1).astype(np.float64)
    target = np.tile([[1, 3]], (n, 1))
    est = estimate_all(target, shown, labels, np.log(np.full(n, 0.25)), np.full(shown.shape, 0.5), n_boot=200)
    for name in ("ips", "snips", "pi", "snpi"):
        assert est[name].value == pytest.approx(1.5, abs=0.05), name
        assert est[name].ci_low <= 1.5 <= est[name].ci_high, name
    assert est["pi"].ess > est["ips"].ess  # PI's per-position weights waste fewer requests


def _truth_table(**extra) -> pa.Table:
    t = pa.table({
        "request_id": ["a", "b", "c"], "user_id": [0, 1, 2], "timestamp": [1, 2, 3],
        "history": [[7], [7], [7]], "candidates": [[1, 2, 9], [3, 4, 9], [5, 6, 9]],
        "shown": SHOWN.tolist(), "labels": pa.array(LABELS.tolist(), pa.list_(pa.float32())),
    })
    for name, values in extra.items():
        t = t.append_column(name, pa.array(values))
    return t


def test_evaluate_ope_from_tables_and_cli(tmp_path, capsys):
    truth = _truth_table(propensity=PROP.tolist(), position_propensities=POS_PROP.tolist())
    ranked = pa.table({"request_id": ["c", "a", "b"], "ranked": [[5, 6], [1, 2], [4, 3]]})  # any order
    est = evaluate_ope(ranked, truth, n_boot=100)
    assert est["ips"].value == pytest.approx(2 / 3) and est["pi"].value == pytest.approx(1 / 3)
    pq.write_table(truth, tmp_path / "truth.parquet")
    pq.write_table(ranked, tmp_path / "lists.parquet")
    assert main(["evaluate", "--lists", str(tmp_path / "lists.parquet"), "--truth", str(tmp_path / "truth.parquet"),
                 "--ope"]) == 0
    out = capsys.readouterr().out
    assert "ips" in out and "snpi" in out and "0.6667" in out and "ESS" in out
    no_prop = _truth_table()
    pq.write_table(no_prop, tmp_path / "plain.parquet")
    assert main(["evaluate", "--lists", str(tmp_path / "lists.parquet"), "--truth", str(tmp_path / "plain.parquet"),
                 "--ope"]) == 2
    assert "need a 'propensity' or 'log_propensity' column" in capsys.readouterr().err


# ---------------------------------------------------------------- the simulator's Plackett-Luce logger


def _brute_log_prob(score: np.ndarray, order) -> float:
    left, total = list(range(len(score))), 0.0
    for i in order:
        total += score[i] - np.log(np.exp(score[left]).sum())
        left.remove(i)
    return total


def test_plackett_luce_log_prob_and_position_probs_match_enumeration_by_hand():
    import itertools

    from goalrank_core.synth import plackett_luce_log_prob, plackett_luce_position_probs

    score = np.array([[0.0, 1.0, -1.0, 0.5], [2.0, 0.0, 0.0, -2.0]])
    top = np.array([[1, 3], [0, 2]])
    np.testing.assert_allclose(plackett_luce_log_prob(score, top), [_brute_log_prob(s, t) for s, t in zip(score, top)])
    orders = list(itertools.permutations(range(4), 2))
    want = [[sum(np.exp(_brute_log_prob(s, o)) for o in orders if o[j] == t[j]) for j in range(2)]
            for s, t in zip(score, top)]
    np.testing.assert_allclose(plackett_luce_position_probs(score, top), want)
    # Every ordering's probabilities sum to 1, and position 0's marginal is the softmax.
    all_p = np.exp(plackett_luce_log_prob(score, np.broadcast_to(np.array(orders), (2, len(orders), 2))))
    np.testing.assert_allclose(all_p.sum(1), 1.0)
    soft = np.exp(score) / np.exp(score).sum(1, keepdims=True)
    np.testing.assert_allclose(plackett_luce_position_probs(score, top)[:, 0], soft[[0, 1], top[:, 0]])


def test_simulated_plackett_luce_logs_carry_propensities_that_match_the_draws():
    from goalrank_core.simulator import make_world, simulate_logs

    world = make_world("saturation", seed=0, n_users=1, n_items=4, n_categories=2, slate_len=2)
    imp, _ = simulate_logs(world, n_requests=4000, n_candidates=3, seed=1, logger="plackett-luce", temperature=2.0)
    assert {"log_propensity", "position_propensities"} <= set(imp.column_names)
    # One user, but candidates differ per request: check against the empirical frequency of the
    # logged list among requests with the same candidate set and the same propensity.
    cand = [tuple(sorted(c)) for c in imp.column("candidates").to_pylist()]
    shown = [tuple(s) for s in imp.column("shown").to_pylist()]
    prop = np.exp(imp.column("log_propensity").to_numpy())
    key = max(set(cand), key=cand.count)
    rows = [i for i, c in enumerate(cand) if c == key]
    assert len(rows) > 200
    for s in set(shown[i] for i in rows):
        hits = [i for i in rows if shown[i] == s]
        freq = len(hits) / len(rows)
        assert abs(freq - prop[hits[0]]) < 4 * np.sqrt(prop[hits[0]] * (1 - prop[hits[0]]) / len(rows)) + 1e-9
    noisy, _ = simulate_logs(world, n_requests=10, n_candidates=3, seed=1)
    assert "log_propensity" not in noisy.column_names


def test_simulated_plackett_luce_logs_pass_validation(tmp_path):
    from goalrank_core.simulator import make_world, simulate_logs
    from goalrank_core.validate import read_impressions

    world = make_world("cascade", seed=0, n_users=30, n_items=50, slate_len=3)
    imp, _ = simulate_logs(world, n_requests=60, n_candidates=6, seed=0, logger="plackett-luce")
    pq.write_table(imp, tmp_path / "imp.parquet")
    back = read_impressions(tmp_path / "imp.parquet")
    assert back.column("position_propensities").to_pylist() == imp.column("position_propensities").to_pylist()
    with pytest.raises(Exception, match="logger"):
        simulate_logs(world, n_requests=5, n_candidates=6, logger="greedy")
