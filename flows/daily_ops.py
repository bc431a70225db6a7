"""Daily operations around the `goalrank-daily` flow: the window and data gates of a run on
date-partitioned impressions, the warm start from the champion, the run record that marks a
dated run complete (which flows/backfill.py reads to skip completed dates).

Warm start: once a run's data is prepared, the current champion's generator (its registered
ranker) and reward model (the reward stage of the champion's run, found through its
`goalrank.storage_prefix` tag) are remapped onto the new vocabulary (goalrank_core.warm) and
saved in the run's `warm_start/` stage; training then starts from them with
`train.warm_epochs` / `train.warm_reward_epochs`. It starts cold, and says why, when asked
(`cold`), with no champion, with a champion trained on a later (or the same) date than this
run (a backfill must not learn from the future), or when the architectures differ. The
decision is made once per run and kept in the stage's manifest: a rerun reuses it even if
the champion has moved since (to this very run's model, typically), so it redoes nothing.
"""
from __future__ import annotations

import re
from datetime import date
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from goalrank_core.config import GoalRankConfig

RECORD_STAGE = "registry"  # {storage}/{dataset}/{run_id}/registry/_manifest.json: the run is complete
WARM_STAGE = "warm_start"
TAG_RUN_DATE = "goalrank.run_date"
TAG_WARM = "goalrank.warm_start"
TAG_WARM_VERSION = "goalrank.warm_start.version"
TAG_WARM_REASON = "goalrank.warm_start.reason"
TAG_WINDOW = "goalrank.window"
TAG_PARTITIONS = "goalrank.partitions"

_OPTS = dict(cache_policy=NO_CACHE, log_prints=True)


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


# ---------------------------------------------------------------- window and gates
@task(name="data_gates", task_run_name="data_gates · {run_id}", **_OPTS)
def data_gates_task(run_id: str, impressions: str, run_date: str, config: dict) -> dict:
    """Plan the window of `run_date` and gate its newest partition; no retries: a bad
    partition does not heal by waiting. -> {"window", "partitions", "gates"}."""
    from goalrank_core.partitions import parse_date
    from tasks.partitions import plan_window, run_gates

    cfg = GoalRankConfig.from_dict(config)
    window = plan_window(impressions, parse_date(run_date), cfg.window.days)
    gates = run_gates(impressions, window, cfg)
    desc = window.describe()
    lines = [f"### data gates · run `{run_id}`", "",
             f"window {desc['start']} .. {desc['end']}: {len(desc['partitions'])} partition(s), "
             f"missing {desc['missing'] or 'none'}", "", "| check | value | bounds | passed |", "|---|---|---|---|"]
    for c in gates["checks"]:
        v = "-" if c["value"] is None else f"{c['value']:.4g}"
        lines.append(f"| {c['check']} | {v} | [{c['low']}, {c['high']}] | "
                     f"{'skipped: ' + c['note'] if c['passed'] is None else c['passed']} |")
    create_markdown_artifact("\n".join(lines), key=_key(f"gates-{run_id}"), description=f"data gates of run {run_id}")
    print(f"[data_gates] {gates['partition']} passed; window {desc['start']}..{desc['end']} "
          f"({len(desc['partitions'])} partitions)", flush=True)
    return {"window": desc, "partitions": desc["partitions"], "gates": gates}


# ---------------------------------------------------------------- warm start
def _champion_date(mv: Any) -> date | None:
    from flows.registry import TAG_RUN_ID
    from goalrank_core.partitions import parse_date

    for raw in ((mv.tags or {}).get(TAG_RUN_DATE), (mv.tags or {}).get(TAG_RUN_ID)):
        if raw:
            try:
                return parse_date(raw)
            except ValueError:
                continue
    return None


def _champion_models(mv: Any, model_name: str, tracking_uri: str) -> tuple[Any, Any, str]:
    """(generator bundle, reward bundle or None, note) of a registered version."""
    from flows.tracking import load_bundle_from
    from tasks import object_store, storage
    from tasks.stage_io import load_bundle

    gen = load_bundle_from(f"models:/{model_name}/{mv.version}", tracking_uri)
    prefix = (mv.tags or {}).get("goalrank.storage_prefix")
    if not prefix:
        return gen, None, "no goalrank.storage_prefix tag: reward model starts cold"
    reward_stage = object_store.join(prefix, "reward_model")
    if storage.read_manifest(reward_stage) is None:
        return gen, None, f"{reward_stage} is gone: reward model starts cold"
    return gen, load_bundle(object_store.join(reward_stage, "model"), "warm start: champion reward model"), ""


def _remap(old_bundle: Any, name: str, kind: str, new_bundle: Any, config: GoalRankConfig, section: str) -> tuple[Any, dict]:
    """A model of `kind` on the new bundle's vocabulary holding the old model's weights."""
    import torch

    from goalrank_core.warm import WarmStartMismatch, category_alignment, remap_state

    old_cfg = getattr(old_bundle.config, section).__dict__
    if old_cfg != getattr(config, section).__dict__:
        raise WarmStartMismatch(f"warm start: '{section}' config differs from the champion's ({old_cfg})")
    torch.manual_seed(config.train.seed)  # fresh rows of new items: seeded
    model = new_bundle.build(kind)
    categories = category_alignment(old_bundle.item_category, new_bundle.item_category, new_bundle.dims.n_categories)
    state, stats = remap_state(old_bundle.require(name).state_dict(), model.state_dict(), old_bundle.item_vocab,
                               new_bundle.item_vocab, old_bundle.user_vocab, new_bundle.user_vocab, categories)
    model.load_state_dict(state)
    return model, stats


def resolve_warm_start(prepared: str, out: str, config: GoalRankConfig, tracking_uri: str, model_name: str,
                       run_date: str, cold: bool) -> dict:
    """Decide (once per run) and build the warm-start weights; see the module docstring.
    -> {"warm", "version", "reason", "generator", "reward", "stats", "uri", "skipped"}."""
    from mlflow import MlflowClient

    from flows import registry
    from goalrank_core.partitions import parse_date
    from tasks import object_store, storage
    from tasks.stage_io import load_bundle, save_bundle
    from tasks.storage import run_stage

    prep = storage.read_manifest(prepared) or {}
    key = {"prepared": prep.get("fingerprint"), "config_hash": config.hash(), "cold": bool(cold)}
    existing = storage.read_manifest(out)
    if existing is not None and (existing.get("warm_start") or {}).get("key") == key:
        d = dict(existing["warm_start"])
        print(f"[warm_start] reusing this run's decision: {_describe(d)}", flush=True)
        return {**d, "uri": out, "skipped": True}

    champ = None
    reason = ""
    if cold:
        reason = "cold start requested (--cold)"
    else:
        champ = registry.get_alias(MlflowClient(tracking_uri), model_name, registry.CHAMPION)
        if champ is None:
            reason = "no champion yet"
        else:
            when = _champion_date(champ)
            if when is not None and when >= parse_date(run_date):
                reason = (f"champion v{champ.version} was trained for {when.isoformat()}, not before this run's "
                          f"date {run_date}: cold start (a backfill must not learn from later data)")
                champ = None

    def body(out: str) -> dict:
        decision = {"key": key, "warm": False, "version": str(champ.version) if champ else None, "reason": reason,
                    "generator": None, "reward": None, "stats": {}}
        if champ is not None:
            new = load_bundle(object_store.join(prepared, "vocab"), "warm start: vocabulary")
            new.config = config
            old_gen, old_rew, note = _champion_models(champ, model_name, tracking_uri)
            notes = [note] if note else []
            for what, old, name, kind, section in (("generator", old_gen, "generator", "generator", "generator"),
                                                    ("reward", old_rew, "reward", "reward", "reward")):
                if old is None:
                    continue
                try:
                    model, stats = _remap(old, name, kind, new, config, section)
                except Exception as exc:  # noqa: BLE001 - any mismatch means: this model starts cold
                    notes.append(f"{what} starts cold: {exc}")
                    continue
                b = type(new)(config, new.item_vocab, new.user_vocab, dict(new.item_category), new.dims)
                b.add(name, kind, model.eval())
                save_bundle(b, object_store.join(out, what, "model"))
                decision[what] = object_store.join(out, what)
                decision["stats"][what] = stats
            decision["warm"] = decision["generator"] is not None or decision["reward"] is not None
            decision["reason"] = "; ".join([f"from champion v{champ.version}"] + notes)
        return {"extra": {"warm_start": decision}}

    result = run_stage(out, WARM_STAGE, config, {"prepared": prepared}, body,
                       params={"cold": bool(cold), "champion": str(champ.version) if champ else None})
    d = dict(result.manifest["warm_start"])
    print(f"[warm_start] {_describe(d)}", flush=True)
    return {**d, "uri": out, "skipped": False}


def _describe(d: dict) -> str:
    if not d.get("warm"):
        return f"cold start: {d.get('reason')}"
    parts = [p for p in ("generator", "reward") if d.get(p)]
    return f"warm start of {' and '.join(parts)} {d.get('reason')}"


@task(name="warm_start", task_run_name="warm_start · {run_id}", retries=2, retry_delay_seconds=2, **_OPTS)
def warm_start_task(run_id: str, prepared: str, out: str, config: dict, tracking_uri: str, model_name: str,
                    run_date: str, cold: bool) -> dict:
    return resolve_warm_start(prepared, out, GoalRankConfig.from_dict(config), tracking_uri, model_name, run_date,
                              cold)


def effective_config(config: GoalRankConfig, warm: dict) -> GoalRankConfig:
    """The config training runs with: fewer epochs for what starts warm."""
    o: dict[str, Any] = {}
    if warm.get("generator"):
        o["train.epochs"] = config.train.warm_epochs
    if warm.get("reward"):
        o["train.reward_epochs"] = config.train.warm_reward_epochs
    return config.override(o) if o else config


def warm_tags(warm: dict, run_date: str, window: dict | None) -> dict[str, str]:
    """MLflow run and version tags of a run: its date, warm start, window."""
    tags = {TAG_RUN_DATE: run_date, TAG_WARM: "true" if warm.get("warm") else "false",
            TAG_WARM_VERSION: str(warm.get("version") or "") if warm.get("warm") else "",
            TAG_WARM_REASON: str(warm.get("reason") or "")[:500]}
    if window:
        tags[TAG_WINDOW] = f"{window['start']}..{window['end']}"
        tags[TAG_PARTITIONS] = ",".join(p.split("=", 1)[1] for p in window["partitions"])[:5000]
    return tags


# ---------------------------------------------------------------- run record
def record_uri(storage_uri: str, dataset: str, run_id: str) -> str:
    from tasks.storage import stage_uri

    return stage_uri(storage_uri, dataset, run_id, RECORD_STAGE)


def write_record(storage_uri: str, dataset: str, run_id: str, record: dict) -> str:
    """Mark the run complete (written last, after registration and the promotion decision)."""
    from tasks import object_store, storage

    uri = record_uri(storage_uri, dataset, run_id)
    object_store.write_json(storage.manifest_uri(uri), {"stage": RECORD_STAGE, **record})
    return uri


def completed(storage_uri: str, dataset: str, run_id: str, config_hash: str) -> dict | None:
    """The run record of a completed run with this config hash, else None."""
    from tasks import storage

    m = storage.read_manifest(record_uri(storage_uri, dataset, run_id))
    return m if m is not None and m.get("config_hash") == config_hash else None
