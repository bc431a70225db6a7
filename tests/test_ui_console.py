"""`goalrank run`'s terminal: progress, results, warnings and errors there; the rest in the log file."""
from __future__ import annotations

import subprocess
import sys
import textwrap

from flows import console as progress
from goalrank.cli.console import is_harmless, worker_line_to_console


def test_worker_lines_reach_the_terminal_only_when_alarming_and_not_known_harmless():
    assert worker_line_to_console("\x1b[36m(RayTrainWorker pid=10108)\x1b[0m RuntimeError: boom")
    assert worker_line_to_console("(raylet) A worker died or was killed while executing a task")
    assert worker_line_to_console("(MapWorker(_Scorer) pid=7, ip=127.0.0.1) UserWarning: odd")
    assert not worker_line_to_console("\x1b[36m(_fit_policies pid=9564)\x1b[0m [policies] prm epoch 1/3: loss 1.19")
    assert not worker_line_to_console("(PlacementGroupCleaner pid=10043) Failed to query Ray Train Controller "
                                      "actor state. State API may be temporarily unavailable.")
    assert not worker_line_to_console("\x1b[36m(PlacementGroupCleaner pid=1063)\x1b[0m ConnectionError: Found "
                                      "multiple active Ray instances")
    assert not worker_line_to_console("21:52:49 | WARNING | prefect - not a worker line")
    assert is_harmless("WARNING ray.data: Warning: The Ray cluster currently does not have any available CPUs. "
                       "The Dataset job will hang unless more CPUs are freed up.")
    assert not is_harmless("WARNING ray.data: Warning: something else about CPUs")
    assert is_harmless("UserWarning: Add type hints to the `predict` method to enable data validation")


def test_quiet_console_keeps_chatter_in_the_log_and_warnings_on_the_terminal(tmp_path):
    log = tmp_path / "run" / "_logs" / "goalrank-run.log"
    script = textwrap.dedent(f"""
        import logging, os, sys, warnings
        from goalrank.cli.console import quiet_console
        from flows import console as progress
        with quiet_console(__import__("pathlib").Path({str(log)!r})):
            print("chatter from print")
            os.write(2, b"chatter on fd 2\\n")
            logging.getLogger("ray.data").info("ray data info")
            logging.getLogger("some.lib").warning("a real warning")
            warnings.warn("a python warning")
            warnings.warn("Add type hints to the `predict` method, please")
            sys.stderr.write("(RayTrainWorker pid=1) ValueError: worker failed\\n")
            sys.stdout.write("(RayTrainWorker pid=1) epoch 1/3 loss 0.5\\n")
            progress.start(2)
            progress.done("prepare", "10 rows", 1.0)
        print("after the run")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    terminal = out.stdout + out.stderr
    for shown in ("a real warning", "a python warning", "ValueError: worker failed", "[1/2] prepare",
                  "10 rows", "after the run"):
        assert shown in terminal, (shown, terminal)
    for hidden in ("chatter", "ray data info", "epoch 1/3", "type hints"):
        assert hidden not in terminal, (hidden, terminal)
    text = log.read_text()
    for logged in ("chatter from print", "chatter on fd 2", "epoch 1/3", "[1/2] prepare"):
        assert logged in text, (logged, text)


def test_progress_lines_count_stages_and_show_skips(capsys):
    progress.attach(None)
    progress.start(3)
    progress.done("prepare", progress.stage_detail({"rows": 42, "peak_mb": 2048.0}), 9.3)
    progress.done("train_policies", progress.stage_detail({"skipped": True}), 0.1)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[1/3] prepare") and "9.3 s" in lines[0] and "42 rows, peak 2.0 GB" in lines[0]
    assert lines[1].startswith("[2/3] train_policies") and "skipped (complete earlier)" in lines[1]
    assert "(elapsed 0:0" in lines[1]


def _decision(**kw):
    d = {"promoted": True, "metric": "ndcg@6", "challenger_value": 0.5014, "champion_version": None,
         "champion_value": None, "reason": "no champion yet"}
    return {**d, **kw}


def test_decision_line_names_the_champion_only_when_there_is_one_and_shows_ope_intervals():
    from flows.report import format_decision

    assert format_decision(_decision()) == "decision: PROMOTED to champion: ndcg@6 challenger 0.5014; no champion yet"
    line = format_decision(_decision(promoted=False, champion_version="3", champion_value=0.52,
                                     reason="challenger below champion"))
    assert line == ("decision: not promoted: ndcg@6 challenger 0.5014 vs champion v3 0.5200; "
                    "challenger below champion")
    ope = format_decision(_decision(metric="ope:snips", challenger_value=0.081, challenger_ci_low=0.07,
                                    challenger_ci_high=0.093, challenger_ess=412.3, champion_version="2",
                                    champion_value=0.079, champion_ci_low=0.068, champion_ci_high=0.09,
                                    champion_ess=398.0, reason="no worse than the champion"))
    assert ope == ("decision: PROMOTED to champion: ope:snips challenger 0.0810 [0.0700, 0.0930], ESS 412 vs "
                   "champion v2 0.0790 [0.0680, 0.0900], ESS 398; no worse than the champion")
