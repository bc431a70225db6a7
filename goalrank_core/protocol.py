"""Ratings -> impression logs, split by time per user (docs/protocol.md has every choice).

Explicit ratings (MovieLens): k-core filter; each user's ratings in time order are cut into
consecutive slates of L (the shown list, labels = rating >= threshold); the oldest
`n mod L` ratings form no slate but count as history. Last slate -> test, the one before ->
valid, earlier -> train. History = the user's positives strictly before the slate (last H).
Candidates = shown + (N - L) retrieved by a retriever fit on train-period ratings only,
excluding every item the user rated before or in the slate. The union is put in a seeded
random order: score order would reveal which items were shown (see `_shuffle_rows`).

Implicit data (Amazon-Book, `RawData.implicit`): see `interaction_requests.implicit_requests`.

User logs that already carry candidates (`split_impressions`) are split by `protocol.split`:
`time` (default) cuts all requests at two timestamps, so every training request is earlier
than every evaluation one, as production logs are cut; `user-last` applies the per-user rule
above (last request test, the one before valid, earlier train).
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from goalrank_core.config_sections import ProtocolConfig
from goalrank_core.datasets.registry import RawData
from goalrank_core.errors import GoalRankInputError
from goalrank_core.interaction_requests import explicit_requests, implicit_requests
from goalrank_core.splits import SPLITS, Splits, split_impressions, split_stats


def make_splits(raw: RawData, cfg: ProtocolConfig | None = None, chunk: int = 2048) -> Splits:
    """Turn a loaded data set into train/valid/test impressions. Deterministic for a seed."""
    cfg = cfg or ProtocolConfig()
    build = implicit_requests if raw.implicit else explicit_requests
    tables, stats = build(raw, cfg, chunk)
    stats = split_stats(tables, dataset=raw.name, slate_len=cfg.slate_len, n_candidates=cfg.n_candidates,
                   min_core=cfg.min_core, retriever=cfg.retriever, max_users=cfg.max_users, seed=cfg.seed, **stats)
    items = raw.items
    if items is not None:  # keep the rows of items that appear somewhere
        used = pa.concat_arrays([pc.list_flatten(tables[s].column(c)).combine_chunks()
                                 for s in SPLITS for c in ("candidates", "history")])
        items = items.filter(pc.is_in(items.column("item_id"), value_set=pc.unique(used)))
    return Splits(tables["train"], tables["valid"], tables["test"], items, {**stats, "source": "interactions"})


def load_splits(dataset: str | None = None, impressions: str | None = None, items: str | None = None,
                data_dir: str | None = None, protocol: ProtocolConfig | None = None) -> Splits:
    """The one way to get splits from a data source: a named data set through the protocol,
    or user impressions (validated, then split by `protocol.split`; candidates are given, so
    no retriever). Exactly one of `dataset` and `impressions`; `items` only with `impressions`."""
    from goalrank_core import datasets  # local: keeps `import goalrank_core.protocol` light
    from goalrank_core.validate import read_impressions, read_items

    if (dataset is None) == (impressions is None):
        raise GoalRankInputError("give exactly one data source: a data set name or an impressions path")
    if dataset is not None:
        if items is not None:
            raise GoalRankInputError("an items file goes with --impressions; named data sets bring their own")
        return make_splits(datasets.load(dataset, data_dir), protocol)
    table = read_impressions(impressions)
    item_table = read_items(items) if items is not None else None
    return split_impressions(table, item_table, protocol)
