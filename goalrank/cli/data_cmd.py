"""`goalrank data prepare | synth | download`."""
from __future__ import annotations

import argparse
import json

from goalrank.cli.common import DATASET_NAMES, add_data_source_args, load_config, load_source, write_splits


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="prepare, synthesise or download data",
                                 description="Data: turn a data set or your impressions into train/valid/test splits.")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    p = sub.add_parser("prepare", help="validate and split a data source into OUT/{train,valid,test}.parquet",
                       description="Validate a data source and write OUT/train.parquet, valid.parquet, test.parquet, "
                                   "items.parquet (when there is an item table) and stats.json. Nothing is written "
                                   "if validation fails.")
    add_data_source_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config (protocol settings under 'protocol:')")
    p.add_argument("--json", action="store_true", help="print the stats as one JSON object")
    p.set_defaults(func=_prepare)

    s = sub.add_parser("synth", help="write seeded synthetic impressions with a list-context effect",
                       description="Write OUT/impressions.parquet and OUT/items.parquet from a seeded synthetic "
                                   "world in which a list's value depends on its composition.")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--users", type=int, default=200, help="number of users (default 200)")
    s.add_argument("--items", type=int, default=500, help="number of items (default 500)")
    s.add_argument("--requests", type=int, default=10, help="requests per user (default 10)")
    s.add_argument("--categories", type=int, default=8, help="item categories (default 8)")
    s.add_argument("--days", type=int, default=1, help="spread requests over this many days (default 1)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=_synth)

    d = sub.add_parser("download", help="fetch a public data set from its canonical URL",
                       description="Download NAME into DATA_DIR/NAME from its canonical URL and verify its checksum.")
    d.add_argument("name", choices=DATASET_NAMES, help="data set name")
    d.add_argument("--data-dir", metavar="DIR", help="target (default: $GOALRANK_DATA_DIR, else ~/.cache/goalrank)")
    d.add_argument("--url", help="override the source URL (a mirror)")
    d.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    d.set_defaults(func=_download)


def _prepare(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    splits = load_source(args, config)  # everything is validated before anything is written
    out = write_splits(splits, args.out)
    if args.json:
        print(json.dumps(splits.stats, sort_keys=True))
    else:
        st = splits.stats
        print(f"wrote {out}: " + ", ".join(f"{n} {st[f'{n}_requests']} requests" for n in ("train", "valid", "test")))
        for key in sorted(st):
            print(f"  {key}: {st[key]}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq
    from pathlib import Path

    from goalrank_core.synth import synth_impressions

    imp, items, _ = synth_impressions(n_users=args.users, n_items=args.items, requests_per_user=args.requests,
                                      n_categories=args.categories, days=args.days, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(imp, out / "impressions.parquet")
    pq.write_table(items, out / "items.parquet")
    print(f"wrote {out / 'impressions.parquet'} ({imp.num_rows} requests) and {out / 'items.parquet'} ({items.num_rows} items)")
    return 0


def _download(args: argparse.Namespace) -> int:
    from goalrank_core.datasets import download

    path = download(args.name, args.data_dir, url=args.url, timeout=args.timeout)
    print(f"downloaded {args.name} to {path}")
    return 0
