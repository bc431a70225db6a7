"""Scaling (the paper's Figure 3): the metric against generator parameters, for GoalRank's
single generator and for a mixture of k small generators plus an evaluator with the same
total generator parameters.

- GoalRank at size P: the supervised generator of size P (list likelihood on logged
  positives) is trained first, as `fit_policies` does, and `fit.fit_goalrank` then warm-starts
  the GoalRank generator from it and runs the group-relative rounds.
- Mixture at size P: k supervised generators of about P / k parameters each (same depth,
  narrower; seeds 0..k-1); each proposes its greedy list and the reward model picks the best
  (baselines.GeneratorEvaluator). The evaluator is the same reward model GoalRank trains
  against, so it is left out of both parameter counts.
The reward model and the heuristic policies are fitted once and shared by every size.

    python -m bench.scaling --mode quick|full
    python -m bench.scaling --mode full --device cuda --tf32 --sizes 64x2x4,256x4x8,512x6x8,1152x8x16 \
        --set train.aux_epochs=1 --set train.epochs=1 --results-dir DIR     (up to ~108M parameters)

With `--device cuda` every model is built and trained on the GPU (bench/gpu_util.models_on)
and the result goes to scaling_cuda_{mode}.json; the JSON is rewritten after every size, so
a run cut short keeps the sizes it finished.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

from bench.common import Recorder, evaluate, log_to, rank_with_policy, table
from bench.gpu_util import matmul_precision, models_on, parse_sets

# (d_model, n_layers, n_heads) per size; parameters depend on the data's vocabulary too.
MODES = {
    "quick": {"sizes": [(8, 1, 2), (32, 1, 2), (96, 2, 4), (192, 2, 4)], "k": 4, "dataset": "ml-100k",
              "max_users": 60, "overrides": {"train.reward_epochs": 2, "train.aux_epochs": 1, "train.epochs": 1,
                                              "group.rounds": 1}},
    "full": {"sizes": [(16, 1, 2), (32, 1, 2), (64, 2, 4), (128, 2, 4), (256, 4, 8), (384, 4, 8), (512, 6, 8)],
             "k": 4, "dataset": "ml-100k", "max_users": 0, "overrides": {}},
}


def gen_config(cfg, d: int, layers: int, heads: int):
    return cfg.override({"generator.d_model": d, "generator.n_layers": layers, "generator.n_heads": heads})


def matched_width(bundle, layers: int, target: int) -> tuple[int, int, int]:
    """The (d_model, n_layers, n_heads) of the same depth whose generator is closest to
    `target` parameters (d from 4 up, in steps of 2)."""
    import torch

    from goalrank_core.bundle import MODEL_KINDS

    best = None
    for d in range(4, 2049, 2):
        heads = 4 if d % 4 == 0 and d >= 32 else 2
        with torch.device("meta"):  # shapes only: no memory, no init
            n = sum(p.numel() for p in MODEL_KINDS["generator"](gen_config(bundle.config, d, layers, heads), bundle.dims).parameters())
        if best is None or abs(n - target) < abs(best[0] - target):
            best = (n, d, heads)
        if n > target:
            break
    return best[1], layers, best[2]


def train_supervised(bundle, tr, va, seed: int, verbose: bool, tag: str):
    from goalrank_core.trainer import set_seed, train_generator_supervised

    set_seed(seed)
    model = bundle.build("generator")
    train_generator_supervised(tr, va, model, bundle.config.train, log_to(tag, not verbose))
    return model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--max-users", type=int)
    ap.add_argument("--k", type=int, help="generators in the mixture (default 4)")
    ap.add_argument("--sizes", help="comma-separated DxLAYERSxHEADS, e.g. 16x1x2,64x2x4 (default: the mode's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where every model is built and trained")
    ap.add_argument("--tf32", action="store_true", help="TF32 tensor-core matmuls (GPU; fp32 otherwise)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override on top of the mode's (e.g. train.aux_epochs=1)")
    ap.add_argument("--results-dir", help="where the JSON goes (default bench/results)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    import torch

    dev = torch.device(args.device)
    with models_on(dev), matmul_precision("tf32" if args.tf32 else "fp32"):
        return run(args, dev)


def run(args, dev) -> dict:
    import torch

    rec = Recorder("scaling" if dev.type == "cpu" else f"scaling_{dev.type}", args.mode)
    mode = MODES[args.mode]
    if args.set:
        mode = {**mode, "overrides": {**mode["overrides"], **parse_sets(args.set)}}
    k = args.k or mode["k"]
    if args.sizes:
        mode = {**mode, "sizes": [tuple(int(v) for v in x.split("x")) for x in args.sizes.split(",")]}
    max_users = mode["max_users"] if args.max_users is None else args.max_users

    from goalrank_core.baselines import GeneratorEvaluator
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.policies import GeneratorPolicy
    from goalrank_core.bundle import build_bundle, encode
    from goalrank_core.fit import fit_goalrank
    from goalrank_core.protocol import load_splits
    from goalrank_core.ranking import rank

    cfg = GoalRankConfig().override({"protocol.max_users": max_users, **mode["overrides"]})
    splits = load_splits(mode["dataset"], protocol=cfg.protocol)
    cfg = cfg.for_source(splits.source)
    test = splits.test
    base = None
    points = []
    for d, layers, heads in mode["sizes"]:
        t0 = time.perf_counter()
        cfg_s = gen_config(cfg, d, layers, heads)
        if base is None:  # first size: reward model, heuristics, DNN, PRM and supervised generator
            bundle = build_bundle(splits.train, cfg_s, splits.items)
            tr, va = encode(bundle, splits.train), encode(bundle, splits.valid)
            fit_goalrank(tr, va, bundle, log_to(f"d={d}", not args.verbose))
            base = bundle
        else:
            bundle = dataclasses.replace(base, config=cfg_s, tensors=dict(base.tensors),
                                         models={n: m for n, m in base.models.items() if n not in ("generator", "supervised")},
                                         kinds={n: m for n, m in base.kinds.items() if n not in ("generator", "supervised")})
            bundle.add("supervised", "generator", train_supervised(bundle, tr, va, cfg.train.seed, args.verbose, f"sup d={d}"))
            fit_goalrank(tr, va, bundle, log_to(f"d={d}", not args.verbose))
        fit_s = time.perf_counter() - t0
        params = bundle.models["generator"].num_parameters()
        point = {"d_model": d, "n_layers": layers, "params": params, "fit_s": fit_s}
        for name in ("goalrank", "supervised", "g-e"):
            point[name] = evaluate(rank(bundle, test, name), test)
        # Mixture of k narrower supervised generators with the same total parameters.
        t1 = time.perf_counter()
        md, ml, mh = matched_width(bundle, layers, params // k)
        small_cfg = gen_config(cfg, md, ml, mh)
        small = dataclasses.replace(bundle, config=small_cfg)
        gens = [train_supervised(small, tr, va, cfg.train.seed + i, args.verbose, f"mix{i} d={md}") for i in range(k)]
        mix = GeneratorEvaluator([GeneratorPolicy(g, f"gen{i}") for i, g in enumerate(gens)], bundle.models["reward"],
                                 name=f"mixture-{k}")
        point["mixture"] = evaluate(rank_with_policy(bundle, mix, test, device=dev), test)
        point["mixture_params"] = sum(g.num_parameters() for g in gens)
        point["mixture_d_model"] = md
        point["mixture_fit_s"] = time.perf_counter() - t1
        points.append(point)
        print(f"[scaling] {params:,} params: GoalRank ndcg@6 {point['goalrank']['ndcg@6']:.4f}, mixture of {k} "
              f"({point['mixture_params']:,}) {point['mixture']['ndcg@6']:.4f} ({fit_s:.0f}s + {point['mixture_fit_s']:.0f}s)",
              flush=True)
        write(rec, points, mode, max_users, k, dev, args)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return write(rec, points, mode, max_users, k, dev, args)


def write(rec, points: list[dict], mode: dict, max_users: int, k: int, dev, args) -> dict:
    """The result so far (every finished size) -> the JSON."""
    span = points[-1]["params"] / points[0]["params"]
    rows = [[f"{p['params']:,}", f"d={p['d_model']}, {p['n_layers']} layer(s)", f"{p['goalrank']['hr@6']:.4f}",
             f"{p['goalrank']['ndcg@6']:.4f}", f"{p['supervised']['ndcg@6']:.4f}", f"{p['g-e']['ndcg@6']:.4f}",
             f"{p['mixture_params']:,} (d={p['mixture_d_model']})", f"{p['mixture']['ndcg@6']:.4f}",
             f"{p['fit_s'] + p['mixture_fit_s']:.0f}"] for p in points]
    result = {
        "config": {"dataset": mode["dataset"], "max_users": max_users, "sizes": mode["sizes"], "k": k,
                   "overrides": mode["overrides"], "span_orders_of_magnitude": span, "device": str(dev),
                   "matmul_precision": "tf32" if args.tf32 else "fp32", "sizes_done": len(points)},
        "tables": [table(f"Scaling: NDCG@6 against generator parameters ({mode['dataset']}, "
                         f"{'all' if not max_users else max_users} users; sizes span {span:.0f}x)",
                         ["generator params", "shape", "GoalRank HR@6", "GoalRank NDCG@6", "supervised gen. NDCG@6",
                          "G-E (aux + supervised) NDCG@6", f"mixture of {k}: params", f"mixture of {k} + evaluator NDCG@6",
                          "s"], rows,
                         "Parameters count every generator weight (embeddings included).")],
        "data": {"points": points},
    }
    rec.write(result, args.results_dir)
    return result


if __name__ == "__main__":
    main()
