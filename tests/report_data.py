"""A run that is not the demo, for the report tests: joined records of two challengers and a
few alerts written straight into a fresh ClickHouse database (``python -m tests.report_data
CLICKHOUSE_URL DATABASE`` does it in a child process, which then releases the embedded
engine's directory for the CLI; a third argument fixes "now", epoch ms).

c-bad is five points worse than the primary, all of it in clinic=east; c-eq answers like
the primary. A fifth of the labels come from human review; the last 100 requests wait for
theirs; c-eq times out on every 97th request."""

from __future__ import annotations

import sys
import time
from typing import Any

DAY = 86_400_000
REQUESTS = 4000


def records(now_ms: int) -> list[dict[str, Any]]:
    """The JoinedRecords (as the monitor stores them, before encoding)."""
    out = []
    for i in range(REQUESTS):
        t = now_ms - 3 * DAY + i * 60_000  # one a minute over ~2.8 days
        clinic = "east" if i % 4 == 0 else "west"
        truth = "a" if i % 3 else "b"
        other = "b" if truth == "a" else "a"
        p_ok = i % 10 != 0
        labelled = i % 5 != 4 and i < REQUESTS - 100
        delay_ms = 60_000 * (1 + (i * 37) % 120)  # 1 min to 2 h
        for name in ("c-bad", "c-eq"):
            s_ok = p_ok if name == "c-eq" else (p_ok and not (clinic == "east" and i % 5 == 1))
            timeout = name == "c-eq" and i % 97 == 0
            rec: dict[str, Any] = {
                "request_id": f"r{i}", "challenger": name, "version": 2 if labelled else 1,
                "state": "labelled" if labelled else "predicted", "event_time": t,
                "context": {"clinic": clinic, "device": f"d{i % 3}"},
                "num_features": {"radius": 10.0 + i % 7, "area": 500.0 + i % 11},
                "cat_features": {"scanner": "x1" if i % 2 else "x2"},
                "primary_output": _output(truth if p_ok else other, truth, other, p_ok),
                "shadow_output": None if timeout else _output(truth if s_ok else other, truth,
                                                              other, s_ok),
                "shadow_error": "timeout" if timeout else None,
                "shadow_error_kind": "timeout" if timeout else None,
                "primary_latency_ms": 20.0 + (i * 13) % 40,
                "model_time_ms": 2.0 + (i * 7) % 9 + (300.0 if name == "c-bad" and i % 50 == 0
                                                      else 0.0),
                "joined_at": t + 1000}
            if labelled:
                rec.update(label=truth, label_time=t + delay_ms, label_delay_ms=delay_ms,
                           feedback_source="human" if i % 5 == 0 else "explicit")
            out.append(rec)
    return out


def _output(label: str, truth: str, other: str, right: bool) -> dict[str, Any]:
    probs = {truth: 0.8, other: 0.2} if right else {truth: 0.3, other: 0.7}
    return {"label": label, "probabilities": probs, "value": None}


def alerts(now_ms: int) -> list[dict[str, Any]]:
    """A firing and a resolved drift alert of c-bad in clinic=east."""
    start = now_ms - DAY
    base = {"kind": "drift", "detector": "adwin", "metric": "error_rate", "challenger": "c-bad",
            "arm": "challenger", "segment": "clinic=east", "window_start": start,
            "window_end": start + 600_000, "value": 0.3, "threshold": 0.1,
            "severity": "warning", "details": {}}
    return [{**base, "alert_id": "a1", "time": start + 600_000, "status": "firing"},
            {**base, "alert_id": "a2", "time": start + 7_200_000, "status": "resolved",
             "window_start": start + 6_600_000}]


def insert(clickhouse_url: str, database: str, now_ms: int) -> int:
    """Create the tables and write the records and alerts; the number of records."""
    from shadowpipe import tables
    from shadowpipe.config import Settings
    from shadowpipe.processors.monitor import sink
    from shadowpipe.schemas.codec import Codec
    from shadowpipe.stores import clickhouse_client

    settings = Settings.load(env={"SHADOWPIPE_CLICKHOUSE_URL": clickhouse_url,
                                  "SHADOWPIPE_CLICKHOUSE_DATABASE": database})
    client = clickhouse_client(settings)
    tables.migrate(client, settings)
    codec = Codec()
    rows = records(now_ms)
    full = [codec.decode(codec.encode("JoinedRecord", r), "JoinedRecord") for r in rows]
    batches = {"joined_records": sink.joined_columns(full),
               "alerts": sink.rows_to_columns(alerts(now_ms), tables.ALERT_COLUMNS)}
    for table, cols in batches.items():
        client.insert(table, list(cols.values()), column_names=list(cols), database=database,
                      column_oriented=True)
    return len(rows)


if __name__ == "__main__":
    now = int(sys.argv[3]) if len(sys.argv) > 3 else (int(time.time()) // 60) * 60_000
    print(insert(sys.argv[1], sys.argv[2], now))
