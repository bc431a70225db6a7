"""`goalrank evaluate --lists PATH (--truth PATH [--k 6,10] [--ope] | --world DIR [--truth PATH]) [--json]`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from goalrank.cli import UserError


def _ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not ks or any(k < 1 for k in ks):
        raise argparse.ArgumentTypeError(f"K values must be integers >= 1, got {text!r}")
    return ks


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="score ranked lists against labelled requests",
                              description="Score a ranked-lists Parquet (request_id, ranked list<int64>) against "
                                          "labelled requests (impressions): HR@K, NDCG@K, MAP@K with bootstrap 95% "
                                          "intervals. Requests without a positive are excluded and counted.")
    p.add_argument("--lists", required=True, metavar="PATH", help="ranked lists Parquet (file or folder)")
    p.add_argument("--truth", metavar="PATH", help="impressions Parquet with shown and labels (with --world: the "
                   "requests to score, default WORLD_DIR/impressions.parquet)")
    p.add_argument("--world", metavar="DIR", help="a `goalrank data simulate` folder (or its world/): score the lists' "
                   "true expected clicks, normalised (random list 0, best list found 1), instead of logged labels")
    p.add_argument("--k", type=_ks, default=None, metavar="K[,K...]", help="cut-offs (default: L, the longest shown list)")
    p.add_argument("--json", action="store_true", help="print one JSON object {metric: value}")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--ope", action="store_true",
                   help="with --truth: also estimate the expected slate reward (sum of labels over the list) that the "
                        "policy behind --lists would have earned, from --truth's logging propensities: slate IPS and "
                        "SNIPS (need propensity or log_propensity), pseudo-inverse PI and SNPI (also need "
                        "position_propensities), each with a bootstrap 95%% interval and its effective sample size")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    if args.world is not None:
        return _evaluate_world(args)
    if args.truth is None:
        raise UserError("give --truth (labelled requests) or --world (a simulator folder)")

    from goalrank_core.metrics import evaluate_lists, evaluate_ope
    from goalrank_core.validate import read_impressions, read_ranked

    truth = read_impressions(args.truth)
    ranked = read_ranked(args.lists)
    ks = args.k or [int(pc.max(pc.list_value_length(truth.column("shown"))).as_py())]
    results = evaluate_lists(ranked, truth, ks, seed=args.seed)
    ope = evaluate_ope(ranked, truth, seed=args.seed) if args.ope else {}
    if args.json:
        out = {name: r.value for name, r in results.items()}
        out.update({f"ope_{name}": e.value for name, e in ope.items()})
        print(json.dumps(out, sort_keys=False))
        return 0
    first = next(iter(results.values()))
    print(f"{len(truth)} requests; {first.n_requests} with a positive, {first.n_excluded} without (excluded)")
    print(f"{'metric':<10} {'value':>8}  {'95% interval':>19}")
    for name, r in results.items():
        print(f"{name:<10} {r.value:>8.4f}  [{r.ci_low:.4f}, {r.ci_high:.4f}]")
    if ope:
        _print_ope(ope, "position_propensities" in truth.column_names)
    if first.n_requests == 0:
        raise UserError("no request in --truth has a positive label: every metric is undefined")
    return 0


def _print_ope(ope: dict, has_positions: bool) -> None:
    print("off-policy estimates of the expected slate reward (sum of labels over the list):")
    print(f"{'estimator':<10} {'value':>8}  {'95% interval':>19}  {'ESS':>8}")
    for name, e in ope.items():
        print(f"{name:<10} {e.value:>8.4f}  [{e.ci_low:.4f}, {e.ci_high:.4f}]  {e.ess:>8.1f}")
    if not has_positions:
        print("pi, snpi: not estimated (they need a position_propensities column: the list propensity alone does "
              "not give the per-position marginals)")


def _world_paths(world: str, truth: str | None) -> tuple[Path, Path]:
    """--world DIR [--truth PATH] -> (world folder, requests path)."""
    root = Path(world)
    world_dir = root / "world" if (root / "world" / "world.json").is_file() else root
    requests = Path(truth) if truth is not None else (root / "impressions.parquet")
    if truth is None and not requests.exists():
        raise UserError(f"--world {root}: no impressions.parquet there; give the requests with --truth")
    return world_dir, requests


def _evaluate_world(args: argparse.Namespace) -> int:
    """True value of ranked lists in a simulator world, with a bootstrap 95% interval."""
    import pyarrow.compute as pc

    from goalrank_core.metrics import bootstrap_ci
    from goalrank_core.simulator import World
    from goalrank_core.simulator_search import normalised_value
    from goalrank_core.validate import read_ranked, read_requests

    world_dir, requests_path = _world_paths(args.world, args.truth)
    world = World.load(world_dir)
    ranked = read_ranked(args.lists)
    requests = read_requests(requests_path)
    requests = requests.filter(pc.is_in(requests.column("request_id"), value_set=ranked.column("request_id").combine_chunks()))
    tv = normalised_value(world, requests, ranked, seed=args.seed)
    lo, hi = bootstrap_ci(tv.normalised, seed=args.seed)
    out = {"normalised": tv.score, "ci_low": lo, "ci_high": hi, "value": float(tv.value.mean()),
           "random": float(tv.random.mean()), "best": float(tv.best.mean()), "upper": float(tv.upper.mean()),
           "n_requests": int(len(tv.value)), "effects": "+".join(world.effects)}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{out['n_requests']} requests, world effect {out['effects']}: expected clicks per list {out['value']:.4f} "
          f"(random {out['random']:.4f}, best found {out['best']:.4f}, certified upper bound {out['upper']:.4f})")
    print(f"normalised true value {tv.score:.4f}  95% interval [{lo:.4f}, {hi:.4f}]  (random 0, best found 1)")
    return 0
