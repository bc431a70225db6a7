"""The evidence benchmarks: the report generator on hand-made result files, the statistics,
and one benchmark (latency) end to end at a tiny size on synthetic data."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from bench import report
from bench.common import Recorder, seed_summary, t975, table


def _write(path, doc):
    path.write_text(json.dumps(doc))


def _main_doc(mode="quick", load=0.5):
    return {"benchmark": "main_table", "mode": mode, "command": f"python -m bench.main_table --mode {mode}",
            "finished_at": "2026-01-01T00:00:00", "wall_s": 12.0, "git": {"sha": "0123456789abcdef", "dirty": False},
            "machine": {"cpus": 2, "cpu_model": "Test CPU", "mem_gb": 8.0, "platform": "Linux", "python": "3.11.7",
                        "torch": "2.13.0+cpu", "cuda": False, "load_avg_start": load, "load_avg_end": load},
            "tables": [table("Table 1, ml-100k", ["policy", "HR@6"], [["GoalRank", "0.2500"], ["random", "0.1|0.2"]],
                             "one seed")],
            "notes": ["a note from the numbers"]}


def test_report_renders_tables_provenance_and_flat_results(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    _write(res / "main_table_quick.json", _main_doc("quick", load=3.0))
    _write(res / "main_table_full.json", _main_doc("full"))
    _write(res / "bench_score_quick.json", {"benchmark": "bench_score", "mode": "quick",
                                            "machine": {"cpus": 2, "load_avg_1m": 0.1},
                                            "ratio_1_actor_vs_bare": 0.91, "ray_1_actor": {"lists_per_s": 1234.5},
                                            "per_epoch": [1, 2, 3]})
    out = report.write_report(res, tmp_path / "docs" / "results.md", plots=False)
    text = out.read_text()
    assert text.startswith("# Results")
    assert "`python -m bench.main_table --mode full`" in text and "2 CPUs (Test CPU)" in text
    assert "0123456789ab" in text
    assert "| GoalRank | 0.2500 |" in text
    assert "0.1\\|0.2" in text  # a cell's pipe is escaped, not a column break
    assert "a note from the numbers" in text
    # full before quick, and the main table before the stage benchmarks
    assert text.index("main_table, full mode") < text.index("main_table, quick mode") < text.index("bench_score, quick")
    # only the loaded run is flagged
    assert text.count("taken under load") == 1
    # a result without tables: its numbers as key/value rows; lists stay in the JSON
    assert "| ratio_1_actor_vs_bare | 0.91 |" in text and "| ray_1_actor.lists_per_s | 1234 |" in text
    assert "per_epoch" not in text


def test_report_rejects_a_bad_result_file_by_name(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        report.load_results(tmp_path)
    (tmp_path / "broken.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="benchmark"):
        report.load_results(tmp_path)


def test_report_draws_the_scaling_plot(tmp_path):
    res = tmp_path / "results"
    res.mkdir()
    pts = [{"params": p, "mixture_params": p - 10, "goalrank": {"ndcg@6": v}, "supervised": {"ndcg@6": v - 0.01},
            "mixture": {"ndcg@6": v - 0.02}} for p, v in ((1e4, 0.2), (1e5, 0.25), (1e6, 0.27))]
    _write(res / "scaling_quick.json", {"benchmark": "scaling", "mode": "quick", "config": {"dataset": "x", "k": 4},
                                        "tables": [], "data": {"points": pts}})
    out = report.write_report(res, tmp_path / "docs" / "results.md")
    png = tmp_path / "docs" / "scaling.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![scaling](scaling.png)" in out.read_text()


def test_seed_summary_is_mean_std_and_t_interval():
    s = seed_summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["std"] == pytest.approx(1.0)
    assert s["ci_high"] - s["mean"] == pytest.approx(4.303 / math.sqrt(3), rel=1e-4)
    one = seed_summary([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    assert t975(1) == 12.706 and t975(100) == 1.96


def test_gain_is_over_the_best_baseline_the_supervised_generator_included():
    from bench.main_table import gains

    summ = {"GoalRank": {"hr@6": {"mean": 0.33}}, "PRM": {"hr@6": {"mean": 0.30}}, "random": {"hr@6": {"mean": 0.1}},
            "supervised generator": {"hr@6": {"mean": 0.34}}}
    g = gains(summ)["hr@6"]  # the supervised generator is a baseline (Seq2Slate-style) and the warm start
    assert g["best_baseline"] == "supervised generator" and g["gain_pct"] == pytest.approx(-100 * 0.01 / 0.34)
    assert g["warm_start"] == 0.34 and g["gain_over_warm_start_pct"] == pytest.approx(-100 * 0.01 / 0.34)
    summ["supervised generator"]["hr@6"]["mean"] = 0.29
    assert gains(summ)["hr@6"]["best_baseline"] == "PRM" and gains(summ)["hr@6"]["gain_pct"] == pytest.approx(10.0)


def test_paired_table_differences_goalrank_and_each_baseline_per_seed():
    from bench.main_table import PAIRED_TITLE, paired_table
    from bench.report import with_derived_tables

    per_seed = {"GoalRank": {"hr@6": [0.60, 0.62, 0.64], "ndcg@6": [0.50, 0.52, 0.54]},
                "supervised generator": {"hr@6": [0.61, 0.61, 0.62], "ndcg@6": [0.49, 0.51, 0.53]}}
    t = paired_table([{"dataset": "ml-100k", "per_seed": per_seed}])
    assert t["title"] == PAIRED_TITLE and len(t["rows"]) == 1
    hr, ndcg = t["rows"][0][2], t["rows"][0][3]
    assert hr.startswith("+0.0067 [") and not hr.endswith("+0.0000]")  # -0.01, +0.01, +0.02: spans 0
    assert ndcg == "+0.0100 [+0.0100, +0.0100]"  # the same gain every seed: no spread
    doc = {"benchmark": "main_table", "tables": [], "data": {"runs": [{"dataset": "ml-100k", "per_seed": per_seed}]}}
    derived = with_derived_tables(doc)["tables"]
    assert [x["title"] for x in derived] == [PAIRED_TITLE] and "bench.report" in derived[0]["notes"]
    assert with_derived_tables(doc)["tables"] == derived  # not added twice


def test_group_stats_measure_the_reward_spread():
    from bench.group_size import group_stats
    from goalrank_core.trainer import Groups

    rewards = np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 2.0]], np.float32)
    mask = np.array([[True, True, False], [True, True, True]])
    pi = np.array([[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]], np.float32)
    pids = np.array([[0, 1, -1], [0, 0, 1]])
    g = group_stats(Groups(np.zeros((2, 3, 4), np.int64), pi, mask, rewards, pids), ["popularity", "goalrank"])
    assert g["reward_std"] == pytest.approx((1.0 + 0.0) / 2)  # population std per group, then the mean
    assert g["group_size"] == pytest.approx(2.5)
    assert g["effective_lists"] == pytest.approx((math.exp(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))) + 3) / 2, rel=1e-5)
    assert g["generator_share"] == pytest.approx(2 / 5)


def test_latency_benchmark_end_to_end_on_tiny_synthetic_data(tmp_path):
    """A real fit (tiny), real GoalRank and G-E pipelines timed, a result file and its report."""
    from bench import latency
    from gr_helpers import synth_tables, tiny_config
    from goalrank_core.bundle import encode
    from goalrank_core.fit import fit_tables

    splits, _ = synth_tables(n_users=16, requests_per_user=4)
    bundle = fit_tables(splits.train, splits.valid, tiny_config(), splits.items, log=lambda m: None)
    data = encode(bundle, splits.test)
    t1 = latency.measure(bundle, data, 1, n_calls=6, warmup=1)
    t8 = latency.measure(bundle, data, 8, n_calls=3, warmup=1)
    assert {k: len(v) for k, v in t1.items()} == {"goalrank": 6, "g-e": 6}
    assert {k: len(v) for k, v in t8.items()} == {"goalrank": 3, "g-e": 3}
    assert all(np.isfinite(x) and x > 0 for v in t8.values() for x in v)
    s = latency.summarise(t1, t8, 8)
    # The summary is the timings' own statistics (seconds in, ms out): median ratio, mean per request.
    assert s["batch_1"]["ratio_p50"] == pytest.approx(np.median(t1["goalrank"]) / np.median(t1["g-e"]))
    assert s["batch_8"]["goalrank"]["amortised_ms_per_request"] == pytest.approx(np.mean(t8["goalrank"]) * 1e3 / 8)  # s -> ms
    parts = latency.breakdown(bundle, data, 4, reps=2)
    assert "goalrank: encoder" in parts and any(k.startswith("g-e: reward model") for k in parts)
    assert any(k.startswith("g-e: supervised") for k in parts)
    rec = Recorder("latency", "quick", command="pytest tiny latency")
    path = rec.write({"tables": [table("ratio", ["batch", "ratio"], [[1, round(s["batch_1"]["ratio_p50"], 3)]])],
                      "data": {"summary": s}}, results_dir=tmp_path)
    doc = json.loads(path.read_text())
    assert doc["command"] == "pytest tiny latency" and doc["machine"]["cpus"] >= 1 and doc["wall_s"] >= 0
    text = report.write_report(tmp_path, tmp_path / "results.md", plots=False).read_text()
    assert "pytest tiny latency" in text and f"| 1 | {round(s['batch_1']['ratio_p50'], 3)} |" in text


def test_oracle_pi_ref_follows_the_logged_dcg_of_each_list():
    from bench.oracle_groups import oracle_pi_ref
    from goalrank_core.batch import EncodedRequests

    # One request: shown positions 0..2 with labels 1, 0, 1; candidates 0..4.
    train = EncodedRequests(request_id=np.array(["r"], dtype=object), user=np.zeros(1, np.int64),
                            history=np.zeros((1, 1), np.int64), candidates=np.arange(5)[None],
                            cand_mask=np.ones((1, 5), bool), category=np.zeros((1, 5), np.int64),
                            shown=np.array([[0, 1, 2]]), labels=np.array([[1.0, 0.0, 1.0]], np.float32),
                            raw_candidates=np.arange(5)[None])
    lists = np.array([[[0, 2, 1], [2, 3, 4], [3, 4, 1], [-1, -1, -1]]])  # DCG 1.63, 1, 0, padding
    mask = np.array([[True, True, True, False]])
    pi = oracle_pi_ref(train, lists, mask, tau=1.0, eps=1e-6)[0]
    assert pi[0] > pi[1] > pi[2] > 0 and pi[3] == 0 and pi.sum() == pytest.approx(1.0)


def test_shown_share_counts_the_slots_that_hold_a_logged_item():
    import pyarrow as pa

    from bench.oracle_groups import shown_share

    requests = pa.table({"shown": [[10, 11, 12], [20, 21, 22]]})
    ranked = pa.table({"ranked": [[12, 30, 10], [40, 41, 42]]})  # 2 of 3, then 0 of 3
    assert shown_share(ranked, requests) == pytest.approx(2 / 6)
    assert shown_share(pa.table({"ranked": [[10, 11, 12], [22, 21, 20]]}), requests) == 1.0


def test_paired_cell_is_the_mean_and_t_interval_of_per_seed_differences():
    from bench.common import paired_cell

    assert paired_cell([0.5], [0.4]) == "+0.1000"
    # differences 0.01, 0.02, 0.03: mean 0.02, std 0.01, t(2) = 4.303 -> half-width 0.0248
    assert paired_cell([0.51, 0.52, 0.53], [0.5, 0.5, 0.5]) == "+0.0200 [-0.0048, +0.0448]"


def test_bench_score_summary_tables_show_every_run_and_the_ordering_price():
    """bench_score's tables: medians with their trials, the targets, and the unordered run's
    ratio to the default (ordered) 2-actor run."""
    from bench.bench_score import summary_tables

    def run(lps, trials=None, steady=None):
        return {"lists_per_s": lps, "seconds": 10.0, "startup_s": 5.0 if steady else None,
                "steady_lists_per_s": steady, "trials_lists_per_s": trials}

    r = {"bare_1_thread": run(20000.0, [20000.0, 21000.0, 19000.0]), "bare_all_threads": None,
         "bare_2_processes": run(38000.0), "ray_1_actor": run(19000.0, [19000.0], 20000.0),
         "ray_2_actors": run(32000.0, [32000.0], 34000.0), "ray_2_actors_unordered": run(32640.0, [32640.0], 34500.0),
         "ratio_1_actor_vs_bare": 0.95, "ratio_2_vs_1_actor": 32000 / 19000, "ratio_bare_2_vs_1_process": 1.9,
         "ratio_2_actors_unordered_vs_ordered": 1.02, "steady_ratio_1_actor_vs_bare": 1.0,
         "steady_ratio_2_vs_1_actor": 1.7, "targets": {"ratio_1_actor_vs_bare": 0.8, "ratio_2_vs_1_actor": 1.6},
         "met": {"ratio_1_actor_vs_bare": True, "ratio_2_vs_1_actor": True},
         "config": {"groups": 1000, "lists": 20000, "max_users": None, "repeat": 11, "batch_size": 256}}
    runs, ratios = summary_tables(r)
    names = [row[0] for row in runs["rows"]]
    assert names == ["bare loop, 1 process (median)", "bare loop, 2 processes", "stage, 1 actor (median)",
                     "stage, 2 actors (median)", "stage, 2 actors, GOALRANK_DATA_ORDERED=0 (median)"]
    assert runs["rows"][0][-1] == "20.0k / 21.0k / 19.0k"
    assert ratios["rows"][1] == ["ratio_2_vs_1_actor", 1.684, 1.7, 1.6, "yes"]
    assert ratios["rows"][-1] == ["ratio_2_actors_unordered_vs_ordered (the price of identical runs)", 1.02, None, None,
                                  None]


def test_report_flags_results_that_no_clean_commit_reproduces():
    from bench.report import provenance_problems, render

    pins = {"torch": "2.13.0"}
    clean = {"benchmark": "x", "git": {"sha": "a" * 40, "dirty": False}, "machine": {"torch": "2.13.0+cpu", "python": "3.11.9"}}
    assert provenance_problems(clean, pins) == []
    dirty = {**clean, "git": {"sha": "b" * 40, "dirty": True}}
    none = {**clean, "git": {}}
    other = {**clean, "machine": {"torch": "2.7.1+cu126", "python": "3.12.3"}}
    assert provenance_problems(dirty, pins) == ["written from a tree with uncommitted changes"]
    assert provenance_problems(none, pins) == ["no commit recorded"]
    assert provenance_problems(other, pins) == ["torch 2.7.1+cu126, the lock pins 2.13.0", "Python 3.12.3, the project needs 3.11"]
    docs = [dict(d, _file=f"{n}.json", mode="quick") for n, d in (("clean", clean), ("dirty", dirty))]
    md = render(docs)
    assert "1 of 2 result files cannot be reproduced" in md and "`dirty.json` (written from a tree with uncommitted changes)" in md
    assert md.count("**provenance:") == 1


def test_readme_results_block_is_rewritten_from_result_files_only(tmp_path, monkeypatch):
    """bench.report writes the README's quoted tables between its markers, under each file's
    command and commit, flags a dirty one, says which files are missing, and touches nothing else."""
    from bench import report

    monkeypatch.setattr(report, "README_RESULTS", [
        ("a.json", ("Kept",), "What a measures"), ("missing.json", ("X",), "What nobody ran")])
    doc = {"benchmark": "a", "_file": "a.json", "command": "python -m bench.a --mode full",
           "git": {"sha": "c" * 40, "dirty": True}, "machine": {},
           "tables": [{"title": "Kept table", "columns": ["k", "v"], "rows": [["x", 0.5]]},
                      {"title": "Other table", "columns": ["k"], "rows": [["y"]]}]}
    readme = tmp_path / "README.md"
    readme.write_text(f"# T\n\nbefore\n{report.README_BEGIN}\nold 0.123\n{report.README_END}\nafter\n")
    assert report.write_readme_results([doc], readme)
    text = readme.read_text()
    assert text.startswith("# T\n\nbefore\n") and text.endswith(f"{report.README_END}\nafter\n")
    assert "old 0.123" not in text and "| x | 0.5 |" in text and "Other table" not in text
    assert "`python -m bench.a --mode full` at ccccccc; `bench/results/a.json`" in text
    assert "written from a tree with uncommitted changes" in text
    assert "**What nobody ran**: not measured yet (`bench/results/missing.json` missing)." in text
    assert not report.write_readme_results([doc], readme)  # idempotent
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="results:begin"):
        report.write_readme_results([doc], readme)


def test_pipeline_cost_metrics_table_lists_every_policy_best_ndcg_first():
    from bench.pipeline_cost import metrics_table

    rows = [{"split": "test", "policy": p, "metric": m, "value": v}
            for p, hr, nd in (("random", 0.1, 0.09), ("goalrank", 0.58, 0.54), ("dnn", 0.47, 0.46))
            for m, v in (("hr@6", hr), ("ndcg@6", nd))] + [
        {"split": "valid", "policy": "goalrank", "metric": "hr@6", "value": 0.9}]
    t = metrics_table("Test split", rows)
    assert t["columns"] == ["policy", "hr@6", "ndcg@6"]
    assert t["rows"] == [["goalrank", "0.5800", "0.5400"], ["dnn", "0.4700", "0.4600"], ["random", "0.1000", "0.0900"]]


def test_benchmark_subprocesses_run_this_checkout(tmp_path):
    """A result file records this tree's commit, so the `goalrank run` a benchmark starts (and
    its Ray workers) must import this tree, not the checkout an editable install points at."""
    import subprocess
    import sys

    from bench.common import ROOT, this_tree_env

    env = this_tree_env({"PYTHONPATH": "/elsewhere", "PATH": os.environ.get("PATH", "")})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/elsewhere"]
    out = subprocess.run([sys.executable, "-c", "import tasks; print(tasks.__file__)"], cwd=tmp_path,
                         env=this_tree_env(dict(os.environ)), capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(ROOT / "tasks" / "__init__.py")


def test_readme_quotes_the_pipeline_runs_console_line_counts():
    from bench import report

    doc = {"benchmark": "pipeline_cost", "data": {"runs": {"ml-100k": {"console_lines": 49, "log_file_lines": 455},
                                                           "synth": {"wall_s": 3.0}}}}
    assert report.console_lines(doc) == [
        "*Console of the ml-100k run*: 49 lines on the terminal, 455 in the run's log file.", ""]
    assert report.console_lines({**doc, "benchmark": "simulator"}) == []


def test_main_table_without_its_data_writes_no_result(tmp_path, monkeypatch):
    """A main_table run that finds none of its data sets stops with the reason and leaves the
    committed result file alone (it used to write an empty one over it)."""
    from bench import main_table
    from bench.common import RESULTS

    monkeypatch.setenv("GOALRANK_DATA_DIR", str(tmp_path))
    target = RESULTS / "main_table_full_amazon-book.json"
    before = target.read_bytes() if target.exists() else None
    with pytest.raises(SystemExit, match="none of amazon-book is present.*GOALRANK_DATA_DIR"):
        main_table.main(["--mode", "full", "--datasets", "amazon-book", "--seeds", "1"])
    assert (target.read_bytes() if target.exists() else None) == before
