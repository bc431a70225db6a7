"""Serving latency: GoalRank greedy decoding against the Generator-Evaluator pipeline built
from the same fitted components (the auxiliary policies and the supervised generator propose,
the reward model picks), in the same process and the same run, calls interleaved so that any
background load hits both alike.

Per-request latency at batch 1 is one `propose` call for one request. At batch 256 every
request of a batch waits for the whole batch, so its latency is the batch's time; the
amortised time per request (batch time / 256) is reported beside it. Encoding the Parquet
rows into tensors is shared by both pipelines and left out. A per-component breakdown (the
generator's encoder and its L cached decode steps; each G-E proposer and the reward model;
each pipeline's whole `propose`, so the glue between the parts shows) explains the ratio.

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
# reps: calls per component in the breakdown (batch 1, large batch); its fastest call counts.
MODES = {
    "quick": {"dataset": "ml-100k", "max_users": 60, "single": 150, "batched": 8, "warmup": 10, "reps": (30, 3),
              "overrides": {"train.reward_epochs": 1, "train.aux_epochs": 1, "train.epochs": 1, "group.rounds": 1}},
    "full": {"dataset": "ml-100k", "max_users": 0, "single": 1000, "batched": 60, "warmup": 30, "reps": (100, 10),
             "overrides": {}},
}


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def pipelines(bundle) -> dict:
    from goalrank_core.ranking import policy_resources

    for model in bundle.models.values():  # as a serving process holds them (ModelBundle.load does the same)
        model.eval()
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
    """Fastest ms (of `reps`; the least disturbed by background load) per component for one
    batch: the generator's encoder and its decode steps (timed apart, on one cached encoding),
    each G-E proposer, the reward model scoring the proposals, and each pipeline's whole
    `propose` (what the parts leave out is glue: mode switches, copies, sorting)."""
    from goalrank_core.policies import propose_all

    pipes = pipelines(bundle)
    model = pipes["goalrank"].model.eval()
    ge = pipes["g-e"]
    L = int(bundle.dims.slate_len)
    b = data.batch(np.arange(batch_size) % len(data))
    gen = torch.Generator().manual_seed(0)
    parts: dict[str, list[float]] = {}

    def add(name: str, dt: float) -> None:
        parts.setdefault(name, []).append(dt * 1e3)

    for _ in range(reps):
        add("goalrank: propose (all)", _timed(pipes["goalrank"].propose, b, 1, gen))
        add("goalrank: encoder", _timed(model.encode, b))
        enc = model.encode(b)
        add(f"goalrank: {L} decode steps (cached)", _timed(model.decode, enc, 1, True))
        b = data.batch(np.arange(batch_size) % len(data))  # fresh tensors: no score cache hit from the last rep
        add("g-e: propose (all)", _timed(ge.propose, b, 1, gen))
        b = data.batch(np.arange(batch_size) % len(data))
        for p in ge.generators:  # in G-E's order: the DNN's scores are computed once and shared, as in G-E
            add(f"g-e: {p.name} x{p.lists_per_request}", _timed(p.propose, b, p.lists_per_request, gen))
        lists, _ = propose_all(ge.generators, b, gen)
        add(f"g-e: reward model on {lists.shape[1]} lists", _timed(ge.reward_model.score, b, lists))
    return {k: float(np.min(v)) for k, v in parts.items()}


def fit_bundle(mode: dict, verbose: bool):
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.bundle import encode
    from goalrank_core.fit import fit_tables
    from goalrank_core.protocol import load_splits

    cfg = GoalRankConfig().override({"protocol.max_users": mode["max_users"], **mode["overrides"]})
    splits = load_splits(mode["dataset"], protocol=cfg.protocol)
    cfg = cfg.for_source(splits.source)
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
    phases: dict[str, float] = {}
    t0 = time.perf_counter()
    bundle, data = fit_bundle(mode, args.verbose)
    phases["fit"], t0 = time.perf_counter() - t0, time.perf_counter()
    t1 = measure(bundle, data, 1, mode["single"], mode["warmup"])
    phases["batch_1"], t0 = time.perf_counter() - t0, time.perf_counter()
    tb = measure(bundle, data, args.batch, mode["batched"], max(2, mode["warmup"] // 5))
    phases[f"batch_{args.batch}"], t0 = time.perf_counter() - t0, time.perf_counter()
    s = summarise(t1, tb, args.batch)
    reps1, repsb = mode["reps"]
    parts1 = breakdown(bundle, data, 1, reps1)
    partsb = breakdown(bundle, data, args.batch, repsb)
    phases["breakdown"] = time.perf_counter() - t0
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
    L = int(bundle.dims.slate_len)
    enc1, dec1 = parts1["goalrank: encoder"], parts1[f"goalrank: {L} decode steps (cached)"]
    sup = next((v for k, v in parts1.items() if k.startswith("g-e: supervised")), float("nan"))
    rest = sum(v for k, v in parts1.items() if k.startswith("g-e: ") and "supervised" not in k and "(all)" not in k)
    notes = [
        f"G-E proposers: {', '.join(ge_names)} (the same fitted components as GoalRank's groups), then the reward model "
        f"scores every proposal and keeps the best.",
        f"Why the ratio is what it is (batch 1, fastest calls): GoalRank = encoder {enc1:.2f} ms + {L} decode steps "
        f"{dec1:.2f} ms (incremental: each step runs the decoder on its one new token against a key/value cache) = "
        f"{enc1 + dec1:.2f} ms; its whole propose {parts1['goalrank: propose (all)']:.2f} ms. G-E runs a generator of the "
        f"same architecture and decoding (the supervised one, {sup:.2f} ms) plus the other proposers and the reward model "
        f"({rest:.2f} ms together); its whole propose {parts1['g-e: propose (all)']:.2f} ms. So the ratio is about "
        f"generator / (generator + rest), below 0.4 once the rest costs more than 1.5x the generator. At batch 1 "
        f"nearly all of it is per-operator overhead on tiny tensors, which is why background load inflates it.",
        "Setup and timing phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()) + ".",
    ]
    result = {
        "config": {"dataset": mode["dataset"], "max_users": mode["max_users"], "batch": args.batch,
                   "calls_batch_1": mode["single"], "calls_batched": mode["batched"], "torch_threads": torch.get_num_threads(),
                   "generator": bundle.config.generator.__dict__, "n_candidates": bundle.dims.n_candidates,
                   "slate_len": bundle.dims.slate_len, "breakdown_reps": [reps1, repsb]},
        "tables": [
            table("Latency per request (ms): GoalRank greedy vs Generator-Evaluator, same process, interleaved",
                  ["batch", "pipeline", "p50 ms", "p99 ms", "amortised ms / request", "calls"], rows,
                  f"Paper: GoalRank {PAPER['goalrank_ms']} ms, G-E {PAPER['g-e_ms']} ms (ratio {PAPER['ratio']})."),
            table("Latency ratio GoalRank / G-E (goal <= 0.4)", ["batch", "ratio p50", "ratio p99", "paper", "goal", ""],
                  ratio_rows),
            table(f"Where the time goes (fastest of {reps1} calls at batch 1, of {repsb} at batch {args.batch}; ms)",
                  ["component", "batch 1", f"batch {args.batch}"], comp_rows),
        ],
        "notes": notes,
        "data": {"summary": s, "breakdown_batch_1": parts1, f"breakdown_batch_{args.batch}": partsb, "phases_s": phases},
    }
    rec.write(result)
    return result


if __name__ == "__main__":
    main()
