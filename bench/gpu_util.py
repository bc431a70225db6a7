"""Pieces the benchmarks need to run on a GPU (bench/gpu_checks.sh): models built on a device,
training precision, the device's peak FLOP/s for MFU, and a guard proving that a run needs
none of the pipeline's heavy packages (the GPU machine has torch, numpy, pandas, pyarrow
only).

    python -m bench.gpu_util run MODULE [ARGS...]   MODULE's main under the import guard
    python -m bench.gpu_util peak [PRECISION]       this device's peak TFLOP/s (JSON)
"""
from __future__ import annotations

import contextlib
import importlib.abc
import json
import runpy
import sys
from typing import Iterator

import torch

HEAVY = ("ray", "prefect", "mlflow", "boto3", "botocore", "moto")
PRECISIONS = ("fp32", "tf32", "bf16")

# Dense (no 2:4 sparsity) peak TFLOP/s from NVIDIA's data sheets, by a substring of
# torch.cuda.get_device_name (first match wins, so the specific names come first).
PEAK_TFLOPS = [
    ("H100 PCIe", {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H200 NVL", {"fp32": 60.0, "tf32": 417.5, "bf16": 835.0}),
    ("H100", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}),  # SXM: H100 SXM's compute
    ("A100", {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0}),
]


def device_peak(dev: torch.device) -> tuple[str | None, dict[str, float] | None]:
    """(the table row that matched, {precision: dense peak TFLOP/s}) for a CUDA device; (None, None) otherwise."""
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None, None
    name = torch.cuda.get_device_name(dev)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return key, dict(peaks)
    return None, None


def parse_peaks(spec: str | None, precisions: list[str], dev: torch.device) -> tuple[dict[str, float], str]:
    """--peak-tflops: a number (the peak of the one precision run), `auto` (the data-sheet
    table for this device) or `fp32=67,tf32=495,bf16=989`. -> ({precision: TFLOP/s}, source)."""
    if not spec:
        return {}, "none"
    if spec == "auto":
        key, peaks = device_peak(dev)
        return ({p: peaks[p] for p in precisions} if peaks else {}), (f"data sheet ({key})" if key else "unknown device")
    if "=" in spec:
        out = {}
        for part in spec.split(","):
            k, v = part.split("=", 1)
            if k.strip() not in PRECISIONS:
                raise ValueError(f"--peak-tflops: unknown precision {k!r} (known: {', '.join(PRECISIONS)})")
            out[k.strip()] = float(v)
        return out, "command line"
    if len(precisions) != 1:
        raise ValueError("--peak-tflops: give one number per precision (fp32=..,bf16=..) when running several")
    return {precisions[0]: float(spec)}, "command line"


def parse_sets(items: list[str]) -> dict[str, object]:
    """--set KEY=VALUE items -> config overrides; values parsed as JSON (1, 2e-3, true), else kept as text."""
    out: dict[str, object] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


@contextlib.contextmanager
def matmul_precision(name: str) -> Iterator[None]:
    """fp32 matmuls for the whole step (forward and backward): strict IEEE fp32 ("fp32"), or
    TF32 tensor cores ("tf32"); "bf16" runs fp32 outside the autocast region."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if name == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def autocast(name: str, dev: torch.device):
    """The forward pass's context: torch.autocast to bfloat16 for "bf16" (fp32 master weights;
    backward then runs outside it, as PyTorch recommends), nothing otherwise."""
    if name == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def models_on(dev: torch.device) -> Iterator[None]:
    """Every model `ModelBundle.build` makes inside the block is created on `dev`, so the
    project's own trainers (which follow the model's device) fit on it. A no-op on CPU."""
    from goalrank_core.bundle import ModelBundle

    if dev.type == "cpu":
        yield
        return
    orig = ModelBundle.build

    def build(self, kind: str):
        return orig(self, kind).to(dev)

    ModelBundle.build = build
    try:
        yield
    finally:
        ModelBundle.build = orig


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"{name} is blocked: the GPU machine does not have it (bench.gpu_util guard)")
        return None


def block_heavy() -> None:
    """Make importing ray/prefect/mlflow/boto3/moto fail, as on the GPU machine."""
    loaded = sorted({m.split(".")[0] for m in sys.modules} & set(HEAVY))
    if loaded:
        raise RuntimeError(f"already imported: {', '.join(loaded)}")
    sys.meta_path.insert(0, _Blocker())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["peak"]:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        key, peaks = device_peak(dev)
        print(json.dumps({"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
                          "matched": key, "peak_tflops": peaks}))
        return 0
    if len(argv) < 2 or argv[0] != "run":
        print(__doc__, file=sys.stderr)
        return 2
    block_heavy()
    sys.argv = [argv[1]] + argv[2:]
    if argv[1] == "pytest":
        import pytest

        return int(pytest.main(argv[2:]))
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
