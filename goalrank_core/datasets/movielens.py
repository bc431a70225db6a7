"""MovieLens loaders for GroupLens' own layouts.

ML-100K: `u.data` (tab: user item rating timestamp), `u.item` (pipe: id|title|release|video|url|
19 genre flags, latin-1). ML-1M: `ratings.dat` (UserID::MovieID::Rating::Timestamp), `movies.dat`
(MovieID::Title::Genres with |-joined genres, latin-1). `u.user` / `users.dat` must be present
(they are part of the layout) but user features are not used.

An item's `category` is its first genre, coded 1..19 in ML-100K's genre order (0 = none), so
both data sets share one coding.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from goalrank_core.datasets.registry import RATINGS, RawData
from goalrank_core.errors import GoalRankInputError
from goalrank_core.schemas import ITEMS

GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)


def _first_bad_line(data: bytes, sep: str, fields: int) -> tuple[int, str] | None:
    """(line number, text) of the first non-empty line without `fields` fields (error path only)."""
    for n, line in enumerate(data.split(b"\n"), 1):
        if line.strip() and len(line.split(sep.encode())) != fields:
            return n, line.decode("latin-1")[:60]
    return None


def _read_ratings(path: Path, data: bytes, sep: str, layout: str) -> pa.Table:
    """`layout` names the publisher's line format for error messages (ML-1M's `::` is read as a tab)."""
    names = ["user_id", "item_id", "rating", "timestamp"]
    types = {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()}
    # A copy or download cut short ends mid-line: say so, with the line, before parsing.
    if data and not data.endswith(b"\n"):
        bad = _first_bad_line(data[data.rfind(b"\n") + 1:], sep, len(names))
        if bad is not None:
            line = data.count(b"\n") + 1
            raise GoalRankInputError(f"{path}: truncated: its last line, line {line:,}, ends mid-record ({bad[1]!r}, "
                                     f"expected {layout}); re-download or re-extract the file")
    try:
        t = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names),
            parse_options=pacsv.ParseOptions(delimiter=sep),
            convert_options=pacsv.ConvertOptions(column_types=types),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        bad = _first_bad_line(data, sep, len(names))
        where = f"line {bad[0]:,} ({bad[1]!r})" if bad else str(exc).splitlines()[0]
        raise GoalRankInputError(f"{path}: not in the expected {layout} layout: {where}") from exc
    if t.num_rows == 0:
        raise GoalRankInputError(f"{path}: no ratings")
    for name in names:
        if t.column(name).null_count:
            row = int(np.flatnonzero(t.column(name).is_null().to_numpy(zero_copy_only=False))[0])
            raise GoalRankInputError(f"{path}: line {row + 1}: missing {name}")
    return t.cast(RATINGS)


def load_ml100k(folder: Path) -> RawData:
    folder = Path(folder)
    ratings = _read_ratings(folder / "u.data", (folder / "u.data").read_bytes(), "\t", "`user<TAB>item<TAB>rating<TAB>timestamp`")
    ids, cats = [], []
    for n, line in enumerate((folder / "u.item").read_bytes().decode("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 5 + len(GENRES):
            raise GoalRankInputError(f"{folder / 'u.item'}: line {n}: expected {5 + len(GENRES)} fields, got {len(parts)}")
        flags = [p.strip() == "1" for p in parts[5 : 5 + len(GENRES)]]
        ids.append(int(parts[0]))
        cats.append(flags.index(True) + 1 if any(flags) else 0)
    items = pa.table({"item_id": pa.array(ids, pa.int64()), "category": pa.array(cats, pa.int64())}, schema=ITEMS)
    return RawData("ml-100k", ratings, items)


def load_ml1m(folder: Path) -> RawData:
    folder = Path(folder)
    # `::` is two characters; pyarrow's CSV reader takes one, so swap it for a tab first.
    raw = (folder / "ratings.dat").read_bytes().replace(b"::", b"\t")
    ratings = _read_ratings(folder / "ratings.dat", raw, "\t", "`UserID::MovieID::Rating::Timestamp`")
    code = {g: i + 1 for i, g in enumerate(GENRES)}
    ids, cats = [], []
    for n, line in enumerate((folder / "movies.dat").read_bytes().decode("latin-1").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 3:
            raise GoalRankInputError(f"{folder / 'movies.dat'}: line {n}: expected MovieID::Title::Genres")
        first = parts[2].split("|")[0].strip()
        ids.append(int(parts[0]))
        cats.append(code.get(first, 0))
    items = pa.table({"item_id": pa.array(ids, pa.int64()), "category": pa.array(cats, pa.int64())}, schema=ITEMS)
    return RawData("ml-1m", ratings, items)
