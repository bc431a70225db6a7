"""Does the reward model know what a list is worth? An ablation on the simulator (issue 16).

One world and its logs (`goalrank_core.simulator`, the split `goalrank fit --impressions`
makes), the auxiliary policies fitted once (`fit.fit_policies`), then the reward model trained
under each variant below. Each is judged on the TEST requests' groups (every auxiliary policy's
lists plus supervised-generator samples, as a training group holds) against the exact true
value of every list:
- spearman / top-1 / top-1 value: goalrank_core.diagnostics.ordering_quality;
- pick: the true value of the reward model's favourite list (what G-E serves), normalised
  (random lists 0, best list found 1), beside the group's best list (a perfect evaluator);
- search: the list built by greedy search under the reward model (goalrank_core/search.py);
- point-wise corr / sort: the model's score of each candidate alone against its true
  point-wise logit (within-request correlation), and the value of the list sorted by it.

Variants (each adds to the one before): the old defaults (unshown candidates labelled 0 in
augmented and proposer lists, start from the supervised generator, context layers, 3 epochs);
observed positions only; 8 epochs, no context layers; the pairwise term; causal list encoding;
cross-fitting over 2 folds (today's defaults).

    python -m bench.reward_ordering [--effect saturation] [--mode quick|full]
    python -m bench.reward_ordering --mode quick --set reward.exposure_prior=true   # defaults against one change
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import Recorder, table

OLD = {"reward.unshown": "negative", "reward.augment_lists": 1, "reward.group_lists": 4, "reward.init_from_supervised": True,
       "reward.context_layers": 2, "train.reward_epochs": 3, "reward.pairwise": False, "reward.causal": False,
       "reward.folds": 1}
VARIANTS = [
    ("old defaults", OLD),
    ("observed positions only", {**OLD, "reward.unshown": "unknown", "reward.augment_lists": 0, "reward.group_lists": 0,
                                 "reward.init_from_supervised": False}),
    ("+ 8 epochs, no context layers", {**OLD, "reward.unshown": "unknown", "reward.augment_lists": 0, "reward.group_lists": 0,
                                       "reward.init_from_supervised": False, "reward.context_layers": 0,
                                       "train.reward_epochs": 8}),
    ("+ pairwise term", {"reward.pairwise": True, "reward.causal": False, "reward.folds": 1}),
    ("+ causal list encoding", {"reward.causal": True, "reward.folds": 1}),
    ("+ cross-fitting, 2 folds (defaults)", {}),
]
VOLUME = {"quick": (600, 8), "full": (2000, 8)}


def true_values(world, test, lists: np.ndarray, users: np.ndarray) -> np.ndarray:
    """(R, G, L) positions into the test candidates -> (R, G) exact expected clicks."""
    r, g, l = lists.shape
    ids = np.take_along_axis(test.raw_candidates[:, None, :].repeat(g, 1), np.maximum(lists, 0), 2)
    return world.expected_clicks(np.repeat(users, g), ids.reshape(r * g, l)).reshape(r, g)


@torch.no_grad()
def judge(bundle, reward, test, world, users, props, norm) -> dict[str, float]:
    from goalrank_core.diagnostics import ordering_quality
    from goalrank_core.search import greedy_search

    lists, mask = props.lists, (props.lists >= 0).all(-1)
    truth = true_values(world, test, lists, users)
    reward.eval()
    scores, found, solo = [], [], []
    for i in range(0, len(test), 256):
        b = test.batch(slice(i, i + 256))
        scores.append(reward.score(b, torch.from_numpy(lists[i:i + 256]).clamp(min=0)).numpy())
        sweeps = bundle.config.group.search_sweeps
        found.append(greedy_search(reward, b, lists.shape[2], sweeps=sweeps).numpy()[:, None, :])
        n = b.candidates.shape[1]  # every candidate alone, at the top: the model's point-wise view
        one = reward.score(b, torch.arange(n).expand(len(b.candidates), n)[:, :, None])
        solo.append(one.masked_fill(~b.cand_mask, float("-inf")).numpy())
    scores, solo = np.concatenate(scores), np.concatenate(solo)  # (R, G), (R, N)
    rnd, best = norm
    nz = lambda v: float(np.mean((v - rnd) / (best - rnd)))  # noqa: E731
    pick = np.where(mask, scores, -np.inf).argmax(1)
    q = ordering_quality(scores, truth, mask)
    aff = world.affinity(users, test.raw_candidates)  # (R, N) true point-wise logit
    seen = np.isfinite(solo)
    corr = [np.corrcoef(solo[r, seen[r]], aff[r, seen[r]])[0, 1] for r in range(len(solo)) if seen[r].sum() > 2]
    by_solo = np.argsort(-solo, 1)[:, : lists.shape[2]][:, None, :]  # (R, 1, L) sorted by the one-item score
    return {**q, "pick": nz(truth[np.arange(len(pick)), pick]), "group_best": nz(np.where(mask, truth, -np.inf).max(1)),
            "search": nz(true_values(world, test, np.concatenate(found), users)[:, 0]),
            "pointwise_corr": float(np.nanmean(corr)), "pointwise_sort": nz(true_values(world, test, by_solo, users)[:, 0])}


def main(argv: list[str] | None = None) -> dict:
    from bench.simulator import world_and_splits
    from goalrank_core.config import GoalRankConfig
    from goalrank_core.bundle import build_bundle, encode
    from goalrank_core.fit import fit_policies, proposer_lists, train_reward
    from goalrank_core.policy_registry import build_auxiliary
    from goalrank_core.ranking import policy_resources
    from goalrank_core.simulator_search import best_lists, random_value

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--effect", default="saturation")
    ap.add_argument("--mode", choices=("quick", "full"), default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="compare the defaults with the defaults plus these overrides instead of the ablation")
    ap.add_argument("--tag", default="", help="suffix of the result file (default: the effect)")
    args = ap.parse_args(argv)
    from goalrank.cli.pipeline_cmd import parse_overrides

    overrides = parse_overrides(args.overrides)
    variants = VARIANTS if not overrides else [("defaults", {}), ("+ " + ", ".join(args.overrides), overrides)]
    rec = Recorder("reward_ordering", args.mode, tag=args.tag or args.effect)
    users_n, per_user = VOLUME[args.mode]
    base = GoalRankConfig().override({"train.seed": args.seed})
    with tempfile.TemporaryDirectory() as tmp:
        world, sp = world_and_splits(args.effect, args.seed, users_n, per_user, base, Path(tmp))
    bundle = build_bundle(sp.train, base, sp.items)
    tr, va, te = encode(bundle, sp.train), encode(bundle, sp.valid), encode(bundle, sp.test)
    fit_policies(bundle, tr, va, log=lambda m: None)
    res = policy_resources(bundle)
    policies = build_auxiliary(res) + [res.extra["supervised"]]
    props = proposer_lists(te, policies, bundle.models["supervised"], base, seed=args.seed + 5)
    users = sp.test.column("user_id").to_numpy()
    L = te.shown.shape[1]
    best = best_lists(world, users, te.raw_candidates, L, seed=args.seed)[1]
    norm = (random_value(world, users, te.raw_candidates, L, seed=args.seed), best)
    rows, out = [], {}
    for name, over in variants:
        t0 = time.perf_counter()
        bundle.config = base.override(over)
        bundle.models.pop("reward", None)
        train_reward(bundle, tr, va, policies, log=lambda m: None)
        r = judge(bundle, bundle.models["reward"], te, world, users, props, norm)
        r["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = {**r, "overrides": over}
        rows.append([name, f"{r['spearman']:.3f}", f"{r['top1']:.3f}", f"{r['top1_value']:.3f}", f"{r['pick']:.3f}",
                     f"{r['search']:.3f}", f"{r['group_best']:.3f}", f"{r['pointwise_corr']:.3f}",
                     f"{r['pointwise_sort']:.3f}", f"{r['seconds']:.0f}"])
        print(f"[reward_ordering] {name}: {r}", flush=True)
    cols = ["reward model", "spearman", "top-1", "top-1 value", "pick (G-E)", "search", "group best",
            "point-wise corr", "point-wise sort", "s"]
    result = {"config": {"effect": args.effect, "seed": args.seed, "train_requests": len(tr), "test_requests": len(te)},
              "tables": [table(f"Reward model against the true list value ({args.effect}, {len(te)} test groups)",
                               cols, rows,
                               ("Each row adds to the one before. " if not overrides else "") + "pick = the true value of the reward model's favourite "
                               "in a group of the auxiliary policies' and supervised-generator lists (what G-E "
                               "serves); group best = a perfect evaluator's pick; search = greedy search under the "
                               "reward model; all normalised (random lists 0, best list found 1). point-wise corr = "
                               "the correlation, within a request, of the model's score of each candidate alone "
                               "with its true point-wise logit; point-wise sort = the value of the list sorted by "
                               "that score.")],
              "data": out}
    rec.write(result)
    return result


if __name__ == "__main__":
    main()
