"""The monitor pipeline on the real embedded stack (Kafka, Redis, chdb): alerts on the
topic and in ClickHouse, ClickHouse outages, restarts from the checkpoint."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.processors.monitor.alerts import follow
from shadowpipe.processors.monitor.pipeline import BULK_FIELDS, Message, Pipeline
from shadowpipe.processors.publisher import Publisher
from shadowpipe.schemas.codec import Codec
from shadowpipe.stores import clickhouse_client

CODEC = Codec()
# Recent event times: older rows would fall to the joined records' TTL on insert.
RECENT_MS = (int(time.time()) // 3600 - 2) * 3_600_000


def _monitor_settings(settings: Settings) -> Settings:
    return settings.replace(clickhouse_database=f"m{uuid.uuid4().hex[:10]}",
                            segments=("region",), drift_features=("amount",))


def _messages(records: list[dict]) -> list[Message]:
    return [Message(CODEC.encode("JoinedRecord", r), r["request_id"].encode(), "joined", 0, i)
            for i, r in enumerate(records)]


def _drive(pipeline: Pipeline, settings: Settings, messages: list[Message],
           batch: int = 2000) -> list[dict]:
    """What the agent does per batch: process, publish, checkpoint."""
    publisher, alerts = Publisher(settings), []
    for i in range(0, len(messages), batch):
        result = pipeline.process(messages[i:i + batch])
        for alert in result.alerts:
            publisher.produce(settings.topic("alerts"), alert["challenger"],
                              CODEC.encode("Alert", alert))
        publisher.flush_sync()
        pipeline.checkpoint()
        alerts += result.alerts
    return alerts


def _client(settings: Settings) -> Any:
    return clickhouse_client(settings)


def _count(settings: Settings, sql: str) -> int:
    return int(_client(settings).command(sql.replace("{db}", settings.clickhouse_database)))


def test_accuracy_drift_alert_on_topic_and_in_clickhouse(settings: Settings) -> None:
    s = _monitor_settings(settings)
    change = 1_700_000_000_000 + 150_000
    drift = synthetic.Drift(at_ms=change, challenger="c1", attribute="region", value="us")
    records = synthetic.stream(synthetic.Spec(requests=8000, seed=21, interval_ms=25,
                                              drift=drift))
    pipeline = Pipeline(s)
    pipeline.migrate()
    alerts = _drive(pipeline, s, _messages(records))
    seg = [a for a in alerts if a["metric"] == "error_rate" and a["arm"] == "challenger"
           and a["segment"] == "region=us"]
    assert seg, alerts
    fired = int(seg[0]["details"]["event_time"])
    assert sum(1 for r in records if r["state"] == "labelled"
               and change <= r["label_time"] <= fired) <= 2000
    published = []
    for alert in follow(s, stop=lambda: len(published) >= len(alerts)):
        published.append(alert)
    assert seg[0] in published
    row = _client(s).query(
        f"SELECT challenger, detector, segment FROM {s.clickhouse_database}.alerts FINAL "
        "WHERE alert_id = {id:String}", parameters={"id": seg[0]["alert_id"]}).result_rows
    assert row == [("c1", "ADWIN", "region=us")]


def test_no_accuracy_drift_alert_without_the_change(settings: Settings) -> None:
    s = _monitor_settings(settings)
    records = synthetic.stream(synthetic.Spec(requests=8000, seed=21, interval_ms=25))
    pipeline = Pipeline(s)
    pipeline.migrate()
    alerts = _drive(pipeline, s, _messages(records))
    assert not [a for a in alerts if a["metric"] == "error_rate"]
    assert _count(s, "SELECT count() FROM {db}.alerts FINAL WHERE metric = 'error_rate'") == 0


class FlakyClient:
    """Fault injection on the real engine: inserts fail while ``down`` is set."""

    def __init__(self, real: Any, state: dict[str, Any]) -> None:
        self.real, self.state = real, state

    def _fail_if_down(self) -> None:
        if self.state["down"]:
            self.state["failures"] += 1
            if self.state["failures"] >= 3:
                self.state["down"] = False  # back after three failed attempts
            raise ConnectionError("ClickHouse unreachable (injected)")

    def insert(self, *args: Any, **kwargs: Any) -> Any:
        self._fail_if_down()
        return self.real.insert(*args, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:  # INSERT ... SELECT from the file
        self._fail_if_down()
        return self.real.command(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_clickhouse_down_mid_run_then_back_loses_and_duplicates_nothing(
        settings: Settings) -> None:
    s = _monitor_settings(settings)
    state = {"down": False, "failures": 0}
    real = _client(s)
    pipeline = Pipeline(s, client_factory=lambda: FlakyClient(real, state),
                        sleep=lambda _s: None)
    pipeline.migrate()
    records = synthetic.stream(synthetic.Spec(requests=3000, challengers=("c1", "c2"),
                                              seed=4, interval_ms=100,
                                              start_ms=RECENT_MS))
    messages = _messages(records)
    half = len(messages) // 2
    _drive(pipeline, s, messages[:half])
    state["down"] = True
    _drive(pipeline, s, messages[half - 500:])  # overlap: redelivered records
    assert state["failures"] >= 3 and pipeline.sink.failures >= 3
    pipeline.close_all()
    joined = {(r["request_id"], r["challenger"]) for r in records}
    db = "{db}"
    assert _count(s, f"SELECT count() FROM {db}.joined_records FINAL") == len(joined)
    assert _count(s, f"SELECT countIf(state = 'labelled') FROM {db}.joined_records FINAL") \
        == sum(1 for r in records if r["state"] == "labelled")
    windows = _client(s).query(
        f"SELECT challenger, segment, toUnixTimestamp64Milli(window_start), published "
        f"FROM {s.clickhouse_database}.windows FINAL WHERE segment = ''").result_rows
    closed = {(c, w): n for c, _seg, w, n in windows}
    assert len(closed) == len(windows)  # one row per window after FINAL
    assert sum(closed.values()) == sum(1 for r in records if r["state"] == "predicted")
    for (challenger, start), n in closed.items():
        assert n == sum(1 for r in records if r["state"] == "predicted"
                        and r["challenger"] == challenger
                        and start <= r["event_time"] < start + 60_000)


def test_restart_from_checkpoint_replays_without_double_counting(settings: Settings) -> None:
    crash_and_restart(_monitor_settings(settings))


def crash_and_restart(s: Settings, check: Callable[[Pipeline], None] = lambda _: None) -> None:
    """Checkpointed batches, a batch processed but never checkpointed (a crash), ``check``
    of that first pipeline, then a restart replaying from before the crash: every window
    count exact."""
    records = synthetic.stream(synthetic.Spec(requests=1500, seed=8, interval_ms=200))
    messages = _messages(records)
    first = Pipeline(s)
    first.migrate()
    _drive(first, s, messages[:2000])
    first.process(messages[2000:2400])  # processed, never checkpointed: a crash
    check(first)
    second = Pipeline(s)  # restart: state from Redis, replay from the last commit
    _drive(second, s, messages[1800:])
    second.close_all()
    total = _count(s, "SELECT sum(published) FROM {db}.windows FINAL WHERE segment = ''")
    assert total == sum(1 for r in records if r["state"] == "predicted")
    labelled = _count(s, "SELECT sum(labelled) FROM {db}.windows FINAL WHERE segment = ''")
    assert labelled == sum(1 for r in records if r["state"] == "labelled")


def _varied(records: list[dict]) -> list[dict]:
    """Records exercising every field shape: regression outputs, orphans, NaN, nulls."""
    out = [dict(r) for r in records]
    out[1].update(primary_output={"label": None, "probabilities": {}, "value": 1.5},
                  shadow_output={"label": None, "probabilities": {}, "value": float("nan")},
                  label_value=2.0, cat_features={"tier": "gold"}, null_features=["x", "y"],
                  trace_id="t-1", is_control=True, model_version="7")
    out[2].update(state="orphan_prediction", event_time=None, primary_output=None,
                  primary_latency_ms=None, feedback_source="crm", feedback_weight=0.5)
    out[3].update(state="orphan_feedback", challenger="", shadow_output=None,
                  label="a", context={}, num_features={})
    return out


def _stored(s: Settings, records: list[dict]) -> tuple[str, str]:
    """The joined_records and orphans rows stored (repr: NaN compares equal), checked
    against ``records``: one row per valid joined (request, challenger), two orphans."""
    db = s.clickhouse_database
    rows = _client(s).query(f"SELECT * FROM {db}.joined_records FINAL "
                            "ORDER BY challenger, request_id").result_rows
    orphans = _client(s).query(f"SELECT * FROM {db}.orphans FINAL "
                               "ORDER BY state, challenger, request_id").result_rows
    assert len(rows) == len({(r["request_id"], r["challenger"]) for r in records
                             if r["request_id"] and not r["state"].startswith("orphan")})
    assert len(orphans) == 2
    return repr(rows), repr(orphans)


def test_bulk_decoding_equals_per_record_and_isolates_bad_messages(settings: Settings) -> None:
    s = _monitor_settings(settings)
    pipeline = Pipeline(s)
    assert pipeline.bulk is not None  # the embedded engine decodes batches
    records = _varied(synthetic.stream(synthetic.Spec(
        requests=150, challengers=("c1", "c2"), seed=3, labelled_fraction=0.5,
        error_rate=0.1, timeout_rate=0.1, start_ms=RECENT_MS)))
    messages = _messages(records)
    assert len(pipeline._bulk_decode(messages)) == len(messages)  # the bulk path is taken
    expected = [{k: v for k, v in CODEC.decode(m.value, "JoinedRecord").items()
                 if k in BULK_FIELDS} for m in messages]
    decoded, dead = pipeline.decode(messages)
    assert dead == []
    assert repr(decoded) == repr(expected)  # repr: NaN != NaN, but both must be NaN

    truncated = Message(messages[7].value[:-3], b"t", "joined", 0, 7)
    not_avro = Message(b"\x99not avro", b"n", "joined", 0, 8)
    mixed = messages[:7] + [truncated, not_avro] + messages[9:]
    decoded, dead = pipeline.decode(mixed)  # the engine refuses it: decoded per record
    decoded = [{k: v for k, v in r.items() if k in BULK_FIELDS} for r in decoded]
    assert repr(decoded) == repr(expected[:7] + expected[9:])
    assert [(d["source_offset"], d["error_kind"]) for d in dead] == [(7, "decode"), (8, "decode")]
    assert pipeline.bulk is not None  # a bad message is no reason to stop bulk decoding


def test_joined_rows_inserted_from_the_bulk_file_equal_the_python_columns(
        settings: Settings) -> None:
    records = _varied(synthetic.stream(synthetic.Spec(
        requests=150, challengers=("c1", "c2"), seed=5, labelled_fraction=0.5,
        error_rate=0.1, timeout_rate=0.1, start_ms=RECENT_MS)))
    records[4] = {**records[4], "event_time": 0}  # 0 means unknown, like None
    records[5] = {**records[5], "request_id": ""}  # dead-lettered, never stored
    messages = _messages(records)
    tables = []
    for bulk in (True, False):
        s = _monitor_settings(settings)
        pipeline = Pipeline(s)
        pipeline.migrate()
        if not bulk:
            pipeline.bulk = None
        result = pipeline.process(messages)
        assert len(result.dead_letters) == 1
        assert result.rows >= len(records) - 1 - sum(
            1 for r in records if r["state"].startswith("orphan"))
        tables.append(_stored(s, records))
    assert tables[0] == tables[1]


def test_partitioned_sink_stores_bulk_decoded_records_as_decoded_per_record(
        settings: Settings) -> None:
    """The partitioned monitor's sink on the embedded engine: a batch's joined records
    decoded and inserted by the engine from its file give the rows of the per-record path
    (fastavro and Python columns); orphans and invalid records as there."""
    from shadowpipe.processors.monitor import sink as sink_mod
    from shadowpipe.processors.monitor.partitioned import Sink

    records = _varied(synthetic.stream(synthetic.Spec(
        requests=150, challengers=("c1", "c2"), seed=6, labelled_fraction=0.5,
        error_rate=0.1, timeout_rate=0.1, start_ms=RECENT_MS)))
    records[5] = {**records[5], "request_id": ""}  # invalid: stored by neither path
    messages = _messages(records)
    tables = []
    for bulk in (True, False):
        s = _monitor_settings(settings)
        Pipeline(s).migrate()
        sink = Sink(s, sink_mod.Sink(s))
        assert sink.bulk is not None
        if bulk:
            assert len(sink._bulk(messages)) == len(messages)  # the bulk path is taken
        else:
            sink.bulk = None
        sink.process(messages)
        tables.append((*_stored(s, records), sink.label_delays.snapshot()))
    assert tables[0] == tables[1]
