"""Amazon-Book as preprocessed for KGAT (Wang et al., KDD 2019).

`train.txt` / `test.txt`: one line per user, `user item item ...` (implicit positives, no
ratings, no timestamps). `item_list.txt` maps original ASINs to the remapped ids used in the
interaction files; items have no category here (the ITEMS table is omitted).

The only order is a line's own order, so an event's `timestamp` is its position in the
user's line (train: 0..n-1; test: continuing after train). docs/protocol.md says why.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from goalrank_core.datasets.registry import RATINGS, RawData
from goalrank_core.errors import GoalRankInputError


def _read_lists(path: Path, offset: dict[int, int] | None = None) -> tuple[pa.Table, dict[int, int]]:
    users, items, stamps = [], [], []
    lengths: dict[int, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            ids = [int(p) for p in parts]
        except ValueError as exc:
            raise GoalRankInputError(f"{path}: line {n}: expected integer ids: {exc}") from exc
        u, its = ids[0], ids[1:]
        start = (offset or {}).get(u, 0)
        users.extend([u] * len(its))
        items.extend(its)
        stamps.extend(range(start, start + len(its)))
        lengths[u] = start + len(its)
    n = len(items)
    table = pa.table(
        {
            "user_id": pa.array(np.asarray(users, np.int64)),
            "item_id": pa.array(np.asarray(items, np.int64)),
            "rating": pa.array(np.ones(n, np.float32)),
            "timestamp": pa.array(np.asarray(stamps, np.int64)),
        },
        schema=RATINGS,
    )
    return table, lengths


def load_amazon_book(folder: Path) -> RawData:
    folder = Path(folder)
    train, lengths = _read_lists(folder / "train.txt")
    if train.num_rows == 0:
        raise GoalRankInputError(f"{folder / 'train.txt'}: no interactions")
    test, _ = _read_lists(folder / "test.txt", offset=lengths)
    return RawData("amazon-book", train, items=None, test=test, implicit=True)
