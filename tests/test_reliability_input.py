"""Bad input through every `goalrank` command (issue 8): each malformed file or config ends in
one clear line naming the problem, exit code 2, and nothing written to storage, the model
folder or the registry. `rank` validates requests the same way; unseen users and items,
unicode request ids and huge histories are valid input and get ranked.

The corpus itself (25 malformed impressions files) lives in test_validate.py, where the
validator is tested case by case; here every case goes through `fit`, `run` and `evaluate`,
and the request-side cases through `rank`."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from goalrank.cli import main
from goalrank_core.schemas import IMPRESSIONS, REQUESTS
from test_validate import CORPUS, good_table

# Cases about columns a request also has (rank drops shown/labels unread, so the others are
# not errors for it).
REQUEST_SIDE = {
    "mistyped-user-id", "mistyped-candidates-float", "duplicate-candidate", "empty-candidates",
    "ids-beyond-int64", "negative-item-id", "null-user", "null-inside-list", "duplicate-request-id",
    "empty-request-id", "zero-rows", "empty-file", "truncated-parquet", "not-parquet",
}


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_line(stderr: str, command: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"goalrank {command}: error: "), stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model folder from `goalrank fit` (a few seconds)."""
    from goalrank_core.synth import synth_impressions
    from gr_helpers import tiny_config

    tmp = tmp_path_factory.mktemp("fit")
    table, items, _ = synth_impressions(n_users=15, n_items=60, requests_per_user=5, slate_len=4, n_candidates=12,
                                       n_categories=4, history_len=10, seed=0)
    pq.write_table(table, tmp / "imp.parquet")
    pq.write_table(table.select(REQUESTS.names).slice(0, 12), tmp / "req.parquet")
    (tmp / "cfg.json").write_text(json.dumps(tiny_config().to_dict()))
    assert main(["fit", "--impressions", str(tmp / "imp.parquet"), "--config", str(tmp / "cfg.json"),
                 "--out", str(tmp / "model"), "--quiet"]) == 0
    return tmp


@pytest.mark.parametrize("command", ["fit", "run", "evaluate"])
@pytest.mark.parametrize("case, writer, expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_through_every_command(tmp_path, monkeypatch, capsys, command, case, writer, expected):
    """fit/run/evaluate on a malformed impressions file: exit 2, one line naming the file and
    the problem; no model folder, no storage, no MLflow store, no Prefect database."""
    monkeypatch.chdir(tmp_path)  # the settings' defaults (.goalrank/...) would land here
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    bad = tmp_path / "bad.parquet"
    writer(bad)
    before = _files(tmp_path)
    if command == "fit":
        argv = ["fit", "--impressions", str(bad), "--out", str(tmp_path / "model"), "--quiet"]
    elif command == "run":
        argv = ["run", "--impressions", str(bad), "--storage", str(tmp_path / "storage"),
                "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--run-id", "r1"]
    else:
        ranked = tmp_path / "ranked.parquet"
        pq.write_table(pa.table({"request_id": ["r0"], "ranked": [[12, 100, 15]]}), ranked)
        before = _files(tmp_path)
        argv = ["evaluate", "--lists", str(ranked), "--truth", str(bad)]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err, command)
    assert str(bad) in line and all(part in line for part in expected), (case, line)
    assert _files(tmp_path) == before  # nothing written anywhere under the workspace


@pytest.mark.parametrize("case, writer, expected", [c for c in CORPUS if c[0] in REQUEST_SIDE],
                         ids=[c[0] for c in CORPUS if c[0] in REQUEST_SIDE])
def test_rank_validates_requests_the_same_way(model_dir, tmp_path, capsys, case, writer, expected):
    bad = tmp_path / "bad.parquet"
    writer(bad)
    out = tmp_path / "ranked.parquet"
    assert main(["rank", "--model", str(model_dir / "model"), "--requests", str(bad), "--out", str(out)]) == 2
    line = _one_line(capsys.readouterr().err, "rank")
    assert str(bad) in line and all(part in line for part in expected), (case, line)
    assert _files(tmp_path) == {"bad.parquet"}


def test_corpus_covers_the_issue_list():
    """Each kind of malformed input the issue names has at least one case here or below."""
    names = {c[0] for c in CORPUS}
    assert len(names) >= 15
    for kind in ("missing-column", "propensity-above-1", "extra-labels-length", "mistyped-user-id", "nan-label", "inf-label", "empty-file",
                 "empty-candidates", "empty-shown", "shown-outside-candidates", "duplicate-candidate",
                 "n-less-than-l", "ids-beyond-int64", "truncated-parquet"):
        assert kind in names, kind


@pytest.mark.parametrize("command", ["fit", "run"])
@pytest.mark.parametrize(
    "config, expected",
    [({"protocol": {"slate_len": 4, "slate_lenn": 6}}, "unknown config key(s) in 'protocol': slate_lenn"),
     ({"bogus": {"x": 1}}, "unknown config key(s): bogus"),
     ({"group": {"size": 0}}, "'group.size' must be >= 1"),
     ({"train": {"lr": -1.0}}, "'train.lr' must be > 0"),
     ({"generator": {"dropout": 1.5}}, "'generator.dropout' must be in [0, 1)"),
     ({"train": {"epochs": "three"}}, "'train.epochs' must be an integer")],
    ids=["unknown-key", "unknown-section", "group-size-0", "negative-lr", "dropout-1.5", "string-epochs"],
)
def test_bad_config_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, command, config, expected):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    pq.write_table(good_table(), tmp_path / "ok.parquet")
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(config))
    before = _files(tmp_path)
    if command == "fit":
        argv = ["fit", "--impressions", str(tmp_path / "ok.parquet"), "--config", str(cfg),
                "--out", str(tmp_path / "model"), "--quiet"]
    else:
        argv = ["run", "--impressions", str(tmp_path / "ok.parquet"), "--config", str(cfg),
                "--storage", str(tmp_path / "storage"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(argv) == 2
    line = _one_line(capsys.readouterr().err, command)
    assert expected in line, line
    assert _files(tmp_path) == before


def test_bad_override_on_run_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    pq.write_table(good_table(), tmp_path / "ok.parquet")
    assert main(["run", "--impressions", str(tmp_path / "ok.parquet"), "--set", "group.sise=3"]) == 2
    assert "group.sise" in _one_line(capsys.readouterr().err, "run")
    assert main(["run", "--impressions", str(tmp_path / "ok.parquet"), "--set", "protocol.n_candidates=2"]) == 2
    assert "'protocol.n_candidates' must be >= slate_len" in _one_line(capsys.readouterr().err, "run")
    assert _files(tmp_path) == {"ok.parquet"}


def test_cold_start_unicode_ids_and_huge_history_are_ranked(model_dir, tmp_path):
    """Valid oddities: users and items never seen in training, unicode request ids and a
    100k-item history are ranked (exit 0), each list L distinct items from its candidates."""
    req = pq.read_table(model_dir / "req.parquet").slice(0, 4)
    rows = req.to_pylist()
    rows[0]["request_id"] = "请求-🎬-ü"
    rows[0]["user_id"] = 987_654_321  # an unseen user
    rows[1]["candidates"] = [5_000_000 + i for i in range(12)]  # only unseen items
    rows[2]["candidates"] = rows[2]["candidates"][:6] + [7_000_000 + i for i in range(6)]  # a mix
    rows[3]["history"] = list(range(100_000))  # longer than any history_len: the most recent are kept
    pq.write_table(pa.Table.from_pylist(rows, schema=REQUESTS), tmp_path / "odd.parquet")
    for policy in ("goalrank", "g-e", "dnn"):
        out = tmp_path / f"{policy}.parquet"
        assert main(["rank", "--model", str(model_dir / "model"), "--requests", str(tmp_path / "odd.parquet"),
                     "--out", str(out), "--policy", policy]) == 0
        ranked = pq.read_table(out)
        assert ranked.column("request_id").to_pylist() == [r["request_id"] for r in rows]
        for lst, row in zip(ranked.column("ranked").to_pylist(), rows):
            assert len(lst) == 4 and len(set(lst)) == 4 and set(lst) <= set(row["candidates"])


def test_rank_accepts_impressions_and_evaluate_scores_them(model_dir, tmp_path, capsys):
    """The happy path of the same commands, so the failures above are not a broken command."""
    imp = pq.read_table(model_dir / "imp.parquet").slice(0, 10)
    pq.write_table(imp, tmp_path / "imp.parquet")
    assert main(["rank", "--model", str(model_dir / "model"), "--requests", str(tmp_path / "imp.parquet"),
                 "--out", str(tmp_path / "r.parquet")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--lists", str(tmp_path / "r.parquet"), "--truth", str(tmp_path / "imp.parquet"),
                 "--json"]) == 0
    values = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(values) == {"hr@4", "ndcg@4", "map@4"} and all(0 <= v <= 1 for v in values.values())


@pytest.mark.ray
@pytest.mark.parametrize("case", ["nan-label", "shown-outside-candidates", "truncated-parquet"])
def test_prepare_stage_on_bad_input_writes_nothing(ray_session, tmp_path, case):
    """The flow's own path (a scheduled run, S3 input): the prepare stage validates on the Ray
    workers, fails with the validator's error (not retried: not transient) and leaves no
    folder at all in storage."""
    from flows.retry import is_transient
    from goalrank_core.errors import GoalRankInputError
    from gr_helpers import tiny_config
    from tasks.stages import DataSource, prepare, stage_uri

    writer = {c[0]: c[1] for c in CORPUS}[case]
    writer(tmp_path / "bad.parquet")
    storage_root = tmp_path / "storage"
    out = stage_uri(str(storage_root), "bad", "r1", "prepare")
    with pytest.raises(Exception) as err:
        prepare(DataSource(impressions=str(tmp_path / "bad.parquet")), out, tiny_config(**{"protocol.slate_len": 3,
                                                                                          "protocol.n_candidates": 6}))
    assert isinstance(err.value, GoalRankInputError), repr(err.value)[:2000]
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "bad.parquet") in msg, msg  # one line naming the file
    assert not is_transient(err.value)
    assert not storage_root.exists(), _files(storage_root)


def test_impressions_schema_is_the_contract():
    # The corpus is built against this contract; a change to it should revisit the corpus.
    assert IMPRESSIONS.names == ["request_id", "user_id", "timestamp", "history", "candidates", "shown", "labels"]


def test_run_with_a_missing_data_set_fails_before_anything_starts(tmp_path, monkeypatch, capsys):
    """`run --dataset` whose files are not in the data dir: exit 2 and one line saying where
    it looked, from the preflight (no Prefect database, storage or MLflow store written)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    (tmp_path / "data").mkdir()
    before = _files(tmp_path)
    assert main(["run", "--dataset", "ml-100k", "--data-dir", str(tmp_path / "data"), "--storage",
                 str(tmp_path / "storage"), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]) == 2
    line = _one_line(capsys.readouterr().err, "run")
    assert "data set 'ml-100k' not found" in line and str(tmp_path / "data") in line, line
    assert _files(tmp_path) == before
