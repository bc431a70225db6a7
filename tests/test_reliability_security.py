"""Security (issue 8): every service the project starts listens on loopback only; model
weights and training checkpoints load without unpickling (a pickled payload is refused and
never runs); no code path loads pickles. The whole-flow search for leaked credentials is in
test_reliability_flow.py (slow)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from infra.stack import listening_sockets

ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


@pytest.mark.ray
@pytest.mark.s3
def test_services_started_by_the_project_listen_on_loopback_only(ray_session, s3_server, prefect_harness):
    """Ray (tasks.ray_runtime.ensure_ray, local mode), the S3 server and Prefect's temporary
    server, all started by this test session: every listening socket of this process and of
    every process below it is on a loopback address. (infra.stack's services are checked the
    same way in test_local_stack.py, slow.)"""
    import ray

    @ray.remote(num_cpus=0.5)
    def ping() -> int:  # make sure a worker process exists
        return os.getpid()

    worker = ray.get(ping.remote())
    pids = [os.getpid()] + descendants(os.getpid())
    assert worker in pids and s3_server["pid"] in pids
    socks = listening_sockets(pids)
    assert len(socks) >= 4, socks  # moto, Prefect, Ray's GCS/raylet/workers at least
    wide = [s for s in socks if s[0] not in LOOPBACK]
    assert not wide, f"listening beyond loopback: {wide}"


class Payload:
    """Unpickling this creates `marker`: proof that pickled code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    from goalrank_core.fit import fit_tables
    from gr_helpers import synth_tables, tiny_config

    splits, _ = synth_tables(n_users=15, requests_per_user=4)
    bundle = fit_tables(splits.train, splits.valid, tiny_config(), splits.items, log=lambda *a: None)
    path = tmp_path_factory.mktemp("bundle") / "model"
    bundle.save(path)
    return path


@pytest.mark.parametrize("target", ["generator.pt", "tensors.pt"])
def test_a_pickled_payload_in_a_model_folder_is_refused_and_never_runs(bundle_dir, tmp_path, capsys, target):
    import shutil

    from goalrank.cli import main
    from goalrank_core.bundle import BundleError, ModelBundle

    evil = tmp_path / "model"
    shutil.copytree(bundle_dir, evil)
    if target == "tensors.pt" and not (evil / "tensors.pt").exists():
        pytest.skip("this bundle has no tensors.pt")
    marker = tmp_path / "pwned"
    torch.save({"weight": Payload(str(marker))}, evil / target)
    with pytest.raises(BundleError, match=f"{target}: refused: not a plain weights file"):
        ModelBundle.load(evil)
    assert not marker.exists()
    # The CLI says so in one line, exit 2.
    (tmp_path / "req.parquet").write_bytes(b"")
    assert main(["rank", "--model", str(evil), "--requests", str(tmp_path / "req.parquet"),
                 "--out", str(tmp_path / "o.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "refused" in err, err
    assert not marker.exists() and not (tmp_path / "o.parquet").exists()
    # The untouched bundle still loads.
    assert "generator" in ModelBundle.load(bundle_dir).models


def test_a_pickled_payload_as_a_training_checkpoint_is_refused(tmp_path):
    """Ray Train checkpoints (tasks.ray_train) are read with weights_only=True as well."""
    import pickle

    from ray.train import Checkpoint

    from tasks.ray_train import load_checkpoint

    d = tmp_path / "ckpt"
    d.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "model": {}, "opt": Payload(str(marker))}, d / "state.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(Checkpoint.from_directory(str(d)))
    assert not marker.exists()
    # A checkpoint of plain tensors, numbers and lists loads.
    torch.save({"epoch": 2, "model": {"w": torch.ones(2)}, "history": [{"loss": 1.0}]}, d / "state.pt")
    assert load_checkpoint(Checkpoint.from_directory(str(d)))["epoch"] == 2


_LOADS = re.compile(r"\btorch\.load\((?P<args>.*)|\b(?:pickle|cloudpickle|joblib|dill)\.loads?\(|"
                    r"mlflow\.pytorch\.load_model\(")  # a torch.load call fits on one line here


def test_no_code_path_unpickles():
    """Every torch.load in the project passes weights_only=True; nothing calls pickle.load(s),
    cloudpickle, joblib or mlflow.pytorch.load_model (which unpickles a whole module)."""
    found = []
    for pkg in ("goalrank_core", "tasks", "flows", "goalrank", "infra", "bench"):
        for path in (ROOT / pkg).rglob("*.py"):
            for m in _LOADS.finditer(path.read_text()):
                if m.group("args") is not None and "weights_only=True" in m.group("args"):
                    continue
                found.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not found, found
