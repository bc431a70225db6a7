"""Ray Train plumbing shared by the training stages: the driver (`fit`) and what a worker
loop needs (`LossModule`, `epoch_summary`, checkpoint save/restore).

Checkpoints go to `{run}/_checkpoints/{stage}-{fingerprint}` in the run's storage, outside the
stage folder, so a stage redone after a crash resumes from its last epoch (Ray Train V2
restores a run with the same name and storage path) while a stage with another config or
other inputs starts fresh. Workers that die mid-run are restarted from the latest
checkpoint up to `max_failures` times.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from goalrank_core.config import GoalRankConfig
from tasks import object_store
from tasks.stage_io import load_bundle, read_dataset, save_bundle
from tasks.memory import self_peak_mb


def max_failures_default() -> int:
    return int(os.environ.get("GOALRANK_TRAIN_MAX_FAILURES", "1"))


def checkpoint_root(out: str) -> str:
    """Where a stage's Ray Train checkpoints live: beside the run's stage folders."""
    return object_store.join(object_store.parent(out), "_checkpoints")


def fit(loop: Callable[[dict], None], loop_config: dict, datasets: dict[str, Any], out: str, name: str,
        num_workers: int, max_failures: int | None = None) -> Any:
    """Run `loop` on `num_workers` DDP workers (gloo on CPU, NCCL on GPU) and return the
    Ray Train Result. `name` must identify the stage's config and inputs (resume key)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from tasks.ray_runtime import train_scaling

    for ds in datasets.values():
        # Workers' shards come from the split coordinator; its per-epoch bars would only
        # interleave with the epoch lines.
        ds.context.enable_progress_bars = False
    fs, path = object_store.filesystem(checkpoint_root(out))
    fs.create_dir(path, recursive=True)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=train_scaling(num_workers),
        run_config=RunConfig(
            name=name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures_default() if max_failures is None else max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    return trainer.fit()


def clear_checkpoints(out: str, name: str) -> None:
    """Drop a finished stage's checkpoints (its model is in the stage folder now)."""
    object_store.delete(object_store.join(checkpoint_root(out), name))


# ---------------------------------------------------------------- inside a worker


class LossModule(nn.Module):
    """`forward(*args) = loss_fn(model, *args)`: routes a per-batch loss function through
    DDP's forward, so gradients are averaged across workers (calling a method of the wrapped
    model directly would bypass DDP's reducer)."""

    def __init__(self, model: nn.Module, loss_fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.loss_fn(self.model, *args, **kwargs)


def prepare(model: nn.Module, loss_fn: Callable[..., torch.Tensor], find_unused: bool = False) -> tuple[nn.Module, torch.device]:
    """Wrap `model` for DDP (a no-op wrapper on one worker) and move it to the device.
    find_unused: some parameters may get no gradient in a step (DDP would wait for them)."""
    import ray.train.torch as rt

    wrapped = rt.prepare_model(LossModule(model, loss_fn), parallel_strategy_kwargs={"find_unused_parameters": find_unused})
    return wrapped, rt.get_device()


def worker_info() -> tuple[int, int]:
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a few floats across workers (identity on one worker)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


@dataclass
class EpochMeter:
    """Loss and throughput of one epoch on this worker."""

    t0: float = 0.0
    loss_sum: float = 0.0
    samples: int = 0

    def start(self) -> "EpochMeter":
        self.t0, self.loss_sum, self.samples = time.perf_counter(), 0.0, 0
        return self

    def add(self, loss: float, n: int) -> None:
        self.loss_sum += loss * n
        self.samples += n

    def summary(self) -> dict[str, float]:
        """Across all workers: mean loss, total samples/s, peak worker memory."""
        dt = time.perf_counter() - self.t0
        loss_sum, samples = all_reduce([self.loss_sum, float(self.samples)])
        (slowest,) = all_reduce([dt], "max")
        (peak,) = all_reduce([self_peak_mb()], "max")
        return {"loss": loss_sum / max(samples, 1.0), "samples": samples, "epoch_s": slowest,
                "samples_per_s": samples / max(slowest, 1e-9), "worker_peak_rss_mb": peak}


def save_checkpoint(state: dict, metrics: dict) -> None:
    """Every worker calls this (report is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    rank, _ = worker_info()
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(state, os.path.join(tmp, "state.pt"))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch-{metrics['epoch']:04d}")


def load_checkpoint(checkpoint: Any) -> dict | None:
    """The state saved by `save_checkpoint`, from a Ray Train checkpoint (or None)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)


def restore() -> dict | None:
    """The latest checkpoint of this run when resuming (after a worker failure or a rerun)."""
    import ray.train

    return load_checkpoint(ray.train.get_checkpoint())


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- the shared worker loop


class TrainSpec:
    """What differs between training stages. Subclasses live at module level (they are
    pickled to the workers) and implement:

    setup(rank) -> nn.Module          build the model (same seed on every rank)
    loss(model, *args) -> Tensor       a per-batch loss from goalrank_core.trainer
    batch_args(table, device, gen)     a pyarrow batch -> the loss's extra arguments
    validate(model) -> float           on rank 0 after each epoch (nan: no validation)
    """

    what = "train"
    higher_is_better = False
    keep_best = True  # False: the last epoch's weights are kept, the valid measure only logged
    find_unused_parameters = False

    def __init__(self, config_dict: dict, epochs: int):
        self.config_dict, self.epochs = config_dict, epochs

    @property
    def config(self) -> GoalRankConfig:
        return GoalRankConfig.from_dict(self.config_dict)


def shard_table(shard: Any) -> "pa.Table":
    """A worker's whole dataset shard as one Arrow table (read once per stage run)."""
    import pyarrow as pa

    parts = list(shard.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(parts) if parts else pa.table({})


def epoch_batches(rows: "pa.Table", batch_size: int, seed: int, epoch: int, rank: int):
    """Batches of `rows` in a seeded random order, new every epoch (a global shuffle of the
    shard; the in-process trainer permutes the whole split the same way)."""
    import numpy as np

    from goalrank_core.trainer import iterate_batches

    rng = np.random.default_rng([seed, epoch, rank])
    for idx in iterate_batches(rows.num_rows, batch_size, True, rng):
        yield rows.take(idx)


def worker_loop(loop_config: dict) -> None:
    """DDP epochs over this worker's shard of dataset "train", AdamW with gradient clipping
    (as the in-process trainer), one checkpoint and one log line per epoch, best-on-valid
    weights kept by rank 0."""
    import math

    import ray.train

    from goalrank_core.trainer import make_optimizer, set_seed

    spec: TrainSpec = loop_config["spec"]
    cfg = spec.config.train
    rank, world = worker_info()
    set_seed(cfg.seed)
    model = spec.setup(rank)
    ddp, dev = prepare(model, spec.loss, spec.find_unused_parameters)
    opt = make_optimizer(model, cfg)
    start, best, best_state, history = 1, None, None, []
    state = restore()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, best, best_state, history = state["epoch"] + 1, state.get("best_val"), state.get("best"), state["history"]
        if rank == 0:
            print(f"[{spec.what}] resuming after epoch {state['epoch']} from the latest checkpoint", flush=True)
    # The whole shard once, then a seeded permutation of it every epoch: the prepared data is
    # sorted by user, and a local shuffle buffer of two batches would feed a few users per
    # step. Each DDP step averages one random batch of every worker's shard.
    rows = shard_table(ray.train.get_dataset_shard("train"))
    meter = EpochMeter()
    for epoch in range(start, spec.epochs + 1):
        ddp.train()
        meter.start()
        # Seeded per (epoch, rank): a resumed run draws what an uninterrupted one would. Sampling
        # uses `gen`; dropout draws from torch's global generator, seeded from the same number, or
        # a run resumed after epoch e would train epoch e + 1 with other masks.
        epoch_seed = cfg.seed * 7919 + epoch * 101 + rank
        gen = torch.Generator(device=dev).manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed * 2 + 1)
        for table in epoch_batches(rows, cfg.batch_size, cfg.seed, epoch, rank):
            args = spec.batch_args(table, dev, gen)
            loss = ddp(*args)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            meter.add(float(loss.detach()), table.num_rows)
        summary = meter.summary()
        valid = float("nan")
        if rank == 0:
            model.eval()
            valid = float(spec.validate(model))
            if spec.keep_best and not math.isnan(valid) and (best is None or (valid > best if spec.higher_is_better else valid < best)):
                best, best_state = valid, cpu_state(model)
        metrics = {"epoch": epoch, "valid": valid, **summary}
        history.append(metrics)
        if rank == 0:
            print(f"[{spec.what}] epoch {epoch}/{spec.epochs} loss {summary['loss']:.4f} valid {valid:.4f} "
                  f"{summary['samples_per_s']:.0f} samples/s on {world} worker(s) ({summary['epoch_s']:.1f}s)", flush=True)
        save_checkpoint({"epoch": epoch, "model": cpu_state(model), "opt": opt.state_dict(), "best": best_state,
                         "best_val": best, "history": history}, metrics)


def final_state(result: Any) -> dict:
    """The last checkpoint's state of a finished run (raises the run's error, if any)."""
    if getattr(result, "error", None) is not None:
        raise result.error
    state = load_checkpoint(result.checkpoint)
    if state is None:
        raise RuntimeError("training finished without a checkpoint")
    return state


def train_and_save(spec: TrainSpec, train_uri: str, out: str, stage: str, key: str, config: GoalRankConfig,
                model_name: str, kind: str, vocab_uri: str, max_failures: int | None, dataset: Any | None = None) -> dict:
    """Shared driver of the training stages: fit on Ray Train, then save the best (else the
    last) weights as a one-model bundle in `{out}/model`. -> what the manifest records.
    `dataset`: a Ray Dataset to train on instead of `train_uri`'s (e.g. with extra columns
    computed by the driver); it must be a deterministic function of the stage's inputs (`key`)."""
    name = f"{stage}-{key}"
    # Materialised once: every epoch then splits blocks already in the object store instead
    # of reading storage again (seconds per epoch on a small machine).
    train = (dataset if dataset is not None else read_dataset(train_uri, f"{stage}: training data")).materialize()
    result = fit(worker_loop, {"spec": spec}, {"train": train}, out, name, config.train.num_workers, max_failures)
    state = final_state(result)
    bundle = load_bundle(vocab_uri, f"{stage}: vocabulary")
    bundle.config = config
    model = bundle.build(kind)
    model.load_state_dict(state["best"] if state.get("best") is not None else state["model"])
    bundle.add(model_name, kind, model.eval())
    saved = save_bundle(bundle, object_store.join(out, "model"))
    clear_checkpoints(out, name)
    history = state["history"]
    peak = max((h.get("worker_peak_rss_mb", 0.0) for h in history), default=None)
    return {
        "models": {"model": saved},
        "training": {"epochs": history, "best_valid": state.get("best_val"), "num_workers": config.train.num_workers},
        "memory": {"train_workers_peak_rss_mb": peak},
    }
