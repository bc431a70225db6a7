"""`train_generator` throughput (groups/s): the Ray Train stage with 1 and 2 DDP workers
against the in-process trainer (goalrank_core.trainer.train_generator_group) on the same
scored groups and config.

Reported per run: steady-state groups/s (epochs after the first, from the per-epoch log) and
end-to-end groups/s (epochs x groups / wall time, Ray Train start-up included). DDP workers
get a fractional CPU (one torch thread each); the in-process trainer is run with 1 thread (the
comparison) and, in full mode, with every thread. Quick mode trains on the groups of half the
quick training requests (~2.2k groups, 2 epochs) to stay within about two minutes.

    python -m bench.bench_train_generator --mode quick|full
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from bench._stages_common import config, prepared, random_groups, untrained_reward
from bench.common import Recorder
from tasks import object_store, storage
from tasks.ray_runtime import ensure_ray


FRACTION = {"quick": 0.5, "full": 1.0}  # of the training requests given groups


def in_process(prep: str, scored: str, cfg, threads: int) -> dict:
    from goalrank_core.bundle import encode
    from goalrank_core.trainer import Groups, set_seed, train_generator_group
    from goalrank_core.schemas import SCORED_GROUPS
    from tasks.group_rows import RequestIndex, groups_to_positions
    from tasks.stage_io import load_bundle, read_split

    torch.set_num_threads(threads)
    bundle = load_bundle(object_store.join(prep, "vocab"), "bench vocab")
    groups = storage.read_table(object_store.join(scored, "groups"), SCORED_GROUPS, "bench scored")
    index = RequestIndex(read_split(prep, "train", "bench train"), "bench")
    enc = encode(bundle, index.take(groups.column("request_id")))
    pos, mask = groups_to_positions(enc, groups.column("lists"), cfg.group.size, "bench")
    pi = np.zeros(mask.shape, np.float32)
    pi[mask] = groups.column("pi_ref").combine_chunks().flatten().to_numpy()  # row-major, as the stage wrote it
    set_seed(cfg.train.seed)
    model = bundle.build("generator")
    t0 = time.perf_counter()
    history = train_generator_group(enc, Groups(pos, pi, mask), model, cfg.train, None, log=lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    steady = [h.samples_per_s for h in history[1:]] or [history[0].samples_per_s]
    return {"threads": threads, "epochs": len(history), "groups": len(enc), "wall_s": wall,
            "groups_per_s_steady": float(np.mean(steady)), "groups_per_s_end_to_end": len(enc) * len(history) / wall,
            "loss": [h.loss for h in history]}


def stage_run(prep: str, scored: str, cfg, root: str, workers: int) -> dict:
    from tasks.stages import train_generator

    cfg = cfg.override({"train.num_workers": workers})
    t0 = time.perf_counter()
    res = train_generator(scored, prep, None, object_store.join(root, f"generator-w{workers}"), cfg)
    wall = time.perf_counter() - t0
    epochs = res.manifest["training"]["epochs"]
    steady = [e["samples_per_s"] for e in epochs[1:]] or [epochs[0]["samples_per_s"]]
    groups = epochs[0]["samples"]
    return {"workers": workers, "epochs": len(epochs), "groups": groups, "wall_s": wall,
            "groups_per_s_steady": float(np.mean(steady)), "groups_per_s_end_to_end": groups * len(epochs) / wall,
            "loss": [e["loss"] for e in epochs]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--storage", default=None, help="artifact root (default: a temporary folder)")
    args = ap.parse_args()
    rec = Recorder("bench_train_generator", args.mode)
    t_start = time.perf_counter()
    ensure_ray()
    cfg = config(args.mode)
    from tasks.stages import score

    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        root = args.storage or tmp
        prep = prepared(root, cfg)
        cand = random_groups(root, prep, cfg, fraction=FRACTION[args.mode])
        scored = score(cand, prep, untrained_reward(root, prep, cfg), object_store.join(root, "scored"), cfg).uri
        local1 = in_process(prep, scored, cfg, 1)
        local_all = in_process(prep, scored, cfg, os.cpu_count() or 1) if args.mode == "full" else None
        one = stage_run(prep, scored, cfg, root, 1)
        two = stage_run(prep, scored, cfg, root, 2)
    result = {
        "in_process_1_thread": local1, "in_process_all_threads": local_all, "ray_1_worker": one, "ray_2_workers": two,
        "ratio_1_worker_vs_in_process_1_thread": one["groups_per_s_steady"] / local1["groups_per_s_steady"],
        "ratio_2_vs_1_worker": two["groups_per_s_steady"] / one["groups_per_s_steady"],
        "compared": "steady-state groups/s (epochs after the first); end-to-end groups/s reported beside",
        "config": {"group.size": cfg.group.size, "batch_size": cfg.train.batch_size, "epochs": cfg.train.epochs,
                   "max_users": cfg.protocol.max_users, "fraction": FRACTION[args.mode]},
        "bench_wall_s": time.perf_counter() - t_start,
    }
    rec.write(result)


if __name__ == "__main__":
    main()
