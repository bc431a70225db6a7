"""The Ray stages on small real data (40 ML-100K users), on the local disk and through a moto
S3 server on loopback: every stage runs, reruns skip, a folder without a manifest is redone,
DDP with 2 workers lowers the loss. Whole chains are `slow` (a minute or two each)."""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from goalrank_core.config import GoalRankConfig
from goalrank_core.errors import GoalRankInputError
from goalrank_core.schemas import CANDIDATE_GROUPS, IMPRESSIONS, METRICS, RANKED, SCORED_GROUPS
from tasks import object_store, storage
from tasks.stages import (DataSource, evaluate, generate_candidates, prepare, score, stage_uri, train_generator,
                          train_policies, train_reward_model)

DATA_DIR = os.environ.get("GOALRANK_DATA_DIR")
needs_data = pytest.mark.skipif(not DATA_DIR or not os.path.isdir(os.path.join(DATA_DIR or "", "ml-100k")),
                                reason="GOALRANK_DATA_DIR with ml-100k not available")

TINY = {
    "protocol.max_users": 40, "reward.d_model": 16, "reward.n_layers": 1, "reward.n_heads": 2,
    "generator.d_model": 16, "generator.n_layers": 1, "generator.n_heads": 2,
    "train.reward_epochs": 3, "train.epochs": 2, "train.aux_epochs": 1, "train.batch_size": 64,
    "group.size": 16, "group.generator_samples": 3, "policies.dnn_dim": 8, "policies.dnn_hidden": 16,
    "policies.prm_d_model": 8, "policies.emb_dim": 8,
}


def tiny(**extra) -> GoalRankConfig:
    return GoalRankConfig().override({**TINY, **extra})


def run_chain(root: str, config: GoalRankConfig) -> dict:
    """Every stage once, round 1 then round 2 of generate -> score -> train."""
    u = lambda s: stage_uri(root, "ml-100k", "run1", s)  # noqa: E731
    r = {"prepare": prepare(DataSource(dataset="ml-100k", data_dir=DATA_DIR), u("prepare"), config)}
    p = r["prepare"].uri
    r["policies"] = train_policies(p, u("policies"), config)
    r["reward"] = train_reward_model(p, r["policies"].uri, u("reward"), config)
    r["candidates"] = generate_candidates(p, r["policies"].uri, None, u("candidates-1"), config, 1)
    r["score"] = score(r["candidates"].uri, p, r["reward"].uri, u("scored-1"), config)
    r["generator"] = train_generator(r["score"].uri, p, r["policies"].uri, u("generator-1"), config)
    r["candidates2"] = generate_candidates(p, r["policies"].uri, r["generator"].uri, u("candidates-2"), config, 2)
    r["evaluate"] = evaluate(p, r["reward"].uri, r["policies"].uri, r["generator"].uri, u("evaluate"), config)
    return r


def check_outputs(r: dict) -> None:
    p = r["prepare"].uri
    train = storage.read_table(object_store.join(p, "train"), IMPRESSIONS, "train")
    assert train.num_rows == r["prepare"].manifest["tables"]["train"]["rows"] > 100
    groups = storage.read_table(object_store.join(r["candidates"].uri, "groups"), CANDIDATE_GROUPS, "groups")
    assert sorted(groups.column("request_id").to_pylist()) == sorted(train.column("request_id").to_pylist())
    sizes = [len(g) for g in groups.column("lists").to_pylist()]
    assert 2 <= min(sizes) and max(sizes) <= 16
    cands = dict(zip(train.column("request_id").to_pylist(), train.column("candidates").to_pylist()))
    for rid, lists in zip(groups.column("request_id").to_pylist()[:50], groups.column("lists").to_pylist()[:50]):
        assert all(len(set(lst)) == len(lst) == 6 and set(lst) <= set(cands[rid]) for lst in lists)
        assert len({tuple(lst) for lst in lists}) == len(lists)  # deduplicated
    policies = {p for row in groups.column("policies").to_pylist() for p in row}
    assert {"goalrank", "supervised", "popularity"} <= policies
    second = storage.read_table(object_store.join(r["candidates2"].uri, "groups"), CANDIDATE_GROUPS, "groups 2")
    assert second.column("lists").to_pylist() != groups.column("lists").to_pylist()  # the new generator samples

    scored = storage.read_table(object_store.join(r["score"].uri, "groups"), SCORED_GROUPS, "scored")
    for lists, rew, pi in zip(*(scored.column(c).to_pylist() for c in ("lists", "rewards", "pi_ref"))):
        assert len(lists) == len(rew) == len(pi)
        # reward = DCG-weighted click probabilities over L=6 positions: in [0, sum 1/log2(k+2)]
        assert abs(sum(pi) - 1) < 1e-4 and all(0 <= x <= 2.95 for x in rew)
        assert int(np.argmax(pi)) == int(np.argmax(rew))

    for stage in ("reward", "generator"):
        epochs = r[stage].manifest["training"]["epochs"]
        assert epochs[-1]["loss"] < epochs[0]["loss"], (stage, epochs)
        assert r[stage].manifest["memory"]["train_workers_peak_rss_mb"] > 100

    ev = r["evaluate"]
    metrics = storage.read_table(object_store.join(ev.uri, "metrics"), METRICS, "metrics")
    pols = set(metrics.column("policy").to_pylist())
    assert {"goalrank", "supervised", "g-e", "dnn", "prm", "popularity", "random"} <= pols
    assert set(metrics.column("split").to_pylist()) == {"valid", "test"}
    vals = np.array(metrics.column("value").to_pylist())
    assert np.all((vals >= 0) & (vals <= 1))
    test = storage.read_table(object_store.join(p, "test"), IMPRESSIONS, "test")
    ranked = storage.read_table(object_store.join(ev.uri, "ranked/test/goalrank"), RANKED, "ranked")
    assert sorted(ranked.column("request_id").to_pylist()) == sorted(test.column("request_id").to_pylist())
    for res in r.values():
        m = res.manifest
        assert m["config_hash"] == res.manifest["config_hash"] and m["wall_s"] > 0 and m["code_version"]
        assert m["memory"]["driver_peak_rss_mb"] > 0


# ---------------------------------------------------------------- fast


def test_data_source_needs_exactly_one_input():
    with pytest.raises(GoalRankInputError, match="exactly one"):
        DataSource()
    with pytest.raises(GoalRankInputError, match="exactly one"):
        DataSource(dataset="ml-100k", impressions="x.parquet")
    with pytest.raises(GoalRankInputError, match="partitions"):
        DataSource(dataset="ml-100k", partitions=("date=2024-01-01",))


@pytest.mark.ray
def test_write_dataset_validates_and_overwrites(ray_session, tmp_path):
    import ray.data

    from tasks.stage_io import count_rows, write_dataset

    uri = str(tmp_path / "ranked")
    good = pa.table({"request_id": ["a", "b", "c"], "ranked": [[1, 2], [3, 4], [5, 6]]})
    assert write_dataset(ray.data.from_arrow(good), uri, RANKED, "ranked") == 3
    assert write_dataset(ray.data.from_arrow(good), uri, RANKED, "ranked") == 3  # not appended: 3, not 6
    assert count_rows(uri) == 3
    bad = good.append_column("extra", pa.array([1, 2, 3]))
    with pytest.raises(Exception, match="unexpected column"):
        write_dataset(ray.data.from_arrow(bad), str(tmp_path / "bad"), RANKED, "ranked")


@pytest.mark.ray
@needs_data
def test_prepare_reruns_skip_and_stage_folders_need_manifests(ray_session, tmp_path):
    cfg = tiny()
    out = stage_uri(str(tmp_path), "ml-100k", "r", "prepare")
    first = prepare(DataSource(dataset="ml-100k", data_dir=DATA_DIR), out, cfg)
    assert not first.skipped and first.manifest["tables"]["valid"]["rows"] == 40
    assert prepare(DataSource(dataset="ml-100k", data_dir=DATA_DIR), out, cfg).skipped
    before = storage.read_table(object_store.join(out, "train"), IMPRESSIONS, "train")
    object_store.delete(storage.manifest_uri(out))  # as if the run died before the manifest landed
    with pytest.raises(object_store.StorageError):
        train_policies(out, stage_uri(str(tmp_path), "ml-100k", "r", "policies"), cfg)
    again = prepare(DataSource(dataset="ml-100k", data_dir=DATA_DIR), out, cfg)
    assert not again.skipped
    assert storage.read_table(object_store.join(out, "train"), IMPRESSIONS, "train").equals(before)  # deterministic


@pytest.mark.ray
def test_prepare_reads_and_validates_impression_logs(ray_session, tmp_path, capsys):
    import pyarrow.parquet as pq

    rows = []
    for u in range(3):
        for t in range(4):
            cands = list(range(100 * u + 10 * t, 100 * u + 10 * t + 8))
            rows.append({"request_id": f"u{u}-{t}", "user_id": u, "timestamp": 1000 + t, "history": cands[:2],
                         "candidates": cands, "shown": cands[:3], "labels": [1.0, 0.0, float(t % 2)]})
    table = pa.Table.from_pylist(rows, schema=IMPRESSIONS)
    table = table.append_column("propensity", pa.array([0.5] * 12)).append_column("clicks", pa.array([1] * 12))
    (tmp_path / "logs" / "date=2024-01-01").mkdir(parents=True)
    pq.write_table(table.slice(0, 6), tmp_path / "logs" / "date=2024-01-01" / "part-0.parquet")
    (tmp_path / "logs" / "date=2024-01-02").mkdir()
    pq.write_table(table.slice(6), tmp_path / "logs" / "date=2024-01-02" / "part-0.parquet")
    cfg = tiny(**{"protocol.slate_len": 3, "protocol.n_candidates": 8})
    res = prepare(DataSource(impressions=str(tmp_path / "logs")), str(tmp_path / "out"), cfg)
    t = res.manifest["tables"]
    assert (t["train"]["rows"], t["valid"]["rows"], t["test"]["rows"]) == (6, 3, 3)  # time split; ties move cuts
    assert "['clicks'] are validated where known but not carried" in capsys.readouterr().out
    # The logging propensities reach valid and test (off-policy estimates), conformed on read; train is the contract.
    from tasks.stage_io import read_split

    out = str(tmp_path / "out")
    assert t["train"]["schema"] == {f.name: str(f.type) for f in IMPRESSIONS} and "propensity" in t["valid"]["schema"]
    valid = read_split(out, "valid", "valid", propensities=True)
    assert valid.column_names == IMPRESSIONS.names + ["propensity"] and valid.column("propensity").to_pylist() == [0.5] * 3
    assert read_split(out, "test", "test").column_names == IMPRESSIONS.names
    # A daily window: exactly the named partitions, the newest held out for valid/test.
    days = ("date=2024-01-01", "date=2024-01-02")
    window = prepare(DataSource(impressions=str(tmp_path / "logs"), partitions=days), str(tmp_path / "out1"), cfg)
    assert window.manifest["partitions"] == list(days)
    t = window.manifest["tables"]
    assert t["train"]["rows"] == 6 and t["valid"]["rows"] + t["test"]["rows"] == 6
    with pytest.raises(GoalRankInputError, match="at least 2 partitions"):
        prepare(DataSource(impressions=str(tmp_path / "logs"), partitions=days[:1]), str(tmp_path / "out3"), cfg)
    broken = table.set_column(6, "labels", pa.array([[float("nan")] * 3] * 12, pa.list_(pa.float32())))
    pq.write_table(broken, tmp_path / "broken.parquet")
    with pytest.raises(Exception, match="labels"):
        prepare(DataSource(impressions=str(tmp_path / "broken.parquet")), str(tmp_path / "out2"), cfg)
    assert storage.read_manifest(str(tmp_path / "out2")) is None


def test_group_positions_round_trip():
    from goalrank_core.batch import Vocab, encode_requests
    from tasks.group_rows import groups_to_positions, positions_to_rows

    t = pa.Table.from_pylist([
        {"request_id": "a", "user_id": 1, "timestamp": 0, "history": [9], "candidates": [5, 6, 7, 8],
         "shown": [5, 6], "labels": [1.0, 0.0]},
        {"request_id": "b", "user_id": 2, "timestamp": 0, "history": [], "candidates": [1, 2, 3],
         "shown": [3, 1], "labels": [0.0, 1.0]},
    ], schema=IMPRESSIONS)
    enc = encode_requests(t, Vocab.build(np.arange(10)), Vocab.build(np.arange(3)), 4)
    groups = [[[8, 5], [6, 7]], [[2, 3]]]
    pos, mask = groups_to_positions(enc, groups, 3, "test")
    assert pos.shape == (2, 3, 2) and mask.tolist() == [[True, True, False], [True, False, False]]
    assert pos[0, 0].tolist() == [3, 0] and pos[1, 0].tolist() == [1, 2] and (pos[1, 1:] == -1).all()
    assert positions_to_rows(enc, pos, mask)["lists"] == groups
    with pytest.raises(GoalRankInputError, match="'b' list 0 has an item outside"):
        groups_to_positions(enc, [[[8, 5]], [[2, 99]]], 2, "test")


# ---------------------------------------------------------------- whole chains (slow)


@pytest.mark.slow
@pytest.mark.ray
@needs_data
def test_every_stage_on_local_disk_with_2_ddp_workers(ray_session, tmp_path):
    cfg = tiny(**{"train.num_workers": 2})
    root = str(tmp_path / "artifacts")
    r = run_chain(root, cfg)
    check_outputs(r)
    assert r["reward"].manifest["training"]["num_workers"] == 2
    # A rerun redoes nothing.
    again = run_chain(root, cfg)
    assert all(res.skipped for res in again.values())
    # A stage folder that lost its manifest is cleared and redone, with the same output.
    scored = object_store.join(r["score"].uri, "groups")
    before = storage.read_table(scored, SCORED_GROUPS, "scored")
    object_store.delete(storage.manifest_uri(r["score"].uri))
    object_store.write_bytes(object_store.join(r["score"].uri, "groups", "part-stale.parquet"), b"half-written")
    redo = score(r["candidates"].uri, r["prepare"].uri, r["reward"].uri, r["score"].uri, cfg)
    assert not redo.skipped
    assert "groups/part-stale.parquet" not in object_store.list_files(r["score"].uri)
    after = storage.read_table(scored, SCORED_GROUPS, "scored")
    key = lambda t: t.sort_by("request_id")  # noqa: E731
    assert key(after).equals(key(before))
    # Checkpoints are dropped once the model is in the stage folder.
    assert not object_store.list_files(object_store.join(root, "ml-100k", "run1", "_checkpoints"))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.s3
@needs_data
def test_every_stage_through_the_s3_server(ray_session, s3_server, s3_storage):
    cfg = tiny(**{"train.num_workers": 1})
    r = run_chain(s3_storage, cfg)
    check_outputs(r)
    prefix = s3_storage[len(f"s3://{s3_server['bucket']}/"):]
    client = s3_server["client"]
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_server["bucket"], Prefix=prefix):
        keys += [o["Key"][len(prefix) + 1:] for o in page.get("Contents", [])]
    for stage in ("prepare", "reward", "policies", "candidates-1", "scored-1", "generator-1", "candidates-2", "evaluate"):
        assert f"ml-100k/run1/{stage}/_manifest.json" in keys, stage
    assert any(k.startswith("ml-100k/run1/scored-1/groups/") and k.endswith(".parquet") for k in keys)
    assert "ml-100k/run1/reward/model/reward.pt" in keys and "ml-100k/run1/generator-1/model/generator.pt" in keys
    assert "ml-100k/run1/evaluate/ranked/test/goalrank/part-00000.parquet" in keys
    for stage in ("prepare", "reward", "evaluate"):
        body = client.get_object(Bucket=s3_server["bucket"], Key=f"{prefix}/ml-100k/run1/{stage}/_manifest.json")["Body"].read()
        assert s3_server["secret"].encode() not in body and s3_server["key_id"].encode() not in body
    assert run_chain(s3_storage, cfg)["score"].skipped

