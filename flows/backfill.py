"""Backfill: the daily flow `goalrank-daily` for each date of a range, in order, skipping
dates whose run record (flows/daily_ops.py) says they completed with the same config."""
from __future__ import annotations

from datetime import date
from typing import Any, Callable

from flows.daily import dataset_name, flow_settings, goalrank_daily, run_config
from flows.daily_ops import completed


def backfill(dates: list[date], params: dict[str, Any], run: Callable[..., dict] | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    """Run the daily flow (`run`, default `goalrank_daily`) for each date in order (run id =
    the date), skipping dates whose run record exists with the same config hash. Stops at the
    first failure (later days would warm-start from, and be compared with, a history that has
    a hole). -> one row per date."""
    run = goalrank_daily if run is None else run
    cfg = run_config(params.get("config"), params.get("overrides"), params.get("dataset"))  # as the run records it
    s = flow_settings(storage=params.get("storage"), tracking_uri=params.get("tracking_uri"),
                      experiment=params.get("experiment"), model_name=params.get("model_name"),
                      data_dir=params.get("data_dir"))
    name = dataset_name(params.get("dataset"), params.get("impressions"))
    rows = []
    for d in dates:
        day = d.isoformat()
        done = completed(s["storage"], name, day, cfg.hash())
        if done is not None:
            log(f"[backfill] {day}: complete (version {done.get('version')}), skipped")
            rows.append({"date": day, "ran": False, "version": done.get("version")})
            continue
        log(f"[backfill] {day}: running the daily flow")
        summary = run(**{**params, "run_date": day, "run_id": day})
        rows.append({"date": day, "ran": True, "version": summary.get("registered_version"),
                     "promoted": (summary.get("decision") or {}).get("promoted"),
                     "warm_start": (summary.get("warm_start") or {}).get("warm")})
    return rows
