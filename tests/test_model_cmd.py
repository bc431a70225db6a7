"""`goalrank fit` and `goalrank rank` end to end on a small synthetic log."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from goalrank.cli import main
from goalrank_core.schemas import REQUESTS
from goalrank_core.synth import synth_impressions


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    table, items, _ = synth_impressions(n_users=15, n_items=60, requests_per_user=5, slate_len=4, n_candidates=12,
                                       n_categories=4, history_len=10, seed=0)
    pq.write_table(table, tmp / "imp.parquet")
    pq.write_table(items, tmp / "items.parquet")
    pq.write_table(table.select(REQUESTS.names).slice(0, 20), tmp / "req.parquet")
    from gr_helpers import tiny_config

    (tmp / "cfg.json").write_text(json.dumps(tiny_config().to_dict()))
    rc = main(["fit", "--impressions", str(tmp / "imp.parquet"), "--items", str(tmp / "items.parquet"),
               "--config", str(tmp / "cfg.json"), "--out", str(tmp / "model"), "--quiet"])
    assert rc == 0
    return tmp


def test_fit_writes_a_model_folder(fitted):
    names = {p.name for p in (fitted / "model").iterdir()}
    assert {"bundle.json", "generator.pt", "reward.pt", "supervised.pt", "items.parquet"} <= names


@pytest.mark.parametrize("policy", ["goalrank", "g-e", "dnn", "random"])
def test_rank_writes_valid_lists(fitted, policy):
    out = fitted / f"ranked-{policy}.parquet"
    assert main(["rank", "--model", str(fitted / "model"), "--requests", str(fitted / "req.parquet"),
                 "--out", str(out), "--policy", policy]) == 0
    ranked = pq.read_table(out)
    req = pq.read_table(fitted / "req.parquet")
    assert ranked.column("request_id").to_pylist() == req.column("request_id").to_pylist()
    for lst, cand in zip(ranked.column("ranked").to_pylist(), req.column("candidates").to_pylist()):
        assert len(lst) == 4 and len(set(lst)) == 4 and set(lst) <= set(cand)


def test_bad_inputs_exit_2_with_one_line(fitted, tmp_path, capsys):
    assert main(["rank", "--model", str(tmp_path / "none"), "--requests", str(fitted / "req.parquet"),
                 "--out", str(tmp_path / "o.parquet")]) == 2
    assert "no bundle.json" in capsys.readouterr().err
    assert main(["rank", "--model", str(fitted / "model"), "--requests", str(fitted / "req.parquet"),
                 "--out", str(tmp_path / "o.parquet"), "--policy", "nope"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    pq.write_table(pq.read_table(fitted / "req.parquet").drop(["candidates"]), tmp_path / "bad.parquet")
    assert main(["rank", "--model", str(fitted / "model"), "--requests", str(tmp_path / "bad.parquet"),
                 "--out", str(tmp_path / "o.parquet")]) == 2
    assert "candidates" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()
