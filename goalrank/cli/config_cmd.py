"""`goalrank config show`: the effective settings, where each came from, secrets masked; and
the model config the same file gives (with its hash, as stage manifests record it)."""
from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    from flows.settings import add_settings_flags

    parser = subparsers.add_parser("config", help="show the effective configuration")
    sub = parser.add_subparsers(dest="config_command", metavar="SUBCOMMAND")
    sub.required = True
    show = sub.add_parser(
        "show",
        help="print effective settings with their source (flag > env > file > default), secrets masked",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    show.add_argument("--config", metavar="FILE", default=None, help="YAML file: a settings: section and model sections")
    show.add_argument("--format", choices=("text", "json"), default="text")
    add_settings_flags(show)
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    import os

    from flows.settings import ENV_VARS, TUNING_ENV_VARS, cli_values, load

    settings, model = load(args.config, cli_values(args))
    masked = settings.masked()
    if args.format == "json":
        out = {
            "settings": {k: {"value": v, "source": settings.source_of(k), "env": ENV_VARS[k]} for k, v in masked.items()},
            "model_config": model.to_dict(),
            "config_hash": model.hash(),
            "tuning_env": {k: os.environ.get(k) for k in TUNING_ENV_VARS},
        }
        print(json.dumps(out, indent=2))
        return 0
    width = max(map(len, masked))
    print("settings (flag > env > file > default):")
    for name, value in masked.items():
        shown = "-" if value is None else value
        print(f"  {name:<{width}}  {shown}   [{settings.source_of(name)}]")
    print("tuning (env only, read where it acts):")
    for var, help in TUNING_ENV_VARS.items():
        print(f"  {var:<28} {os.environ.get(var) or '-':<6} {help}")
    print(f"model config (hash {model.hash()}):")
    for section, values in model.to_dict().items():
        for key, value in values.items():
            print(f"  {section}.{key} = {value}")
    return 0
