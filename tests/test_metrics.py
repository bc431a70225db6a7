"""Metrics on hand-computed cases, properties, and the evaluation CLI path."""
from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goalrank.cli import main
from goalrank_core.errors import DataValidationError
from goalrank_core.metrics import bootstrap_ci, evaluate_lists, metrics_rows, metrics_table, per_request
from goalrank_core.schemas import IMPRESSIONS, METRICS, RANKED

D = [1 / math.log2(j + 2) for j in range(10)]  # DCG discounts


def truth_table() -> pa.Table:
    # request a: positives {1, 3}; b: positive {5}; c: no positive (excluded).
    rows = [
        {"request_id": "a", "user_id": 1, "timestamp": 0, "history": [], "candidates": [1, 2, 3, 4, 9],
         "shown": [1, 2, 3], "labels": [1.0, 0.0, 1.0]},
        {"request_id": "b", "user_id": 2, "timestamp": 0, "history": [7], "candidates": [5, 6, 7, 8],
         "shown": [6, 5, 8], "labels": [0.0, 1.0, 0.0]},
        {"request_id": "c", "user_id": 3, "timestamp": 0, "history": [], "candidates": [1, 2, 3],
         "shown": [1, 2, 3], "labels": [0.0, 0.0, 0.0]},
    ]
    return pa.Table.from_pylist(rows, schema=IMPRESSIONS)


def ranked(lists: dict[str, list[int]]) -> pa.Table:
    return pa.Table.from_pylist([{"request_id": k, "ranked": v} for k, v in lists.items()], schema=RANKED)


def test_hand_computed():
    res = evaluate_lists(ranked({"a": [2, 1, 4], "b": [5, 6, 7], "c": [3, 2, 1]}), truth_table(), [1, 3], n_boot=200)
    # a: rel = [0, 1, 0], P = 2.  b: rel = [1, 0, 0], P = 1.  c excluded.
    assert res["hr@1"].value == pytest.approx((0 + 1) / 2)
    assert res["hr@3"].value == pytest.approx((1 / 2 + 1) / 2)
    ndcg_a3 = D[1] / (D[0] + D[1])
    assert res["ndcg@3"].value == pytest.approx((ndcg_a3 + 1.0) / 2)
    assert res["ndcg@1"].value == pytest.approx((0 + 1) / 2)
    map_a3 = (1 / 2) / 2  # one hit at rank 2: precision 1/2, divided by min(P, K) = 2
    assert res["map@3"].value == pytest.approx((map_a3 + 1.0) / 2)
    assert res["map@1"].value == pytest.approx((0 + 1) / 2)  # min(P, 1) = 1
    assert res["hr@3"].n_requests == 2 and res["hr@3"].n_excluded == 1
    assert res["hr@3"].ci_low <= res["hr@3"].value <= res["hr@3"].ci_high


def test_perfect_and_worst_lists():
    t = truth_table()
    best = evaluate_lists(ranked({"a": [1, 3, 2], "b": [5, 6, 7], "c": [1, 2, 3]}), t, [2])
    assert all(best[m].value == pytest.approx(1.0) for m in ("hr@2", "ndcg@2", "map@2"))
    worst = evaluate_lists(ranked({"a": [2, 4, 9], "b": [6, 7, 8], "c": [1, 2, 3]}), t, [3])
    assert all(worst[m].value == 0.0 for m in ("hr@3", "ndcg@3", "map@3"))


def test_k_larger_than_list_and_ranked_order_irrelevant():
    t = truth_table()
    r1 = evaluate_lists(ranked({"a": [3], "b": [5], "c": [1]}), t, [10])
    assert r1["hr@10"].value == pytest.approx((0.5 + 1) / 2)
    r2 = evaluate_lists(ranked({"c": [1], "b": [5], "a": [3]}), t, [10])
    assert r2["ndcg@10"].value == r1["ndcg@10"].value


@pytest.mark.parametrize(
    "lists, expected",
    [({"a": [1, 1, 2], "b": [5], "c": [1]}, "row 0: an item appears more than once"),
     ({"a": [1, 99], "b": [5], "c": [1]}, "row 0: item 99 is not among the request's candidates"),
     ({"a": [1], "b": [5], "c": [1], "zz": [1]}, "row 3: request 'zz' is not in the truth table"),
     ({"a": [1], "b": [5]}, "request 'c' has no ranked list"),
     ({"a": [1], "b": [], "c": [1]}, "row 1: empty list"),
     ({"a": [1], "b": [-3], "c": [1]}, "row 1: negative item id")],
)
def test_bad_ranked_lists(lists, expected):
    with pytest.raises(DataValidationError, match=expected):
        evaluate_lists(ranked(lists), truth_table(), [3])


def test_duplicate_request_in_ranked():
    t = pa.Table.from_pylist([{"request_id": "a", "ranked": [1]}, {"request_id": "a", "ranked": [2]}], schema=RANKED)
    with pytest.raises(DataValidationError, match="row 1: duplicate request id 'a'"):
        evaluate_lists(t, truth_table(), [3])


def test_bootstrap_is_seeded_and_covers_mean():
    v = np.random.default_rng(0).random(500)
    assert bootstrap_ci(v, seed=3) == bootstrap_ci(v, seed=3)
    lo, hi = bootstrap_ci(v, seed=3)
    assert lo < v.mean() < hi and hi - lo < 0.1
    assert bootstrap_ci(np.full(50, 0.25)) == (0.25, 0.25)


def test_metrics_rows_match_schema():
    res = evaluate_lists(ranked({"a": [2, 1, 4], "b": [5, 6, 7], "c": [3, 2, 1]}), truth_table(), [3])
    rows = metrics_rows("test", "random", res)
    t = metrics_table(rows)
    assert t.schema.equals(METRICS)
    assert sorted(t.column("metric").to_pylist()) == ["hr@3", "map@3", "ndcg@3"]
    assert set(t.column("n_requests").to_pylist()) == {2}


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_metrics_in_unit_interval_and_monotone_hr(data):
    n = data.draw(st.integers(6, 20))
    r = data.draw(st.integers(1, 8))
    rng = np.random.default_rng(data.draw(st.integers(0, 10_000)))
    lists = np.stack([rng.permutation(n)[:6] for _ in range(r)])  # (r, 6) distinct
    pos = np.where(rng.random((r, 6)) < 0.4, np.stack([rng.permutation(n)[:6] for _ in range(r)]), -1)
    prev = None
    for k in (1, 3, 6):
        vals = per_request(lists, pos, k)
        for name, v in vals.items():
            ok = v[~np.isnan(v)]
            assert ((ok >= -1e-12) & (ok <= 1 + 1e-12)).all(), name
            assert np.isnan(v).sum() == ((pos >= 0).sum(1) == 0).sum()
        if prev is not None:  # HR@K never decreases with K
            assert (np.nan_to_num(vals["hr"]) >= np.nan_to_num(prev) - 1e-12).all()
        prev = vals["hr"]


@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(8))), st.sets(st.integers(0, 7), min_size=1, max_size=6))
def test_ranking_positives_first_is_optimal(perm, pos_set):
    pos = np.array([sorted(pos_set) + [-1] * (6 - len(pos_set))])
    best = np.array([sorted(pos_set) + [x for x in range(8) if x not in pos_set]])
    got, top = per_request(np.array([perm]), pos, 6), per_request(best, pos, 6)
    for name in ("hr", "ndcg", "map"):
        assert got[name][0] <= top[name][0] + 1e-12
        assert top[name][0] == pytest.approx(1.0) or name == "hr"


def test_evaluate_cli(tmp_path, capsys):
    pq.write_table(truth_table(), tmp_path / "truth.parquet")
    pq.write_table(ranked({"a": [2, 1, 4], "b": [5, 6, 7], "c": [3, 2, 1]}), tmp_path / "lists.parquet")
    assert main(["evaluate", "--lists", str(tmp_path / "lists.parquet"), "--truth", str(tmp_path / "truth.parquet"), "--k", "1,3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"hr@1", "ndcg@1", "map@1", "hr@3", "ndcg@3", "map@3"}
    assert out["hr@3"] == pytest.approx(0.75)
    assert main(["evaluate", "--lists", str(tmp_path / "lists.parquet"), "--truth", str(tmp_path / "truth.parquet")]) == 0
    table = capsys.readouterr().out
    assert "hr@3" in table and "95% interval" in table and "1 without" in table  # default K = L = 3
    pq.write_table(ranked({"a": [1, 99], "b": [5], "c": [1]}), tmp_path / "bad.parquet")
    assert main(["evaluate", "--lists", str(tmp_path / "bad.parquet"), "--truth", str(tmp_path / "truth.parquet")]) == 2
    assert "item 99 is not among" in capsys.readouterr().err


def test_bootstrap_without_resamples_gives_no_interval():
    v = np.random.default_rng(0).random(20)
    assert all(np.isnan(x) for x in bootstrap_ci(v, n_boot=0))
    with pytest.raises(ValueError, match="n_boot must be >= 0"):
        bootstrap_ci(v, n_boot=-1)
