"""Logs that arrive one day at a time, for showing and testing the daily pipeline.

- `synth_day`: one day of synthetic impressions from a world fixed by `seed`; the draws of a
  day depend only on (seed, date), so day 2026-11-27 is the same whether it was written with
  nine others or alone, and a "new partition landing" is just the next date written.
- `replay_splits`: a public data set through the protocol, all splits together, as one log
  to be partitioned by the UTC day of each request's timestamp. Amazon-Book has no time:
  `partitions.spread_over_days` stands in (the protocol's per-user order, spread over days).
"""
from __future__ import annotations

from datetime import date

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from goalrank_core.errors import GoalRankInputError
from goalrank_core.partitions import DAY_S, date_of_day, day_number
from goalrank_core.schemas import IMPRESSIONS
from goalrank_core.synth import T0

SYNTH_START = date_of_day(T0 // DAY_S)  # 2023-11-15, the first day of `synth_impressions`


def synth_day(day: date, n_users: int = 200, n_items: int = 500, requests_per_user: int = 2, slate_len: int = 6,
              n_candidates: int = 50, n_categories: int = 8, history_len: int = 50, seed: int = 0
              ) -> tuple[pa.Table, pa.Table]:
    """One day of IMPRESSIONS (timestamps inside `day`, request ids prefixed with the date) and
    the world's ITEMS. History holds the user's clicks of earlier requests of that day."""
    from goalrank_core.synth import synth_impressions

    k = day_number(day)
    day_seed = int(np.random.SeedSequence([seed, k]).generate_state(1)[0])
    imp, items, _ = synth_impressions(n_users=n_users, n_items=n_items, requests_per_user=requests_per_user,
                                      slate_len=slate_len, n_candidates=n_candidates, n_categories=n_categories,
                                      history_len=history_len, days=1, seed=day_seed, world_seed=seed)
    ts = imp.column("timestamp").to_numpy()
    shifted = (ts - T0) % DAY_S + k * DAY_S  # same second of day, on `day`
    rid = pc.binary_join_element_wise(pa.scalar(day.isoformat()), imp.column("request_id"), "/")
    imp = imp.set_column(0, IMPRESSIONS.field("request_id"), rid)
    imp = imp.set_column(2, IMPRESSIONS.field("timestamp"), pa.array(shifted, pa.int64()))
    return imp.cast(IMPRESSIONS), items


def replay_splits(dataset: str, data_dir: str | None = None, protocol=None) -> tuple[pa.Table, pa.Table | None, bool]:
    """A named data set as one impressions log (train + valid + test of the protocol).
    -> (IMPRESSIONS, ITEMS or None, has_time: False for implicit data without timestamps)."""
    from goalrank_core import datasets
    from goalrank_core.protocol import make_splits

    raw = datasets.load(dataset, data_dir)
    splits = make_splits(raw, protocol)
    table = pa.concat_tables([splits.train, splits.valid, splits.test])
    if table.num_rows == 0:
        raise GoalRankInputError(f"{dataset}: the protocol produced no requests to replay")
    return table, splits.items, not raw.implicit
