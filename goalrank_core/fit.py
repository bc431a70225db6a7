"""The whole GoalRank fit, in one process (the reference the distributed stages mirror):

1. auxiliary policies: heuristic statistics, point-wise DNN, PRM, and the supervised
   generator (list likelihood on logged positives);
2. reward model: BCE on logged lists, augmented lists and the proposers' lists on the
   training requests labelled from the log (an unshown candidate is never a positive);
3. `config.group.rounds` rounds of: propose a group per training request (auxiliary lists
   first, then generator samples; deduplicated to |B|), score it with the reward model,
   pi_ref = softmax of normalised rewards, train the generator on the group-relative loss.
   A training request's group also holds its logged list (`group.logged_list`).

The GoalRank generator starts from the supervised generator's weights (same architecture),
so its first round of samples is already sensible.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from goalrank_core.baselines import train_pointwise, train_prm
from goalrank_core.batch import EncodedRequests, RequestBatch
from goalrank_core.bundle import ModelBundle, build_bundle, encode
from goalrank_core.config import GoalRankConfig
from goalrank_core.diagnostics import format_round, group_summary, ordering_quality
from goalrank_core.group import dcg_weights, dedup_lists, reference_policy
from goalrank_core.policies import fit_heuristics, propose_all
from goalrank_core.policy_registry import build_auxiliary
from goalrank_core.ranking import policy_resources
from goalrank_core.layers import set_item_features
from goalrank_core.reward_model import can_init_from, init_from_generator
from goalrank_core.search import greedy_search
from goalrank_core.trainer import (Groups, Log, batch_folds, iterate_batches, log_labels, set_seed, train_generator_group,
                                   train_generator_supervised, train_reward_model)


@dataclass
class Proposals:
    """Unscored proposals for every row of an EncodedRequests (numpy)."""

    lists: np.ndarray  # (R, G, L) int64 positions, -1 rows where a group is smaller
    policy_ids: np.ndarray  # (R, G) int64 index into names, -1 padding
    names: list[str]


@torch.no_grad()
def group_proposals(batch: RequestBatch, aux: list, generator: nn.Module | None, config: GoalRankConfig,
                    gen: torch.Generator | None = None) -> tuple[torch.Tensor, list[str]]:
    """A training group's proposals before deduplication -> ((B, G, L) positions, G policy names):
    the logged list (if `group.logged_list`: the behaviour policy's proposal, known for a logged
    training request; a row without a full logged list gets an invalid list that dedup drops),
    every auxiliary policy's lists, then `group.generator_samples` generator samples."""
    parts, names = [], []
    if config.group.logged_list:
        parts.append(batch.shown[:, None, :])  # (B, 1, L); -1 entries make it invalid
        names.append("logged")
    if aux:
        lists, aux_names = propose_all(aux, batch, gen)
        parts.append(lists)
        names += aux_names
    if generator is not None and config.group.generator_samples > 0:
        generator.eval()
        parts.append(generator.sample(batch, config.group.generator_samples, gen))
        names += ["goalrank"] * config.group.generator_samples
    if not parts:
        return batch.shown.new_zeros(len(batch), 0, batch.shown.shape[1]), []
    return torch.cat(parts, dim=1), names


@torch.no_grad()
def propose_groups(data: EncodedRequests, aux: list, generator: nn.Module | None, reward: nn.Module,
                   config: GoalRankConfig, seed: int, batch_size: int = 512,
                   proposals: Proposals | None = None, heldout: bool = True) -> tuple[Groups, list[str]]:
    """Groups for every row of `data` (`group_proposals`, or the precomputed `proposals`
    behind the logged list; with `group.search_lists` the reward-guided list first),
    deduplicated to |B| and scored, each training request by the reward member that did not
    train on it (cross-fitting).
    -> (Groups, policy names indexed by Groups.policy_ids)."""
    dev = next(reward.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    reward.eval()
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("lists", "mask", "pids", "rewards", "pi")}
    names: list[str] = []
    for idx in iterate_batches(len(data), batch_size, False):
        b = data.batch(idx, dev)
        if proposals is not None:
            logged = config.group.logged_list
            names = (["logged"] if logged else []) + proposals.names
            lists = torch.from_numpy(proposals.lists[idx]).to(dev)  # (B, G, L)
            pid = torch.from_numpy(proposals.policy_ids[idx]).to(dev) + int(logged)  # (B, G)
            if logged:
                lists = torch.cat([b.shown[:, None, :], lists], dim=1)
                pid = torch.cat([torch.zeros_like(pid[:, :1]), pid], dim=1)
        else:
            lists, batch_names = group_proposals(b, aux, generator, config, gen)
            if not names:
                names = list(dict.fromkeys(batch_names))
            pid = torch.tensor([names.index(n) for n in batch_names], device=dev).expand(len(b), -1)
        # Cross-fitting: a training row is scored by the member that never saw it (`heldout`);
        # other rows (validation) by the members' mean.
        folds = batch_folds(reward, data, idx, dev) if heldout else None
        if config.group.search_lists:  # the reward-guided list leads the group (search.py)
            found = greedy_search(reward, b, lists.shape[2], folds, config.group.search_shortlist,
                                  sweeps=config.group.search_sweeps)  # (B, L)
            if "search" not in names:
                names = names + ["search"]
            lists = torch.cat([found[:, None, :], lists], dim=1)
            pid = torch.cat([torch.full_like(pid[:, :1], names.index("search")), pid], dim=1)
        lists, mask, pids = dedup_lists(lists, pid, config.group.size)
        rewards = reward.score(b, lists.clamp(min=0), folds)
        pi = reference_policy(rewards, mask, config.group.tau, config.group.eps)
        for k, v in (("lists", lists), ("mask", mask), ("pids", pids), ("rewards", rewards), ("pi", pi)):
            out[k].append(v.cpu().numpy())
    cat = {k: np.concatenate(v) for k, v in out.items()}
    groups = Groups(lists=cat["lists"], pi_ref=cat["pi"].astype(np.float32), mask=cat["mask"],
                    rewards=np.where(cat["mask"], cat["rewards"], 0).astype(np.float32), policy_ids=cat["pids"])
    return groups, names


def fit_policies(bundle: ModelBundle, train: EncodedRequests, valid: EncodedRequests | None, log: Log = print) -> None:
    """Heuristic statistics, point-wise DNN, PRM and the supervised generator, into `bundle`."""

    cfg = bundle.config
    stats = fit_heuristics(train, bundle.dims.n_items, cfg.policies, cfg.train.seed)
    bundle.tensors.update({f"stats.{k}": v for k, v in stats.to_tensors().items()})
    for name, trainer in (("pointwise", train_pointwise), ("prm", train_prm)):
        set_seed(cfg.train.seed)
        model = bundle.build(name)
        trainer(train, valid, model, cfg.train, log)
        bundle.add(name, name, model)
    set_seed(cfg.train.seed)
    sup = bundle.build("generator")
    item_features(sup, bundle, log)
    train_generator_supervised(train, valid, sup, cfg.train, log)
    bundle.add("supervised", "generator", sup)


@torch.no_grad()
def proposer_lists(data: EncodedRequests, policies: list, generator: nn.Module | None, config: GoalRankConfig,
                   seed: int, batch_size: int = 512) -> Proposals:
    """The group proposers' lists (auxiliary policies, then generator samples; no logged list,
    no scores) for every row of `data`, deduplicated to |B|."""
    cfg = config.override({"group.logged_list": False})
    dev = next(generator.parameters()).device if generator is not None else torch.device("cpu")
    gen = torch.Generator(device=dev).manual_seed(seed)
    lists_out, pids_out, names = [], [], []
    for idx in iterate_batches(len(data), batch_size, False):
        b = data.batch(idx, dev)
        lists, batch_names = group_proposals(b, policies, generator, cfg, gen)
        names = names or list(dict.fromkeys(batch_names))
        pid = torch.tensor([names.index(n) for n in batch_names], dtype=torch.long, device=dev).expand(len(b), -1)
        lists, _, pids = dedup_lists(lists, pid, cfg.group.size)
        lists_out.append(lists.cpu().numpy())
        pids_out.append(pids.cpu().numpy())
    if not lists_out:
        return Proposals(np.zeros((0, cfg.group.size, data.shown.shape[1]), np.int64), np.zeros((0, cfg.group.size), np.int64), [])
    return Proposals(np.concatenate(lists_out), np.concatenate(pids_out), names)


def item_features(model: nn.Module, bundle: ModelBundle, log: Log = print) -> bool:
    """Copy the bundle's heuristic statistics into `model`'s item features (a reward model with
    `reward.item_features`, a generator with `generator.item_features`). -> whether it did."""
    stats = {k[len("stats."):]: v for k, v in bundle.tensors.items() if k.startswith("stats.")}
    if stats and set_item_features(model, stats["popularity"], stats["ctr"], stats["item_emb"]):
        log(f"{type(model).__name__}: item features from the heuristic statistics")
        return True
    return False


def init_reward(reward: nn.Module, bundle: ModelBundle, log: Log = print) -> bool:
    """Give `reward` the bundle's heuristic statistics as item features (`reward.item_features`)
    and, with `reward.init_from_supervised`, start it from the bundle's supervised generator
    when it has one of matching shape. -> whether it started from that generator."""
    item_features(reward, bundle, log)
    sup = bundle.models.get("supervised")
    if not bundle.config.reward.init_from_supervised or sup is None:
        return False
    members = list(getattr(reward, "members", [reward]))  # a CrossFitReward: every member
    if not all(can_init_from(m, sup) for m in members):
        log("reward model: shapes differ from the supervised generator's; starting from random weights")
        return False
    for m in members:
        init_from_generator(m, sup)
    log("reward model: embeddings and context layers start from the supervised generator")
    return True


def train_reward(bundle: ModelBundle, train: EncodedRequests, valid: EncodedRequests | None, policies: list,
                 log: Log = print) -> Proposals | None:
    """The reward model into `bundle`: BCE on logged lists, augmented lists and (with
    `reward.labelled_lists`: only when unshown candidates are negatives) lists of the group proposers (`policies`, plus samples of the
    supervised generator if the bundle has one) labelled from the log, so it is trained on the
    kind of lists it will rank; early stopping on the same measure on valid.
    -> the training requests' proposals (reused as the first round's groups), or None."""
    cfg = bundle.config
    props = vprops = None
    if cfg.reward.labelled_lists[1] > 0 and policies:
        sup = bundle.models.get("supervised")
        props = proposer_lists(train, policies, sup, cfg, seed=cfg.train.seed + 101)
        if valid is not None and len(valid):
            vprops = proposer_lists(valid, policies, sup, cfg, seed=cfg.train.seed + 102)
    set_seed(cfg.train.seed)
    reward = bundle.build("reward")
    log(f"reward model: {reward.num_parameters():,} parameters")
    init_reward(reward, bundle, log)
    train_reward_model(train, valid, reward, cfg.train, log, proposals=props.lists if props else None,
                       valid_proposals=vprops.lists if vprops else None)
    bundle.add("reward", "reward", reward)
    return props


# (data, row indices (B,), lists (B, G, L) positions) -> (B, G) a reference value per list
ListValue = Callable[[EncodedRequests, np.ndarray, np.ndarray], np.ndarray]


def logged_dcg(data: EncodedRequests, idx: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """The logged DCG of lists (B, G, L) of rows `idx`: shown candidates keep their labels,
    every other candidate counts 0 (the only reference real logs give). -> (B, G)."""
    b = data.batch(idx)
    lab = log_labels(b, torch.from_numpy(lists))  # (B, G, L)
    return (lab * dcg_weights(lists.shape[2])).sum(-1).numpy()


@torch.no_grad()
def valid_ordering(valid: EncodedRequests | None, policies: list, generator: nn.Module | None, reward: nn.Module,
                   config: GoalRankConfig, seed: int, list_value: ListValue | None = None) -> dict | None:
    """How well the reward model orders the groups of the valid requests (no logged list in
    them) against `list_value` (default: logged DCG). None without valid requests."""
    if valid is None or not len(valid):
        return None
    cfg = config.override({"group.logged_list": False})
    groups, _ = propose_groups(valid, policies, generator, reward, cfg, seed, heldout=False)
    ref = np.zeros_like(groups.rewards, dtype=np.float64)
    for idx in iterate_batches(len(valid), 512, False):
        ref[idx] = (list_value or logged_dcg)(valid, idx, np.maximum(groups.lists[idx], 0))
    q = ordering_quality(groups.rewards, ref, groups.mask)
    return {**q, "against": "true value" if list_value is not None else "logged DCG"}


def fit_goalrank(train: EncodedRequests, valid: EncodedRequests | None, bundle: ModelBundle, log: Log = print,
                 policies: list | None = None, list_value: ListValue | None = None,
                 reward_model: nn.Module | None = None) -> ModelBundle:
    """Train reward model, auxiliary policies (unless `bundle` already has them) and the
    GoalRank generator into `bundle` (also returned). `policies` overrides the auxiliary
    proposers (ListPolicy objects); default: the configured auxiliary policies plus the
    supervised generator. Each round's diagnostics (goalrank_core/diagnostics.py) are logged
    and kept in `bundle.fit_report`; the reward model's ordering is measured on the valid
    requests' groups against `list_value` (a simulator's true value) or, without it, their
    logged DCG. `reward_model` (for example the simulator's TrueReward) replaces the trained
    reward model: the loop's ceiling when pi_ref comes from true list values."""

    cfg = bundle.config
    t0 = time.perf_counter()
    if reward_model is not None:
        bundle.models["reward"] = reward_model
    if policies is None:
        if "supervised" not in bundle.models:
            fit_policies(bundle, train, valid, log)
        res = policy_resources(bundle)
        policies = build_auxiliary(res) + [res.extra["supervised"]]
    log(f"auxiliary policies: {', '.join(p.name for p in policies)} ({time.perf_counter() - t0:.0f}s so far)")
    props = None  # the proposers' lists for the reward model are also round 1's groups
    if "reward" not in bundle.models:
        props = train_reward(bundle, train, valid, policies, log)
        log(f"reward model trained ({time.perf_counter() - t0:.0f}s so far)")
    reward = bundle.models["reward"]

    set_seed(cfg.train.seed)
    generator = bundle.build("generator")
    if "supervised" in bundle.models:  # warm start from the supervised generator
        generator.load_state_dict(bundle.models["supervised"].state_dict())
    log(f"generator: {generator.num_parameters():,} parameters")
    bundle.fit_report = []
    for rnd in range(1, cfg.group.rounds + 1):
        groups, names = propose_groups(train, policies, generator, reward, cfg, seed=cfg.train.seed + rnd,
                                       proposals=props if rnd == 1 else None)
        summary = group_summary(groups.rewards, groups.pi_ref, groups.mask, groups.policy_ids, names)
        quality = valid_ordering(valid, policies, generator, reward, cfg, cfg.train.seed + 1000 + rnd, list_value)
        bundle.fit_report.append({"round": rnd, **summary, "ordering": quality})
        log(format_round(rnd, summary, quality))
        train_generator_group(train, groups, generator, cfg.train, valid, log)
    bundle.add("generator", "generator", generator)
    log(f"fit done in {time.perf_counter() - t0:.0f}s")
    return bundle


def fit_tables(train: pa.Table, valid: pa.Table | None, config: GoalRankConfig, items: pa.Table | None = None,
               log: Log = print, list_value: ListValue | None = None,
               reward_model: Callable[[ModelBundle], nn.Module] | None = None) -> ModelBundle:
    """fit_goalrank from impressions tables: builds vocabularies, encodes, fits. `reward_model`
    builds a fixed reward model from the bundle (its vocabularies) instead of training one."""
    bundle = build_bundle(train, config, items)
    tr = encode(bundle, train)
    va = encode(bundle, valid) if valid is not None and valid.num_rows else None
    log(f"train {len(tr)} requests, valid {len(va) if va is not None else 0}; items {bundle.dims.n_items}, "
        f"users {bundle.dims.n_users}, N {tr.candidates.shape[1]}, L {bundle.dims.slate_len}")
    return fit_goalrank(tr, va, bundle, log, list_value=list_value,
                        reward_model=reward_model(bundle) if reward_model is not None else None)
