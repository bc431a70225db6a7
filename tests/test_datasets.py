"""Loaders for the publishers' layouts, data-dir resolution, and download (loopback only)."""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from goalrank.cli import main
from goalrank_core.datasets import RATINGS, dataset_dir, download, load, resolve_data_dir
from goalrank_core.errors import DatasetNotFoundError, GoalRankInputError

DATA = os.environ.get("GOALRANK_DATA_DIR")


def write_ml1m(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_text("1::10::5::978300760\n1::20::3::978302109\n2::10::4::978301968\n2::30::1::978300275\n")
    (folder / "movies.dat").write_bytes(
        "10::Toy Story (1995)::Animation|Children's|Comedy\n20::Amélie (2001)::Comedy|Romance\n30::Odd (1999)::Nothing\n".encode("latin-1"))
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")


def write_ml100k(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("196\t242\t3\t881250949\n186\t302\t4\t891717742\n")
    flags = ["0"] * 19
    f1, f2 = flags.copy(), flags.copy()
    f1[3], f1[5] = "1", "1"  # Animation first
    (folder / "u.item").write_bytes(("242|Kolya (1996)||||" + "|".join(f1) + "\n302|L.A. Confidential (1997)||||" + "|".join(f2) + "\n").encode("latin-1"))
    (folder / "u.user").write_text("196|49|M|writer|55105\n186|39|F|executive|00000\n")


def write_amazon(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "train.txt").write_text("0 5 6 7\n1 8\n")
    (folder / "test.txt").write_text("0 9 10\n1 5\n")
    (folder / "item_list.txt").write_text("org_id remap_id freebase_id\nA 0 m.1\n")


def test_ml1m_fixture(tmp_path):
    write_ml1m(tmp_path / "ml-1m")
    d = load("ml-1m", tmp_path)
    assert d.ratings.schema.equals(RATINGS) and d.ratings.num_rows == 4
    assert d.ratings.to_pylist()[1] == {"user_id": 1, "item_id": 20, "rating": 3.0, "timestamp": 978302109}
    cats = dict(zip(d.items.column("item_id").to_pylist(), d.items.column("category").to_pylist()))
    assert cats == {10: 4, 20: 6, 30: 0}  # Animation = 4, Comedy = 6 in ML-100K's genre order; unknown name = 0


def test_ml100k_fixture_and_direct_folder(tmp_path):
    write_ml100k(tmp_path / "ml-100k")
    d = load("ml-100k", tmp_path)
    assert d.ratings.column("item_id").to_pylist() == [242, 302]
    assert d.items.column("category").to_pylist() == [4, 0]  # first flag (Animation) -> 4; none -> 0
    assert load("ml-100k", tmp_path / "ml-100k").ratings.num_rows == 2  # a data dir holding the files directly


def test_amazon_fixture(tmp_path):
    write_amazon(tmp_path / "amazon-book")
    d = load("amazon-book", tmp_path)
    assert d.implicit and d.items is None
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in d.ratings.to_pylist()] == [(0, 5, 0), (0, 6, 1), (0, 7, 2), (1, 8, 0)]
    assert [(r["user_id"], r["item_id"], r["timestamp"]) for r in d.test.to_pylist()] == [(0, 9, 3), (0, 10, 4), (1, 5, 1)]


def test_malformed_files_name_the_file(tmp_path):
    write_ml100k(tmp_path / "ml-100k")
    (tmp_path / "ml-100k" / "u.data").write_text("196\t242\t3\t881250949\n186\tabc\t4\t891717742\n")
    with pytest.raises(GoalRankInputError, match="u.data"):
        load("ml-100k", tmp_path)
    write_amazon(tmp_path / "amazon-book")
    (tmp_path / "amazon-book" / "train.txt").write_text("0 5 x\n")
    with pytest.raises(GoalRankInputError, match="train.txt: line 1"):
        load("amazon-book", tmp_path)


def test_prepare_refuses_a_truncated_ml1m_ratings_file(tmp_path, capsys):
    write_ml1m(tmp_path / "ml-1m")
    ratings = tmp_path / "ml-1m" / "ratings.dat"
    ratings.write_bytes(ratings.read_bytes()[:-14])  # a copy cut short inside the 4th record
    out = tmp_path / "prepared"
    assert main(["data", "prepare", "--dataset", "ml-1m", "--data-dir", str(tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(ratings) in err and "truncated" in err and "line 4" in err and "UserID::MovieID::Rating::Timestamp" in err
    assert not out.exists()


def test_a_bad_ml1m_record_names_the_file_and_layout(tmp_path):
    write_ml1m(tmp_path / "ml-1m")
    (tmp_path / "ml-1m" / "ratings.dat").write_text("1::10::5::978300760\n1::20::3\n")
    with pytest.raises(GoalRankInputError, match=r"ratings.dat: not in the expected `UserID::MovieID::Rating::Timestamp` layout: line 2"):
        load("ml-1m", tmp_path)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("GOALRANK_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir() == tmp_path / "env"
    monkeypatch.delenv("GOALRANK_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert resolve_data_dir() == tmp_path / "cache" / "goalrank"


def test_missing_dataset_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        dataset_dir("ml-1m", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "ml-1m") in msg and "goalrank data download ml-1m" in msg
    assert "https://files.grouplens.org/datasets/movielens/ml-1m.zip" in msg
    with pytest.raises(GoalRankInputError, match="unknown data set"):
        load("ml-20m", tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_unreachable_is_a_clear_error(tmp_path, capsys):
    url = f"http://127.0.0.1:{_free_port()}/ml-100k.zip"
    with pytest.raises(GoalRankInputError, match="download of http://127.0.0.1:.*failed"):
        download("ml-100k", tmp_path, url=url, timeout=5)
    assert not (tmp_path / "ml-100k").exists() and list(tmp_path.iterdir()) == []
    assert main(["data", "download", "ml-100k", "--data-dir", str(tmp_path), "--url", url, "--timeout", "5"]) == 2
    assert "failed" in capsys.readouterr().err


@pytest.fixture
def loopback_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **k)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_md5_companion(tmp_path, loopback_server):
    root, base = loopback_server
    write_ml100k(tmp_path / "src" / "ml-100k")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in ("u.data", "u.item", "u.user"):
            z.write(tmp_path / "src" / "ml-100k" / f, f"ml-100k/{f}")
    (root / "ml-100k.zip").write_bytes(buf.getvalue())
    (root / "ml-100k.zip.md5").write_text(f"MD5 (ml-100k.zip) = {hashlib.md5(buf.getvalue()).hexdigest()}\n")
    got = download("ml-100k", tmp_path / "data", url=f"{base}/ml-100k.zip", timeout=5)
    assert got == tmp_path / "data" / "ml-100k"
    assert load("ml-100k", tmp_path / "data").ratings.num_rows == 2
    (root / "ml-100k.zip.md5").write_text("0" * 32 + "\n")
    with pytest.raises(GoalRankInputError, match="md5 mismatch"):
        download("ml-100k", tmp_path / "data2", url=f"{base}/ml-100k.zip", timeout=5)
    assert not (tmp_path / "data2" / "ml-100k").exists()


@pytest.mark.skipif(not (DATA and (Path(DATA) / "ml-100k" / "u.data").is_file()), reason="GOALRANK_DATA_DIR not set")
def test_real_ml100k_and_amazon_book():
    d = load("ml-100k", DATA)
    assert d.ratings.num_rows == 100_000 and d.items.num_rows == 1682
    assert len(set(d.ratings.column("user_id").to_pylist())) == 943
    m = load("ml-1m", DATA)
    assert m.ratings.num_rows == 1_000_209 and len(set(m.ratings.column("user_id").to_pylist())) == 6040
    a = load("amazon-book", DATA)
    assert (a.ratings.num_rows, a.test.num_rows) == (652_514, 193_920)
