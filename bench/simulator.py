"""Every policy's TRUE list value on the list-wise simulator (issue 16), beside its logged-label metrics.

For each effect and seed: a world and its logs (`goalrank_core.simulator`), split the way
`goalrank fit --impressions` splits (`protocol.load_splits` on the written Parquet), a fit with
the DEFAULT config (`fit.fit_tables`), then every policy `ranking.available_policies` offers,
plus the logging policy's own lists (`logged`) and an oracle sorting candidates by TRUE point-wise
relevance, ranks the test requests. Each list is scored by its exact expected clicks,
normalised per run: (mean value - mean random list) / (mean best - mean random), where best is
the best list found by search with the true model (or any policy's list, when better). The
world is honest when the true-relevance sort stays <= 0.6.

    python -m bench.simulator [--mode quick|full] [--effects saturation,pairs,cascade] [--seeds 3]
    python -m bench.simulator --mode quick --reward true   # the loop's ceiling: pi_ref from true list values
    python -m bench.simulator --mode quick --effects saturation --strength gamma=1.5   # a world of other strengths
    python -m bench.simulator --mode quick --effects saturation --no-items   # logs without an item table
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.common import Recorder, log_to, seed_summary, table

HONEST_MAX = 0.6  # the true-relevance sort may reach at most this
ORACLE, LOGGED = "true-relevance sort", "logged"
TEACHER = "reward-model search (teacher)"  # the list pi_ref leads with: search under the trained reward model
TRAIN_SAMPLE = 480  # training requests on which teacher and student are also scored
VOLUME = {"quick": (600, 8), "full": (2000, 8)}  # (users, requests per user): full ~12.8k training requests


def _ranked(requests: pa.Table, lists: np.ndarray) -> pa.Table:
    return pa.table({"request_id": requests.column("request_id"), "ranked": pa.array(list(lists), pa.list_(pa.int64()))})


def world_and_splits(effect: str, seed: int, users: int, per_user: int, cfg, workdir: Path,
                     strengths: dict | None = None, with_items: bool = True):
    """World (`strengths`: Strengths fields other than the defaults), its logs written as Parquet,
    and the splits `goalrank fit --impressions` would make (without `--items` when not `with_items`:
    then no model sees the item categories; the world still uses them)."""
    import pyarrow.parquet as pq

    from goalrank_core.protocol import load_splits
    from goalrank_core.simulator import Strengths, make_world, simulate_logs

    world = make_world(effect, seed=seed, n_users=users, strengths=Strengths(**(strengths or {})))
    imp, items = simulate_logs(world, n_requests=users * per_user, seed=seed)
    pq.write_table(imp, workdir / "impressions.parquet")
    pq.write_table(items, workdir / "items.parquet")
    splits = load_splits(impressions=str(workdir / "impressions.parquet"),
                         items=str(workdir / "items.parquet") if with_items else None,
                         protocol=cfg.protocol)
    return world, splits


def policy_lists(bundle, world, test: pa.Table, seed: int) -> dict[str, pa.Table]:
    """RANKED tables of every policy the bundle offers, the logged lists and the true-relevance sort."""
    from goalrank_core.metrics import _padded
    from goalrank_core.ranking import available_policies, rank

    out = {p: rank(bundle, test, p, seed=seed) for p in available_policies(bundle)}
    cand, shown = _padded(test.column("candidates")), _padded(test.column("shown"))
    aff = world.affinity(test.column("user_id").to_numpy(), cand)  # (R, N)
    out[ORACLE] = _ranked(test, np.take_along_axis(cand, np.argsort(-aff, 1)[:, : shown.shape[1]], 1))
    if "logged" not in out:  # the bundle's own replay of the shown list, when it offers one
        out[LOGGED] = _ranked(test, shown)
    return out


def teacher_lists(bundle, requests: pa.Table, batch_size: int = 256) -> pa.Table:
    """RANKED table of the list the loop's teacher writes for each request: greedy-then-local
    search under the trained reward model (`group.search_lists`, `search_sweeps`), as the group
    stage builds it; on training requests by the model that trained on them (`reward.folds` 1).
    A reference, not a policy: it runs the reward model N times per position, at serving too."""
    from goalrank_core.bundle import encode
    from goalrank_core.search import greedy_search

    data, reward, g = encode(bundle, requests), bundle.models["reward"], bundle.config.group
    L = bundle.dims.slate_len
    pos = [greedy_search(reward, data.batch(slice(a, a + batch_size)), L, None, g.search_shortlist,
                         sweeps=g.search_sweeps).numpy() for a in range(0, len(data), batch_size)]
    pos = np.concatenate(pos) if pos else np.zeros((0, L), np.int64)
    return _ranked(requests, data.positions_to_ids(slice(None), pos))


def train_sample_values(bundle, world, train: pa.Table, seed: int) -> dict[str, float]:
    """Normalised true value on TRAIN_SAMPLE evenly spaced training requests of the teacher, GoalRank
    and the supervised generator: the requests the generator imitates the teacher on, which the
    reward model has seen (its memorised clicks can steer its search there)."""
    from goalrank_core.ranking import rank

    sample = train.take(np.arange(0, train.num_rows, max(1, train.num_rows // TRAIN_SAMPLE))[:TRAIN_SAMPLE])
    lists = {TEACHER: teacher_lists(bundle, sample), "goalrank": rank(bundle, sample, "goalrank", seed=seed),
             "supervised": rank(bundle, sample, "supervised", seed=seed)}
    scored = score_policies(world, sample, lists, seed)
    return {p: scored[p]["normalised"] for p in lists}


def score_policies(world, test: pa.Table, lists: dict[str, pa.Table], seed: int) -> dict[str, dict]:
    """True value (normalised with one shared best over search and every policy) and logged HR/NDCG@L."""
    from bench.common import evaluate
    from goalrank_core.metrics import _padded
    from goalrank_core.simulator_search import best_lists, normalised_value

    L = _padded(test.column("shown")).shape[1]
    found = best_lists(world, test.column("user_id").to_numpy(), _padded(test.column("candidates")), L, seed=seed)[1]
    tvs = {p: normalised_value(world, test, r, best=found, seed=seed) for p, r in lists.items()}
    best = np.max([tv.best for tv in tvs.values()], axis=0)  # (R,)
    rand = next(iter(tvs.values())).random  # the same seeded random lists for every policy
    denom = float((best - rand).mean())
    out = {}
    for p, tv in tvs.items():
        logged = evaluate(lists[p], test, ks=(L,), n_boot=0, seed=seed)
        out[p] = {"normalised": float((tv.value - rand).mean() / denom), "per_request": (tv.value - rand) / denom,
                  "value": float(tv.value.mean()), f"hr@{L}": logged[f"hr@{L}"], f"ndcg@{L}": logged[f"ndcg@{L}"]}
    first = next(iter(tvs.values()))
    out["_world"] = {"random": float(rand.mean()), "best": float(best.mean()), "upper": float(first.upper.mean()),
                     "search_best": float(found.mean()), "L": L, "test_requests": int(len(best))}
    return out


def run_seed(effect: str, seed: int, mode: str, log, overrides: dict | None = None,
             true_reward: bool = False, strengths: dict | None = None, with_items: bool = True) -> dict[str, dict]:
    import torch

    from goalrank_core.config import GoalRankConfig
    from goalrank_core.fit import fit_tables

    cfg = GoalRankConfig().override({**(overrides or {}), "train.seed": seed}).for_source("impressions")
    users, per_user = VOLUME[mode]
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        world, splits = world_and_splits(effect, seed, users, per_user, cfg, Path(tmp), strengths, with_items)
    log(f"{effect} seed {seed}: train {splits.train.num_rows}, valid {splits.valid.num_rows}, test {splits.test.num_rows}")
    oracle = None
    if true_reward:  # the loop's ceiling: pi_ref (and G-E's pick) from each list's true value
        from goalrank_core.simulator import TrueReward

        def oracle(b):
            return TrueReward(world, b.item_vocab.ids, b.user_vocab.ids)
    bundle = fit_tables(splits.train, splits.valid, cfg, splits.items, log=log, reward_model=oracle)
    taught = oracle is None and cfg.group.search_lists  # a trained reward model's search leads the groups
    lists = policy_lists(bundle, world, splits.test, seed)
    if taught:
        lists[TEACHER] = teacher_lists(bundle, splits.test)
    res = score_policies(world, splits.test, lists, seed)
    res["_world"]["train_requests"] = splits.train.num_rows
    if taught:
        res["_train_sample"] = train_sample_values(bundle, world, splits.train, seed)
    return res


def _fmt(s: dict) -> str:
    if s["n"] >= 2:
        return f"{s['mean']:.3f} ± {s['std']:.3f} [{s['ci_low']:.3f}, {s['ci_high']:.3f}]"
    return f"{s['mean']:.3f}"


def summarise(effect: str, runs: list[dict], L: int) -> tuple[dict, list[list]]:
    """Over seeds: mean/std/95% interval per policy and metric, and goalrank minus each policy:
    over seeds when there are >= 2, else a per-request paired bootstrap interval."""
    from goalrank_core.metrics import bootstrap_ci

    policies = [p for p in runs[0] if not p.startswith("_")]
    metrics = ("normalised", f"hr@{L}", f"ndcg@{L}")
    summary = {p: {m: seed_summary([r[p][m] for r in runs]) for m in metrics} for p in policies}
    rows = []
    for p in sorted(policies, key=lambda p: -summary[p]["normalised"]["mean"]):
        diffs = [r["goalrank"]["normalised"] - r[p]["normalised"] for r in runs]
        d = seed_summary(diffs)
        if len(runs) == 1:
            d["ci_low"], d["ci_high"] = bootstrap_ci(runs[0]["goalrank"]["per_request"] - runs[0][p]["per_request"])
        summary[p]["goalrank_minus"] = d
        diff = "-" if p == "goalrank" else f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        rows.append([effect, p, _fmt(summary[p]["normalised"]), diff, _fmt(summary[p][f"hr@{L}"]),
                     _fmt(summary[p][f"ndcg@{L}"])])
    return summary, rows


def parse_strengths(pairs: list[str]) -> dict[str, float]:
    """["gamma=1.5", ...] -> {"gamma": 1.5}; an unknown name or a non-number is refused by name."""
    from dataclasses import fields

    from goalrank_core.simulator import Strengths

    known = {f.name: f.type for f in fields(Strengths)}
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in known:
            raise SystemExit(f"--strength {pair!r}: expected NAME=VALUE with NAME one of {', '.join(known)}")
        try:
            out[key] = int(value) if known[key] in (int, "int") else float(value)
        except ValueError:
            raise SystemExit(f"--strength {pair!r}: {value!r} is not a number") from None
    return out


def main(argv: list[str] | None = None) -> dict:
    from goalrank_core.simulator import EFFECTS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="full")
    ap.add_argument("--effects", default=",".join(EFFECTS), help="comma-separated effects (default all three)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..S-1 (default 3, quick 1)")
    ap.add_argument("--verbose", action="store_true", help="print the fit's log lines")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override, e.g. --set group.tau=0.5 (repeatable; default: the default config)")
    ap.add_argument("--reward", choices=("trained", "true"), default="trained",
                    help="true: the world's exact list value replaces the trained reward model (the loop's ceiling)")
    ap.add_argument("--strength", dest="strengths", action="append", default=[], metavar="KEY=VALUE",
                    help="a world strength other than its default (goalrank_core.simulator.Strengths), e.g. "
                         "gamma=1.5 (repeatable)")
    ap.add_argument("--no-items", action="store_true",
                    help="fit without the items file (no categories for any model), as logs without an item table")
    ap.add_argument("--tag", default="", help="suffix of the result file (default: the effects, when not all)")
    args = ap.parse_args(argv)
    from goalrank.cli.pipeline_cmd import parse_overrides

    overrides = parse_overrides(args.overrides)
    strengths = parse_strengths(args.strengths)
    seeds = args.seeds or (1 if args.mode == "quick" else 3)
    effects = [e.strip() for e in args.effects.split(",") if e.strip()]
    default_tag = "-".join(([] if effects == list(EFFECTS) else [e.replace("+", "_") for e in effects])
                           + (["true-reward"] if args.reward == "true" else []) + (["no-items"] if args.no_items else []))
    rec = Recorder("simulator", args.mode, tag=args.tag or default_tag)
    t0 = time.perf_counter()
    per_effect, rows, honest_rows, teacher_rows = {}, [], [], []
    for effect in effects:
        runs = []
        for seed in range(seeds):
            runs.append(run_seed(effect, seed, args.mode, log_to(f"sim {effect} s{seed}", quiet=not args.verbose), overrides,
                                 args.reward == "true", strengths, not args.no_items))
            print(f"[simulator] {effect} seed {seed} done ({time.perf_counter() - t0:.0f}s)", flush=True)
        L = runs[0]["_world"]["L"]
        summary, effect_rows = summarise(effect, runs, L)
        rows += effect_rows
        worlds = [r["_world"] for r in runs]
        sort = summary[ORACLE]["normalised"]
        honest_rows.append([effect, _fmt(sort), "yes" if sort["mean"] <= HONEST_MAX else "NO",
                            f"{np.mean([w['search_best'] / w['upper'] for w in worlds]):.3f}",
                            f"{np.mean([w['random'] for w in worlds]):.3f}", f"{np.mean([w['best'] for w in worlds]):.3f}",
                            int(np.mean([w['train_requests'] for w in worlds]))])
        if all("_train_sample" in r for r in runs):
            on_train = {p: seed_summary([r["_train_sample"][p] for r in runs]) for p in runs[0]["_train_sample"]}
            summary["_train_sample"] = on_train
            teacher_rows.append([effect, _fmt(on_train[TEACHER]), _fmt(on_train["goalrank"]), _fmt(on_train["supervised"]),
                                 _fmt(summary[TEACHER]["normalised"]), _fmt(summary["goalrank"]["normalised"])])
        per_effect[effect] = {"summary": summary, "worlds": worlds,
                              "per_seed": [{p: {k: v for k, v in m.items() if k != "per_request"} for p, m in r.items()}
                                           for r in runs]}
    users, per_user = VOLUME[args.mode]
    result = {
        "config": {"effects": effects, "seeds": list(range(seeds)), "users": users, "requests_per_user": per_user,
                   "goalrank_config": {**overrides} if overrides else "default (train.seed = seed)",
                   "strengths": strengths or "defaults",
                   "reward": args.reward, "items_file": not args.no_items},
        "tables": [
            table("True value on the simulator (test split; random list 0, best list found 1)",
                  ["effect", "policy", "normalised true value", "goalrank minus policy", f"HR@{L} (logged)",
                   f"NDCG@{L} (logged)"], rows,
                  "mean ± std [95% t-interval] over seeds; with one seed the difference's interval is a per-request "
                  "paired bootstrap. HR/NDCG use the logged labels of the shown items, as on real data."),
            table("Honesty of each world", ["effect", "true-relevance sort", f"sort <= {HONEST_MAX}",
                                             "search best / certified bound", "random (clicks)", "best (clicks)",
                                             "training requests"], honest_rows,
                  "The certified bound ignores list context (no saturation, every complement, every position "
                  "examined), so best / bound is a floor on how close search gets to the optimum, loose for cascade."),
        ] + ([table("Teacher and student: training against test requests",
                    ["effect", "teacher on training requests", "goalrank on training requests",
                     "supervised on training requests", "teacher on test requests", "goalrank on test requests"],
                    teacher_rows,
                    f"Normalised true value. The teacher is the reward model's search list, the list that leads each "
                    f"training group's pi_ref; training requests: {TRAIN_SAMPLE} evenly spaced ones, searched by the "
                    f"reward model that was fitted on them. GoalRank can only learn what the teacher shows it there.")]
             if teacher_rows else []),
        "data": per_effect,
    }
    rec.write(result)
    return result


if __name__ == "__main__":
    main()
