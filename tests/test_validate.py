"""Strict validation of impressions/requests/items, and the bad-input corpus (issue 8):
each malformed file gives one clear error naming the problem, exit code 2, nothing written."""
from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from goalrank.cli import main
from goalrank_core.errors import DataValidationError, GoalRankInputError
from goalrank_core.schemas import IMPRESSIONS, REQUESTS
from goalrank_core.validate import read_impressions, read_items, read_requests, validate_impressions


def good_rows(n: int = 4) -> list[dict]:
    return [
        {
            "request_id": f"r{r}",
            "user_id": r % 2,
            "timestamp": 1000 + r,
            "history": [1, 2, 2],  # repeats allowed in history
            "candidates": [100 + r, 11, 12, 13, 14, 15, 16, 17],
            "shown": [12, 100 + r, 15],
            "labels": [1.0, 0.0, 1.0],
        }
        for r in range(n)
    ]


def good_table() -> pa.Table:
    return pa.Table.from_pylist(good_rows(), schema=IMPRESSIONS)


def with_row(field: str, value, row: int = 2) -> pa.Table:
    rows = good_rows()
    rows[row][field] = value
    return pa.Table.from_pylist(rows, schema=IMPRESSIONS)


def with_column(name: str, array: pa.Array) -> pa.Table:
    t = good_table()
    return t.set_column(t.column_names.index(name), name, array)


def with_extra(name: str, array: pa.Array) -> pa.Table:
    return good_table().append_column(name, array)


def _write(table: pa.Table):
    def w(path):
        pq.write_table(table, path)
    return w


def _raw(data: bytes):
    def w(path):
        path.write_bytes(data)
    return w


def _truncated(path):
    pq.write_table(good_table(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


HUGE = 2**63 + 5

# (case id, writer(path), substrings the error must contain)
CORPUS = [
    ("missing-column", _write(good_table().drop_columns(["labels"])), ["missing column", "labels"]),
    ("propensity-above-1", _write(with_extra("propensity", pa.array([0.5, 0.2, 1.5, 0.1]))), ["'propensity' row 2", "not a probability in (0, 1]"]),
    ("propensity-zero", _write(with_extra("propensity", pa.array([0.5, 0.2, 0.0, 0.1]))), ["'propensity' row 2", "not a probability"]),
    ("propensity-nan", _write(with_extra("propensity", pa.array([0.5, 0.2, float("nan"), 0.1]))), ["'propensity' row 2", "not a probability"]),
    ("propensity-missing", _write(with_extra("propensity", pa.array([0.5, 0.2, None, 0.1], pa.float64()))), ["'propensity'", "null at row 2"]),
    ("propensity-string", _write(with_extra("propensity", pa.array(["a", "b", "c", "d"]))), ["'propensity'", "expected float64"]),
    ("log-propensity-positive", _write(with_extra("log_propensity", pa.array([-1.0, -2.0, 0.5, -1.0]))), ["'log_propensity' row 2", "log-probability <= 0"]),
    ("log-propensity-inf", _write(with_extra("log_propensity", pa.array([-1.0, -2.0, -np.inf, -1.0]))), ["'log_propensity' row 2", "not a finite"]),
    ("propensity-and-log", _write(with_extra("propensity", pa.array([0.5] * 4)).append_column("log_propensity", pa.array([-0.7] * 4))), ["'propensity' and 'log_propensity' both given"]),
    ("extra-labels-length", _write(with_extra("labels_like", pa.array([[1.0, 0.0, 0.0]] * 2 + [[1.0, 0.0]] + [[0.0, 0.0, 1.0]]))), ["'labels_like' row 2", "2 values for 3 shown"]),
    ("extra-labels-nan", _write(with_extra("labels_like", pa.array([[1.0, 0.0, 0.0]] * 2 + [[1.0, float("nan"), 0.0]] + [[0.0, 0.0, 1.0]]))), ["'labels_like' row 2", "not finite"]),
    ("extra-labels-negative", _write(with_extra("labels_star", pa.array([[1.0, 0.0, 0.0]] * 2 + [[1.0, -2.0, 0.0]] + [[0.0, 0.0, 1.0]]))), ["'labels_star' row 2", "negative"]),
    ("position-propensities-length", _write(with_extra("position_propensities", pa.array([[0.5, 0.5, 0.5]] * 2 + [[0.5]] + [[0.5, 0.5, 0.5]]))), ["'position_propensities' row 2", "1 values for 3 shown"]),
    ("position-propensities-zero", _write(with_extra("position_propensities", pa.array([[0.5, 0.5, 0.5]] * 2 + [[0.5, 0.0, 0.5]] + [[0.5, 0.5, 0.5]]))), ["'position_propensities' row 2", "not a probability"]),
    ("mistyped-user-id", _write(with_column("user_id", pa.array(["a", "b", "c", "d"]))), ["'user_id'", "type string", "expected int64"]),
    ("mistyped-candidates-float", _write(with_column("candidates", pa.array([[1.0, 2.0, 3.0]] * 4))), ["'candidates'", "double"]),
    ("mistyped-labels-string", _write(with_column("labels", pa.array([["1", "0", "1"]] * 4))), ["'labels'", "list<float32>"]),
    ("nan-label", _write(with_row("labels", [1.0, float("nan"), 0.0])), ["'labels' row 2", "not finite"]),
    ("inf-label", _write(with_row("labels", [float("inf"), 0.0, 0.0])), ["'labels' row 2", "not finite"]),
    ("negative-label", _write(with_row("labels", [-1.0, 0.0, 0.0])), ["'labels' row 2", "negative"]),
    ("labels-length", _write(with_row("labels", [1.0, 0.0])), ["'labels' row 2", "2 labels for 3 shown"]),
    ("shown-outside-candidates", _write(with_row("shown", [12, 99, 15])), ["'shown' row 2", "item 99 is not in candidates"]),
    ("duplicate-candidate", _write(with_row("candidates", [12, 11, 12, 13, 14, 15])), ["'candidates' row 2", "item 12 appears more than once"]),
    ("duplicate-shown", _write(with_row("shown", [12, 15, 12])), ["'shown' row 2", "item 12 appears more than once"]),
    ("empty-candidates", _write(with_row("candidates", [])), ["'candidates' row 2", "empty candidates"]),
    ("empty-shown", _write(with_row("shown", []) .set_column(6, "labels", pa.array([[1.0, 0.0, 1.0]] * 2 + [[]] + [[1.0, 0.0, 1.0]], pa.list_(pa.float32())))), ["'shown' row 2", "empty shown"]),
    ("n-less-than-l", _write(with_row("candidates", [12, 15])), ["'candidates' row 2", "N=2", "L=3"]),
    ("ids-beyond-int64", _write(with_column("candidates", pa.array([[100, 11, 12, 13, 14, 15], [101, 11, 12, 13, 14, 15], [12, HUGE, 15], [103, 12, 15]], pa.list_(pa.uint64())))), ["'candidates' row 2", f"id {HUGE} is beyond int64"]),
    ("negative-item-id", _write(with_row("history", [1, -7])), ["'history' row 2", "negative item id -7"]),
    ("null-user", _write(with_column("user_id", pa.array([0, 1, None, 1], pa.int64()))), ["'user_id'", "null at row 2"]),
    ("null-inside-list", _write(with_column("history", pa.array([[1], [2], [3, None], [4]], pa.list_(pa.int64())))), ["'history' row 2", "null item id"]),
    ("duplicate-request-id", _write(with_row("request_id", "r0")), ["'request_id' row 2", "duplicate request id 'r0'"]),
    ("empty-request-id", _write(with_row("request_id", "")), ["'request_id' row 2", "empty request id"]),
    ("zero-rows", _write(good_table().slice(0, 0)), ["no rows"]),
    ("empty-file", _raw(b""), ["empty file"]),
    ("truncated-parquet", _truncated, ["not a readable Parquet"]),
    ("not-parquet", _raw(b"request_id,user_id\nr1,1\n"), ["not a readable Parquet"]),
]


@pytest.mark.parametrize("case, writer, expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_bad_input_corpus(tmp_path, capsys, case, writer, expected):
    path = tmp_path / "bad.parquet"
    writer(path)
    with pytest.raises(DataValidationError) as err:
        read_impressions(path)
    msg = str(err.value)
    assert str(path) in msg, msg  # names the file
    for part in expected:
        assert part in msg, f"{case}: {part!r} not in {msg!r}"

    out = tmp_path / "out"
    code = main(["data", "prepare", "--impressions", str(path), "--out", str(out)])
    assert code == 2
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.parquet"]  # no temp folder left either
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and expected[0] in stderr  # one line, no traceback


def test_corpus_has_at_least_15_cases():
    assert len(CORPUS) >= 15


@pytest.mark.parametrize(
    "config, expected",
    [("protocol:\n  slate_lenn: 6\n", "unknown config key(s) in 'protocol': slate_lenn"),
     ("protocol:\n  slate_len: 0\n", "'protocol.slate_len' must be >= 1"),
     ("protocol: [1, 2\n", "not valid YAML")],
)
def test_bad_config_exits_2_and_writes_nothing(tmp_path, capsys, config, expected):
    pq.write_table(good_table(), tmp_path / "ok.parquet")
    (tmp_path / "c.yaml").write_text(config)
    out = tmp_path / "out"
    code = main(["data", "prepare", "--impressions", str(tmp_path / "ok.parquet"), "--out", str(out), "--config", str(tmp_path / "c.yaml")])
    assert code == 2 and not out.exists()
    assert expected in capsys.readouterr().err


def test_good_table_roundtrips_and_conforms(tmp_path):
    pq.write_table(good_table(), tmp_path / "ok.parquet")
    t = read_impressions(tmp_path / "ok.parquet")
    assert t.schema.equals(IMPRESSIONS)
    assert t.to_pylist() == good_table().to_pylist()


def test_accepted_oddities(tmp_path):
    """Unicode request ids, narrower or unsigned int ids that fit int64, integer or float64
    labels, a huge history and repeats in history are all valid input."""
    rows = good_rows()
    rows[0]["request_id"] = "请求-🎬-ü"
    rows[1]["history"] = list(range(100_000))
    t = pa.Table.from_pylist(rows)  # pyarrow infers int64 / double
    t = t.set_column(1, "user_id", t.column("user_id").cast(pa.uint32()))
    t = t.set_column(4, "candidates", t.column("candidates").cast(pa.list_(pa.uint64())))
    pq.write_table(t, tmp_path / "odd.parquet")
    out = read_impressions(tmp_path / "odd.parquet")
    assert out.schema.equals(IMPRESSIONS)
    assert out.column("request_id")[0].as_py() == "请求-🎬-ü"
    assert len(out.column("history")[1].as_py()) == 100_000
    t2 = t.set_column(6, "labels", pa.array([[1, 0, 1]] * 4, pa.list_(pa.int8())))
    assert validate_impressions(t2, "int-labels").column("labels").type == pa.list_(pa.float32())


def test_requests_accept_impressions_and_directories(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    t = good_table()
    pq.write_table(t.slice(0, 2), d / "part-0.parquet")
    pq.write_table(t.slice(2), d / "part-1.parquet")
    req = read_requests(d)
    assert req.schema.equals(REQUESTS) and req.num_rows == 4
    assert read_impressions(d).column("request_id").to_pylist() == ["r0", "r1", "r2", "r3"]
    # require_feedback=False: a requests-only file is fine
    pq.write_table(req, tmp_path / "req.parquet")
    assert read_impressions(tmp_path / "req.parquet", require_feedback=False).schema.equals(REQUESTS)
    with pytest.raises(DataValidationError, match="missing column"):
        read_impressions(tmp_path / "req.parquet")


def test_directory_with_mismatched_parts(tmp_path):
    d = tmp_path / "parts"
    d.mkdir()
    pq.write_table(good_table(), d / "a.parquet")
    pq.write_table(good_table().drop_columns(["labels"]), d / "b.parquet")
    with pytest.raises(DataValidationError, match="b.parquet: schema differs"):
        read_impressions(d)


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(DataValidationError, match="no such file"):
        read_impressions(tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataValidationError, match="no .parquet files"):
        read_impressions(tmp_path / "empty")


@pytest.mark.parametrize(
    "items, expected",
    [({"item_id": [1, 2, 1], "category": [0, 1, 2]}, "'item_id' row 2: duplicate item id 1"),
     ({"item_id": [1, 2, 3], "category": [0, -1, 2]}, "'category' row 1"),
     ({"item_id": [1, 2, 3]}, "missing column")],
)
def test_bad_items(tmp_path, items, expected):
    pq.write_table(pa.table(items), tmp_path / "items.parquet")
    with pytest.raises(DataValidationError, match=expected.replace("(", r"\(")):
        read_items(tmp_path / "items.parquet")


def test_first_offending_row_is_reported():
    rows = good_rows(6)
    rows[4]["shown"] = [12, 77, 15]
    rows[3]["shown"] = [12, 88, 15]
    with pytest.raises(DataValidationError, match="'shown' row 3: item 88"):
        validate_impressions(pa.Table.from_pylist(rows, schema=IMPRESSIONS), "t")


def test_validation_speed_100k_rows():
    """Well under a second per 100k rows of N=50, L=6 (measured ~0.4 s here on a busy 2-core box)."""
    rng = np.random.default_rng(0)
    R, N, L = 100_000, 50, 6
    cand = (rng.integers(0, 400, R)[:, None] + 7 * np.arange(N)[None, :]) % 400  # distinct per row (7 is prime to 400)
    t = pa.table(
        {
            "request_id": pa.array([f"r{i}" for i in range(R)]),
            "user_id": pa.array(rng.integers(0, 1000, R)),
            "timestamp": pa.array(np.arange(R)),
            "history": pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, 400, R * 20)), 20).cast(pa.list_(pa.int64())),
            "candidates": pa.FixedSizeListArray.from_arrays(pa.array(cand.ravel()), N).cast(pa.list_(pa.int64())),
            "shown": pa.FixedSizeListArray.from_arrays(pa.array(cand[:, :L].ravel()), L).cast(pa.list_(pa.int64())),
            "labels": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(R * L).astype(np.float32)), L).cast(pa.list_(pa.float32())),
        }
    )
    t0 = time.perf_counter()
    validate_impressions(t, "speed")
    assert time.perf_counter() - t0 < 2.5  # generous for a loaded CI box; typical 0.3-0.5 s


def test_errors_are_goalrank_input_errors():
    assert issubclass(DataValidationError, GoalRankInputError) and issubclass(DataValidationError, ValueError)


def test_unknown_columns_are_ignored_with_one_line(tmp_path, caplog):
    pq.write_table(with_extra("clicks", pa.array([1, 2, 3, 4])).append_column("reward", pa.array([0.1] * 4)), tmp_path / "x.parquet")
    with caplog.at_level("WARNING", logger="goalrank"):
        t = read_impressions(tmp_path / "x.parquet")
        req = read_requests(tmp_path / "x.parquet")
    assert t.schema.equals(IMPRESSIONS) and req.schema.equals(REQUESTS)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2 and "ignoring column(s) ['clicks', 'reward']" in notes[0] and str(tmp_path / "x.parquet") in notes[0]
    assert "\n" not in notes[0]


def test_optional_columns_are_kept_and_typed(tmp_path, caplog):
    t = (with_extra("labels_like", pa.array([[1, 0, 0]] * 4, pa.list_(pa.int32())))
         .append_column("propensity", pa.array([0.5, 1.0, 0.25, 0.125], pa.float32()))
         .append_column("position_propensities", pa.array([[0.5, 0.5, 1.0]] * 4)))
    pq.write_table(t, tmp_path / "x.parquet")
    with caplog.at_level("WARNING", logger="goalrank"):
        got = read_impressions(tmp_path / "x.parquet")
        req = read_requests(tmp_path / "x.parquet")  # optional feedback is not a request column, and no notice
    assert not caplog.records
    assert got.column_names == IMPRESSIONS.names + ["labels_like", "propensity", "position_propensities"]
    assert got.schema.field("labels_like").type == pa.list_(pa.float32())
    assert got.schema.field("propensity").type == pa.float64()
    assert got.column("labels_like").to_pylist()[0] == [1.0, 0.0, 0.0]
    assert req.schema.equals(REQUESTS)
    log_p = with_extra("log_propensity", pa.array([0.0, -1.0, -2.0, -0.5]))
    assert validate_impressions(log_p, "x").column("log_propensity").to_pylist() == [0.0, -1.0, -2.0, -0.5]
