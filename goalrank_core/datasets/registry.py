"""Where data sets live and how to fetch them.

Data-dir resolution: an explicit argument, else env GOALRANK_DATA_DIR, else a per-user cache
(~/.cache/goalrank, or $XDG_CACHE_HOME/goalrank). A data set NAME lives in `DATA_DIR/NAME/`
in its publisher's own layout; a data dir that directly holds the files is accepted too.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from goalrank_core.errors import DatasetNotFoundError, GoalRankInputError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    files: tuple[str, ...]  # every file the loader needs
    url: str  # canonical source: a zip, or a folder of raw files (files fetched one by one)
    archive: bool  # True: `url` is a zip holding a folder `name/`
    sha256: dict[str, str] = field(default_factory=dict)  # file -> digest, where known
    md5_companion: bool = False  # GroupLens publishes `URL.md5` next to each zip


GROUPLENS = "https://files.grouplens.org/datasets/movielens"
KGAT = "https://raw.githubusercontent.com/xiangwang1223/knowledge_graph_attention_network/master/Data/amazon-book"

DATASETS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec("ml-100k", ("u.data", "u.item", "u.user"), f"{GROUPLENS}/ml-100k.zip", True, md5_companion=True),
    "ml-1m": DatasetSpec("ml-1m", ("ratings.dat", "movies.dat", "users.dat"), f"{GROUPLENS}/ml-1m.zip", True, md5_companion=True),
    "amazon-book": DatasetSpec("amazon-book", ("train.txt", "test.txt", "item_list.txt"), KGAT, False),
}


def spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise GoalRankInputError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("GOALRANK_DATA_DIR")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "goalrank"


def dataset_dir(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding NAME's files, or DatasetNotFoundError saying where we looked."""
    s = spec(name)
    root = resolve_data_dir(data_dir)
    looked = [root / name, root]
    for d in looked:
        if all((d / f).is_file() for f in s.files):
            return d
    raise DatasetNotFoundError(
        f"data set {name!r} not found: looked for {', '.join(s.files)} in "
        f"{' and '.join(str(d) for d in looked)} (data dir from "
        f"{'--data-dir' if data_dir else 'GOALRANK_DATA_DIR' if os.environ.get('GOALRANK_DATA_DIR') else 'the default cache'}); "
        f"get it with `goalrank data download {name}` (source: {s.url}) or point --data-dir / GOALRANK_DATA_DIR at a folder holding {name}/"
    )


def _fetch(url: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out)
    except OSError as exc:  # URLError, timeouts and refused connections are OSErrors
        raise GoalRankInputError(f"download of {url} failed: {exc}") from exc


def _digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(name: str, data_dir: str | os.PathLike | None = None, url: str | None = None, timeout: float = 60.0) -> Path:
    """Fetch NAME from its canonical URL (or `url`) into DATA_DIR/NAME and verify checksums:
    a known sha256, or GroupLens' published `.md5` companion. Returns the data set folder.
    Nothing is left in DATA_DIR/NAME unless every file arrived and checked out."""
    s = spec(name)
    base = url or s.url
    target = resolve_data_dir(data_dir) / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        staged = tmp_path / name
        staged.mkdir()
        if s.archive:
            zpath = tmp_path / f"{name}.zip"
            _fetch(base, zpath, timeout)
            if s.md5_companion:
                _fetch(base + ".md5", tmp_path / "zip.md5", timeout)
                want = (tmp_path / "zip.md5").read_text().split()
                want = next((w for w in want if len(w) == 32), "")
                if want.lower() != _digest(zpath, "md5"):
                    raise GoalRankInputError(f"download of {base}: md5 mismatch (published {want!r})")
            with zipfile.ZipFile(zpath) as z:
                for f in s.files:
                    with z.open(f"{name}/{f}") as src, open(staged / f, "wb") as out:
                        shutil.copyfileobj(src, out)
        else:
            for f in s.files:
                _fetch(f"{base}/{f}", staged / f, timeout)
        for f, want in s.sha256.items():
            got = _digest(staged / f, "sha256")
            if got != want:
                raise GoalRankInputError(f"download of {name}/{f}: sha256 {got} != expected {want}")
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    return target


@dataclass
class RawData:
    """A data set as published, in one shape for the protocol.

    ratings: user_id int64, item_id int64, rating float32, timestamp int64, one row per event.
      Implicit data sets (Amazon-Book) have rating 1.0 and timestamp = the event's position in
      the user's published list (the only order there is).
    test: held-out events the publisher split off (Amazon-Book's test.txt), same columns, or None.
    items: goalrank_core.schemas.ITEMS or None.
    """

    name: str
    ratings: pa.Table
    items: pa.Table | None = None
    test: pa.Table | None = None
    implicit: bool = False


RATINGS = pa.schema(
    [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("rating", pa.float32(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),
    ]
)
