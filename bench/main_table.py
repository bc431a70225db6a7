"""The paper's Table 1 through the project's own code paths: `fit.fit_tables` (reward model,
auxiliary policies, supervised generator, GoalRank rounds), `ranking.rank` per policy and
`metrics.evaluate_lists` on the test split; seeds vary the training seed, the data split is
fixed (protocol seed 0).

K: lists have L = 6 items and the positives of a request are its labelled shown items, so
@6 scores the whole list (the paper's K = L). @10 is not reported: a 6-item list has no
10th slot, HR@10 would equal HR@6 and NDCG@10 would only change its normaliser. @3 (the top
half of the list) is reported beside @6 as a second, order-sensitive cut-off.

    python -m bench.main_table --mode quick|full [--datasets ml-100k,amazon-book] [--seeds 3] [--tag NAME]
"""
from __future__ import annotations

import argparse
import time

from bench.common import Recorder, data_available, log_to, paired_cell, seed_summary, table

# Table rows: (label, policy name in goalrank_core.ranking / policies).
ROWS = [("random", "random"), ("popularity", "popularity"), ("point-wise DNN", "dnn"), ("PRM", "prm"),
        ("supervised generator", "supervised"), ("Generator-Evaluator", "g-e"), ("GoalRank", "goalrank")]
PAPER_GAIN = {"hr": (4.41, 6.43), "ndcg": (3.75, 4.70)}  # % over the best baseline, arXiv 2509.22046 Table 1
# What GoalRank is compared against: the heuristics, issue 3's baselines and the supervised
# generator, a Seq2Slate-style generator-only ranker (also GoalRank's warm start, so its own
# column says what group-relative training added to that start).
BASELINES = ("random", "popularity", "point-wise DNN", "PRM", "supervised generator", "Generator-Evaluator")
WARM_START = "supervised generator"
KS = (3, 6)

# quick: fewer users, epochs and rounds so all six benchmarks fit 20 minutes on 2 cores.
MODES = {
    "quick": {"seeds": 1, "datasets": ["ml-100k", "amazon-book"],
              "max_users": {"ml-100k": 120, "amazon-book": 150, "ml-1m": 150},
              "overrides": {"train.reward_epochs": 2, "train.aux_epochs": 2, "train.epochs": 1, "group.rounds": 1}},
    "full": {"seeds": 3, "datasets": ["ml-100k", "amazon-book", "ml-1m"],
             "max_users": {"ml-100k": 0, "amazon-book": 6000, "ml-1m": 0},
             "overrides": {}},
}


def run_dataset(dataset: str, seeds: list[int], max_users: int, overrides: dict, verbose: bool) -> dict:
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.fit import fit_tables
    from goalrank_core.metrics import evaluate_lists
    from goalrank_core.protocol import load_splits
    from goalrank_core.ranking import rank

    base = GoalRankConfig().override({"protocol.max_users": max_users, **overrides})
    t0 = time.perf_counter()
    splits = load_splits(dataset, protocol=base.protocol)
    base = base.for_source(splits.source)
    load_s = time.perf_counter() - t0
    per_seed: dict[str, dict[str, list[float]]] = {label: {} for label, _ in ROWS}
    fit_s = []
    for seed in seeds:
        cfg = base.override({"train.seed": seed})
        t1 = time.perf_counter()
        bundle = fit_tables(splits.train, splits.valid, cfg, splits.items, log=log_to(f"{dataset} s{seed}", not verbose))
        fit_s.append(time.perf_counter() - t1)
        for label, policy in ROWS:
            res = evaluate_lists(rank(bundle, splits.test, policy, seed=seed), splits.test, KS, n_boot=200, seed=seed)
            for name, r in res.items():
                per_seed[label].setdefault(name, []).append(r.value)
        print(f"[main_table] {dataset} seed {seed}: fit {fit_s[-1]:.0f}s; GoalRank hr@6 "
              f"{per_seed['GoalRank']['hr@6'][-1]:.4f}, G-E {per_seed['Generator-Evaluator']['hr@6'][-1]:.4f}",
              flush=True)
    return {"dataset": dataset, "max_users": max_users, "seeds": seeds, "load_s": load_s, "fit_s": fit_s,
            "requests": {"train": splits.train.num_rows, "valid": splits.valid.num_rows, "test": splits.test.num_rows},
            "test_requests_without_positive": splits.stats.get("test_requests_without_positive"),
            "per_seed": per_seed,
            "summary": {label: {m: seed_summary(v) for m, v in ms.items()} for label, ms in per_seed.items()}}


def gains(summary: dict) -> dict[str, dict]:
    """GoalRank's relative gain (%) over the best of BASELINES, per metric, on the seed means,
    and over its warm start (WARM_START)."""
    pct = lambda ours, base: 100.0 * (ours - base) / base if base else None  # noqa: E731
    out = {}
    for metric in summary["GoalRank"]:
        others = {label: summary[label][metric]["mean"] for label in BASELINES if label in summary}
        best = max(others, key=lambda k: others[k])
        ours = summary["GoalRank"][metric]["mean"]
        out[metric] = {"best_baseline": best, "baseline": others[best], "goalrank": ours,
                       "gain_pct": pct(ours, others[best])}
        if WARM_START in summary:
            warm = summary[WARM_START][metric]["mean"]
            out[metric].update(warm_start=warm, gain_over_warm_start_pct=pct(ours, warm))
    return out


PAIRED_TITLE = "GoalRank minus each baseline, paired over seeds"


def paired_table(runs: list[dict]) -> dict:
    """GoalRank minus each learnt baseline per training seed (the same seed's split, data and
    policies): the mean and 95 % t-interval of those differences, whether a gain is more than
    the seed spread. From each run's `per_seed`, so it can be rebuilt from any result file."""
    rows = []
    for run in runs:
        ps = run["per_seed"]
        for label in ("supervised generator", "Generator-Evaluator", "PRM", "point-wise DNN"):
            if label not in ps:
                continue
            cells = [paired_cell(ps["GoalRank"][metric], ps[label][metric]) for metric in ("hr@6", "ndcg@6")]
            rows.append([run["dataset"], label, *cells])
    return table(PAIRED_TITLE, ["data set", "baseline", "HR@6 difference", "NDCG@6 difference"], rows,
                 "Per seed, GoalRank's metric minus the baseline's on the same test split; mean [95% t-interval] "
                 "over the seeds. An interval that excludes 0 is a gain (or loss) larger than the seed spread.")


def _fmt(s: dict) -> str:
    if s["n"] >= 2:
        return f"{s['mean']:.4f} ± {s['std']:.4f} [{s['ci_low']:.4f}, {s['ci_high']:.4f}]"
    return f"{s['mean']:.4f}"


def tables_for(runs: list[dict], mode: str) -> list[dict]:
    out = []
    for run in runs:
        n = len(run["seeds"])
        cols = ["policy"] + [f"{m}@{k}" for k in (6, 3) for m in ("HR", "NDCG")]
        rows = [[label] + [_fmt(run["summary"][label][f"{m}@{k}"]) for k in (6, 3) for m in ("hr", "ndcg")]
                for label, _ in ROWS]
        spread = (f"mean ± std [95% t-interval] over {n} training seeds {run['seeds']}" if n >= 2
                  else f"one training seed ({run['seeds'][0]}; no spread without a second)")
        out.append(table(
            f"Table 1, {run['dataset']} (test split, {run['requests']['test']} requests; "
            f"{'all users' if not run['max_users'] else str(run['max_users']) + ' users'})",
            cols, rows,
            f"{spread}; L = 6, so @6 is the whole list and @10 is not reported "
            f"(no 10th slot). {run['test_requests_without_positive']} test requests have no positive and are "
            f"excluded from the means."))
    rows = []
    for run in runs:
        g = run["gains"]
        for metric, paper in (("hr@6", PAPER_GAIN["hr"]), ("ndcg@6", PAPER_GAIN["ndcg"])):
            x = g[metric]
            gain = "-" if x["gain_pct"] is None else f"{x['gain_pct']:+.2f}%"
            warm = ("-" if x.get("gain_over_warm_start_pct") is None
                    else f"{x['warm_start']:.4f} ({x['gain_over_warm_start_pct']:+.2f}%)")
            rows.append([run["dataset"], metric.upper(), x["best_baseline"], f"{x['baseline']:.4f}",
                         f"{x['goalrank']:.4f}", gain, f"+{paper[0]:.2f} to +{paper[1]:.2f}%", warm])
    out.append(table("GoalRank's gain over the best baseline, against the paper's",
                     ["data set", "metric", "best baseline", "baseline", "GoalRank", "our gain", "paper's gain",
                      "warm start: supervised generator (GoalRank's gain over it)"],
                     rows, "Gain = (GoalRank - best baseline) / best baseline, on the seed means. Baselines: "
                     f"{', '.join(BASELINES)}. The supervised generator (a Seq2Slate-style generator-only "
                     "ranker) is a baseline and also GoalRank's starting point, so its own column says what "
                     "group-relative training added to that start."))
    out.append(paired_table(runs))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--datasets", help="comma-separated (default: the mode's; missing data sets are skipped)")
    ap.add_argument("--seeds", type=int, help="number of training seeds (default: 1 quick, 3 full)")
    ap.add_argument("--max-users", type=int, help="override the users kept per data set (0 = all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set train.epochs=2 (repeatable)")
    ap.add_argument("--verbose", action="store_true", help="print the trainers' epoch lines")
    ap.add_argument("--tag", default="", help="suffix of the result file, main_table_{mode}_{tag}.json (default: the --datasets, "
                    "so one data set's run does not replace another's)")
    args = ap.parse_args(argv)
    rec = Recorder("main_table", args.mode, tag=args.tag or (args.datasets.replace(",", "_") if args.datasets else ""))
    mode = MODES[args.mode]
    overrides = dict(mode["overrides"])
    for item in args.overrides:
        from goalrank.cli.pipeline_cmd import parse_overrides

        overrides.update(parse_overrides([item]))
    datasets = args.datasets.split(",") if args.datasets else mode["datasets"]
    seeds = list(range(args.seeds or mode["seeds"]))
    runs, skipped = [], []
    for ds in datasets:
        if not data_available(ds):
            skipped.append(ds)
            print(f"[main_table] {ds}: files not present, skipped", flush=True)
            continue
        mu = args.max_users if args.max_users is not None else mode["max_users"].get(ds, 0)
        run = run_dataset(ds, seeds, mu, overrides, args.verbose)
        run["gains"] = gains(run["summary"])
        runs.append(run)
    if not runs:  # nothing measured: no result file, so a committed one is never replaced by an empty one
        raise SystemExit(f"main_table: none of {', '.join(datasets)} is present; point GOALRANK_DATA_DIR (or "
                         "the default cache) at a folder holding them (../shared/data on the team's machines)")
    notes = [f"Data sets skipped (files not present): {', '.join(skipped)}."] if skipped else []
    result = {"config": {"datasets": [r["dataset"] for r in runs], "seeds": seeds, "overrides": overrides,
                         "max_users": {r["dataset"]: r["max_users"] for r in runs}, "ks": list(KS)},
              "tables": tables_for(runs, args.mode), "notes": notes, "data": {"runs": runs}}
    rec.write(result)
    return result


if __name__ == "__main__":
    main()
