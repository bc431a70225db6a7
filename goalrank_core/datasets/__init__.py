"""Public data sets in their publishers' layouts -> `RawData` (ratings, items, held-out test).

    load("ml-100k")                      # finds the folder via data_dir / GOALRANK_DATA_DIR / cache
    download("ml-100k", data_dir)        # canonical URL, checksum verified
"""
from __future__ import annotations

import os

from goalrank_core.datasets.amazon_book import load_amazon_book
from goalrank_core.datasets.movielens import load_ml100k, load_ml1m
from goalrank_core.datasets.registry import (
    DATASETS,
    RATINGS,
    DatasetSpec,
    RawData,
    dataset_dir,
    download,
    resolve_data_dir,
)

_LOADERS = {"ml-100k": load_ml100k, "ml-1m": load_ml1m, "amazon-book": load_amazon_book}


def load(name: str, data_dir: str | os.PathLike | None = None) -> RawData:
    """Load a named data set; DatasetNotFoundError (with where/how) if it is not there."""
    folder = dataset_dir(name, data_dir)  # validates the name too
    return _LOADERS[name](folder)


__all__ = [
    "DATASETS", "RATINGS", "DatasetSpec", "RawData", "dataset_dir", "download", "load",
    "resolve_data_dir", "load_ml100k", "load_ml1m", "load_amazon_book",
]
