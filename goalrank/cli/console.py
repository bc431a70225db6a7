"""A readable terminal for `goalrank run`: progress and results on the terminal, the rest in a file.

Inside `quiet_console(log_path)` file descriptors 1 and 2 point at the log file, so everything
written there (Prefect's and Ray's INFO lines, the lines Ray forwards from its workers, the
temporary Prefect server, C++ warnings) lands in the file. The terminal keeps:
- what flows.console writes (one line per stage, the summary),
- log records at WARNING or above from any logger, Python warnings included,
- lines forwarded from Ray workers that carry a warning or an error,
except the known-harmless ones in HARMLESS, which go to the file only.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
from collections import deque
from pathlib import Path
from typing import Iterator, TextIO

# Known-harmless messages (searched in the message or line): to the log file only.
HARMLESS = (
    # Ray Train V2's placement-group cleaner, once a second of training, on a local Ray without
    # its dashboard (no State API to ask; why it is off: tasks/ray_runtime._dashboard).
    "Failed to query Ray Train Controller actor state",
    # ... and its monitor thread's end when another Ray runs on the machine: the State API
    # client, looking for a dashboard alone, refuses to pick one ("Found multiple active Ray
    # instances"). Without a State API nothing the cleaner says is actionable.
    "(PlacementGroupCleaner pid=",
    # Ray Train's own actors pass constructor arguments through the object store.
    "has constructor arguments in the object store and max_restarts > 0",
    # Ray Data inside Ray Train's dataset manager; deprecated in Ray, not used by us.
    "ExecutionOptions.exclude_resources",
    "self.exclude_resources = exclude_resources",
    # The raylet counts worker processes against whole CPUs; actors and DDP workers here ask
    # for fractions of one on purpose (tasks/ray_runtime.py), so more start than it expects.
    "PYTHON worker processes have been started on node",
    # Ray Data's check of `ray.available_resources()` when a training stage materialises its
    # data: a snapshot taken while the previous stage's actors are still handing their CPUs
    # back (the cluster view lags the raylet). The read then runs; a real hang shows as a
    # stage that does not finish, and the warning stays in the log.
    "The Ray cluster currently does not have any available CPUs",
    # MLflow's advice on type hints: the pyfunc takes a DataFrame by design.
    "Add type hints to the `predict` method",
    # MLflow's note that integer columns could not hold missing values; ours have none.
    "Inferred schema contains integer column(s)",
    "color_warning(",
)
# A line Ray forwards from a worker: `(ActorName pid=123)` or `(raylet)`, maybe in colour.
_WORKER_LINE = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:\S+ )?(?:pid=\d+|raylet|autoscaler)\b")
_ALARM = re.compile(r"warning|error|exception|traceback|fatal|killed|oom|out of memory", re.IGNORECASE)


def is_harmless(text: str) -> bool:
    return any(h in text for h in HARMLESS)


def worker_line_to_console(line: str) -> bool:
    """True for a forwarded Ray worker line that a person should see: a warning or an error."""
    return bool(_WORKER_LINE.match(line)) and bool(_ALARM.search(line)) and not is_harmless(line)


class _Tee(io.TextIOBase):
    """sys.stdout / sys.stderr inside the quiet console: everything to `inner` (the log
    file, through fd 1 or 2), and alarming worker lines to `console` as well."""

    def __init__(self, inner: TextIO, console: TextIO):
        self.inner, self.console, self._buf = inner, console, ""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def write(self, s: str) -> int:
        self.inner.write(s)
        self._buf += s
        *lines, self._buf = self._buf.split("\n")
        for line in lines:
            if worker_line_to_console(line):
                self.console.write(line + "\n")
        return len(s)

    def flush(self) -> None:
        self.inner.flush()
        self.console.flush()

    def fileno(self) -> int:
        return self.inner.fileno()


class _ConsoleHandler(logging.Handler):
    """WARNING and above from the loggers it is attached to, once per record, to the terminal."""

    def __init__(self, stream: TextIO):
        super().__init__(logging.WARNING)
        self.stream = stream
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self._seen: deque = deque(maxlen=64)  # a record reaching two attached loggers

    def emit(self, record: logging.LogRecord) -> None:
        if any(r is record for r in self._seen):
            return
        self._seen.append(record)
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad record must not stop the run
            return
        if not is_harmless(text):
            self.stream.write(text + "\n")
            self.stream.flush()


# Loggers that do not propagate to the root logger, so the handler is attached to each.
_LOGGERS = ("", "ray", "ray.data", "ray.train", "ray.tune", "prefect", "prefect._internal", "mlflow")


@contextlib.contextmanager
def quiet_console(log_path: Path) -> Iterator[TextIO]:
    """Send fds 1 and 2 to `log_path` (appended) and yield the terminal's stream."""
    from flows import console as progress

    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    log = open(log_path, "a", buffering=1, encoding="utf-8")
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    old_out, old_err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(old_out, terminal), _Tee(old_err, terminal)
    import ray.data  # noqa: F401 - configures its loggers on import, dropping handlers attached before

    handler = _ConsoleHandler(terminal)
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    logging.captureWarnings(True)
    progress.attach(terminal)
    try:
        yield terminal
    finally:
        progress.attach(None)
        for lg in loggers:
            lg.removeHandler(handler)
        logging.captureWarnings(False)
        _quiet_at_exit()
        for s in (sys.stdout, sys.stderr):
            s.flush()
        sys.stdout, sys.stderr = old_out, old_err
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        log.close()
        terminal.flush()
        terminal.close()


def _quiet_at_exit() -> None:
    """Ray's shutdown and the temporary Prefect server's stop run at interpreter exit, after
    the log file is closed: shut Ray down now, and keep Prefect's INFO at exit off the terminal."""
    if "ray" in sys.modules:
        from tasks.ray_runtime import shutdown

        shutdown()
    for h in logging.getLogger().handlers:
        if type(h).__name__ == "PrefectConsoleHandler":
            h.setLevel(logging.WARNING)
