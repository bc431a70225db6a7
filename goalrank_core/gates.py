"""Data gates: checks on the newest partition of a daily window before any training.

A partition outside its bounds (config `gates`) raises DataGateError naming the partition,
the check, the measured value and the bounds; the flow stops there, so nothing is trained,
registered or promoted and the champion stays as it was. Checks, in order:

- `readable` / `schema`: every file reads as Parquet and the partition passes the input
  contract (goalrank_core.validate; an empty partition has no rows and fails `rows`);
- `rows`: at least `min_rows` requests, and rows / mean rows of the `trailing_days` earlier
  partitions of the window within [min_row_ratio, max_row_ratio] (skipped without history);
- `positive_share`: share of shown items labelled > 0 within [min, max] (a labelling outage
  gives 0, a join gone wrong 1);
- `unknown_item_share`: share of candidate slots whose item never occurs (candidates or
  history) in the window's training partitions: an id remapping gone wrong shows here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from goalrank_core.config_sections import GateConfig
from goalrank_core.errors import DataValidationError, GoalRankInputError


class DataGateError(GoalRankInputError):
    """A partition failed a data gate; the message names the partition and the check."""

    def __init__(self, partition: str, check: str, detail: str):
        self.partition, self.check = partition, check
        super().__init__(f"data gate '{check}' failed for partition {partition}: {detail}")


class MissingPartitionError(DataGateError):
    """The partition of D - 1 is not there (check `present`): the run must not train on older data."""


@dataclass
class GateResult:
    check: str
    value: float | None
    low: float | None
    high: float | None
    passed: bool | None  # None: skipped (note says why)
    note: str = ""


def _fmt(x: float | None) -> str:
    return "-" if x is None else (f"{x:.4g}" if isinstance(x, float) else str(x))


def _bound(res: GateResult, partition: str) -> GateResult:
    if res.passed is False:
        raise DataGateError(partition, res.check,
                            f"value {_fmt(res.value)} outside [{_fmt(res.low)}, {_fmt(res.high)}]"
                            + (f" ({res.note})" if res.note else ""))
    return res


def _within(check: str, value: float, low: float | None, high: float | None, note: str = "") -> GateResult:
    ok = (low is None or value >= low) and (high is None or value <= high)
    return GateResult(check, value, low, high, ok, note)


def positive_share(table: pa.Table) -> float:
    lab = pc.list_flatten(table.column("labels")).to_numpy(zero_copy_only=False)
    return float((lab > 0).mean()) if len(lab) else 0.0


def unknown_item_share(table: pa.Table, known_items: np.ndarray) -> float:
    """Share of candidate slots (occurrences, not distinct items) whose item is not in
    `known_items` ((K,) int64)."""
    cand = pc.list_flatten(table.column("candidates")).to_numpy(zero_copy_only=False).astype(np.int64)
    if len(cand) == 0:
        return 0.0
    known = np.unique(np.asarray(known_items, np.int64))
    return float((~np.isin(cand, known)).mean())


def check_partition(table: pa.Table, partition: str, trailing_rows: list[int], known_items: np.ndarray,
                    cfg: GateConfig) -> list[GateResult]:
    """Run every gate on the new partition `table` (as read, before validation). Raises
    DataGateError at the first failure; returns the results when all pass."""
    from goalrank_core.validate import validate_impressions

    out = []
    if table.num_rows < cfg.min_rows:
        _bound(GateResult("rows", table.num_rows, cfg.min_rows, None, False,
                          "empty partition" if table.num_rows == 0 else "too few requests"), partition)
    try:
        table = validate_impressions(table, partition)
    except DataValidationError as exc:
        raise DataGateError(partition, "schema", str(exc)) from exc
    out.append(GateResult("schema", None, None, None, True))
    if trailing_rows:
        mean = float(np.mean(trailing_rows))
        out.append(_bound(_within("row_ratio", table.num_rows / max(mean, 1e-9), cfg.min_row_ratio, cfg.max_row_ratio,
                                  f"{table.num_rows} rows vs trailing mean {mean:.1f} of {len(trailing_rows)} "
                                  f"partition(s)"), partition))
    else:
        out.append(GateResult("row_ratio", None, cfg.min_row_ratio, cfg.max_row_ratio, None,
                              "no earlier partition in the window"))
    out.append(_bound(_within("positive_share", positive_share(table), cfg.min_positive_share,
                              cfg.max_positive_share), partition))
    if len(known_items):
        out.append(_bound(_within("unknown_item_share", unknown_item_share(table, known_items), 0.0,
                                  cfg.max_unknown_item_share), partition))
    else:
        out.append(GateResult("unknown_item_share", None, 0.0, cfg.max_unknown_item_share, None,
                              "no training vocabulary"))
    return out


def report(results: list[GateResult], partition: str) -> dict:
    """What manifests and artifacts record about a passed gate run."""
    return {"partition": partition, "checks": [asdict(r) for r in results]}
