"""The review loop end to end on the embedded stack: the joiner runs as a worker process;
``shadowpipe review publish`` puts the most uncertain records on the review topic; the
reviewer client of docs/review.md (run as written, ``input()`` answering) sends human
feedback; the answers come back as labelled joined records with feedback_source 'human',
and a verdict policy counting only human labels goes from 0 labelled pairs to one per
answer."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from shadowpipe import cli
from shadowpipe.config import Settings
from shadowpipe.kafka import consumer, producer
from shadowpipe.processors.monitor import sink
from shadowpipe.processors.verdict.aggregate import aggregate
from shadowpipe.processors.verdict.policy import Policy
from shadowpipe.schemas.codec import Codec
from shadowpipe.stores import clickhouse_client
from shadowpipe.tables import migrate
from tests.conftest import assign_from_start, spawn_cli
from tests.test_join_worker import _stop

REPO = Path(__file__).resolve().parents[1]
CODEC = Codec()
REQUESTS = 30  # the first half uncertain (margins 0.02, 0.04, ...), the rest confident
LIMIT = 8
HUMAN_POLICY = Policy.parse('[defaults]\nlabels = "human"\n')


def client_block() -> str:
    """The reviewer client of docs/review.md."""
    section = (REPO / "docs" / "review.md").read_text().split("## A reviewer client", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "docs/review.md shows the reviewer client"
    return block.group(1)


def _messages(now_ms: int) -> list[tuple[str, str, bytes]]:
    out = []
    for i in range(REQUESTS):
        rid = f"q{i:03d}"
        p = 0.51 + 0.01 * i if i < REQUESTS // 2 else 0.97
        inference = {
            "request_id": rid, "event_time": now_ms - 60_000 + i, "model": "m",
            "model_version": "1", "num_features": {"radius": 10.0 + i},
            "cat_features": {"scanner": "a"}, "null_features": [],
            "output": {"label": "a", "probabilities": {"a": 0.8, "b": 0.2}, "value": None},
            "latency_ms": 2.0, "context": {"clinic": "east"}, "inclusion_prob": 1.0,
            "trace_id": None}
        prediction = {
            "request_id": rid, "challenger": "c1", "challenger_version": "1",
            "is_control": False, "event_time": inference["event_time"],
            "scored_at": inference["event_time"] + 5,
            "output": {"label": "b", "probabilities": {"b": p, "a": 1 - p}, "value": None},
            "model_time_ms": 1.0, "queue_lag_ms": 1.0, "error": None, "error_kind": None}
        out += [("inference", rid, CODEC.encode("InferenceEvent", inference)),
                ("predictions", rid, CODEC.encode("ShadowPrediction", prediction))]
    return out


class Topic:
    """Decoded records of one topic, read from the start, accumulated."""

    def __init__(self, s: Settings, kind: str, schema: str) -> None:
        self.consumer = consumer(s, f"test-{uuid.uuid4().hex[:8]}")
        assign_from_start(self.consumer, s, s.topic(kind))
        self.schema, self.records = schema, []  # type: list[dict[str, Any]]

    def wait(self, what: str, done: Any, timeout_s: float = 90.0) -> list[dict[str, Any]]:
        deadline = time.time() + timeout_s
        while not done(self.records):
            assert time.time() < deadline, f"timed out waiting for {what}: {len(self.records)}"
            for msg in self.consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    self.records.append(CODEC.decode(msg.value(), self.schema))
        return self.records


def _store(client: Any, s: Settings, records: list[dict[str, Any]]) -> None:
    """Into joined_records as the monitor's sink writes them."""
    cols = sink.joined_columns(records)
    client.insert("joined_records", list(cols.values()), column_names=list(cols),
                  database=s.clickhouse_database, column_oriented=True)


def _human_labelled(client: Any, s: Settings) -> int:
    return aggregate(client, s, HUMAN_POLICY).challengers["c1"].overall().labelled


def test_review_requests_answered_by_the_doc_client_become_human_labels(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    s = settings.replace(clickhouse_database=f"r{uuid.uuid4().hex[:10]}", log_level="WARNING")
    for name, value in s.to_env().items():  # the CLI and the doc's Emitter() read these
        monkeypatch.setenv(name, value)
    client = clickhouse_client(s)
    migrate(client, s)
    joined, review = Topic(s, "joined", "JoinedRecord"), Topic(s, "review", "ReviewRequest")
    worker = spawn_cli(s, "worker", "join", log=tmp_path / "join.log")
    try:
        prod = producer(s)
        for kind, key, value in _messages(int(time.time() * 1000)):
            prod.produce(s.topic(kind), value, key.encode())
        assert prod.flush(30) == 0
        predicted = joined.wait("every request joined", lambda r: len(r) >= REQUESTS)
        assert {r["state"] for r in predicted} == {"predicted"}
        _store(client, s, predicted)
        assert _human_labelled(client, s) == 0

        assert cli.main(["review", "publish", "--kind", "uncertain", "--limit",
                         str(LIMIT)]) == 0
        assert f"published {LIMIT} review requests" in capsys.readouterr().out
        requests = review.wait("the review requests", lambda r: len(r) >= LIMIT)
        # The most uncertain first: margins 0.02, 0.04, ... of q000, q001, ...
        assert sorted(r["request_id"] for r in requests) == [f"q{i:03d}" for i in range(LIMIT)]
        assert all(r["kind"] == "uncertain" and r["score"] < r["threshold"] for r in requests)
        assert requests[0]["shadow_output"]["label"] == "b"
        assert requests[0]["num_features"]["radius"] >= 10.0

        asked: list[str] = []

        def reviewer(prompt: str) -> str:
            asked.append(prompt)
            return "b"

        code = (client_block().replace("127.0.0.1:19092", s.kafka_bootstrap)
                .replace('"shadowpipe.review"', repr(s.topic("review")))
                .replace("range(4)", f"range({s.partitions})").replace("poll(10)", "poll(3)"))
        assert len([line for line in code.splitlines() if line.strip()]) == 10
        monkeypatch.chdir(tmp_path)
        exec(compile(code, "docs/review.md", "exec"), {"input": reviewer})  # noqa: S102
        assert len(asked) == LIMIT

        labelled = joined.wait("the human labels joined", lambda r: sum(
            x["state"] == "labelled" for x in r) >= LIMIT)
        answers = [r for r in labelled if r["state"] == "labelled"]
        assert {r["request_id"] for r in answers} == {r["request_id"] for r in requests}
        assert all(r["feedback_source"] == "human" and r["label"] == "b" for r in answers)
        _store(client, s, answers)
        stored = client.command(
            f"SELECT count() FROM {s.clickhouse_database}.joined_records FINAL "
            "WHERE state = 'labelled' AND feedback_source = 'human'")
        assert int(stored) == LIMIT
        assert _human_labelled(client, s) == LIMIT
    finally:
        _stop(worker)
