"""How much can group-relative training add over its supervised start here? The headroom check.

One in-process fit (`fit.fit_policies`, `fit.train_reward`, round-1 groups from
`fit.propose_groups`), then the generator is trained twice from the supervised generator's
weights on the very same groups:
- `reward`: pi_ref from the reward model (what GoalRank does, group.rounds = 1);
- `oracle`: pi_ref from the log itself, the DCG each list earns with the training request's
  logged labels (`trainer.log_labels`; an unshown candidate counts 0, as in the test metric).
The oracle is a perfect reward model on the training requests. If it barely beats the
supervised generator on test, the training groups hold little that the supervised list
likelihood on the same labels has not already learnt, and a better reward model cannot
open a large gap in this offline protocol.

    python -m bench.oracle_groups [--dataset ml-100k] [--seeds 1] [--max-users N]   # N: default bench.main_table full mode
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.common import Recorder, paired_cell, seed_summary, table
from bench.main_table import MODES

POLICIES = ("supervised", "g-e", "goalrank")


def oracle_pi_ref(train, lists: np.ndarray, mask: np.ndarray, tau: float, eps: float) -> np.ndarray:
    """(R, G, L) lists on the training requests -> (R, G) pi_ref of their logged DCG."""
    from goalrank_core.group import dcg_weights, reference_policy
    from goalrank_core.trainer import log_labels

    batch = train.batch(slice(None))
    pos = torch.from_numpy(lists)
    labels = log_labels(batch, pos.clamp(min=0)).float() * (pos >= 0)  # (R, G, L)
    return reference_policy((labels * dcg_weights(lists.shape[-1])).sum(-1), torch.from_numpy(mask), tau, eps).numpy().astype(np.float32)


def shown_share(ranked, requests) -> float:
    """Share of a policy's list slots that hold one of the request's logged (shown) items: the
    only slots logged labels can reward. A list that fills its slots with unshown candidates
    scores 0 there, whatever their true worth."""
    from goalrank_core.metrics import _padded

    lists, shown = _padded(ranked.column("ranked")), _padded(requests.column("shown"))  # (R, L), (R, L)
    hit = (lists[:, :, None] == shown[:, None, :]).any(-1) & (lists >= 0)  # (R, L)
    return float(hit.sum() / max((lists >= 0).sum(), 1))


def run_seed(dataset: str, seed: int, log, max_users: int = 0) -> dict[str, dict[str, float]]:
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.bundle import build_bundle, encode
    from goalrank_core.fit import fit_policies, propose_groups, train_reward
    from goalrank_core.metrics import evaluate_lists
    from goalrank_core.policy_registry import build_auxiliary
    from goalrank_core.protocol import load_splits
    from goalrank_core.ranking import policy_resources, rank
    from goalrank_core.trainer import set_seed, train_generator_group

    cfg = GoalRankConfig().override({"train.seed": seed, "protocol.max_users": max_users})
    splits = load_splits(dataset, protocol=cfg.protocol)
    cfg = cfg.for_source(splits.source)
    bundle = build_bundle(splits.train, cfg, splits.items)
    train, valid = encode(bundle, splits.train), encode(bundle, splits.valid)
    fit_policies(bundle, train, valid, log)
    res = policy_resources(bundle)
    proposers = build_auxiliary(res) + [res.extra["supervised"]]
    props = train_reward(bundle, train, valid, proposers, log)
    set_seed(seed)
    start = bundle.build("generator")
    start.load_state_dict(bundle.models["supervised"].state_dict())
    groups, _ = propose_groups(train, proposers, start, bundle.models["reward"], cfg, seed=seed + 1, proposals=props)

    def score(policy: str) -> dict[str, float]:
        ranked = rank(bundle, splits.test, policy, seed=seed)
        r = evaluate_lists(ranked, splits.test, (6,), n_boot=0, seed=seed)
        return {**{k: v.value for k, v in r.items() if k in ("hr@6", "ndcg@6")},
                "shown share": shown_share(ranked, splits.test)}

    out = {"supervised": score("supervised"), "g-e": score("g-e")}
    for name, pi in (("reward", groups.pi_ref), ("oracle", oracle_pi_ref(train, groups.lists, groups.mask,
                                                                          cfg.group.tau, cfg.group.eps))):
        set_seed(seed)
        gen = bundle.build("generator")
        gen.load_state_dict(bundle.models["supervised"].state_dict())
        groups.pi_ref = pi
        train_generator_group(train, groups, gen, cfg.train, valid, log)
        bundle.add("generator", "generator", gen)
        out[f"goalrank ({name} pi_ref)"] = score("goalrank")
    return out


def main(argv: list[str] | None = None) -> dict:
    from bench.common import log_to

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--max-users", type=int, default=None,
                    help="users kept (default: bench.main_table's full mode for the data set, so Table 1 compares)")
    args = ap.parse_args(argv)
    max_users = MODES["full"]["max_users"].get(args.dataset, 0) if args.max_users is None else args.max_users
    rec = Recorder("oracle_groups", "full", tag=args.dataset)
    per_seed: dict[str, dict[str, list[float]]] = {}
    t0 = time.perf_counter()
    for seed in range(args.seeds):
        for row, metrics in run_seed(args.dataset, seed, log_to(f"oracle s{seed}"), max_users).items():
            for k, v in metrics.items():
                per_seed.setdefault(row, {}).setdefault(k, []).append(v)
        print(f"[oracle_groups] seed {seed} done ({time.perf_counter() - t0:.0f}s)", flush=True)
    summary = {row: {k: seed_summary(v) for k, v in m.items()} for row, m in per_seed.items()}
    fmt = lambda s: f"{s['mean']:.4f}" + (f" ± {s['std']:.4f}" if s["n"] >= 2 else "")  # noqa: E731
    rows = [[row, fmt(m["hr@6"]), fmt(m["ndcg@6"]), fmt(m["shown share"])] for row, m in summary.items()]
    base = per_seed["supervised"]
    paired = [[row, paired_cell(m["hr@6"], base["hr@6"]), paired_cell(m["ndcg@6"], base["ndcg@6"])]
              for row, m in per_seed.items() if row != "supervised"]
    result = {"config": {"dataset": args.dataset, "seeds": list(range(args.seeds)), "max_users": max_users},
              "tables": [table(f"Headroom of group-relative training ({args.dataset}, test split)",
                               ["generator / policy", "HR@6", "NDCG@6", "shown share"], rows,
                               "Both GoalRank rows start from the supervised generator and train on the same "
                               "round-1 groups; only pi_ref differs. Oracle = the lists' logged DCG on the "
                               "training requests: a perfect reward model there. Shown share = the share of "
                               "list slots holding one of the request's logged items, the only slots logged "
                               "labels can reward."),
                         table(f"Minus the supervised generator, paired over seeds ({args.dataset})",
                               ["generator / policy", "HR@6", "NDCG@6"], paired,
                               "mean [95% t-interval] of the per-seed difference; needs 2 or more seeds")],
              "data": {"per_seed": per_seed, "summary": summary}}
    rec.write(result)
    return result


if __name__ == "__main__":
    main()
