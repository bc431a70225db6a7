"""Storage outage during a stage (issue 8): the S3 server becomes unreachable in the middle of
the prepare stage, after part of the stage's output was written; the Prefect task fails,
is retried with backoff once the server is back, finds a stage folder without a manifest,
clears it and redoes the stage.

How the outage is made: moto keeps objects in RAM, so stopping and restarting the server
would also lose the stage's inputs and its partial output (nothing left to prove the
"partial folder is ignored and redone" rule on). Instead the pipeline reaches the session's
moto server through a TCP proxy on loopback that this test stops and restarts: for the
pipeline, S3 refuses connections for a while (exactly what a down server looks like), and
the objects written before the outage are still there afterwards. The outage is triggered
by the stage's first request for its `vocab/` folder, which comes after the train/valid/test
parts were written, so it always falls mid-stage."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from flow_helpers import TINY_OVERRIDES, synth_source

pytestmark = [pytest.mark.ray, pytest.mark.s3]


class FlakyProxy:
    """127.0.0.1:port -> 127.0.0.1:target. When `trigger` first appears in what a client
    sends, every connection is dropped and the port refuses connections for `outage_s`
    seconds; then it listens again. `on_cut()` runs once during the outage."""

    def __init__(self, target_port: int, trigger: bytes, outage_s: float, on_cut=None):
        self.target, self.trigger, self.outage_s, self.on_cut = target_port, trigger, outage_s, on_cut
        self.cuts, self.connections = 0, 0
        self.down_at = self.up_at = None
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._listen()

    def _listen(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(64)
        ls.settimeout(0.1)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:
                return  # listener closed: outage or shutdown
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                client.close()
                continue
            with self._lock:
                self.connections += 1
                self._socks += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and self.cuts == 0 and self.trigger in data:
                    self.cut()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        with self._lock:
            if self.cuts:
                return
            self.cuts += 1
            self.down_at = time.time()
            self._listener.close()
            for s in self._socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
            self._socks.clear()
        if self.on_cut is not None:
            self.on_cut()
        threading.Timer(self.outage_s, self._restore).start()

    def _restore(self) -> None:
        if not self._closed:
            self.up_at = time.time()
            self._listen()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._socks:
                try:
                    s.close()
                except OSError:
                    pass


@pytest.mark.parametrize("layer, attempts, outage_s", [
    # The S3 client gives up after 2 attempts: the outage reaches the Prefect task.
    ("prefect-retry", 2, 6.0),
    # The default client retries (6 attempts) ride out a short outage inside the first try.
    pytest.param("client-retry", 6, 4.0, marks=pytest.mark.slow),
])
def test_outage_mid_stage_is_retried_and_the_partial_stage_is_redone(prefect_harness, ray_session, s3_server,
                                                                       s3_storage, tmp_path, monkeypatch, capfd, caplog,
                                                                       layer, attempts, outage_s):
    from prefect import flow

    from flows.stage_tasks import prepare_task
    from goalrank_core.config import GoalRankConfig
    from tasks.stages import stage_uri

    imp, items = synth_source(tmp_path / "data")
    out = stage_uri(s3_storage, "synth", "r1", "prepare")
    bucket = s3_server["bucket"]
    prefix = out[len(f"s3://{bucket}/"):]
    during: dict = {}

    def look_during_outage() -> None:
        # What is in the stage folder while S3 is unreachable for the pipeline (read directly).
        objs = s3_server["client"].list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
        during["keys"] = sorted(o["Key"][len(prefix) + 1:] for o in objs)

    port = int(s3_server["endpoint"].rsplit(":", 1)[1])
    proxy = FlakyProxy(port, trigger=b"/prepare/vocab", outage_s=outage_s, on_cut=look_during_outage)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.setenv("GOALRANK_S3_MAX_ATTEMPTS", str(attempts))
    cfg = GoalRankConfig().override(TINY_OVERRIDES).to_dict()
    source = {"dataset": None, "impressions": str(imp), "items": str(items), "data_dir": None}

    @flow(name="reliability-storage-outage")
    def one_stage():
        return prepare_task("r1", source, out, cfg, return_state=True)

    t0 = time.time()
    try:
        state = one_stage()
        wall = time.time() - t0
        _check(state, proxy, during, out, layer, t0, capfd, caplog)
    finally:
        proxy.close()
    print(f"outage test ({layer}): {wall:.1f}s, {proxy.connections} proxied connections")


def _check(state, proxy, during, out, layer, t0, capfd, caplog) -> None:
    from prefect.client.orchestration import get_client

    from goalrank_core.schemas import IMPRESSIONS
    from tasks import object_store, storage

    assert state.is_completed(), state
    summary = state.result()

    # The outage happened mid-stage: parts of the splits were there, the manifest was not.
    assert proxy.cuts == 1 and proxy.up_at is not None
    assert any(k.startswith("train/") and k.endswith(".parquet") for k in during["keys"]), during
    assert "_manifest.json" not in during["keys"], during
    # Prefect retried the task (with backoff) and the retry finished after the outage.
    with get_client(sync_client=True) as client:
        run = client.read_task_run(state.state_details.task_run_id)
    assert time.time() - t0 >= proxy.outage_s
    logs = capfd.readouterr()
    # log_prints=True turns the stage's prints into Prefect log records: read both streams.
    text = logs.out + logs.err + caplog.text
    if layer == "prefect-retry":
        assert run.run_count >= 2, run.run_count
        assert "has no manifest (interrupted run): clearing and redoing it" in text, text[-3000:]
    else:
        assert run.run_count == 1, run.run_count
    # The redone stage is complete and consistent, read back through the proxy.
    assert not summary["skipped"]
    manifest = storage.read_manifest(out)
    assert manifest is not None and manifest["fingerprint"] == summary["manifest"]["fingerprint"]
    for split in ("train", "valid", "test"):
        t = storage.read_table(object_store.join(out, split), IMPRESSIONS, split)
        assert t.num_rows == manifest["tables"][split]["rows"] > 0
