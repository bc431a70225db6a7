"""Stage `evaluate`: Ray Data batch inference with an actor pool holding every fitted model;
each actor ranks its batch with GoalRank and every baseline (goalrank_core.ranking's
policies: supervised, G-E, heuristics, DNN, PRM...). Output per split (valid, test):
`{out}/ranked/{split}/{policy}/` (schemas.RANKED), and `{out}/metrics/` (schemas.METRICS:
HR/NDCG/MAP@L with bootstrap intervals, goalrank_core.metrics). When the prepared splits carry
the logging propensities (schemas.prepared_schema), also `{out}/ope/` (schemas.OPE): every
policy's off-policy estimates (slate IPS/SNIPS; PI/SNPI with position propensities) with
their bootstrap intervals and effective sample sizes, the input of promotion by `ope:<estimator>`.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import torch

from goalrank_core.config import GoalRankConfig
from goalrank_core.schemas import METRICS, OPE, RANKED
from tasks import object_store, storage
from tasks.stage_io import batch_seed, device, in_order, load_bundle, read_dataset, read_split
from tasks.ray_runtime import actor_pool, ensure_ray, pool_size
from tasks.storage import StageResult, run_stage

EVAL_SPLITS = ("valid", "test")
EXCLUDED = ("logged",)  # the logged list holds exactly the labelled items: an oracle here


def merged_bundle(reward_model: str, policies: str, generator: str, dev: str = "cpu"):
    """One bundle with the reward model, the auxiliary policies and the GoalRank generator."""
    pol = load_bundle(object_store.join(policies, "model"), "evaluate: policies", dev)
    rew = load_bundle(object_store.join(reward_model, "model"), "evaluate: reward model", dev)
    gen = load_bundle(object_store.join(generator, "model"), "evaluate: generator", dev)
    gen.require("generator")
    return pol.merge(rew, gen)


def policy_names(bundle) -> list[str]:
    from goalrank_core.ranking import available_policies

    names = [n for n in available_policies(bundle) if n not in EXCLUDED]
    return ["goalrank"] + sorted(n for n in names if n != "goalrank")


class Ranker:
    """A Ray Data actor: every policy ranks every request of its batch -> long table
    (policy, request_id, ranked)."""

    def __init__(self, reward_model: str, policies: str, generator: str, config_dict: dict):
        from goalrank_core.policy_registry import build_policy
        from goalrank_core.ranking import policy_resources

        self.config = GoalRankConfig.from_dict(config_dict)
        self.dev = device()
        self.bundle = merged_bundle(reward_model, policies, generator, self.dev)
        res = policy_resources(self.bundle)
        self.policies = {name: build_policy(name, res) for name in policy_names(self.bundle)}

    @torch.no_grad()
    def __call__(self, table: pa.Table) -> pa.Table:
        from goalrank_core.bundle import encode

        enc = encode(self.bundle, table)
        b = enc.batch(slice(None), self.dev)
        out = {"policy": [], "request_id": [], "ranked": [], "split": []}
        for name, pol in self.policies.items():
            gen = torch.Generator(device=self.dev).manual_seed(batch_seed(self.config.train.seed, enc.request_id))
            pos = pol.propose(b, 1, gen)[:, 0].cpu().numpy()  # (B, L)
            out["policy"] += [name] * len(pos)
            out["request_id"] += list(enc.request_id)
            out["split"] += table.column("split").to_pylist()
            out["ranked"] += enc.positions_to_ids(slice(None), pos).tolist()
        return pa.table({"policy": pa.array(out["policy"], pa.string()),
                         "request_id": pa.array(out["request_id"], pa.string()),
                         "ranked": pa.array(out["ranked"], pa.list_(pa.int64())),
                         "split": pa.array(out["split"], pa.string())})


def evaluate(prepared: str, reward_model: str, policies: str, generator: str, out: str,
             config: GoalRankConfig) -> StageResult:
    """Stage 7: see the module docstring."""
    import ray

    from goalrank_core.metrics import (evaluate_lists, evaluate_ope, has_propensities, metrics_rows, metrics_table,
                                       ope_rows, ope_table)

    ensure_ray()
    inputs = {"prepared": prepared, "reward_model": reward_model, "policies": policies, "generator": generator}

    def body(out: str) -> dict:
        tables, rows, ope = {}, [], []
        args = tuple(object_store.normalize(u) for u in (reward_model, policies, generator)) + (config.to_dict(),)
        truth = {s: read_split(prepared, s, f"evaluate: {s} split", propensities=True) for s in EVAL_SPLITS}
        # Both splits through one actor pool (each actor loads every model once).
        parts = [read_dataset(object_store.join(prepared, s), f"evaluate: {s} split")
                 .add_column("split", _const(s), batch_format="pyarrow") for s in EVAL_SPLITS if truth[s].num_rows]
        compute, res = actor_pool(pool_size())
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ranked = ds.map_batches(Ranker, fn_constructor_args=args, batch_size=config.train.batch_size,
                                batch_format="pyarrow", compute=compute, **res)
        long = pa.concat_tables(ray.get(in_order(ranked).to_arrow_refs()))
        for split in EVAL_SPLITS:
            in_split = long.filter(pc.equal(long.column("split"), split))
            for name in sorted(set(in_split.column("policy").to_pylist())):
                part = in_split.filter(pc.equal(in_split.column("policy"), name)).select(["request_id", "ranked"])
                rel = f"ranked/{split}/{name}"
                tables[rel] = storage.table_entry(RANKED, storage.write_table(part, object_store.join(out, rel), RANKED,
                                                                              f"ranked {split} {name}"))
                results = evaluate_lists(part, truth[split], ks=(config.protocol.slate_len,), seed=config.train.seed)
                rows += metrics_rows(split, name, results)
                if has_propensities(truth[split]):
                    ope += ope_rows(split, name, evaluate_ope(part, truth[split], seed=config.train.seed))
        metrics = metrics_table(rows)
        tables["metrics"] = storage.table_entry(METRICS, storage.write_table(metrics, object_store.join(out, "metrics"),
                                                                             METRICS, "metrics"))
        extra = {}
        if ope:
            estimates = ope_table(ope)
            tables["ope"] = storage.table_entry(OPE, storage.write_table(estimates, object_store.join(out, "ope"), OPE,
                                                                         "off-policy estimates"))
            extra["ope"] = {r["split"] + "." + r["policy"] + "." + r["estimator"]: r["value"] for r in ope}
        return {"tables": tables, "metrics": _summary(metrics), **extra}

    return run_stage(out, "evaluate", config, inputs, body)


def _const(value: str):
    """A Ray Data `add_column` function filling a string column with `value`."""

    def fill(batch: pa.Table) -> pa.Array:
        return pa.array([value] * batch.num_rows, pa.string())

    return fill


def _summary(metrics: pa.Table) -> dict:
    """{split: {policy: {metric: value}}} for the manifest and the flow's logs."""
    out: dict = {}
    for r in metrics.to_pylist():
        out.setdefault(r["split"], {}).setdefault(r["policy"], {})[r["metric"]] = r["value"]
    return out
