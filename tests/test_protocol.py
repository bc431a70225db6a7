"""Ratings -> impressions: the split rule, candidates, determinism, and no leakage."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import goalrank_core.interaction_requests as interaction_requests
from goalrank_core.config_sections import ProtocolConfig
from goalrank_core.datasets import RATINGS, RawData, load
from goalrank_core.interaction_requests import kcore
from goalrank_core.protocol import load_splits, make_splits, split_impressions
from goalrank_core.retriever import ItemKNN, PureSVD
from goalrank_core.schemas import IMPRESSIONS
from goalrank_core.synth import synth_impressions
from goalrank_core.validate import validate_impressions

DATA = os.environ.get("GOALRANK_DATA_DIR")
needs_data = pytest.mark.skipif(not (DATA and (Path(DATA) / "ml-100k" / "u.data").is_file()), reason="GOALRANK_DATA_DIR with ml-100k not set")


def explicit_raw(n_users=60, n_items=90, per_user=40, seed=0) -> RawData:
    rng = np.random.default_rng(seed)
    users, items, ratings, ts = [], [], [], []
    for u in range(n_users):
        its = rng.choice(n_items, per_user - (u % 7), replace=False)
        users += [u + 500] * len(its)
        items += list(its + 1)
        ratings += list(rng.integers(1, 6, len(its)))
        ts += list(np.sort(rng.integers(0, 50, len(its))) * 100 + 10_000)  # many same-second ties
    t = pa.table({"user_id": users, "item_id": items, "rating": ratings, "timestamp": ts}).cast(RATINGS)
    return RawData("toy", t.take(pa.array(rng.permutation(t.num_rows))))


def implicit_raw(n_users=80, n_items=120, seed=1) -> RawData:
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for u in range(n_users):
        its = rng.choice(n_items, 20 + u % 5, replace=False)
        cut = len(its) - 3 - u % 2
        tr += [(u, int(i), 1.0, p) for p, i in enumerate(its[:cut])]
        te += [(u, int(i), 1.0, cut + p) for p, i in enumerate(its[cut:])]
    mk = lambda rows: pa.table(list(zip(*rows)), names=RATINGS.names).cast(RATINGS)
    return RawData("toy-implicit", mk(tr), test=mk(te), implicit=True)


CFG = ProtocolConfig(min_core=5, n_candidates=20)


class Spy:
    """Wraps the real fit_retriever to record what it was trained on."""

    def __init__(self):
        self.pairs: set[tuple[int, int]] = set()

    def __call__(self, kind, users, items, seed=0):
        self.pairs = set(zip(users.tolist(), items.tolist()))
        return interaction_requests.__dict__["_real_fit"](kind, users, items, seed=seed)


@pytest.fixture
def spy(monkeypatch):
    s = Spy()
    monkeypatch.setitem(interaction_requests.__dict__, "_real_fit", interaction_requests.fit_retriever)
    monkeypatch.setattr(interaction_requests, "fit_retriever", s)
    return s


def _by_user(t: pa.Table) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for row in t.to_pylist():
        out.setdefault(row["user_id"], []).append(row)
    return out


def check_no_leakage(s, spy_pairs, implicit=False):
    train, valid, test = _by_user(s.train), _by_user(s.valid), _by_user(s.test)
    assert set(valid) == set(test) and set(train) <= set(test)
    for u in test:
        assert len(valid[u]) == 1 and len(test[u]) == 1
        tr_max = max((r["timestamp"] for r in train.get(u, [])), default=-1)
        assert tr_max <= valid[u][0]["timestamp"] <= test[u][0]["timestamp"]
        # the retriever never saw a valid or test interaction
        for r in valid[u] + test[u]:
            pos = [i for i, lab in zip(r["shown"], r["labels"]) if lab > 0]
            assert not any((u, i) in spy_pairs for i in (pos if implicit else r["shown"]))
        # history holds only items from strictly earlier slates
        reqs = sorted(train.get(u, []) + valid[u] + test[u], key=lambda r: r["timestamp"])
        for j, r in enumerate(reqs):
            later = {i for q in reqs[j:] for i in q["shown"]}
            assert not later & set(r["history"]), (u, j)
            if r["history"] and reqs[:j]:
                # the most recent positives of earlier slates are in the history
                last = [i for i, lab in zip(reqs[j - 1]["shown"], reqs[j - 1]["labels"]) if lab > 0]
                assert set(last) <= set(r["history"])


def test_kcore_reaches_fixed_point():
    rng = np.random.default_rng(0)
    u, i = rng.integers(0, 50, 2000), rng.zipf(1.6, 2000) % 300
    keep = kcore(u, i, 10)
    assert keep.any()
    for arr in (u[keep], i[keep]):
        assert np.unique(arr, return_counts=True)[1].min() >= 10
    assert kcore(u[keep], i[keep], 10).all()


def test_explicit_protocol_shapes_and_split_rule(spy):
    s = make_splits(explicit_raw(), CFG)
    for name in ("train", "valid", "test"):
        t = s.split(name)
        assert t.schema.equals(IMPRESSIONS)
        validate_impressions(t, name)
        assert all(len(c) == CFG.n_candidates for c in t.column("candidates").to_pylist())
        assert all(len(x) == CFG.slate_len for x in t.column("shown").to_pylist())
    assert s.stats["valid_requests"] == s.stats["test_requests"] == s.stats["users"]
    check_no_leakage(s, spy.pairs)
    # labels are rating >= 4 of the shown items, in time order
    raw = explicit_raw().ratings.to_pylist()
    rating = {(r["user_id"], r["item_id"]): r["rating"] for r in raw}
    for r in s.test.to_pylist():
        assert r["labels"] == [float(rating[(r["user_id"], i)] >= 4) for i in r["shown"]]


def test_retrieved_candidates_exclude_everything_rated_before():
    s = make_splits(explicit_raw(), CFG)
    reqs = _by_user(pa.concat_tables([s.train, s.valid, s.test]))
    for u, rs in reqs.items():
        rs = sorted(rs, key=lambda r: r["timestamp"])
        for j, r in enumerate(rs):
            earlier = {i for q in rs[:j] for i in q["shown"]}
            assert not earlier & set(r["candidates"])
            assert set(r["shown"]) <= set(r["candidates"])


def test_deterministic_for_a_seed_and_seed_matters():
    a = make_splits(explicit_raw(), CFG)
    b = make_splits(explicit_raw(), CFG)
    assert a.train.equals(b.train) and a.test.equals(b.test) and a.stats == b.stats
    c = make_splits(explicit_raw(), ProtocolConfig(min_core=5, n_candidates=20, seed=1))
    assert c.test.column("shown").equals(a.test.column("shown"))  # slates do not depend on the seed
    assert not c.test.column("candidates").equals(a.test.column("candidates"))  # candidate order does


def test_candidate_order_does_not_reveal_shown():
    s = make_splits(explicit_raw(n_users=120), CFG)
    pos = [c.index(x) for c, sh in zip(s.train.column("candidates").to_pylist(), s.train.column("shown").to_pylist()) for x in sh]
    # shown items sit anywhere; under score order most would sit in the last L slots
    assert 0.35 < np.mean(pos) / (CFG.n_candidates - 1) < 0.65
    assert s.stats["shown_in_score_tail"] > 0.2


def test_mf_retriever_protocol():
    s = make_splits(explicit_raw(), ProtocolConfig(min_core=5, n_candidates=20, retriever="mf"))
    validate_impressions(s.test, "mf")


def test_implicit_protocol(spy):
    raw = implicit_raw()
    cfg = ProtocolConfig(min_core=5, n_candidates=24)
    s = make_splits(raw, cfg)
    clicked = {}
    for r in raw.ratings.to_pylist() + raw.test.to_pylist():
        clicked.setdefault(r["user_id"], set()).add(r["item_id"])
    test_items = {}
    for r in raw.test.to_pylist():
        test_items.setdefault(r["user_id"], []).append(r["item_id"])
    for name in ("train", "valid", "test"):
        t = s.split(name)
        validate_impressions(t, name)
        for r in t.to_pylist():
            pos = [i for i, lab in zip(r["shown"], r["labels"]) if lab > 0]
            neg = [i for i, lab in zip(r["shown"], r["labels"]) if lab == 0]
            assert len(r["shown"]) == cfg.slate_len and len(pos) == cfg.implicit_positives
            assert not set(neg) & clicked[r["user_id"]]  # negatives were never clicked
            if name == "test":
                assert pos and set(pos) <= set(test_items[r["user_id"]])
            else:
                assert not set(pos) & set(test_items[r["user_id"]])
    check_no_leakage(s, spy.pairs, implicit=True)


USER_LAST = ProtocolConfig(split="user-last")


def _ts(t: pa.Table) -> np.ndarray:
    return t.column("timestamp").to_numpy()


def test_split_user_impressions_by_time():
    imp, items, _ = synth_impressions(n_users=5, n_items=80, requests_per_user=4, seed=0)
    imp = imp.take(pa.array(np.random.default_rng(0).permutation(imp.num_rows)))  # order must not matter
    s = split_impressions(imp, items, USER_LAST)
    assert (s.train.num_rows, s.valid.num_rows, s.test.num_rows) == (10, 5, 5)
    for u, rows in _by_user(s.test).items():
        assert rows[0]["request_id"] == f"synth-{u}-3"
    assert s.items is items
    # no leakage inside a user: train <= valid <= test in time, and the user's last request tests
    train, valid, test = _by_user(s.train), _by_user(s.valid), _by_user(s.test)
    for u in test:
        assert max(r["timestamp"] for r in train[u]) <= valid[u][0]["timestamp"] <= test[u][0]["timestamp"]
        assert test[u][0]["timestamp"] == max(r["timestamp"] for r in imp.to_pylist() if r["user_id"] == u)


@pytest.mark.parametrize("ties", [False, True])
def test_time_split_is_a_global_cut(ties):
    imp, items, _ = synth_impressions(n_users=30, n_items=80, requests_per_user=4, seed=0)
    if ties:  # timestamps in coarse buckets: cuts must move to a run's start
        imp = imp.set_column(2, "timestamp", pa.array(_ts(imp) // 20_000 * 20_000, pa.int64()))
    imp = imp.take(pa.array(np.random.default_rng(0).permutation(imp.num_rows)))
    s = split_impressions(imp, items)  # default: time, 10 % valid, 10 % test
    assert s.stats["split"] == "time"
    assert s.train.num_rows + s.valid.num_rows + s.test.num_rows == imp.num_rows
    assert _ts(s.train).max() < _ts(s.valid).min() and _ts(s.valid).max() < _ts(s.test).min()
    if not ties:
        assert (s.train.num_rows, s.valid.num_rows, s.test.num_rows) == (96, 12, 12)
    assert s.stats["test_from_timestamp"] == _ts(s.test).min()
    shares = split_impressions(imp, items, ProtocolConfig(valid_share=0.25, test_share=0.25))
    if not ties:
        assert (shares.valid.num_rows, shares.test.num_rows) == (30, 30)


def test_a_split_without_training_requests_says_what_to_change():
    from goalrank_core.errors import GoalRankInputError

    imp, items, _ = synth_impressions(n_users=40, n_items=80, requests_per_user=2, seed=0)
    with pytest.raises(GoalRankInputError, match=r"split user-last: .*no requests: 40 of 40 users have fewer than 3 "
                                                 r"requests.*use --split time"):
        split_impressions(imp, items, USER_LAST)
    s = split_impressions(imp, items)  # the time split trains on the earlier 80 %
    assert s.train.num_rows == 64 and _ts(s.train).max() < _ts(s.valid).min()
    same_second = imp.set_column(2, "timestamp", pa.array(np.full(imp.num_rows, 7), pa.int64()))
    with pytest.raises(GoalRankInputError, match=r"split time: .*no requests: of 80 requests.*80 share the earliest"):
        split_impressions(same_second, items)


def test_load_splits_carries_optional_columns(tmp_path):
    import pyarrow.parquet as pq

    imp, _, _ = synth_impressions(n_users=10, n_items=80, requests_per_user=4, seed=0)
    imp = imp.append_column("propensity", pa.array(np.full(imp.num_rows, 0.5))).append_column(
        "labels_like", imp.column("labels")).append_column("note", pa.array(["x"] * imp.num_rows))
    pq.write_table(imp, tmp_path / "imp.parquet")
    s = load_splits(impressions=str(tmp_path / "imp.parquet"), protocol=USER_LAST)
    for t in (s.train, s.valid, s.test):
        assert t.column_names == IMPRESSIONS.names + ["propensity", "labels_like"]
    assert s.stats["split"] == "user-last"


def test_load_splits_arguments():
    from goalrank_core.errors import GoalRankInputError

    with pytest.raises(GoalRankInputError, match="exactly one data source"):
        load_splits()
    with pytest.raises(GoalRankInputError, match="exactly one data source"):
        load_splits(dataset="ml-100k", impressions="x.parquet")
    with pytest.raises(GoalRankInputError, match="items file goes with --impressions"):
        load_splits(dataset="ml-100k", items="i.parquet")


def test_retrievers_rank_co_occurring_items_first():
    # users 0-9 like items 1-5, users 10-19 like items 6-10
    users = np.repeat(np.arange(20), 5)
    items = np.concatenate([np.arange(1, 6) if u < 10 else np.arange(6, 11) for u in range(20)])
    for r in (ItemKNN.fit(users, items), PureSVD.fit(users, items, dim=2)):
        top = r.retrieve([np.array([1, 2]), np.array([7])], [np.array([1, 2]), np.array([7])], k=3)
        assert set(top[0]) <= {3, 4, 5} and set(top[1]) <= {6, 8, 9, 10}
    empty = ItemKNN.fit(users, items).retrieve([np.zeros(0, np.int64)], [np.array([1])], k=20)
    assert (empty[0] == -1).sum() == 11 and 1 not in empty[0]  # 9 items left, then padding


@needs_data
def test_ml100k_protocol(monkeypatch):
    spy = Spy()
    monkeypatch.setitem(interaction_requests.__dict__, "_real_fit", interaction_requests.fit_retriever)
    monkeypatch.setattr(interaction_requests, "fit_retriever", spy)
    s = make_splits(load("ml-100k", DATA), ProtocolConfig())
    st = s.stats
    assert st["users"] == 917 and st["valid_requests"] == st["test_requests"] == 917
    assert 0.45 < st["test_positive_share"] < 0.65
    assert st["train_mean_candidates"] == 50.0
    check_no_leakage(s, spy.pairs)
    assert s.items is not None and s.items.num_rows == st["items"]


@pytest.mark.slow
@needs_data
def test_amazon_book_protocol():
    s = make_splits(load("amazon-book", DATA), ProtocolConfig())
    for name in ("train", "valid", "test"):
        validate_impressions(s.split(name), name)
    assert s.stats["test_requests"] == s.stats["users"] > 1000


def test_the_source_decides_whether_an_unshown_candidate_is_a_negative():
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.errors import ConfigError

    built = make_splits(explicit_raw(), CFG)  # the protocol's impressions from ratings
    imp, items, _ = synth_impressions(n_users=30, n_items=80, requests_per_user=4, seed=0)
    logged = split_impressions(imp, items)  # a system's impression logs
    assert (built.source, built.stats["source"]) == ("interactions", "interactions")
    assert (logged.source, logged.stats["source"]) == ("impressions", "impressions")
    cfg = GoalRankConfig()
    assert cfg.reward.unshown == "auto" and cfg.reward.labelled_lists == (0, 0)  # unresolved: never invent a label
    neg, unk = cfg.for_source(built.source), cfg.for_source(logged.source)
    assert neg.reward.unshown == "negative" and neg.reward.labelled_lists == (cfg.reward.augment_lists, cfg.reward.group_lists) == (1, 4)
    assert unk.reward.unshown == "unknown" and unk.reward.labelled_lists == (0, 0)
    explicit = cfg.override({"reward.unshown": "negative"})
    assert explicit.for_source("impressions").reward.unshown == "negative"  # an explicit choice stays
    assert explicit.for_source("interactions") == explicit  # ... and so does every reward field beside it
    # auto brings the source's reward recipe for the fields left at their defaults; a field set stays
    assert (neg.reward.init_from_supervised, neg.reward.context_layers, neg.train.reward_epochs) == (True, 2, 3)
    assert (neg.reward.pairwise, neg.reward.causal, neg.reward.folds) == (False, False, 1)
    assert (unk.reward.pairwise, unk.reward.folds, unk.train.reward_epochs) == (True, 1, 8)  # list-wise, one reward model
    assert (unk.generator.list_bias, neg.generator.list_bias) == (True, False)  # the list-context pointer term
    # impression logs also get the loop that follows the reward model's search; the named data sets keep the default loop
    assert (unk.group.search_lists, unk.group.search_sweeps, unk.group.tau, unk.train.epochs,
            unk.group.rounds) == (True, 1, 0.1, 4, 2)
    assert (neg.group.search_lists, neg.group.search_sweeps, neg.group.tau, neg.train.epochs,
            neg.group.rounds) == (False, 0, 1.0, 2, 1)
    assert cfg.override({"group.tau": 0.5}).for_source("impressions").group.tau == 0.5  # a field set stays
    kept = cfg.override({"reward.folds": 3, "train.reward_epochs": 5}).for_source("interactions")
    assert (kept.reward.folds, kept.train.reward_epochs, kept.reward.pairwise) == (3, 5, False)
    with pytest.raises(ConfigError, match="reward.unshown"):
        cfg.override({"reward.unshown": "zero"})
    with pytest.raises(ConfigError, match="unknown data source"):
        cfg.for_source("ratings")
