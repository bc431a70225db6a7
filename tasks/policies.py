"""Stage `train_policies`: the auxiliary policies and baselines (heuristic statistics,
point-wise DNN, PRM, supervised generator; goalrank_core.fit.fit_policies), trained in one
process inside a Ray task: small models, where DDP start-up would cost more than it saves.
Output: `{out}/model/`, a bundle with models "pointwise", "prm", "supervised" and the
heuristic statistics as tensors.
"""
from __future__ import annotations

from goalrank_core.config import GoalRankConfig
from goalrank_core.schemas import IMPRESSIONS
from tasks import object_store, storage
from tasks.stage_io import load_bundle, read_split, save_bundle
from tasks.memory import self_peak_mb
from tasks.ray_runtime import ensure_ray, task_cpus
from tasks.storage import StageResult, run_stage


def _fit_policies(prepared: str, out: str, config_dict: dict, threads: int) -> dict:
    """Runs on a Ray worker: read the prepared splits, fit, upload the bundle."""
    import torch

    from goalrank_core.bundle import encode
    from goalrank_core.fit import fit_policies

    torch.set_num_threads(max(1, threads))
    config = GoalRankConfig.from_dict(config_dict)
    bundle = load_bundle(object_store.join(prepared, "vocab"), "policies: vocabulary")
    bundle.config = config
    train = encode(bundle, storage.read_table(object_store.join(prepared, "train"), IMPRESSIONS, "policies: train split"))
    valid_t = read_split(prepared, "valid", "policies: valid split")
    valid = encode(bundle, valid_t) if valid_t.num_rows else None
    lines: list[str] = []

    def log(msg: str) -> None:
        lines.append(msg)
        print(f"[policies] {msg}", flush=True)

    fit_policies(bundle, train, valid, log)
    saved = save_bundle(bundle, object_store.join(out, "model"))
    return {"model": saved, "log": lines, "peak_rss_mb": self_peak_mb()}


def train_policies(prepared: str, out: str, config: GoalRankConfig) -> StageResult:
    """Stage 3: see the module docstring."""
    import ray

    ensure_ray()

    def body(out: str) -> dict:
        cpus = task_cpus()
        remote = ray.remote(num_cpus=cpus, max_retries=1)(_fit_policies)
        res = ray.get(remote.remote(object_store.normalize(prepared), out, config.to_dict(), int(max(1, cpus))))
        return {"models": {"model": res["model"]}, "training": {"log": res["log"]},
                "memory": {"policy_task_peak_rss_mb": round(res["peak_rss_mb"], 1)}}

    return run_stage(out, "policies", config, {"prepared": prepared}, body)
