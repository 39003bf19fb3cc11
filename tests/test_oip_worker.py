"""The shadow worker process with OIP challengers on a real MLServer: identical scores, and
a hung or killed server costs timeouts and errors, never a stuck worker."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shadowpipe import kafka
from shadowpipe.config import Settings
from shadowpipe.demo.world import World
from shadowpipe.schemas.codec import Codec
from tests.conftest import spawn_cli
from tests.test_shadow_worker import read_topic, stats, stop, wait_consumed

CODEC = Codec()


def produce(settings: Settings, world: World, n: int, prefix: str,
            hang: bool = False) -> dict[str, dict[str, float]]:
    """``n`` demo requests as InferenceEvents; with ``hang``, mean_radius is negative (the
    sleepy model then hangs on the batch). Returns the features by request id."""
    producer = kafka.producer(settings)
    sent = {}
    for i, req in enumerate(world.requests(n, seed=len(prefix) + n)):
        rid = f"{prefix}-{i}"
        feats = dict(req.features, mean_radius=-1.0) if hang else req.features
        event = {"request_id": rid, "event_time": int(time.time() * 1000), "model": "primary",
                 "model_version": "1", "num_features": feats,
                 "output": {"label": "benign", "probabilities": {}, "value": None},
                 "latency_ms": 1.0}
        producer.produce(settings.topic("inference"), CODEC.encode("InferenceEvent", event), rid)
        sent[rid] = feats
    assert producer.flush(30) == 0
    return sent


def wait_for(settings: Settings, proc: Any, check: Callable[[dict[str, Any]], bool],
             what: str, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    snap: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the worker died"
        try:
            snap = stats(settings)
        except OSError:
            snap = {}
        if snap and check(snap["challengers"]):
            return snap
        time.sleep(0.3)
    raise AssertionError(f"{what}: not reached in {timeout_s:.0f} s; last stats {snap}")


@pytest.fixture
def server(tmp_path: Path) -> Any:
    pytest.importorskip("mlserver_sklearn")
    pytest.importorskip("orjson")
    import joblib

    from tests import oip_server

    world = World.build()
    joblib.dump(world.primary, tmp_path / "primary.joblib")
    folder = tmp_path / "mlserver"
    folder.mkdir()
    srv = oip_server.start(folder, {"primary": tmp_path / "primary.joblib"}, sleepy="sleepy")
    yield srv
    srv.stop()


def test_hung_then_killed_server_never_stalls_the_worker(
        settings: Settings, server: Any, tmp_path: Path) -> None:
    world = World.build()
    names = ", ".join(f'"{n}"' for n in world.primary_features)
    classes = ", ".join(f'"{c}"' for c in world.primary.classes_)
    path = tmp_path / "challengers.toml"
    path.write_text(
        f'[[challengers]]\nname = "lr"\nversion = "1"\nkind = "oip"\n'
        f'location = "{server.url("primary")}"\nfeatures = [{names}]\n'
        f'outputs = ["predict_proba"]\nclasses = [{classes}]\ntimeout_ms = 5000\n\n'
        f'[[challengers]]\nname = "sleepy"\nversion = "1"\nkind = "oip"\n'
        f'location = "{server.url("sleepy")}"\nfeatures = ["mean_radius", "mean_texture"]\n'
        "timeout_ms = 1000\n")
    s = settings.replace(challengers=str(path))
    proc = spawn_cli(s, "worker", "shadow", log=tmp_path / "worker.log")
    try:
        # 1. healthy: every record scored by both, as scikit-learn scores it
        sent = produce(s, world, 200, "ok")
        wait_for(s, proc, lambda c: c["lr"]["scored"] == 200 and c["sleepy"]["scored"] == 200,
                 "healthy traffic scored")
        preds = [p for p in read_topic(s, "predictions", "ShadowPrediction", 400)
                 if p["challenger"] == "lr"]
        assert len(preds) == 200
        for p in preds:
            row = [[sent[p["request_id"]][n] for n in world.primary_features]]
            want = dict(zip(world.primary.classes_, world.primary.predict_proba(row)[0],
                            strict=True))
            assert p["output"]["label"] == max(want, key=want.__getitem__)
            assert all(abs(p["output"]["probabilities"][c] - v) <= 1e-6
                       for c, v in want.items())
        # 2. the sleepy model hangs on these batches: timeouts, the other arm unaffected
        produce(s, world, 100, "hang", hang=True)
        wait_for(s, proc, lambda c: c["sleepy"]["timeouts"] == 100 and c["lr"]["scored"] == 300,
                 "hung batches timed out")
        # 3. the server is still sleeping on those requests; new batches are scored again
        # (a batch arriving while the hung call still held the thread fails fast, as timeouts)
        produce(s, world, 200, "after")
        snap = wait_for(s, proc, lambda c: c["lr"]["scored"] == 500
                        and c["sleepy"]["scored"] + c["sleepy"]["timeouts"] == 500,
                        "the batches after the hang processed")
        assert snap["challengers"]["sleepy"]["scored"] >= 350
        # 4. the server dies: every record an error, the worker goes on consuming
        server.stop()
        produce(s, world, 200, "dead")
        snap = wait_for(s, proc,
                        lambda c: c["lr"]["errors"] == 200 and c["sleepy"]["errors"] == 200,
                        "records failed after the server died")
        assert snap["consumed"] == 700
        assert snap["challengers"]["sleepy"]["timeouts"] >= 100
        wait_consumed(s, proc, 700)
    finally:
        stop(proc)
    assert proc.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]


@pytest.mark.parametrize(("body", "message"), [
    ('kind = "onnx"\nlocation = "gone.onnx"\nfeatures = ["a"]\n',
     "challenger 'c': cannot load onnx from '"),
    ('kind = "oip"\nlocation = "http://127.0.0.1:9/v2/models/m"\nfeatures = ["a"]\n',
     "challenger 'c': cannot load oip from 'http://127.0.0.1:9/v2/models/m': "),
])
def test_misconfigured_kind_stops_the_worker_with_one_line(
        settings: Settings, tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "challengers.toml"
    path.write_text('[[challengers]]\nname = "c"\nversion = "1"\n' + body)
    log = tmp_path / "worker.log"
    proc = spawn_cli(settings.replace(challengers=str(path)), "worker", "shadow", log=log)
    assert proc.wait(60) == 2
    lines = log.read_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("shadowpipe: error: SHADOWPIPE_CHALLENGERS [shadow]: " + message)


def test_pipelined_batches_on_a_real_server(server: Any, tmp_path: Path) -> None:
    """Each batch submitted before the previous one is collected (as the worker does) gets
    its own records' scores; a batch the server hangs on times out alone, the one in
    flight beside it is scored."""
    from shadowpipe.processors.shadow.runner import Runner
    from tests.conftest import wait_for as wait_until
    from tests.test_challenger_kinds import assert_same, from_file, oip_body, reference

    world = World.build()
    records = [{"request_id": r.request_id, "num_features": r.features, "cat_features": {},
                "null_features": []} for r in world.requests(400, seed=5)]
    batches = [records[i:i + 100] for i in range(0, 400, 100)]
    classes = [str(c) for c in world.primary.classes_]
    lr = from_file(tmp_path, oip_body(server.url("primary"), world.primary_features, classes))
    runner = Runner("lr", lr, 30_000)
    try:
        pending = runner.submit(batches[0])
        for i, records_i in enumerate(batches):
            ahead = runner.submit(batches[i + 1]) if i + 1 < len(batches) else None
            assert_same(runner.collect(pending),
                        reference(world.primary, world.primary_features, records_i))
            pending = ahead
    finally:
        runner.close()

    sleepy = from_file(tmp_path, f'kind = "oip"\nlocation = "{server.url("sleepy")}"\n'
                                 'features = ["mean_radius", "mean_texture"]\n'
                                 "timeout_ms = 1000\n")
    runner = Runner("sleepy", sleepy, 1000)

    def rows(xs: list[float]) -> list[dict[str, Any]]:
        return [{"num_features": {"mean_radius": x, "mean_texture": 1.0}} for x in xs]

    try:
        hung = runner.submit(rows([-1.0, 2.0, 3.0]))
        beside = runner.submit(rows([1.0, 2.0]))
        assert [r.error_kind for r in runner.collect(hung)] == ["timeout"] * 3
        assert [r.output["value"] for r in runner.collect(beside)] == [2.0, 3.0]
        wait_until("the hung call to free its thread", lambda: hung.future.done(), 30)
        assert [r.output["value"] for r in runner.collect(runner.submit(rows([5.0])))] == [6.0]
    finally:
        runner.close()
