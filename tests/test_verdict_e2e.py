"""The verdict end to end on the embedded stack: shadow worker, joiner and monitor in one
``worker all`` child process, real traffic through Kafka, the verdict read through the
monitor's endpoint and ``shadowpipe verdict``.

Challengers with known accuracy (:mod:`tests.verdict_challengers`): ``worse`` is exactly
5 points worse than the primary, ``equal`` as accurate on other requests, ``broken``
always times out. First the inference alone (no feedback yet): label criteria cannot be
judged (INCONCLUSIVE) while ``broken`` is REJECTed on its failure rate, which needs no
label. Then the feedback: ``worse`` is REJECTed, ``equal`` HELD with an ETA. The verdict
topic and the ``verdicts`` table hold the same sequence of decisions.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from shadowpipe import kafka
from shadowpipe.config import Settings
from shadowpipe.schemas.codec import Codec
from tests import verdict_challengers as vc
from tests.conftest import chdb_rows, spawn_cli

REPO = Path(__file__).resolve().parents[1]
CODEC = Codec()
REQUESTS = 3000
CHALLENGERS = """
[[challengers]]
name = "worse"
version = "1"
kind = "callable"
location = "tests.verdict_challengers:worse"

[[challengers]]
name = "equal"
version = "1"
kind = "callable"
location = "tests.verdict_challengers:equal"

[[challengers]]
name = "broken"
version = "1"
kind = "callable"
location = "tests.verdict_challengers:broken"
timeout_ms = 20
"""
# The error guardrail alone: the 0/1 cost criterion equals it here, and its default margin
# of 0 would judge the equal challenger at the margin itself.
POLICY = """
[defaults]
alpha = 0.05
[defaults.guardrails]
error = {margin = 0.01}
"""


def _requests(seed: int = 3) -> list[dict[str, Any]]:
    """Inference events two to one hour ago, with their labels and label delays."""
    rng = random.Random(seed)
    start = int(time.time() * 1000) - 2 * 3_600_000
    out = []
    for i in range(REQUESTS):
        features = {"x0": rng.random(), "x1": rng.random()}
        out.append({"request_id": f"v-{i}", "event_time": start + i * 1200,
                    "features": features, "truth": vc.truth(features),
                    "delay_ms": int(min(rng.expovariate(1 / 60_000), 600_000))})
    return out


def _produce_inference(s: Settings, requests: list[dict[str, Any]]) -> None:
    producer = kafka.producer(s)
    for r in requests:
        event = {"request_id": r["request_id"], "event_time": r["event_time"],
                 "model": "primary", "model_version": "1", "num_features": r["features"],
                 "output": {"label": vc.primary(r["features"]), "probabilities": {},
                            "value": None},
                 "latency_ms": 2.0}
        producer.produce(s.topic("inference"), CODEC.encode("InferenceEvent", event),
                         r["request_id"])
        producer.poll(0)
    assert producer.flush(30) == 0


def _produce_feedback(s: Settings, requests: list[dict[str, Any]]) -> None:
    producer = kafka.producer(s)
    for r in requests:
        feedback = {"request_id": r["request_id"], "label": r["truth"],
                    "event_time": r["event_time"] + r["delay_ms"]}
        producer.produce(s.topic("feedback"), CODEC.encode("Feedback", feedback),
                         r["request_id"])
        producer.poll(0)
    assert producer.flush(30) == 0


def _get(s: Settings, path: str, method: str = "GET", body: bytes | None = None,
         **params: str) -> tuple[int, dict[str, Any]] | None:
    url = f"http://{s.web_host}:{s.web_port}{path}?{urllib.parse.urlencode(params)}"
    req = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return None


def _verdict(s: Settings, challenger: str) -> dict[str, Any]:
    reply = _get(s, "/shadowpipe/verdict/", challenger=challenger)
    assert reply and reply[0] == 200, reply
    return reply[1]


def _counts(s: Settings) -> dict[str, tuple[int, int]]:
    """(published, labelled) per challenger, from the monitor's query endpoint."""
    reply = _get(s, "/shadowpipe/query/", name="arms", since_ms="0")
    if not reply or reply[0] != 200:
        return {}
    rows = [dict(zip(reply[1]["columns"], r, strict=True)) for r in reply[1]["rows"]]
    return {r["challenger"]: (r["published"], r["labelled"]) for r in rows}


def _wait(what: str, fn: Any, worker: subprocess.Popen, timeout_s: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker died"
        value = fn()
        if value:
            return value
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _cli(s: Settings, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadowpipe.cli", *args],
                          env={**os.environ, **s.to_env()}, capture_output=True, text=True,
                          timeout=180)


def _topic_verdicts(s: Settings) -> list[tuple[str, str]]:
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    consumer = kafka.consumer(s, f"t-{uuid.uuid4()}")
    topic = s.topic("verdicts")
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(s.partitions)])
    out: list[tuple[int, str, str]] = []
    idle = time.monotonic() + 15
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < min(idle, deadline):
            for m in consumer.consume(500, 0.5):
                if m.error() is None:
                    v = CODEC.decode(m.value(), "Verdict")
                    assert m.key().decode() == v["challenger"]
                    out.append((v["time_ms"], v["challenger"], v["verdict"]))
                    idle = time.monotonic() + 5
    finally:
        consumer.close()
    return [(c, v) for _t, c, v in sorted(out)]


def _table_verdicts(clickhouse_dir: Path, db: str) -> list[tuple[str, str]]:
    sql = f"SELECT challenger, verdict FROM {db}.verdicts ORDER BY time, challenger"
    return [tuple(r) for r in chdb_rows(clickhouse_dir, sql)]


def _by_challenger(seq: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for challenger, verdict in seq:
        out.setdefault(challenger, []).append(verdict)
    return out


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_verdicts_end_to_end(settings: Settings, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the worker imports the test challengers
    (tmp_path / "challengers.toml").write_text(CHALLENGERS)
    (tmp_path / "policy.toml").write_text(POLICY)
    s = settings.replace(
        challengers=str(tmp_path / "challengers.toml"), policy=str(tmp_path / "policy.toml"),
        clickhouse_url=f"chdb://{tmp_path / 'ch'}", clickhouse_database="verdict_e2e",
        allowed_lateness_s=86400, feedback_horizon_s=86400, verdict_interval_s=2,
        monitor_batch_ms=100, log_level="WARNING")
    requests = _requests()
    _produce_inference(s, requests)
    worker = spawn_cli(s, "worker", "all", log=tmp_path / "worker.log")
    try:
        # 1. No feedback yet.
        _wait("every prediction stored", lambda: _counts(s) == {
            c: (REQUESTS, 0) for c in ("worse", "equal", "broken")}, worker, 400)
        for name in ("worse", "equal"):
            v = _verdict(s, name)
            assert v["verdict"] == "INCONCLUSIVE", v
            assert v["reasons"]
        broken = _verdict(s, "broken")
        assert broken["verdict"] == "REJECT", broken
        limit = next(c for c in broken["criteria"] if c["name"] == "error_rate")
        assert limit["kind"] == "limit" and limit["decision"] == "harm" and limit["lo"] > 0.05

        # 2. The labels arrive.
        _produce_feedback(s, requests)
        _wait("every label stored", lambda: _counts(s) == {
            c: (REQUESTS, REQUESTS) for c in ("worse", "equal", "broken")}, worker, 400)
        worse = _wait("worse REJECTed", lambda: (v := _verdict(s, "worse"))
                      and v["verdict"] == "REJECT" and v, worker, 120)
        error = next(c for c in worse["criteria"] if c["name"] == "error")
        assert error["estimate"] == pytest.approx(0.05, abs=0.005)
        assert error["lo"] > 0.01 and error["decision"] == "harm"
        equal = _verdict(s, "equal")
        assert equal["verdict"] == "HOLD", equal
        error = next(c for c in equal["criteria"] if c["name"] == "error")
        assert error["decision"] == "undecided" and error["lo"] < 0.01 < error["hi"]
        assert error["eta_pairs"] and error["eta_pairs"] > 0
        assert any("pairs" in r for r in equal["reasons"]), equal["reasons"]

        # The CLI (through the endpoint) and the gates Argo Rollouts and Flagger read.
        codes = {name: _cli(s, "verdict", "--challenger", name).returncode
                 for name in ("worse", "equal", "broken")}
        assert codes == {"worse": 5, "equal": 3, "broken": 5}
        everything = _cli(s, "verdict", "--format", "json")
        assert everything.returncode == 5
        assert {v["challenger"]: v["verdict"] for v in
                json.loads(everything.stdout)["verdicts"]} == {
            "worse": "REJECT", "equal": "HOLD", "broken": "REJECT"}
        assert _get(s, "/shadowpipe/verdict/", challenger="equal", gate="promote")[0] == 412
        assert _get(s, "/shadowpipe/verdict/", challenger="equal", gate="no-reject")[0] == 200
        flagger = json.dumps({"name": "svc", "namespace": "ns", "phase": "Progressing",
                              "metadata": {"challenger": "broken"}}).encode()
        assert _get(s, "/shadowpipe/verdict/", "POST", flagger, gate="no-reject")[0] == 412

        # Another policy is a what-if (never recorded); an unreadable one is a setting error.
        lenient = tmp_path / "lenient.toml"
        lenient.write_text(POLICY.replace("0.01", "0.10"))
        status, what_if = _get(s, "/shadowpipe/verdict/", challenger="worse",
                               policy=str(lenient))
        assert status == 200 and what_if["what_if"] is True
        assert what_if["verdict"] == "HOLD" and not what_if["changed"]
        status, error = _get(s, "/shadowpipe/verdict/", challenger="worse",
                             policy=str(tmp_path / "missing.toml"))
        assert status == 400 and error["setting"] == "SHADOWPIPE_POLICY"
        bad = _cli(s, "verdict", "--policy", str(tmp_path / "missing.toml"))
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1

        # A reset lifts the latch; broken is judged afresh, and REJECTed again.
        reset = _cli(s, "verdict", "reset", "--challenger", "broken", "--format", "json")
        assert reset.returncode == 0, reset.stderr
        assert json.loads(reset.stdout)["verdict"]["verdict"] == "REJECT"
    finally:
        _stop(worker)
    table = _by_challenger(_table_verdicts(tmp_path / "ch", "verdict_e2e"))
    topic = _by_challenger(_topic_verdicts(s))
    assert table == topic
    assert table["worse"][0] == "INCONCLUSIVE" and table["worse"][-1] == "REJECT"
    assert table["equal"][0] == "INCONCLUSIVE" and table["equal"][-1] == "HOLD"
    # REJECT stands (latched) until the reset; before it, the limit may have needed data.
    assert table["broken"][-3:] == ["REJECT", "RESET", "REJECT"]
    assert table["broken"].index("REJECT") == len(table["broken"]) - 3
