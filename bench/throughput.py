"""Throughput of the project's code against a bare PyTorch loop over the same model (the
ceiling on this hardware), and the FLOP count behind model FLOP utilisation (MFU).

Training (samples = requests, each with its group of |B| lists): the project's trainer
`trainer.train_generator_group` (numpy -> tensor batches per step, shuffling, masking,
gradient clipping, AdamW with parameter groups) against a bare loop over pre-built tensor
batches: log_prob -> -sum(pi_ref * log_prob) -> backward -> AdamW step, nothing else. Both
start from the same initial weights; steady state = epochs after the first.

Inference (lists/s, greedy): `ranking.rank_positions` (the path `goalrank rank` takes)
against `model.greedy` over pre-built batches under inference_mode.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` counts the matmul/attention FLOPs of one
training step (forward + backward) and of one greedy decode; achieved FLOP/s = FLOPs per
sample x samples/s. MFU = achieved / peak FLOP/s of the device; it needs a GPU and its peak
(`--peak-tflops`), so on a CPU it is reported as not measured.

On a GPU, `--precision fp32,tf32,bf16` times the bare loop at each precision (bf16 =
torch.autocast), each against that precision's dense peak (`--peak-tflops auto` takes it from
NVIDIA's data sheet for the card, bench/gpu_util.py); `--ge` also times bare loops of the
Generator-Evaluator's trained components (the reward model as its evaluator, the supervised
generator as its generator), for the paper's GoalRank-vs-G-E MFU comparison. The set-up fit
(the groups' proposers and reward model) runs on the same device.

    python -m bench.throughput --mode quick|full [--device cuda --peak-tflops 67]
    python -m bench.throughput --mode full --device cuda --precision fp32,tf32,bf16 --peak-tflops auto --ge
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import Recorder, log_to, table
from bench.gpu_util import PRECISIONS, autocast, matmul_precision, models_on, parse_peaks, parse_sets

MODES = {
    "quick": {"dataset": "ml-100k", "max_users": 60, "epochs": 3, "repeats": 3,
              "overrides": {"train.reward_epochs": 1, "train.aux_epochs": 1, "train.epochs": 1, "group.rounds": 1}},
    "full": {"dataset": "ml-100k", "max_users": 0, "epochs": 3, "repeats": 3, "overrides": {}},
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def group_batches(tr, groups, bs: int, dev: torch.device) -> list[tuple]:
    """Pre-built device batches (request batch, (B, G, L) lists with masked slots -1, (B, G) pi_ref)."""
    batches = []
    for i in range(0, len(tr), bs):
        idx = np.arange(i, min(i + bs, len(tr)))
        lists, pi, mask = groups.batch(idx, dev)
        batches.append((tr.batch(idx, dev), torch.where(mask[..., None], lists, torch.full_like(lists, -1)), pi))
    return batches


def group_step_loss(model, b, lists, pi) -> torch.Tensor:
    """GoalRank's group-relative loss, bare: -sum_g pi_ref log pi_theta, mean over requests."""
    return -(pi * model.log_prob(b, lists)).sum(1).mean()


def reward_step_loss(model, b, lists, pi) -> torch.Tensor:
    """The evaluator's loss (G-E): BCE of the reward model on the logged list and the group's
    lists, labelled from the log (as `trainer.reward_loss` with extra lists; no augmentation)."""
    from goalrank_core.trainer import reward_loss

    return reward_loss(model, b, 0, None, lists)


def supervised_step_loss(model, b, lists, pi) -> torch.Tensor:
    """The generator's loss in G-E: list likelihood of the logged positives."""
    from goalrank_core.trainer import supervised_list_loss

    return supervised_list_loss(model, b)


def bare_loop(model, batches: list[tuple], n: int, cfg, epochs: int, dev: torch.device, step_loss=group_step_loss,
              prec: str = "fp32") -> list[float]:
    """The ceiling: pre-built device batches, plain AdamW, `step_loss` at precision `prec`.
    -> samples/s per epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model.train()
    rates = []
    with matmul_precision(prec):
        for _ in range(epochs):
            _sync(dev)
            t0 = time.perf_counter()
            for b, lists, pi in batches:
                with autocast(prec, dev):
                    loss = step_loss(model, b, lists, pi)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            _sync(dev)
            rates.append(n / (time.perf_counter() - t0))
    return rates


def bare_train(model, tr, groups, cfg, epochs: int, dev: torch.device, prec: str = "fp32") -> list[float]:
    """GoalRank's generator, bare loop. -> samples/s per epoch."""
    return bare_loop(model, group_batches(tr, groups, cfg.batch_size, dev), len(tr), cfg, epochs, dev, prec=prec)


def project_train(model, tr, groups, cfg, epochs: int) -> list[float]:
    from goalrank_core.trainer import train_generator_group

    hist = train_generator_group(tr, groups, model, cfg, None, log=lambda m: None, epochs=epochs)
    return [h.samples_per_s for h in hist]


@torch.inference_mode()
def bare_infer(model, data, bs: int, repeats: int, dev: torch.device) -> float:
    model.eval()
    batches = [data.batch(slice(i, i + bs), dev) for i in range(0, len(data), bs)]
    best = float("inf")
    for _ in range(repeats):
        _sync(dev)
        t0 = time.perf_counter()
        for b in batches:
            model.greedy(b)
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return len(data) / best


def project_infer(bundle, data, bs: int, repeats: int) -> float:
    from goalrank_core.ranking import rank_positions

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        rank_positions(bundle, data, "goalrank", batch_size=bs)
        best = min(best, time.perf_counter() - t0)
    return len(data) / best


def count_flops(model, tr, groups, dev: torch.device, n: int = 64) -> dict[str, float]:
    """FLOPs per request of one training step (fwd + bwd) and of one greedy decode."""
    from torch.utils.flop_counter import FlopCounterMode

    idx = np.arange(min(n, len(tr)))
    b = tr.batch(idx, dev)
    lists, pi, mask = groups.batch(idx, dev)
    lists = torch.where(mask[..., None], lists, torch.full_like(lists, -1))
    model.train()
    with FlopCounterMode(display=False) as fc:
        (-(pi * model.log_prob(b, lists)).sum(1).mean()).backward()
    train = fc.get_total_flops() / len(idx)
    model.zero_grad(set_to_none=True)
    # Counted in train mode: in eval mode under no_grad, nn.TransformerEncoderLayer takes a fused
    # fast path that FlopCounterMode does not see (it counts 0). Same matmuls either way.
    with FlopCounterMode(display=False) as fc:
        model.greedy(b)
    model.eval()
    return {"train_flops_per_request": train, "greedy_flops_per_request": fc.get_total_flops() / len(idx)}


def count_step_flops(model, tr, groups, dev: torch.device, step_loss, n: int = 64) -> float:
    """FLOPs per request of one training step (fwd + bwd) of `step_loss`."""
    from torch.utils.flop_counter import FlopCounterMode

    idx = np.arange(min(n, len(tr)))
    lists, pi, mask = groups.batch(idx, dev)
    b, lists = tr.batch(idx, dev), torch.where(mask[..., None], lists, torch.full_like(lists, -1))
    model.train()
    with FlopCounterMode(display=False) as fc:
        step_loss(model, b, lists, pi).backward()
    model.zero_grad(set_to_none=True)
    return fc.get_total_flops() / len(idx)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--peak-tflops", default=None,
                    help="the device's dense peak TFLOP/s at the training precision: a number (one precision), "
                         "`auto` (NVIDIA's data sheet for this card) or fp32=..,tf32=..,bf16=..; MFU needs it")
    ap.add_argument("--precision", default="fp32",
                    help=f"comma-separated training precisions of the bare loop, from {','.join(PRECISIONS)} "
                         "(the first is the headline row; on a CPU tf32 is fp32 and bf16 is CPU autocast)")
    ap.add_argument("--ge", action="store_true",
                    help="also time bare training loops of G-E's components (reward model, supervised generator)")
    ap.add_argument("--extra-batch-sizes", default="",
                    help="comma-separated batch sizes at which the GoalRank bare loop is also timed (each precision)")
    ap.add_argument("--epochs", type=int, help="timed epochs per loop (default: the mode's; the first is warm-up)")
    ap.add_argument("--max-users", type=int, help="users kept from the data set (default: the mode's)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the set-up fit (e.g. train.aux_epochs=1); the timed loops are unaffected")
    ap.add_argument("--results-dir", help="where the JSON goes (default bench/results)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    precs = [p.strip() for p in args.precision.split(",") if p.strip()]
    if any(p not in PRECISIONS for p in precs) or not precs:
        ap.error(f"--precision: each of {precs} must be one of {PRECISIONS}")
    peaks, peak_source = parse_peaks(args.peak_tflops, precs, dev)
    # A GPU run gets its own file, so it never overwrites the CPU reference of the same mode.
    rec = Recorder("throughput" if dev.type == "cpu" else f"throughput_{dev.type}", args.mode)
    mode = dict(MODES[args.mode])
    if args.max_users is not None:
        mode["max_users"] = args.max_users
    if args.epochs is not None:
        mode["epochs"] = max(1, args.epochs)
    sets = parse_sets(args.set)

    from goalrank_core.config import GoalRankConfig
    from goalrank_core.bundle import build_bundle, encode
    from goalrank_core.fit import fit_goalrank, propose_groups
    from goalrank_core.policy_registry import build_auxiliary
    from goalrank_core.protocol import load_splits
    from goalrank_core.ranking import policy_resources
    from goalrank_core.trainer import set_seed

    t_setup = time.perf_counter()
    cfg = GoalRankConfig().override({"protocol.max_users": mode["max_users"], **mode["overrides"], **sets})
    splits = load_splits(mode["dataset"], protocol=cfg.protocol)
    bundle = build_bundle(splits.train, cfg, splits.items)
    tr, va, te = encode(bundle, splits.train), encode(bundle, splits.valid), encode(bundle, splits.test)
    with models_on(dev):  # the set-up fit on the device under test (the trainers follow the model's device)
        fit_goalrank(tr, va, bundle, log_to("throughput fit", not args.verbose))  # groups need fitted proposers
        res = policy_resources(bundle)
        groups, _ = propose_groups(tr, build_auxiliary(res) + [res.extra["supervised"]], bundle.models["supervised"],
                                   bundle.models["reward"], cfg, seed=1)
    for m in bundle.models.values():
        m.to(dev)
    setup_s = time.perf_counter() - t_setup
    print(f"[throughput] set-up (data + fit + groups) {setup_s:.0f}s on {dev}", flush=True)

    def fresh(kind: str = "generator"):
        set_seed(0)
        return bundle.build(kind).to(dev)

    # Epochs (and inference passes) alternate between the two, so background load hits both alike;
    # the best epoch of each is reported (the least disturbed).
    E = mode["epochs"]
    m_ours, m_bare = fresh(), fresh()
    ours, bare = [], []
    for _ in range(E):
        if dev.type == "cpu":  # the in-process trainer is the CPU reference
            ours += project_train(m_ours, tr, groups, cfg.train, 1)
        bare += bare_train(m_bare, tr, groups, cfg.train, 1, dev, precs[0])
    steady = lambda r: float(np.max(r[1:] if len(r) > 1 else r))  # noqa: E731
    model = bundle.models["generator"]
    infer_bs = 1024
    infer_data = te if len(te) >= 256 else tr
    bare_inf, ours_inf = 0.0, None
    for _ in range(mode["repeats"]):
        bare_inf = max(bare_inf, bare_infer(model, infer_data, infer_bs, 1, dev))
        if dev.type == "cpu":
            ours_inf = max(ours_inf or 0.0, project_infer(bundle, infer_data, infer_bs, 1))
    flops = count_flops(fresh(), tr, groups, dev)

    def mfu_of(flop_per_sample: float, rate: float, prec: str) -> float | None:
        peak = peaks.get(prec)
        return flop_per_sample * rate / (peak * 1e12) if peak and dev.type == "cuda" else None

    achieved_train = flops["train_flops_per_request"] * steady(bare)
    mfu = mfu_of(flops["train_flops_per_request"], steady(bare), precs[0])
    # Further precisions and G-E's components: bare loops only, each from fresh weights.
    by_prec = {precs[0]: {"epochs": bare, "samples_per_s": steady(bare), "achieved_gflops": achieved_train / 1e9,
                          "peak_tflops": peaks.get(precs[0]), "mfu": mfu}}
    batches = group_batches(tr, groups, cfg.train.batch_size, dev)
    for p in precs[1:]:
        rates = bare_loop(fresh(), batches, len(tr), cfg.train, E, dev, prec=p)
        by_prec[p] = {"epochs": rates, "samples_per_s": steady(rates),
                      "achieved_gflops": flops["train_flops_per_request"] * steady(rates) / 1e9,
                      "peak_tflops": peaks.get(p), "mfu": mfu_of(flops["train_flops_per_request"], steady(rates), p)}
    by_batch = {}  # GoalRank generator at other batch sizes: how far MFU is a batch-size (launch-bound) effect
    for bs in [int(x) for x in args.extra_batch_sizes.split(",") if x.strip()]:
        bb = group_batches(tr, groups, bs, dev)
        for p in precs:
            rates = bare_loop(fresh(), bb, len(tr), cfg.train, E, dev, prec=p)
            by_batch[f"{bs}/{p}"] = {"batch_size": bs, "precision": p, "epochs": rates, "samples_per_s": steady(rates),
                                     "achieved_gflops": flops["train_flops_per_request"] * steady(rates) / 1e9,
                                     "mfu": mfu_of(flops["train_flops_per_request"], steady(rates), p)}
        del bb
    ge = {}
    if args.ge:
        for comp, kind, loss_fn in (("reward model (G-E evaluator)", "reward", reward_step_loss),
                                    ("supervised generator (G-E generator)", "generator", supervised_step_loss)):
            f = count_step_flops(fresh(kind), tr, groups, dev, loss_fn)
            ge[comp] = {"params": sum(q.numel() for q in fresh(kind).parameters()), "flops_per_request": f, "by_precision": {}}
            for p in precs:
                rates = bare_loop(fresh(kind), batches, len(tr), cfg.train, E, dev, loss_fn, p)
                ge[comp]["by_precision"][p] = {"epochs": rates, "samples_per_s": steady(rates),
                                               "achieved_gflops": f * steady(rates) / 1e9, "mfu": mfu_of(f, steady(rates), p)}
    r = {"train_samples_per_s": {"project": steady(ours) if ours else None, "bare": steady(bare),
                                 "project_epochs": ours, "bare_epochs": bare},
         "infer_lists_per_s": {"project": ours_inf, "bare": bare_inf, "batch": infer_bs},
         "flops": flops, "achieved_train_gflops": achieved_train / 1e9,
         "achieved_infer_gflops": flops["greedy_flops_per_request"] * bare_inf / 1e9, "mfu": mfu,
         "by_precision": by_prec, "by_batch_size": by_batch, "ge_components": ge, "setup_s": setup_s}
    ratio_t = (r["train_samples_per_s"]["project"] / r["train_samples_per_s"]["bare"]) if ours else None
    ratio_i = (ours_inf / bare_inf) if ours_inf else None

    def fmt(x, spec=".0f"):
        return "-" if x is None else format(x, spec)

    def fmt_mfu(x):
        return ("not measured (no GPU)" if dev.type == "cpu" else "not measured (no peak given)") if x is None else f"{x:.2%}"

    rows = [["generator training (requests with |B| lists /s)", fmt(r["train_samples_per_s"]["project"]),
             fmt(r["train_samples_per_s"]["bare"]), fmt(ratio_t, ".2f")],
            [f"greedy inference (lists/s, batch {infer_bs})", fmt(ours_inf), fmt(bare_inf), fmt(ratio_i, ".2f")]]
    flop_rows = [[f"GoalRank generator training step, per request (fwd + bwd), batch {cfg.train.batch_size}, {p}",
                  f"{flops['train_flops_per_request'] / 1e6:.1f}", f"{v['achieved_gflops']:.2f}", fmt_mfu(v["mfu"])]
                 for p, v in by_prec.items()]
    flop_rows += [[f"GoalRank generator training step, batch {v['batch_size']}, {v['precision']}",
                   f"{flops['train_flops_per_request'] / 1e6:.1f}", f"{v['achieved_gflops']:.2f}", fmt_mfu(v["mfu"])]
                  for v in by_batch.values()]
    flop_rows += [[f"{comp} training step, per request, {p}", f"{v['flops_per_request'] / 1e6:.1f}",
                   f"{q['achieved_gflops']:.2f}", fmt_mfu(q["mfu"])]
                  for comp, v in ge.items() for p, q in v["by_precision"].items()]
    flop_rows += [["greedy decode, per request", f"{flops['greedy_flops_per_request'] / 1e6:.1f}",
                   f"{r['achieved_infer_gflops']:.2f}", "-"]]
    notes = []
    if mfu is None:
        notes.append("MFU not measured: this run had no GPU. On a GPU run `python -m bench.throughput --mode full "
                     "--device cuda --precision fp32,tf32,bf16 --peak-tflops auto --ge`." if dev.type == "cpu" else
                     "MFU not measured: no peak FLOP/s for this device (pass --peak-tflops).")
    if sets:
        notes.append(f"set-up fit overrides (the timed loops do not depend on them): {sets}")
    result = {
        "config": {"dataset": mode["dataset"], "max_users": mode["max_users"], "device": str(dev), "epochs": E,
                   "batch_size": cfg.train.batch_size, "group.size": cfg.group.size, "threads": torch.get_num_threads(),
                   "generator_params": model.num_parameters(), "peak_tflops": peaks, "peak_source": peak_source,
                   "precisions": precs, "setup_overrides": sets, "train_requests": len(tr)},
        "tables": [table(f"Throughput on {dev.type.upper()}: the project's code against a bare PyTorch loop (same model)",
                         ["what", "project", "bare PyTorch", "project / bare"], rows,
                         f"Training: best of epochs 2..{E}, the two loops' epochs alternating; inference: best of {mode['repeats']} "
                         "alternating passes. Samples are training requests, each with its whole group."
                         + ("" if dev.type == "cpu" else f" On {dev.type}: bare loop only, at {precs[0]}.")),
                   table("FLOPs and utilisation (torch.utils.flop_counter)",
                         ["what", "MFLOP", "achieved GFLOP/s (bare loop)", "MFU"], flop_rows,
                         "MFU = achieved FLOP/s / the device's dense peak FLOP/s at that precision "
                         f"({peak_source}: {peaks or '-'} TFLOP/s); counted FLOPs are matmuls and attention "
                         "(elementwise ops, softmax and the optimiser are not counted, as is usual for MFU). bf16 = "
                         "torch.autocast. The paper reports 12.65% for GoalRank against 2.03% for Generator-Evaluator on a GPU.")],
        "notes": notes,
        "data": r,
    }
    rec.write(result, args.results_dir)
    return result


if __name__ == "__main__":
    main()
