"""Human review: selected joined records go out as ReviewRequests on the review topic
(``shadowpipe review publish``); a reviewer's answer comes back as an ordinary Feedback
with ``source = "human"`` through the feedback topic, so the joiner stores it with
``feedback_source = 'human'`` and a verdict policy with ``labels = "human"`` counts it
(docs/review.md).

Requests are picked most uncertain first (lowest ``score``, then request id), so
``--limit`` sends reviewers the cases the challenger is least sure of.

>>> sql, params = review_sql("shadowpipe", Selection("uncertain"), 5)
>>> sql.endswith("LIMIT 5") and "ORDER BY score" in sql
True
>>> to_request({"request_id": "r1", "challenger": "c", "event_time": 7, "model": "m",
...             "num_features": {"x": 1.0}, "cat_features": {}, "null_features": [],
...             "context": {}, "primary_label": "a", "primary_probabilities": {"a": 0.9},
...             "primary_value": None, "shadow_label": "b",
...             "shadow_probabilities": {"b": 0.55, "a": 0.45}, "shadow_value": None,
...             "shadow_error": None, "kind": "uncertain", "score": 0.1},
...            Selection("uncertain"), 99)["shadow_output"]
{'label': 'b', 'probabilities': {'b': 0.55, 'a': 0.45}, 'value': None}
"""

from __future__ import annotations

import time
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.selection import Selection

_COLUMNS = ("request_id, toString(challenger) AS challenger, "
            "toUnixTimestamp64Milli(event_time) AS event_time, toString(model) AS model, "
            "num_features, cat_features, null_features, context, primary_label, "
            "primary_probabilities, primary_value, shadow_label, shadow_probabilities, "
            "shadow_value, shadow_error, kind, score")


def review_sql(db: str, selection: Selection, limit: int) -> tuple[str, dict[str, Any]]:
    """The query of the ``limit`` records to review, most uncertain first."""
    return selection.sql(db, _COLUMNS,
                         f"ORDER BY score ASC NULLS LAST, request_id, challenger LIMIT {limit}")


def _output(row: dict[str, Any], arm: str) -> dict[str, Any] | None:
    label, value = row[f"{arm}_label"], row[f"{arm}_value"]
    probabilities = dict(row[f"{arm}_probabilities"])
    if label is None and value is None and not probabilities:
        return None  # the arm gave no answer (a challenger error)
    return {"label": label, "probabilities": probabilities, "value": value}


def to_request(row: dict[str, Any], selection: Selection, now_ms: int) -> dict[str, Any]:
    """A ReviewRequest record of one selected row."""
    return {
        "request_id": row["request_id"], "challenger": row["challenger"],
        "event_time": int(row["event_time"]), "model": row["model"],
        "num_features": dict(row["num_features"]), "cat_features": dict(row["cat_features"]),
        "null_features": list(row["null_features"]), "context": dict(row["context"]),
        "primary_output": _output(row, "primary"), "shadow_output": _output(row, "shadow"),
        "kind": row["kind"], "measure": selection.measure, "score": row["score"],
        "threshold": selection.threshold if selection.kind == "uncertain" else None,
        "selected_at": now_ms,
    }


def select(client: Any, db: str, selection: Selection, limit: int) -> list[dict[str, Any]]:
    """The ReviewRequest records of up to ``limit`` selected joined records."""
    sql, params = review_sql(db, selection, limit)
    result = client.query(sql, parameters=params)
    now_ms = int(time.time() * 1000)
    return [to_request(dict(zip(result.column_names, row, strict=True)), selection, now_ms)
            for row in result.result_rows]


def publish(settings: Settings, requests: list[dict[str, Any]]) -> int:
    """Produce ``requests`` to the review topic, keyed by request id; how many were
    acknowledged (all of them, or an error)."""
    from shadowpipe.kafka import producer
    from shadowpipe.schemas.codec import Codec

    codec = Codec(settings.schema_registry_url)
    topic = settings.topic("review")
    failed: list[str] = []

    def report(err: Any, msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    prod = producer(settings)
    for record in requests:
        prod.produce(topic, codec.encode("ReviewRequest", record),
                     record["request_id"].encode(), on_delivery=report)
        prod.poll(0)
    left = prod.flush(30)
    if left or failed:
        raise RuntimeError(f"review publish: {left} undelivered, {len(failed)} failed "
                           f"({failed[:1]}) on {topic}")
    return len(requests)
