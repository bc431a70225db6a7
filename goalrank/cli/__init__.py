"""`goalrank` command: one entry point, one module per subcommand group.

Each module in COMMANDS defines `register(subparsers)`, adding its subcommands with
`set_defaults(func=...)`; the func takes the parsed args and returns an exit code.
Heavy imports (torch, ray, prefect, mlflow) happen inside the handlers, so `--help` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `goalrank --help` lists them.
COMMANDS = [
    "goalrank.cli.data_cmd",  # data prepare | synth | download
    "goalrank.cli.evaluate_cmd",  # evaluate
    "goalrank.cli.model_cmd",  # fit | rank
    "goalrank.cli.pipeline_cmd",  # run | serve | promote | backfill
    "goalrank.cli.config_cmd",  # config show
]


class UserError(Exception):
    """An error in what the user gave us: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="goalrank",
        description="GoalRank: generator-only list-wise re-ranking trained by group-relative optimisation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # not written yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"goalrank {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        # Validation errors from goalrank_core (bad input, bad config) are ValueErrors
        # whose message names the problem; no traceback for those.
        from goalrank_core.errors import GoalRankInputError

        if isinstance(exc, GoalRankInputError):
            print(f"goalrank {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
