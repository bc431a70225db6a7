"""What the daily flow tells a person: one progress line per stage, then the run's summary.

`goalrank run` attaches the terminal here (`attach`) and sends everything else (Prefect's and
Ray's own output) to the run's log file (goalrank/cli/console.py). With nothing attached, as
in a deployment run or a test, the lines are printed, so they land in the flow run's logs.
Either way each line also goes through `print`, which a flow with `log_prints` records.
"""
from __future__ import annotations

import sys
import time
from typing import Any, TextIO

_state: dict[str, Any] = {"stream": None, "t0": None, "done": 0, "total": None}


def attach(stream: TextIO | None) -> None:
    """Write progress and the summary to `stream` (the terminal); None detaches."""
    _state["stream"] = stream


def start(total: int) -> None:
    """A run of `total` stages begins: the counter and the elapsed clock restart."""
    _state.update(t0=time.time(), done=0, total=total)


def _elapsed() -> str:
    s = int(time.time() - (_state["t0"] or time.time()))
    return f"{s // 60}:{s % 60:02d}"


def _prefix() -> str:
    total = _state["total"] or 0
    width = len(str(total))
    return f"[{_state['done'] + 1:>{width}}/{total}]"


def emit(text: str) -> None:
    """A line (or block) for the person: to the attached terminal, and to the flow's log."""
    stream = _state["stream"]
    print(text, flush=True)  # the Prefect log (and the log file when a terminal is attached)
    if stream is not None and stream is not sys.stdout:
        stream.write(text + "\n")
        stream.flush()


def begin(label: str) -> None:
    """A stage starts. Only an interactive terminal shows it, as a line the result overwrites."""
    stream = _state["stream"]
    if stream is not None and stream.isatty():
        stream.write(f"\r\x1b[K{_prefix()} {label:<24} running (elapsed {_elapsed()})")
        stream.flush()


def done(label: str, detail: str = "", wall_s: float | None = None) -> None:
    """A stage finished: `[3/12] train_reward_model   82.1 s  <detail>  (elapsed 3:05)`."""
    took = f"{wall_s:7.1f} s" if wall_s is not None else " " * 9
    line = f"{_prefix()} {label:<24} {took}  {detail}".rstrip() + f"  (elapsed {_elapsed()})"
    _state["done"] += 1
    stream = _state["stream"]
    if stream is not None and stream.isatty():
        stream.write("\r\x1b[K")
    emit(line)


def stage_detail(summary: dict[str, Any]) -> str:
    """`13526 rows, peak 1.2 GB` from a stage summary (flows.stage_tasks.stage_summary); `skipped` when
    a manifest from an earlier run matched."""
    if summary.get("skipped"):
        return "skipped (complete earlier)"
    parts = []
    if summary.get("rows") is not None:
        parts.append(f"{summary['rows']} rows")
    if summary.get("peak_mb") is not None:
        parts.append(f"peak {summary['peak_mb'] / 1024:.1f} GB")
    return ", ".join(parts)
