"""MLflow tracking: the ranker as a pyfunc (logged, registered, loaded by alias, predicting
the same lists as the bundle), params without credentials, metrics/plots/table artifacts."""
from __future__ import annotations

import tempfile

import numpy as np
import pyarrow as pa
import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from flows import registry, tracking  # noqa: E402
from goalrank_core.config import GoalRankConfig  # noqa: E402
from goalrank_core.errors import GoalRankInputError  # noqa: E402
from goalrank_core.schemas import METRICS  # noqa: E402

TINY = {"protocol.slate_len": 3, "protocol.n_candidates": 8, "generator.d_model": 8, "generator.n_heads": 2,
        "generator.n_layers": 1, "reward.d_model": 8, "reward.n_heads": 2, "reward.n_layers": 1,
        "train.epochs": 1, "train.reward_epochs": 1, "train.aux_epochs": 1, "group.rounds": 1,
        "group.size": 4, "group.generator_samples": 2, "policies.dnn_dim": 8, "policies.dnn_hidden": 8,
        "policies.prm_d_model": 8, "policies.emb_dim": 8}


def _impressions(n: int, seed: int, offset: int = 0) -> pa.Table:
    from goalrank_core.validate import validate_impressions

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        cand = rng.choice(np.arange(2, 40), 8, replace=False)
        rows.append({"request_id": f"r{offset + i}", "user_id": int(rng.integers(1, 10)), "timestamp": 1000 + i,
                     "history": [int(x) for x in rng.choice(np.arange(2, 40), 4)],
                     "candidates": [int(x) for x in cand], "shown": [int(x) for x in cand[:3]],
                     "labels": [float(x) for x in rng.integers(0, 2, 3)]})
    return validate_impressions(pa.Table.from_pylist(rows), "test impressions")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A real (tiny) fitted bundle: every model of the in-process fit, a few seconds."""
    from goalrank_core.fit import fit_tables

    cfg = GoalRankConfig().override(TINY)
    bundle = fit_tables(_impressions(60, 0), _impressions(20, 1, 100), cfg, log=lambda *a: None)
    path = tmp_path_factory.mktemp("bundle") / "generator"
    bundle.save(path)
    return str(path)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return tracking.default_tracking_uri(root), root


def test_scrub_drops_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value-xyz")
    params = tracking.scrub({
        "storage": "s3://user:pw@bucket/prefix?X-Amz-Security-Token=abc&region=eu",
        "aws_secret_access_key": "x", "note": "contains s3cr3t-value-xyz here", "group.size": 10})
    assert params == {"storage": "s3://bucket/prefix?region=eu", "note": "contains *** here", "group.size": 10}
    assert tracking.flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_pyfunc_logged_registered_and_loaded_by_alias(bundle_dir, store, tmp_path, monkeypatch):
    from goalrank_core.bundle import ModelBundle
    from goalrank_core.ranking import rank

    uri, root = store
    requests = _impressions(5, 7, 500).drop_columns(["shown", "labels"])
    example = requests.to_pandas()
    with tracking.pipeline_run(uri, "tracking-tests", "run-a", "cfg1") as run:
        source = tracking.log_ranker(bundle_dir, example.head(2))
    client = MlflowClient(uri)
    mv, created = registry.register(client, "goalrank-t", source, run.info.run_id, "run-a", "cfg1",
                                    {"valid.ndcg@3": 0.3})
    assert created
    assert registry.promote(client, "goalrank-t", mv.version, metric="ndcg@3").promoted

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/goalrank-t@champion")
    sig = model.metadata.get_input_schema()
    assert sig.input_names() == tracking.REQUEST_COLUMNS
    out = model.predict(example)
    expected = rank(ModelBundle.load(bundle_dir), requests, "goalrank")
    assert list(out["request_id"]) == expected.column("request_id").to_pylist()
    assert [list(map(int, r)) for r in out["ranked"]] == expected.column("ranked").to_pylist()
    for cands, ranked in zip(example["candidates"], out["ranked"]):
        assert len(ranked) == 3 and len(set(ranked)) == 3 and set(ranked) <= set(cands)

    # `goalrank rank --model models:/...` goes through resolve_model_dir: the same bundle files.
    local = tracking.resolve_model_dir("models:/goalrank-t@champion", uri, str(tmp_path / "dl"))
    assert sorted(p.name for p in __import__("pathlib").Path(local).iterdir()) == \
        sorted(p.name for p in __import__("pathlib").Path(bundle_dir).iterdir())
    assert tracking.resolve_model_dir("/some/local/dir", uri) == "/some/local/dir"
    # load_bundle_from (`goalrank rank`, the daily flows) loads it and leaves no download behind.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    loaded = tracking.load_bundle_from("models:/goalrank-t@champion", uri)
    assert rank(loaded, requests, "goalrank").equals(expected)
    assert list(scratch.iterdir()) == []

    # Bad requests are refused with a message naming the column.
    bad = example.drop(columns=["candidates"])
    with pytest.raises(Exception, match="candidates"):
        model.predict(bad)
    with pytest.raises(GoalRankInputError, match="candidates"):
        tracking.requests_from_frame(example.assign(candidates=[[] for _ in range(len(example))]))


def test_run_logging_params_metrics_plots_table(store, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake-secret-for-tracking-test")
    uri, root = store
    cfg = GoalRankConfig().override({"group.size": 10})
    metrics = pa.table({
        "split": ["valid", "valid", "test"], "policy": ["goalrank", "dnn", "goalrank"],
        "metric": ["ndcg@6", "ndcg@6", "ndcg@6"], "value": [0.5, 0.4, 0.45], "ci_low": [0.45, 0.35, 0.4],
        "ci_high": [0.55, 0.45, 0.5], "n_requests": [10, 10, 10]}, schema=METRICS)
    summary = {"stage": "train_generator_r1", "wall_s": 3.5, "peak_mb": 800.0, "rows": 100,
               "manifest": {"training": {"epochs": [{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.7}]}}}
    for attempt in range(2):  # a rerun reopens the same MLflow run
        with tracking.pipeline_run(uri, "tracking-tests", "run-b", cfg.hash()) as run:
            tracking.log_params(cfg.to_dict(), {"storage": "s3://k:fake-secret-for-tracking-test@b/p"})
            tracking.log_stage(summary["stage"], summary)
            tracking.log_evaluation(metrics)
            plots = tracking.log_plots({"train_generator_r1": tracking.epoch_history(summary["manifest"])},
                                       metrics, "ndcg@6")
            tracking.log_decision({"version": "1", "promoted": True, "reason": "no champion yet",
                                   "challenger_value": 0.5, "champion_value": None, "champion_version": None})
        run_ids = {run.info.run_id} if attempt == 0 else run_ids | {run.info.run_id}
    assert len(run_ids) == 1
    client = MlflowClient(uri)
    data = client.get_run(run.info.run_id).data
    assert data.params["group.size"] == "10" and data.params["storage"] == "s3://b/p"
    assert "fake-secret" not in repr(data.params) + repr(data.tags)
    assert data.metrics["valid.goalrank.ndcg_at_6"] == pytest.approx(0.5)
    assert data.metrics["stage.train_generator_r1.wall_s"] == pytest.approx(3.5)
    hist = client.get_metric_history(run.info.run_id, "train_generator_r1.loss")
    assert sorted((m.step, m.value) for m in hist)[:2] == [(0, 1.0), (1, pytest.approx(0.7))]
    assert data.tags["goalrank.promotion.promoted"] == "true"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert arts == set(plots) == {"plots/training_curves.png", "plots/goalrank_vs_baselines.png"}
    assert [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")] == ["evaluation/metrics.json"]
    png = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="plots/training_curves.png",
                                              tracking_uri=uri)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # Artifacts of the local store live beside its database, not in ./mlruns of the cwd.
    assert (root / "mlartifacts").is_dir()


@pytest.mark.slow
def test_mlflow_models_serve_answers_ranking_requests(bundle_dir, store, tmp_path):
    """`mlflow models serve -m models:/NAME@champion` on 127.0.0.1 answers POST /invocations."""
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    uri, root = store
    requests = _impressions(4, 9, 900).drop_columns(["shown", "labels"])
    with tracking.pipeline_run(uri, "tracking-tests", "run-serve", "cfg1") as run:
        source = tracking.log_ranker(bundle_dir, requests.to_pandas().head(2))
    client = MlflowClient(uri)
    mv, _ = registry.register(client, "goalrank-served", source, run.info.run_id, "run-serve", "cfg1",
                              {"valid.ndcg@3": 0.3})
    registry.promote(client, "goalrank-served", mv.version, metric="ndcg@3")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    # The scoring server runs `uvicorn` by name: the venv's bin must be on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "models", "serve", "-m",
                                 "models:/goalrank-served@champion", "--env-manager", "local", "-h", "127.0.0.1",
                                 "-p", str(port), "-w", "1"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        body = json.dumps({"dataframe_records": requests.to_pylist()}).encode()
        deadline, reply = time.time() + 120, None
        while time.time() < deadline and reply is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", body,
                                             {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=10) as r:
                    reply = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert reply is not None, log.read_text()[-3000:]
        preds = reply["predictions"]
        assert [p["request_id"] for p in preds] == requests.column("request_id").to_pylist()
        for p, cands in zip(preds, requests.column("candidates").to_pylist()):
            assert len(p["ranked"]) == 3 and set(p["ranked"]) <= set(cands)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
