"""`goalrank evaluate --lists PATH --truth PATH [--k 6,10] [--json]`."""
from __future__ import annotations

import argparse
import json

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
    p.add_argument("--truth", required=True, metavar="PATH", help="impressions Parquet with shown and labels")
    p.add_argument("--k", type=_ks, default=None, metavar="K[,K...]", help="cut-offs (default: L, the longest shown list)")
    p.add_argument("--json", action="store_true", help="print one JSON object {metric: value}")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    import pyarrow.compute as pc

    from goalrank_core.metrics import evaluate_lists
    from goalrank_core.validate import read_impressions, read_ranked

    truth = read_impressions(args.truth)
    ranked = read_ranked(args.lists)
    ks = args.k or [int(pc.max(pc.list_value_length(truth.column("shown"))).as_py())]
    results = evaluate_lists(ranked, truth, ks, seed=args.seed)
    if args.json:
        print(json.dumps({name: r.value for name, r in results.items()}, sort_keys=False))
        return 0
    first = next(iter(results.values()))
    print(f"{len(truth)} requests; {first.n_requests} with a positive, {first.n_excluded} without (excluded)")
    print(f"{'metric':<10} {'value':>8}  {'95% interval':>19}")
    for name, r in results.items():
        print(f"{name:<10} {r.value:>8.4f}  [{r.ci_low:.4f}, {r.ci_high:.4f}]")
    if first.n_requests == 0:
        raise UserError("no request in --truth has a positive label: every metric is undefined")
    return 0
