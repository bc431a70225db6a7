"""Where does GoalRank lose list value: in the reward model, or in the group-relative loop? (issue 16)

On one simulator world (`bench.simulator`'s data, split and scoring), GoalRank is fitted under
each variant below twice: with the trained reward model (what a user gets) and with the
world's exact list value in its place (`goalrank_core.simulator.TrueReward`: a perfect reward
model). With the true value, pi_ref is right on every training group, so what GoalRank then
misses is the loop's own loss: how sharply pi_ref concentrates (`group.tau`), how long and how
often the generator trains on its groups (`train.epochs`, `group.rounds`), whether any list in
the group is better than the proposers' (`group.search_lists`; the last variant also gives the
trained reward model the exposure prior it needs for the search to help), and how far a generator fitted
to a few thousand requests generalises. G-E with the true value is a perfect evaluator's pick
among the proposers.

    python -m bench.loop_ceiling [--mode quick|full] [--effect saturation] [--seed 0]
"""
from __future__ import annotations

import argparse
import time

from bench.common import Recorder, log_to, table

VARIANTS = [
    ("defaults", {}),
    ("tau 0.1", {"group.tau": 0.1}),
    ("tau 0.1, 4 epochs x 2 rounds", {"group.tau": 0.1, "train.epochs": 4, "group.rounds": 2}),
    ("tau 0.1, 4 epochs x 2 rounds, search lists", {"group.tau": 0.1, "train.epochs": 4, "group.rounds": 2,
                                                    "group.search_lists": True}),
    ("search lists, shown-exposure prior", {"group.search_lists": True, "reward.exposure_prior": True,
                                            "reward.exposure_target": "shown"}),
]
SHOWN = ("goalrank", "g-e", "true-relevance sort", "popularity", "mmr", "supervised")


def main(argv: list[str] | None = None) -> dict:
    from bench.simulator import run_seed

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=("quick", "full"), default="quick")
    ap.add_argument("--effect", default="saturation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print the fits' log lines")
    args = ap.parse_args(argv)
    rec = Recorder("loop_ceiling", args.mode, tag=args.effect)
    t0 = time.perf_counter()
    rows, data = [], {}
    for name, over in VARIANTS:
        for reward in ("trained", "true"):
            t1 = time.perf_counter()
            res = run_seed(args.effect, args.seed, args.mode, log_to(f"ceiling {name} {reward}", quiet=not args.verbose),
                           over, true_reward=reward == "true")
            seconds = time.perf_counter() - t1
            vals = {p: res[p]["normalised"] for p in SHOWN if p in res}
            best_aux = max((v for p, v in vals.items() if p not in ("goalrank", "g-e")), default=float("nan"))
            data[f"{name} / {reward}"] = {"overrides": over, "reward": reward, "normalised": vals,
                                          "seconds": round(seconds, 1)}
            rows.append([name, reward, f"{vals['goalrank']:.3f}", f"{vals['g-e']:.3f}",
                         f"{vals['goalrank'] - best_aux:+.3f}", f"{seconds:.0f}"])
            print(f"[loop_ceiling] {name} / {reward}: goalrank {vals['goalrank']:.3f}, g-e {vals['g-e']:.3f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    ref = data["defaults / trained"]["normalised"]
    result = {
        "config": {"effect": args.effect, "seed": args.seed, "variants": dict(VARIANTS)},
        "tables": [table(f"GoalRank's true value with the trained reward model and with the true one ({args.effect}, "
                         f"seed {args.seed}, {args.mode} volume)",
                         ["loop", "reward model", "GoalRank", "G-E", "GoalRank minus best other policy", "s"], rows,
                         "Normalised true value of the test requests' lists (random 0, best list found 1). 'true' "
                         "replaces the trained reward model by the world's exact list value (pi_ref and G-E's pick "
                         "are then right). Policies that do not use the reward model score the same in every row: "
                         + ", ".join(f"{p} {ref[p]:.3f}" for p in SHOWN if p not in ("goalrank", "g-e") and p in ref)
                         + ". One seed: differences under about 0.03 are within a per-request bootstrap interval "
                           "(bench.simulator).")],
        "data": data,
    }
    rec.write(result)
    return result


if __name__ == "__main__":
    main()
