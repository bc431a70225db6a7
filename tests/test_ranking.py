"""rank(): every policy of a fitted bundle gives valid lists for every request."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from goalrank_core.errors import GoalRankInputError
from goalrank_core.fit import fit_tables
from goalrank_core.ranking import available_policies, rank
from goalrank_core.schemas import RANKED, REQUESTS
from gr_helpers import synth_tables, tiny_config


@pytest.fixture(scope="module")
def fitted():
    splits, _ = synth_tables(n_users=20, requests_per_user=5)
    bundle = fit_tables(splits.train, splits.valid, tiny_config(), splits.items, log=lambda s: None)
    return bundle, splits


def _check(ranked: pa.Table, requests: pa.Table, L: int) -> None:
    assert ranked.schema.equals(RANKED)
    assert ranked.column("request_id").to_pylist() == requests.column("request_id").to_pylist()
    for lst, cand in zip(ranked.column("ranked").to_pylist(), requests.column("candidates").to_pylist()):
        assert len(lst) == L and len(set(lst)) == L and set(lst) <= set(cand)


def test_every_policy_ranks_every_request(fitted):
    bundle, splits = fitted
    requests = splits.test.select(REQUESTS.names)
    names = available_policies(bundle)
    for required in ("goalrank", "g-e", "supervised", "random", "popularity", "dnn", "prm"):
        assert required in names
    for policy in names:
        if policy == "logged":
            continue
        _check(rank(bundle, requests, policy), requests, 4)


def test_unseen_users_and_items_are_ranked(fitted):
    bundle, splits = fitted
    t = splits.test.select(REQUESTS.names).slice(0, 3)
    new_cand = [[900_000 + i for i in range(12)], t.column("candidates")[1].as_py(), [900_100 + i for i in range(5)]]
    t = t.set_column(1, "user_id", pa.array([777_777, 777_778, 777_779], pa.int64()))
    t = t.set_column(4, "candidates", pa.array(new_cand, pa.list_(pa.int64())))
    for policy in ("goalrank", "g-e", "dnn"):
        out = rank(bundle, t, policy)
        _check(out, t, 4)


def test_greedy_ranking_is_deterministic_and_unknown_policy_is_an_error(fitted):
    bundle, splits = fitted
    req = splits.test.select(REQUESTS.names)
    assert rank(bundle, req, "goalrank").equals(rank(bundle, req, "goalrank"))
    assert rank(bundle, req, "random", seed=1).equals(rank(bundle, req, "random", seed=1))
    with pytest.raises(GoalRankInputError, match="unknown policy 'nope'"):
        rank(bundle, req, "nope")


def test_too_few_candidates_is_an_error(fitted):
    bundle, splits = fitted
    t = splits.test.select(REQUESTS.names).slice(0, 2)
    t = t.set_column(4, "candidates", pa.array([[1, 2, 3], t.column("candidates")[1].as_py()], pa.list_(pa.int64())))
    with pytest.raises(GoalRankInputError, match="row 0"):
        rank(bundle, t, "goalrank")
