"""Date-partitioned impression logs: partition names, the sliding window of a daily run, and
the time split inside it. Pure: no storage access (tasks/partitions.py lists and reads).

Layout: `{impressions}/date=YYYY-MM-DD/*.parquet`, one partition per UTC day of logs. A run
for date D trains on the window [D - W, D - 1]: every partition of the window but the last day
trains; the last day (D - 1, which must exist) is held out, its earlier requests validate and
its later ones (`window.test_fraction`) are the test split. Gaps inside the window are allowed
and reported; a missing D - 1 is an error, never a silent retrain on older data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from goalrank_core.errors import ConfigError, GoalRankInputError

KEY = "date"
_NAME = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
DAY_S = 86400


class PartitionError(GoalRankInputError):
    """A partition name is malformed, or a window has too few partitions to train on."""


# ---------------------------------------------------------------- names and dates


def parse_date(value: str | date, what: str = "run_date") -> date:
    """"2026-11-27" (or a date) -> date; anything else is a ConfigError naming `what`."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return datetime.strptime(str(value), "%Y-%m-%d").date()
    except ValueError:
        raise ConfigError(f"{what} '{value}' is not a date in the form YYYY-MM-DD") from None


def partition_name(day: date) -> str:
    return f"{KEY}={day.isoformat()}"


def parse_partition(name: str) -> date | None:
    """`date=2026-11-27` -> date; a name not starting with `date=` -> None (not a partition:
    `_SUCCESS`, `.tmp` ...); `date=` with a bad date -> PartitionError."""
    name = name.rstrip("/").rsplit("/", 1)[-1]
    if not name.startswith(f"{KEY}="):
        return None
    m = _NAME.match(name)
    if m is None:
        raise PartitionError(f"partition folder '{name}' is not named {KEY}=YYYY-MM-DD")
    try:
        return datetime.strptime(m.group(1), "%Y-%m-%d").date()
    except ValueError:
        raise PartitionError(f"partition folder '{name}' holds no valid date") from None


def day_of(timestamps: np.ndarray) -> np.ndarray:
    """(R,) seconds since epoch -> (R,) int64 UTC day numbers (days since 1970-01-01)."""
    return np.floor_divide(np.asarray(timestamps, np.int64), DAY_S)


def date_of_day(day_number: int) -> date:
    return date(1970, 1, 1) + timedelta(days=int(day_number))


def day_number(day: date) -> int:
    return (day - date(1970, 1, 1)).days


def date_range(start: date, end: date) -> list[date]:
    """Every day from start to end, both included ([] when end < start)."""
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


# ---------------------------------------------------------------- the window


@dataclass(frozen=True)
class Window:
    """The partitions a run for `run_date` reads."""

    run_date: date
    days: int  # W
    train: tuple[date, ...]  # present partitions of [D - W, D - 2], oldest first
    holdout: date  # D - 1: validation (earlier requests) and test (later ones)
    missing: tuple[date, ...] = field(default_factory=tuple)  # gaps in [D - W, D - 2]

    @property
    def start(self) -> date:
        return self.run_date - timedelta(days=self.days)

    @property
    def dates(self) -> tuple[date, ...]:
        return self.train + (self.holdout,)

    @property
    def partitions(self) -> tuple[str, ...]:
        """Partition folder names read, oldest first (the holdout day last)."""
        return tuple(partition_name(d) for d in self.dates)

    def describe(self) -> dict:
        return {"run_date": self.run_date.isoformat(), "days": self.days, "start": self.start.isoformat(),
                "end": self.holdout.isoformat(), "partitions": list(self.partitions),
                "holdout": partition_name(self.holdout), "missing": [d.isoformat() for d in self.missing]}


def window_dates(run_date: date, days: int) -> list[date]:
    """[D - W, D - 1], oldest first."""
    if days < 1:
        raise ConfigError(f"config 'window.days' must be >= 1, got {days}")
    return date_range(run_date - timedelta(days=days), run_date - timedelta(days=1))


def select_window(available: Iterable[date], run_date: date, days: int, where: str = "impressions") -> Window:
    """The window of `run_date` among the `available` partition dates. Raises
    MissingPartitionError (goalrank_core.gates) when D - 1 is absent, and PartitionError when
    no earlier partition of the window is there to train on."""
    from goalrank_core.gates import MissingPartitionError

    have = set(available)
    wanted = window_dates(run_date, days)
    holdout = wanted[-1]
    if holdout not in have:
        newest = max(have, default=None)
        hint = f"; newest partition is {partition_name(newest)}" if newest else "; it holds no partitions"
        raise MissingPartitionError(
            f"{where}/{partition_name(holdout)}", "present",
            f"missing (D - 1 for run date {run_date.isoformat()}){hint}. Refusing to retrain on older data; "
            f"land the partition or pick another --run-date")
    train = tuple(d for d in wanted[:-1] if d in have)
    if not train:
        raise PartitionError(
            f"{where}: the window [{wanted[0].isoformat()}, {holdout.isoformat()}] of run date "
            f"{run_date.isoformat()} holds only the validation day {partition_name(holdout)}; "
            f"need at least one earlier partition to train on (window.days={days})")
    missing = tuple(d for d in wanted[:-1] if d not in have)
    return Window(run_date, days, train, holdout, missing)


# ---------------------------------------------------------------- the split


def split_window(train: pa.Table, holdout: pa.Table, items: pa.Table | None = None,
                 test_fraction: float = 0.5, holdout_name: str = "holdout day"):
    """Validated IMPRESSIONS of the training days and of the holdout day -> protocol Splits:
    train = every training day; the holdout day sorted by (timestamp, request_id), its first
    ceil((1 - test_fraction) * n) requests valid, the rest test (at least one each when n >= 2)."""
    from goalrank_core.splits import Splits, split_stats

    n = holdout.num_rows
    if n == 0:
        raise PartitionError(f"{holdout_name}: no requests to validate on")
    if train.num_rows == 0:
        raise PartitionError("the window's training partitions hold no requests")
    order = pc.sort_indices(holdout, [("timestamp", "ascending"), ("request_id", "ascending")])
    held = holdout.take(order)
    n_valid = int(np.ceil((1.0 - test_fraction) * n))
    n_valid = min(max(n_valid, 1), n - 1) if n >= 2 else n
    valid, test = held.slice(0, n_valid), held.slice(n_valid)
    tables = {"train": train, "valid": valid, "test": test}
    stats = split_stats(tables, dataset="impressions (window)", holdout=holdout_name, test_fraction=test_fraction)
    return Splits(train, valid, test, items, stats)


# ---------------------------------------------------------------- writers' helpers


def by_day(table: pa.Table) -> dict[date, pa.Table]:
    """Rows grouped by the UTC day of their timestamp, each in its original row order."""
    if table.num_rows == 0:
        return {}
    days = day_of(table.column("timestamp").to_numpy())
    out = {}
    for d in np.unique(days):
        out[date_of_day(int(d))] = table.filter(pa.array(days == d))
    return out


def spread_over_days(table: pa.Table, n_days: int, start: date) -> pa.Table:
    """For logs without real time (Amazon-Book): give each request a timestamp in one of
    `n_days` days from `start` by its rank in its user's own order (the protocol's synthetic
    order: `timestamp`, then request_id), so every day holds a slice of every user's sequence
    and a user's requests keep their order. Seconds inside a day follow the same rank."""
    if n_days < 1:
        raise ConfigError(f"days must be >= 1, got {n_days}")
    if table.num_rows == 0:
        return table
    u = table.column("user_id").to_numpy()
    ts = table.column("timestamp").to_numpy()
    rid = np.asarray(table.column("request_id").to_pylist(), dtype=str)
    order = np.lexsort((rid, ts, u))
    su = u[order]
    _, first, count = np.unique(su, return_index=True, return_counts=True)
    rank = np.arange(len(su)) - np.repeat(first, count)  # (R,) position in the user's sequence
    frac = rank / np.repeat(count, count)  # in [0, 1)
    day = np.floor(frac * n_days).astype(np.int64)
    within = np.floor((frac * n_days - day) * (DAY_S - 1)).astype(np.int64)
    new_ts = np.empty(len(u), np.int64)
    new_ts[order] = day_number(start) * DAY_S + day * DAY_S + within
    i = table.schema.get_field_index("timestamp")
    return table.set_column(i, table.schema.field(i), pa.array(new_ts, pa.int64()))
