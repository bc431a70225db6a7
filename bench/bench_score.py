"""`score` throughput (lists/s): the Ray stage with 1 and 2 actors against a bare
single-process torch loop doing the same per-batch work (encode the requests, map the lists
to positions, reward_model.score, pi_ref) over the same model and data.

Targets (issue 4): 1 actor >= 0.8x bare; 2 actors >= 1.6x one actor. The stage is timed end to
end (actor start-up with the torch import and model load, Parquet read and write, manifest:
a fixed cost of several seconds that small inputs do not amortise; `--mode full` has 3x the
groups). The bare loop gets 1 torch thread, as a Ray actor with a fractional CPU does, and is
also reported with every thread.

    python -m bench.bench_score --mode quick|full
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from bench._stages_common import config, prepared, random_groups, untrained_reward, write_result
from tasks import storage
from tasks.ray_runtime import ensure_ray


def bare_loop(prep: str, reward_uri: str, cand: str, cfg, threads: int, repeats: int = 2) -> dict:
    from goalrank_core.fit import encode
    from goalrank_core.group import reference_policy
    from tasks._data import load_bundle
    from tasks._groups import RequestIndex, groups_to_positions

    torch.set_num_threads(threads)
    bundle = load_bundle(storage.join(reward_uri, "model"), "bench reward")
    model = bundle.require("reward").eval()
    index = RequestIndex(storage.read_table(storage.join(prep, "train"), None, "bench train"), "bench")
    groups = storage.read_table(storage.join(cand, "groups"), None, "bench groups")
    bs = cfg.train.batch_size
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            for i in range(0, groups.num_rows, bs):
                part = groups.slice(i, bs)
                enc = encode(bundle, index.take(part.column("request_id").to_pylist()))
                pos, mask = groups_to_positions(enc, part.column("lists").to_pylist(), cfg.group.size, "bench")
                b = enc.batch(slice(None))
                m = torch.from_numpy(mask)
                r = model.score(b, torch.from_numpy(pos).clamp(min=0))
                reference_policy(torch.where(m, r, torch.zeros_like(r)), m, cfg.group.tau, cfg.group.eps)
        best = min(best, time.perf_counter() - t0)
    lists = groups.num_rows * cfg.group.size
    return {"seconds": best, "lists": lists, "lists_per_s": lists / best, "threads": threads}


def stage_run(prep: str, reward_uri: str, cand: str, cfg, root: str, actors: int, tag: str) -> dict:
    from tasks.stages import score

    os.environ["GOALRANK_DATA_ACTORS"] = str(actors)
    out = storage.join(root, f"score-{tag}")
    t0 = time.perf_counter()
    res = score(cand, prep, reward_uri, out, cfg)
    dt = time.perf_counter() - t0
    lists = res.manifest["tables"]["groups"]["rows"] * cfg.group.size
    return {"seconds": dt, "lists": lists, "lists_per_s": lists / dt, "actors": actors}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--storage", default=None, help="artifact root (default: a temporary folder)")
    args = ap.parse_args()
    ensure_ray()
    cfg = config(args.mode)
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        root = args.storage or tmp
        prep = prepared(root, cfg)
        reward_uri = untrained_reward(root, prep, cfg)
        cand = random_groups(root, prep, cfg)
        bare1 = bare_loop(prep, reward_uri, cand, cfg, threads=1)
        bare_all = bare_loop(prep, reward_uri, cand, cfg, threads=os.cpu_count() or 1)
        stage_run(prep, reward_uri, cand, cfg, root, 1, "warmup")  # worker processes, imports
        one = stage_run(prep, reward_uri, cand, cfg, root, 1, "a1")
        two = stage_run(prep, reward_uri, cand, cfg, root, 2, "a2")
    result = {
        "bare_1_thread": bare1, "bare_all_threads": bare_all, "ray_1_actor": one, "ray_2_actors": two,
        "ratio_1_actor_vs_bare": one["lists_per_s"] / bare1["lists_per_s"],
        "ratio_2_vs_1_actor": two["lists_per_s"] / one["lists_per_s"],
        "targets": {"ratio_1_actor_vs_bare": 0.8, "ratio_2_vs_1_actor": 1.6},
        "config": {"group.size": cfg.group.size, "batch_size": cfg.train.batch_size, "max_users": cfg.protocol.max_users},
    }
    result["met"] = {k: result[k] >= v for k, v in result["targets"].items()}
    write_result("bench_score", args.mode, result)


if __name__ == "__main__":
    main()
