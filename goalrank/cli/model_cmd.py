"""`goalrank fit` (train everything in-process into a model folder) and `goalrank rank`
(any policy of a model folder -> ranked lists Parquet)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from goalrank.cli import UserError
from goalrank.cli.common import add_data_source_args, load_config, load_source


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fit", help="train the reward model, auxiliary policies and GoalRank in-process",
        description="Train the reward model, the auxiliary policies and baselines, and the GoalRank generator "
                    "(group-relative rounds) on the train split, choosing epochs on the valid split; save them "
                    "to MODEL_DIR (weights as state dicts loaded without unpickling, config as JSON).")
    add_data_source_args(p)
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="folder for the fitted models")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config (see `goalrank config show`)")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--quiet", action="store_true", help="no per-epoch log lines")
    p.set_defaults(func=_fit)

    r = subparsers.add_parser(
        "rank", help="rank requests with a fitted model folder",
        description="Write request_id and ranked (list<int64> of L distinct candidates) for every request. "
                    "Users and items unseen in training are ranked with cold-start embeddings, never rejected.")
    r.add_argument("--model", required=True, metavar="MODEL_DIR", help="a folder written by `goalrank fit`, or a registered model "
                   "(models:/goalrank@champion; MLFLOW_TRACKING_URI)")
    r.add_argument("--requests", required=True, metavar="PATH", help="requests (or impressions) Parquet")
    r.add_argument("--out", required=True, metavar="PATH", help="output Parquet file")
    r.add_argument("--policy", default="goalrank",
                   help="goalrank (default), g-e, supervised, or a baseline: random, popularity, ctr, history, mmr, "
                        "first-stage, dnn, dnn-pl, prm")
    r.add_argument("--batch-size", type=int, default=1024, help="requests per batch (default 1024)")
    r.set_defaults(func=_rank)


def _fit(args: argparse.Namespace) -> int:
    import torch

    from goalrank_core.fit import fit_tables

    over = {"train.seed": args.seed} if args.seed is not None else None
    config = load_config(args.config, over)
    splits = load_source(args, config)  # validated before anything is written
    config = config.for_source(splits.source)  # reward.unshown: auto -> by what the data is
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    log = (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    bundle = fit_tables(splits.train, splits.valid, config, splits.items, log=log)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Save beside the target and move in, so a failed save leaves no half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        bundle.save(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"saved {', '.join(sorted(bundle.models))} to {out}")
    return 0


def _rank(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from goalrank_core.bundle import ModelBundle
    from goalrank_core.ranking import available_policies, rank
    from goalrank_core.validate import read_requests

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.model.startswith(("models:/", "runs:/")):  # a registered model, e.g. models:/goalrank@champion
        from flows.tracking import load_bundle_from
        from flows.settings import resolve_settings

        bundle = load_bundle_from(args.model, resolve_settings().tracking_uri)
    else:
        bundle = ModelBundle.load(args.model)
    if args.policy not in available_policies(bundle):
        raise UserError(f"unknown policy '{args.policy}' for {args.model}; available: {', '.join(available_policies(bundle))}")
    requests = read_requests(args.requests)
    ranked = rank(bundle, requests, args.policy, args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    pq.write_table(ranked, tmp)
    os.replace(tmp, out)
    print(f"ranked {ranked.num_rows} requests with '{args.policy}' -> {out}")
    return 0
