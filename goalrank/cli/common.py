"""Helpers shared by subcommands: config files, data-source arguments, writing splits."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay inside functions so `--help` is fast
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.protocol import Splits

DATASET_NAMES = ("ml-100k", "ml-1m", "amazon-book")
SPLIT_NAMES = ("time", "user-last")  # ProtocolConfig.split


def load_config(path: str | os.PathLike | None, overrides: dict | None = None) -> "GoalRankConfig":
    """A YAML or JSON file (by extension; YAML otherwise) -> GoalRankConfig; None -> defaults.
    Unknown keys and bad values raise ConfigError naming the key."""
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.errors import ConfigError

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        text = p.read_text()
        try:
            if p.suffix.lower() == ".json":
                data = json.loads(text) if text.strip() else {}
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except (json.JSONDecodeError, ValueError) as exc:
            raise ConfigError(f"config file {p}: not valid JSON: {exc}") from exc
        except Exception as exc:  # yaml.YAMLError without importing yaml at module level
            raise ConfigError(f"config file {p}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {p}: must hold a mapping, got {type(data).__name__}")
    cfg = GoalRankConfig.from_dict(data)
    return cfg.override(overrides) if overrides else cfg


def add_data_source_args(parser: argparse.ArgumentParser) -> None:
    """--dataset NAME | --impressions PATH [--items PATH] [--split HOW], and --data-dir."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--dataset", choices=DATASET_NAMES, help="a public data set, turned into impressions by the protocol (docs/protocol.md)")
    group.add_argument("--impressions", metavar="PATH", help="your own impressions Parquet (file or folder of parts), split by --split")
    parser.add_argument("--items", metavar="PATH", help="optional item table (item_id, category) for --impressions")
    add_split_arg(parser)
    parser.add_argument("--data-dir", metavar="DIR", help="where data sets live (default: $GOALRANK_DATA_DIR, else ~/.cache/goalrank)")


def add_split_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", choices=SPLIT_NAMES, default=None,
                        help="how --impressions is split: time (a global cut by timestamp: the latest "
                             "protocol.test_share of requests test, the protocol.valid_share before them validate) or "
                             "user-last (per user: last request test, the one before valid); default protocol.split "
                             "(time). A daily run's date window replaces it; --dataset always splits per user")


def split_override(args: argparse.Namespace) -> dict:
    """{"protocol.split": HOW} when --split was given, for GoalRankConfig.override."""
    how = getattr(args, "split", None)
    if how and getattr(args, "impressions", None) is None:
        from goalrank_core.errors import GoalRankInputError

        raise GoalRankInputError("--split applies to --impressions; a named data set always splits per user (docs/protocol.md)")
    return {"protocol.split": how} if how else {}


def load_source(args: argparse.Namespace, config: "GoalRankConfig") -> "Splits":
    """Splits from the parsed data-source arguments (validated before anything is written)."""
    from goalrank_core.protocol import load_splits

    over = split_override(args)
    if over:
        config = config.override(over)
    return load_splits(
        dataset=getattr(args, "dataset", None),
        impressions=getattr(args, "impressions", None),
        items=getattr(args, "items", None),
        data_dir=getattr(args, "data_dir", None),
        protocol=config.protocol,
    )


def write_splits(splits: "Splits", out: str | os.PathLike) -> Path:
    """Write OUT/{train,valid,test}.parquet, OUT/items.parquet (if any) and OUT/stats.json.
    Files are written to a temporary folder beside OUT and moved in at the end, so a failure
    leaves nothing half-written."""
    import pyarrow.parquet as pq

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name in ("train", "valid", "test"):
            pq.write_table(splits.split(name), tmp / f"{name}.parquet")
        if splits.items is not None:
            pq.write_table(splits.items, tmp / "items.parquet")
        (tmp / "stats.json").write_text(json.dumps(splits.stats, indent=2, sort_keys=True) + "\n")
        out.mkdir(exist_ok=True)
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
