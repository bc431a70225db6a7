"""The `score` stage's per-batch path (issue 4, throughput): the vectorised group <-> tensor
conversions agree with the plain per-row definitions, `score_batch` agrees with scoring each
request on its own, and the Ray stage with 2 actors writes exactly what `score_batch` gives."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from gr_helpers import synth_tables, tiny_config
from goalrank_core.errors import GoalRankInputError
from goalrank_core.schemas import CANDIDATE_GROUPS, IMPRESSIONS, SCORED_GROUPS
from tasks.group_rows import RequestIndex, groups_to_positions, masked_lists, padded_values

GROUPS = CANDIDATE_GROUPS.field("lists").type


@pytest.fixture(scope="module")
def world():
    """A synthetic train split, its bundle with a seeded untrained reward model, and groups of
    uneven sizes (1 to |B| lists, some repeated, one request twice)."""
    from goalrank_core.bundle import build_bundle
    from goalrank_core.trainer import set_seed

    splits, _ = synth_tables(n_users=30, requests_per_user=5, seed=1)
    train = splits.train
    cfg = tiny_config(**{"group.size": 5, "train.batch_size": 16})
    bundle = build_bundle(train, cfg)
    set_seed(0)
    bundle.add("reward", "reward", bundle.build("reward").eval())
    rng = np.random.default_rng(0)
    ids, lists = [], []
    for rid, cands in zip(train.column("request_id").to_pylist(), train.column("candidates").to_pylist()):
        n = int(rng.integers(1, cfg.group.size + 1))
        ids.append(rid)
        lists.append([rng.permutation(cands)[: cfg.protocol.slate_len].tolist() for _ in range(n)])
    ids.append(ids[3])
    lists.append(lists[3][:1])
    groups = pa.table({"request_id": pa.array(ids, pa.string()), "lists": pa.array(lists, GROUPS),
                       "policies": pa.array([["random"] * len(g) for g in lists], CANDIDATE_GROUPS.field("policies").type)})
    return {"train": train, "cfg": cfg, "bundle": bundle, "groups": groups}


def _loop_positions(enc, lists, width):
    """The definition, one request and one list at a time."""
    pos = np.full((len(lists), width, enc.shown.shape[1]), -1, dtype=np.int64)
    mask = np.zeros((len(lists), width), dtype=bool)
    for i, group in enumerate(lists):
        where = {int(x): j for j, x in enumerate(enc.raw_candidates[i]) if x >= 0}
        for g, lst in enumerate(group[:width]):
            pos[i, g, : len(lst)] = [where[x] for x in lst[: pos.shape[2]]]
            mask[i, g] = True
    return pos, mask


def test_groups_to_positions_from_arrow_matches_the_per_row_definition(world):
    from goalrank_core.bundle import encode

    groups, bundle = world["groups"], world["bundle"]
    index = RequestIndex(world["train"], "test")
    part = groups.slice(7, 20)  # a slice: offsets into the parent's buffers
    enc = encode(bundle, index.take(part.column("request_id")))
    lists = part.column("lists").to_pylist()
    for width in (5, 3):  # every list, then groups cut to their first 3 lists
        want = _loop_positions(enc, lists, width)
        for given in (part.column("lists"), part.column("lists").combine_chunks(), lists):
            pos, mask = groups_to_positions(enc, given, width, "test")
            assert np.array_equal(pos, want[0]) and np.array_equal(mask, want[1])


def test_groups_to_positions_names_the_request_with_an_unknown_item(world):
    from goalrank_core.bundle import encode

    part = world["groups"].slice(0, 4)
    enc = encode(world["bundle"], RequestIndex(world["train"], "test").take(part.column("request_id")))
    lists = part.column("lists").to_pylist()
    lists[2][0][1] = 10**9  # not a candidate of request 2
    with pytest.raises(GoalRankInputError, match=f"score: request '{part.column('request_id')[2]}' list 0 has an item"):
        groups_to_positions(enc, pa.array(lists, GROUPS), 5, "score")


def test_masked_lists_keeps_masked_values_in_order():
    rng = np.random.default_rng(0)
    values = rng.random((6, 4)).astype(np.float32)
    mask = rng.random((6, 4)) < 0.6
    mask[2] = False  # a request with no list left
    arr = masked_lists(values, mask, pa.list_(pa.float32()))
    assert arr.type == pa.list_(pa.float32())
    assert arr.to_pylist() == [values[i][mask[i]].tolist() for i in range(6)]
    assert masked_lists(values[:0], mask[:0], pa.list_(pa.float32())).to_pylist() == []


def test_padded_values_inverts_masked_lists_and_cuts_rows_to_width():
    rng = np.random.default_rng(1)
    values = rng.random((5, 4)).astype(np.float32)
    mask = np.arange(4) < np.array([4, 2, 0, 3, 1])[:, None]  # lists fill a group from the front
    col = pa.chunked_array([masked_lists(values[:2], mask[:2], pa.list_(pa.float32())),
                            masked_lists(values[2:], mask[2:], pa.list_(pa.float32()))])
    np.testing.assert_array_equal(padded_values(col, 4), np.where(mask, values, 0))
    np.testing.assert_array_equal(padded_values(col, 2), np.where(mask, values, 0)[:, :2])  # longer rows cut
    sliced = masked_lists(values, mask, pa.list_(pa.float32())).slice(1, 3)  # offsets not starting at 0
    np.testing.assert_array_equal(padded_values(sliced, 4), np.where(mask, values, 0)[1:4])
    assert padded_values(pa.chunked_array([], pa.list_(pa.float32())), 3).shape == (0, 3)


def test_request_index_takes_rows_in_order_and_names_a_missing_id(world):
    train = world["train"]
    index = RequestIndex(train, "score")
    ids = train.column("request_id").to_pylist()
    want = [ids[5], ids[0], ids[5]]
    assert index.take(want).column("request_id").to_pylist() == want
    assert index.take(pa.chunked_array([pa.array(want[:1]), pa.array(want[1:])])).column("user_id").to_pylist() == \
        [train.column("user_id")[ids.index(r)].as_py() for r in want]
    with pytest.raises(GoalRankInputError, match="score: request_id 'nope' is not in the prepared split"):
        index.take([ids[0], "nope"])


def test_score_batch_matches_scoring_each_request_alone(world):
    from goalrank_core.bundle import encode
    from goalrank_core.group import reference_policy
    from goalrank_core.reward_model import request_folds
    from tasks.score import score_batch

    cfg, bundle, groups = world["cfg"], world["bundle"], world["groups"]
    reward = bundle.require("reward")
    index = RequestIndex(world["train"], "test")
    out = score_batch(bundle, reward, index, groups, cfg)
    assert out.num_rows == groups.num_rows and out.column_names == SCORED_GROUPS.names
    rewards, pis = out.column("rewards").to_pylist(), out.column("pi_ref").to_pylist()
    for i in (0, 1, 2, 9, groups.num_rows - 1):
        row = groups.slice(i, 1)
        lists = row.column("lists").to_pylist()[0]
        enc = encode(bundle, index.take(row.column("request_id")))
        pos, _ = _loop_positions(enc, [lists], len(lists))
        folds = torch.from_numpy(request_folds(enc.request_id, cfg.reward.folds))  # the held-out member
        with torch.no_grad():
            r = reward.score(enc.batch(slice(None)), torch.from_numpy(pos), folds)  # (1, G)
        pi = reference_policy(r, torch.ones_like(r, dtype=torch.bool), cfg.group.tau, cfg.group.eps)
        assert len(rewards[i]) == len(lists) == len(pis[i])
        np.testing.assert_allclose(rewards[i], r[0].numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pis[i], pi[0].numpy(), rtol=1e-5, atol=1e-6)
    assert all(abs(sum(p) - 1) < 1e-5 for p in pis)


def test_score_batch_puts_the_search_list_first_as_the_in_process_fit_does(world):
    from goalrank_core.bundle import encode
    from goalrank_core.reward_model import request_folds
    from goalrank_core.search import greedy_search
    from tasks.score import score_batch

    cfg, bundle, groups = world["cfg"], world["bundle"], world["groups"]
    cfg = cfg.override({"group.search_lists": True})
    reward = bundle.require("reward")
    index = RequestIndex(world["train"], "test")
    part = groups.slice(0, 12)
    out = score_batch(bundle, reward, index, part, cfg)
    assert out.column_names == SCORED_GROUPS.names
    enc = encode(bundle, index.take(part.column("request_id")))
    folds = torch.from_numpy(request_folds(enc.request_id, cfg.reward.folds))
    found = greedy_search(reward, enc.batch(slice(None)), enc.shown.shape[1], folds).numpy()  # (B, L)
    want = np.take_along_axis(enc.raw_candidates, found, 1)  # (B, L) raw ids
    for i, (lists, pols, before) in enumerate(zip(out.column("lists").to_pylist(), out.column("policies").to_pylist(),
                                                  part.column("lists").to_pylist())):
        assert lists[0] == want[i].tolist() and pols[0] == "search"
        assert len(lists) == min(cfg.group.size, len(before) + (want[i].tolist() not in before))
        assert len({tuple(x) for x in lists}) == len(lists)  # deduplicated
        assert [x for x in before if x != lists[0]][: len(lists) - 1] == lists[1:]  # the proposers' order kept


@pytest.mark.ray
def test_score_stage_with_two_actors_writes_what_score_batch_gives(world, ray_session, tmp_path, monkeypatch):
    """Many small batches over 2 actors (the input is cut into blocks, so both get work); the
    rows are `score_batch`'s in input order (whichever actor finished first: the next stage's
    batches, and so a flow's results, depend on it), and the manifest keeps the actors' timing."""
    from tasks import object_store, storage
    from tasks.stage_io import save_bundle
    from tasks.ray_runtime import pool_size
    from tasks.score import score, score_batch
    from tasks.stages import stage_uri

    cfg, bundle, groups, train = world["cfg"], world["bundle"], world["groups"], world["train"]
    u = lambda s: stage_uri(str(tmp_path), "d", "r", s)  # noqa: E731
    def prep_body(out):
        rows = storage.write_table(train, object_store.join(out, "train"), IMPRESSIONS, "train")
        return {"tables": {"train": storage.table_entry(IMPRESSIONS, rows)}}

    def reward_body(out):
        return {"models": {"model": save_bundle(bundle, object_store.join(out, "model"))}}

    def cand_body(out):
        rows = storage.write_table(groups, object_store.join(out, "groups"), CANDIDATE_GROUPS, "groups")
        return {"tables": {"groups": storage.table_entry(CANDIDATE_GROUPS, rows)}}

    prep = storage.run_stage(u("prepare"), "prepare", cfg, {}, prep_body).uri
    rew = storage.run_stage(u("reward"), "reward", cfg, {"prepared": prep}, reward_body).uri
    cand = storage.run_stage(u("candidates"), "candidates", cfg, {"prepared": prep}, cand_body).uri
    monkeypatch.setenv("GOALRANK_DATA_ACTORS", "2")
    assert pool_size() == 2
    res = score(cand, prep, rew, u("score"), cfg)
    got = storage.read_table(object_store.join(res.uri, "groups"), SCORED_GROUPS, "scored")
    want = score_batch(bundle, bundle.require("reward"), RequestIndex(train, "test"), groups, cfg)
    assert got.num_rows == groups.num_rows
    assert got.column("request_id").to_pylist() == groups.column("request_id").to_pylist()
    assert got.column("lists").to_pylist() == groups.column("lists").to_pylist()
    for col in ("rewards", "pi_ref"):
        for a, b in zip(got.column(col).to_pylist(), want.column(col).to_pylist()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    timing = res.manifest["actor_timing"]
    assert timing["actors"] == 2 and timing["groups"] == groups.num_rows
    assert 0 < timing["busy_s"] <= res.manifest["wall_s"]
    assert 0 <= timing["first_batch_at_s"] < timing["last_batch_end_s"] <= res.manifest["wall_s"]
    assert len([f for f in object_store.list_files(object_store.join(res.uri, "groups")) if f.endswith(".parquet")]) == 1


def test_worker_env_sets_malloc_unless_turned_off_or_already_set(monkeypatch):
    from tasks.ray_runtime import WORKER_MALLOC_ENV, worker_env

    for k in WORKER_MALLOC_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.delenv("GOALRANK_WORKER_MALLOC", raising=False)
    assert worker_env() == WORKER_MALLOC_ENV
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "123")
    assert worker_env()["MALLOC_TRIM_THRESHOLD_"] == "123"
    monkeypatch.setenv("GOALRANK_WORKER_MALLOC", "0")
    assert worker_env() == {}


@pytest.mark.parametrize("raw,default,want", [(None, True, True), ("", False, False), (" 0 ", True, False),
                                               ("No", True, False), ("off", True, False), ("TRUE", False, True),
                                               ("1", False, True), ("on", False, True)])
def test_env_flag_reads_on_off_switches(monkeypatch, raw, default, want):
    from tasks.ray_runtime import env_flag

    if raw is None:
        monkeypatch.delenv("GOALRANK_TEST_SWITCH", raising=False)
    else:
        monkeypatch.setenv("GOALRANK_TEST_SWITCH", raw)
    assert env_flag("GOALRANK_TEST_SWITCH", default) is want


def test_env_flag_refuses_a_value_that_is_not_a_switch(monkeypatch):
    from goalrank_core.errors import ConfigError
    from tasks.stage_io import ordered

    monkeypatch.setenv("GOALRANK_DATA_ORDERED", "sometimes")
    with pytest.raises(ConfigError, match=r"GOALRANK_DATA_ORDERED='sometimes' is not an on/off switch"):
        ordered()


@pytest.mark.ray
def test_ray_workers_start_with_the_worker_env(ray_session):
    """glibc reads MALLOC_* once, when a process starts: the variables must be in the worker
    process's environment from exec (the job's runtime_env), not set later from Python."""
    import ray

    from tasks.ray_runtime import worker_env

    @ray.remote(num_cpus=0.5)
    def env_at_exec() -> dict:
        with open("/proc/self/environ", "rb") as f:
            pairs = [p.decode().split("=", 1) for p in f.read().split(b"\0") if b"=" in p]
        return {k: v for k, v in pairs if k.startswith("MALLOC_")}

    assert worker_env() and ray.get(env_at_exec.remote()) == worker_env()
