"""`goalrank data prepare | synth` and the shared CLI helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from goalrank.cli import main
from goalrank.cli.common import load_config
from goalrank_core.errors import ConfigError
from goalrank_core.schemas import IMPRESSIONS, ITEMS

DATA = os.environ.get("GOALRANK_DATA_DIR")


def test_synth_then_prepare_then_evaluate(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--users", "20", "--items", "80", "--requests", "4", "--seed", "1"]) == 0
    assert main(["data", "prepare", "--impressions", str(tmp_path / "s" / "impressions.parquet"),
                 "--items", str(tmp_path / "s" / "items.parquet"), "--out", str(tmp_path / "p"), "--json",
                 "--split", "user-last"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (stats["train_requests"], stats["valid_requests"], stats["test_requests"]) == (40, 20, 20)
    for name in ("train", "valid", "test"):
        assert pq.read_schema(tmp_path / "p" / f"{name}.parquet").equals(IMPRESSIONS)
    assert pq.read_schema(tmp_path / "p" / "items.parquet").equals(ITEMS)
    assert json.loads((tmp_path / "p" / "stats.json").read_text()) == stats
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "s"]  # no temp folders left
    # the logged order as ranked lists, scored through the CLI
    test = pq.read_table(tmp_path / "p" / "test.parquet")
    pq.write_table(test.select(["request_id", "shown"]).rename_columns(["request_id", "ranked"]), tmp_path / "l.parquet")
    assert main(["evaluate", "--lists", str(tmp_path / "l.parquet"), "--truth", str(tmp_path / "p" / "test.parquet"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hr@6"] == pytest.approx(1.0)  # shown holds every positive


def test_config_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"protocol": {"slate_len": 4, "n_candidates": 20}}))
    assert load_config(tmp_path / "c.json").protocol.slate_len == 4
    (tmp_path / "c.yaml").write_text("protocol:\n  min_core: 5\n")
    assert load_config(tmp_path / "c.yaml").protocol.min_core == 5
    assert load_config(None, {"protocol.seed": 3}).protocol.seed == 3
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_prepare_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(["data", "prepare", "--dataset", "ml-1m", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    assert "goalrank data download ml-1m" in capsys.readouterr().err


def test_prepare_needs_exactly_one_source(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["data", "prepare", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2


def test_every_subcommand_has_help():
    for argv in (["data", "--help"], ["data", "prepare", "--help"], ["data", "synth", "--help"],
                 ["data", "download", "--help"], ["evaluate", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0


@pytest.mark.skipif(not (DATA and (Path(DATA) / "ml-100k" / "u.data").is_file()), reason="GOALRANK_DATA_DIR not set")
def test_prepare_ml100k_subprocess(tmp_path):
    """The installed command, end to end on the real data set (also checks the exit status)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("protocol:\n  max_users: 200\n")
    r = subprocess.run([str(Path(sys.executable).parent / "goalrank"), "data", "prepare", "--dataset", "ml-100k",
                        "--out", str(tmp_path / "out"), "--config", str(cfg)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["users"] <= 200 and stats["test_requests"] == stats["users"]
    bad = subprocess.run([str(Path(sys.executable).parent / "goalrank"), "data", "prepare", "--impressions", str(tmp_path / "nope.parquet"),
                          "--out", str(tmp_path / "out2")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such file" in bad.stderr and not (tmp_path / "out2").exists()


def test_prepare_splits_by_time_by_default(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--users", "20", "--items", "80", "--requests", "2"]) == 0
    imp = str(tmp_path / "s" / "impressions.parquet")
    assert main(["data", "prepare", "--impressions", imp, "--out", str(tmp_path / "p"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (stats["split"], stats["train_requests"], stats["valid_requests"], stats["test_requests"]) == ("time", 32, 4, 4)
    assert main(["data", "prepare", "--impressions", imp, "--out", str(tmp_path / "q"), "--split", "user-last"]) == 2
    err = capsys.readouterr().err
    assert "split user-last" in err and "20 of 20 users have fewer than 3" in err and "--split time" in err
    assert not (tmp_path / "q").exists()
    assert main(["data", "prepare", "--dataset", "ml-100k", "--out", str(tmp_path / "r"), "--split", "time"]) == 2
    assert "--split applies to --impressions" in capsys.readouterr().err


def test_run_passes_split_as_a_config_override(tmp_path, monkeypatch):
    from goalrank.cli import build_parser
    from goalrank.cli.pipeline_cmd import flow_parameters

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["run", "--impressions", "logs.parquet", "--split", "user-last"])
    assert flow_parameters(args)["overrides"] == {"protocol.split": "user-last"}
