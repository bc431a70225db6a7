"""`ray start` for the local stack's extra nodes and its dashboard, kept on 127.0.0.1.

    python infra/ray_node.py [--join] [--dashboard-deps DIR] -- <ray start arguments>

Two things plain `ray start` cannot do here:

- `--join`: a second node on the same machine, on loopback. Ray keeps a node on 127.0.0.1 only
  in its single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0; infra/stack.py), and in
  that mode `ray start --address` refuses to start a further node at all. Only the CLI's own
  check is lifted here (its module sees the switch on); the address logic in
  ray._private.services still sees it off, so the node's servers stay on loopback.
- `--dashboard-deps DIR`: the head's dashboard, which serves Ray's State API
  (`ray.util.state`), needs ray[default]'s extra packages, which this project does not
  install in its venv (a full dashboard agent on every local Ray start made starts abort on a
  busy machine, ray-project/ray#65983). `make ray-dashboard` puts them in DIR; this puts DIR
  on the path of this node's processes only (the raylet tells its agent to be the full one
  when the dashboard is on, and that agent imports them too). Other nodes stay minimal.
"""
from __future__ import annotations

import argparse
import os
import sys
import types


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infra/ray_node.py")
    parser.add_argument("--join", action="store_true", help="start a non-head node on loopback")
    parser.add_argument("--dashboard-deps", metavar="DIR", help="ray[default]'s extra packages, for the dashboard")
    parser.add_argument("ray_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    ray_args = args.ray_args[1:] if args.ray_args[:1] == ["--"] else args.ray_args

    import ray._private.ray_constants as ray_constants
    import ray.scripts.scripts as scripts

    if args.join:
        cli_constants = types.ModuleType("ray_constants_for_join")
        cli_constants.__dict__.update(ray_constants.__dict__)
        cli_constants.ENABLE_RAY_CLUSTER = True
        scripts.ray_constants = cli_constants
    if args.dashboard_deps:
        # On the path of `ray start` (its dependency check) and, through PYTHONPATH, of the
        # processes it starts: the dashboard, and the raylet, which starts the full agent.
        deps = os.path.abspath(args.dashboard_deps)
        sys.path.insert(0, deps)
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = deps + (os.pathsep + saved if saved else "")
    sys.argv = ["ray", "start", *ray_args]
    return scripts.main()


if __name__ == "__main__":
    sys.exit(main())
