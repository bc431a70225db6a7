"""`goalrank run` on a fresh clone: the workspace folders Prefect needs do not exist yet."""
from __future__ import annotations

import os

from goalrank.cli.pipeline_cmd import _use_local_prefect


def test_local_prefect_home_is_created_with_its_parents(tmp_path, monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    workspace = tmp_path / "fresh" / ".goalrank"
    _use_local_prefect(workspace)
    assert os.environ["PREFECT_HOME"] == str((workspace / "prefect").resolve())
    assert (workspace / "prefect").is_dir()


def test_a_configured_prefect_server_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    monkeypatch.delenv("PREFECT_HOME", raising=False)
    _use_local_prefect(tmp_path / "ws")
    assert "PREFECT_HOME" not in os.environ and not (tmp_path / "ws").exists()
