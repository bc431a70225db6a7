"""The import contracts of pyproject.toml ([tool.importlinter]), checked with import-linter:
CLI over flows over tasks over core, a core without Ray / Prefect / MLflow / boto3, and no
import circles between sibling modules (function-local imports count too)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is not installed (make install)"
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def test_the_import_contracts_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "3 kept, 0 broken" in out.stdout


def test_a_circle_in_the_core_breaks_the_contract(tmp_path):
    """The contract can fail: the same check on a copy whose ranking imports fit back."""
    for pkg in ("goalrank", "flows", "tasks", "goalrank_core"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    ranking = tmp_path / "goalrank_core" / "ranking.py"
    ranking.write_text(ranking.read_text() + "\nfrom goalrank_core import fit  # noqa: E402\n")
    out = _lint(tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})  # the copy, not the checkout
    assert out.returncode != 0 and "BROKEN" in out.stdout and ".ranking -> .fit" in out.stdout, out.stdout[-2000:]


def test_an_index_beyond_the_embedding_table_reads_unk_everywhere():
    """Ids added after training (a bigger vocabulary than the model's tables) embed as UNK in
    the generator/reward embedder and in the baselines alike, never as the last real item."""
    import torch

    from goalrank_core.baselines import _Features
    from goalrank_core.batch import UNK
    from goalrank_core.layers import RequestEmbedder, in_table
    from gr_helpers import random_batch

    idx = torch.tensor([0, 1, 5, 39, 40, 99])
    assert in_table(idx, 40).tolist() == [0, 1, 5, 39, UNK, UNK]
    torch.manual_seed(0)
    emb = RequestEmbedder(8, 40, 10, 4, dropout=0.0, unk_rate=0.0).eval()
    b = random_batch(b=2, n=12, n_items=40, short_rows=0)
    beyond = type(b)(**{**b._asdict(), "candidates": b.candidates.clone().index_fill_(1, torch.tensor([0]), 77)})
    as_unk = type(b)(**{**b._asdict(), "candidates": b.candidates.clone().index_fill_(1, torch.tensor([0]), UNK)})
    feats = _Features(10, 40, 4, 8).eval()
    with torch.no_grad():
        assert torch.allclose(emb(beyond)[1], emb(as_unk)[1])
        assert torch.allclose(feats(beyond)[2], feats(as_unk)[2])  # the baselines' candidate embeddings
