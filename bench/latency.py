"""Serving latency: GoalRank greedy decoding against the Generator-Evaluator pipeline built
from the same fitted components (the auxiliary policies and the supervised generator propose,
the reward model picks), in the same process and the same run, calls interleaved so that any
background load hits both alike.

Per-request latency at batch 1 is one `propose` call for one request. At batch 256 every
request of a batch waits for the whole batch, so its latency is the batch's time; the
amortised time per request (batch time / 256) is reported beside it. Encoding the Parquet
rows into tensors is shared by both pipelines and left out. A per-component breakdown (the
generator's encoder and decode steps; each G-E proposer and the reward model) explains the
ratio.

    python -m bench.latency --mode quick|full
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import Recorder, log_to, percentiles, table

PAPER = {"goalrank_ms": 18.6, "g-e_ms": 34.2, "ratio": 0.54}
GOAL_RATIO = 0.4
MODES = {
    "quick": {"dataset": "ml-100k", "max_users": 60, "single": 150, "batched": 8, "warmup": 10,
              "overrides": {"train.reward_epochs": 1, "train.aux_epochs": 1, "train.epochs": 1, "group.rounds": 1}},
    "full": {"dataset": "ml-100k", "max_users": 0, "single": 1000, "batched": 60, "warmup": 30, "overrides": {}},
}


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def pipelines(bundle) -> dict:
    from goalrank_core.ranking import policy_resources

    res = policy_resources(bundle)
    return {"goalrank": res.extra["goalrank"], "g-e": res.extra["g-e"]}


@torch.no_grad()  # not inference_mode: baselines.model_scores reads tensor version counters
def measure(bundle, data, batch_size: int, n_calls: int, warmup: int, seed: int = 0) -> dict:
    """Interleaved timings of both pipelines on batches of `batch_size` requests cycled from
    `data` (EncodedRequests). -> {name: [seconds per call]}."""
    pipes = pipelines(bundle)
    gen = torch.Generator().manual_seed(seed)
    n = len(data)
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for i in range(warmup + n_calls):
        b = data.batch(np.arange(i * batch_size, (i + 1) * batch_size) % n)  # new tensors: no cached scores reused
        order = list(pipes) if i % 2 == 0 else list(pipes)[::-1]
        for name in order:
            dt = _timed(pipes[name].propose, b, 1, gen)
            if i >= warmup:
                times[name].append(dt)
    return times


@torch.no_grad()  # not inference_mode: baselines.model_scores reads tensor version counters
def breakdown(bundle, data, batch_size: int, reps: int) -> dict[str, float]:
    """Fastest ms (of `reps`; the least disturbed by background load) per component for one batch: generator encoder, generator decode (greedy minus
    encoder), each G-E proposer and the reward model scoring the proposals."""
    from goalrank_core.policies import propose_all

    pipes = pipelines(bundle)
    model = pipes["goalrank"].model.eval()
    ge = pipes["g-e"]
    b = data.batch(np.arange(batch_size) % len(data))
    gen = torch.Generator().manual_seed(0)
    parts: dict[str, list[float]] = {}

    def add(name: str, dt: float) -> None:
        parts.setdefault(name, []).append(dt * 1e3)

    for _ in range(reps):
        add("goalrank: encoder", _timed(model.encode, b))
        add("goalrank: greedy (encoder + decode steps)", _timed(model.greedy, b))
        b = data.batch(np.arange(batch_size) % len(data))  # fresh tensors: no score cache hit from the last rep
        for p in ge.generators:  # in G-E's order: the DNN's scores are computed once and shared, as in G-E
            add(f"g-e: {p.name} x{p.lists_per_request}", _timed(p.propose, b, p.lists_per_request, gen))
        lists, _ = propose_all(ge.generators, b, gen)
        add(f"g-e: reward model on {lists.shape[1]} lists", _timed(ge.reward_model.score, b, lists))
    out = {k: float(np.min(v)) for k, v in parts.items()}
    # Decode steps = fastest greedy - fastest encoder (each call timed whole, so the parts add up).
    out["goalrank: decode steps"] = out.pop("goalrank: greedy (encoder + decode steps)") - out["goalrank: encoder"]
    return out


def fit_bundle(mode: dict, verbose: bool):
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.fit import encode, fit_tables
    from goalrank_core.protocol import load_splits

    cfg = GoalRankConfig().override({"protocol.max_users": mode["max_users"], **mode["overrides"]})
    splits = load_splits(mode["dataset"], protocol=cfg.protocol)
    bundle = fit_tables(splits.train, splits.valid, cfg, splits.items, log=log_to("latency fit", not verbose))
    return bundle, encode(bundle, splits.test)


def summarise(t1: dict, t256: dict, batch: int) -> dict:
    out = {}
    for tag, times, bs in (("batch_1", t1, 1), (f"batch_{batch}", t256, batch)):
        s = {name: percentiles(v) for name, v in times.items()}
        for v in s.values():
            v["amortised_ms_per_request"] = v["mean_ms"] / bs
        s["ratio_p50"] = s["goalrank"]["p50_ms"] / s["g-e"]["p50_ms"]
        s["ratio_p99"] = s["goalrank"]["p99_ms"] / s["g-e"]["p99_ms"]
        out[tag] = s
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--max-users", type=int, help="users kept from the data set (default: the mode's)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    rec = Recorder("latency", args.mode)
    mode = dict(MODES[args.mode])
    if args.max_users is not None:
        mode["max_users"] = args.max_users
    bundle, data = fit_bundle(mode, args.verbose)
    t1 = measure(bundle, data, 1, mode["single"], mode["warmup"])
    tb = measure(bundle, data, args.batch, mode["batched"], max(2, mode["warmup"] // 5))
    s = summarise(t1, tb, args.batch)
    parts1 = breakdown(bundle, data, 1, 30)
    partsb = breakdown(bundle, data, args.batch, 5)
    ge_names = [p.name for p in pipelines(bundle)["g-e"].generators]
    rows = []
    for tag, bs in (("batch_1", 1), (f"batch_{args.batch}", args.batch)):
        for name in ("goalrank", "g-e"):
            v = s[tag][name]
            rows.append([bs, name, f"{v['p50_ms']:.2f}", f"{v['p99_ms']:.2f}", f"{v['amortised_ms_per_request']:.3f}", v["n"]])
    ratio_rows = [[bs, f"{s[tag]['ratio_p50']:.3f}", f"{s[tag]['ratio_p99']:.3f}", PAPER["ratio"], GOAL_RATIO,
                   "met" if s[tag]["ratio_p50"] <= GOAL_RATIO else "missed"]
                  for tag, bs in (("batch_1", 1), (f"batch_{args.batch}", args.batch))]
    comp_rows = [[k, f"{parts1[k]:.3f}", f"{partsb.get(k, float('nan')):.2f}"] for k in parts1]
    gen_share = (parts1["goalrank: encoder"] + parts1["goalrank: decode steps"])
    sup = next((v for k, v in parts1.items() if k.startswith("g-e: supervised")), float("nan"))
    notes = [
        f"G-E proposers: {', '.join(ge_names)} (the same fitted components as GoalRank's groups), then the reward model "
        f"scores every proposal and keeps the best.",
        f"Why the ratio is what it is (batch 1, fastest calls): GoalRank = encoder {parts1['goalrank: encoder']:.2f} ms + "
        f"{int(bundle.dims.slate_len)} decode steps {parts1['goalrank: decode steps']:.2f} ms = {gen_share:.2f} ms. "
        f"G-E runs a generator of the same architecture (the supervised one, {sup:.2f} ms) plus every other proposer "
        f"and the reward model, so the ratio is about GoalRank / (generator + the rest); it can only fall below 0.4 if "
        f"the rest costs more than 1.5x the generator. At batch 1 the cost is mostly per-operator overhead (tiny "
        f"tensors), so the decode loop's {int(bundle.dims.slate_len)} steps, each a decoder pass over the whole prefix "
        f"(no key/value cache), dominate GoalRank's time.",
    ]
    result = {
        "config": {"dataset": mode["dataset"], "max_users": mode["max_users"], "batch": args.batch,
                   "calls_batch_1": mode["single"], "calls_batched": mode["batched"], "torch_threads": torch.get_num_threads(),
                   "generator": bundle.config.generator.__dict__, "n_candidates": bundle.dims.n_candidates,
                   "slate_len": bundle.dims.slate_len},
        "tables": [
            table("Latency per request (ms): GoalRank greedy vs Generator-Evaluator, same process, interleaved",
                  ["batch", "pipeline", "p50 ms", "p99 ms", "amortised ms / request", "calls"], rows,
                  f"Paper: GoalRank {PAPER['goalrank_ms']} ms, G-E {PAPER['g-e_ms']} ms (ratio {PAPER['ratio']})."),
            table("Latency ratio GoalRank / G-E (goal <= 0.4)", ["batch", "ratio p50", "ratio p99", "paper", "goal", ""],
                  ratio_rows),
            table("Where the time goes (fastest of 30 calls at batch 1, of 5 at the larger batch; ms)", ["component", "batch 1", f"batch {args.batch}"], comp_rows),
        ],
        "notes": notes,
        "data": {"summary": s, "breakdown_batch_1": parts1, f"breakdown_batch_{args.batch}": partsb},
    }
    rec.write(result)
    return result


if __name__ == "__main__":
    main()
