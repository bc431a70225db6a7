"""`goalrank data prepare | synth | simulate | replay | download`."""
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
    s.add_argument("--days", type=int, default=None,
                   help="write K days as a date-partitioned dataset OUT/impressions/date=YYYY-MM-DD/ (one partition "
                        "a day, --requests per user each day; the same date always gets the same data)")
    s.add_argument("--start", metavar="YYYY-MM-DD", default=None,
                   help="first day written with --days (default 2023-11-15); e.g. --days 1 --start DAY lands one new day")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=_synth)

    m = sub.add_parser("simulate", help="write logs of a list-wise user simulator with a known optimum",
                       description="Write OUT/impressions.parquet (every request; `goalrank fit --impressions` and "
                                   "`data prepare` split them), OUT/items.parquet and OUT/world/ (the simulator, for "
                                   "`goalrank evaluate --world OUT`) from a seeded world whose click model has "
                                   "context effects: saturation, pairs, cascade, or a combination such as "
                                   "saturation+cascade. The logging policy is noisy and context-unaware.")
    m.add_argument("--out", required=True, metavar="DIR", help="output folder")
    m.add_argument("--effect", default="saturation", help="saturation, pairs, cascade, or several joined by '+' "
                   "(default saturation)")
    m.add_argument("--seed", type=int, default=0, help="world and log seed (default 0)")
    m.add_argument("--users", type=int, default=2000, help="number of users (default 2000)")
    m.add_argument("--items", type=int, default=1000, help="number of items (default 1000)")
    m.add_argument("--categories", type=int, default=10, help="item categories (default 10)")
    m.add_argument("--requests", type=int, default=16000, help="requests in all, spread over the users (default 16000)")
    m.add_argument("--candidates", type=int, default=50, help="candidates per request (default 50)")
    m.add_argument("--slate-len", type=int, default=10, help="items shown per request (default 10)")
    m.set_defaults(func=_simulate)

    r = sub.add_parser("replay", help="replay a public data set as a date-partitioned log, one partition a day",
                       description="Run the protocol on a data set and write every request to "
                                   "OUT/impressions/date=YYYY-MM-DD/ by the UTC day of its timestamp, plus "
                                   "OUT/items.parquet. Amazon-Book has no timestamps: each user's requests, in the "
                                   "protocol's synthetic order, are spread over --days days from --start.")
    r.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="data set name")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (local or s3://bucket/prefix)")
    r.add_argument("--data-dir", metavar="DIR", help="where data sets live (default: $GOALRANK_DATA_DIR)")
    r.add_argument("--config", metavar="FILE", help="YAML or JSON config (protocol settings under 'protocol:')")
    r.add_argument("--days", type=int, default=30, help="data without timestamps: days to spread over (default 30)")
    r.add_argument("--start", metavar="YYYY-MM-DD", default=None,
                   help="data without timestamps: first day (default 2023-11-15)")
    r.set_defaults(func=_replay)

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

    if args.days is not None or args.start is not None:
        return _synth_days(args)

    imp, items, _ = synth_impressions(n_users=args.users, n_items=args.items, requests_per_user=args.requests,
                                      n_categories=args.categories, days=1, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(imp, out / "impressions.parquet")
    pq.write_table(items, out / "items.parquet")
    print(f"wrote {out / 'impressions.parquet'} ({imp.num_rows} requests) and {out / 'items.parquet'} ({items.num_rows} items)")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq
    from pathlib import Path

    from goalrank_core.simulator import make_world, simulate_logs

    world = make_world(args.effect, seed=args.seed, n_users=args.users, n_items=args.items,
                       n_categories=args.categories, slate_len=args.slate_len)
    imp, items = simulate_logs(world, n_requests=args.requests, n_candidates=args.candidates, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(imp, out / "impressions.parquet")
    pq.write_table(items, out / "items.parquet")
    world.save(out / "world")
    print(f"wrote {out / 'impressions.parquet'} ({imp.num_rows} requests, effect {'+'.join(world.effects)}), "
          f"{out / 'items.parquet'} ({items.num_rows} items) and {out / 'world'}")
    return 0


def _synth_days(args: argparse.Namespace) -> int:
    """`synth --days K`: one partition a day, each day's draws fixed by (seed, date)."""
    from datetime import timedelta

    from goalrank_core.errors import ConfigError
    from goalrank_core.partitions import parse_date, partition_name
    from goalrank_core.replay import SYNTH_START, synth_day
    from tasks import object_store
    from tasks.partitions import write_file, write_partition

    days = 1 if args.days is None else args.days
    if days < 1:
        raise ConfigError(f"--days must be >= 1, got {days}")
    start = parse_date(args.start, "--start") if args.start else SYNTH_START
    dataset = object_store.join(object_store.normalize(args.out), "impressions")
    total, items = 0, None
    for i in range(days):
        day = start + timedelta(days=i)
        imp, items = synth_day(day, n_users=args.users, n_items=args.items, requests_per_user=args.requests,
                               n_categories=args.categories, seed=args.seed)
        write_partition(imp, dataset, day)
        total += imp.num_rows
    write_file(items, object_store.join(object_store.normalize(args.out), "items.parquet"))
    last = start + timedelta(days=days - 1)
    print(f"wrote {dataset}/{partition_name(start)} .. {partition_name(last)} ({days} partition(s), {total} requests) "
          f"and {args.out}/items.parquet ({items.num_rows} items)")
    return 0


def _replay(args: argparse.Namespace) -> int:
    from goalrank.cli.common import load_config
    from goalrank_core.partitions import by_day, parse_date, partition_name, spread_over_days
    from goalrank_core.replay import SYNTH_START, replay_splits
    from goalrank_core.schemas import ITEMS
    from tasks import object_store
    from tasks.partitions import write_file, write_partition

    config = load_config(args.config)
    table, items, has_time = replay_splits(args.dataset, args.data_dir, config.protocol)
    if not has_time:
        start = parse_date(args.start, "--start") if args.start else SYNTH_START
        print(f"{args.dataset} has no timestamps: spreading each user's requests, in the protocol's synthetic order, "
              f"over {args.days} days from {start.isoformat()}")
        table = spread_over_days(table, args.days, start)
    out = object_store.normalize(args.out)
    dataset = object_store.join(out, "impressions")
    days = by_day(table)
    for day, part in days.items():
        write_partition(part, dataset, day)
    if items is not None:
        write_file(items.cast(ITEMS), object_store.join(out, "items.parquet"))
    first, last = min(days), max(days)
    print(f"wrote {dataset}/{partition_name(first)} .. {partition_name(last)} ({len(days)} partition(s), "
          f"{table.num_rows} requests){' and ' + out + '/items.parquet' if items is not None else ''}")
    return 0


def _download(args: argparse.Namespace) -> int:
    from goalrank_core.datasets import download

    path = download(args.name, args.data_dir, url=args.url, timeout=args.timeout)
    print(f"downloaded {args.name} to {path}")
    return 0
