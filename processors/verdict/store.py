"""Verdicts kept and announced: the append-only ``verdicts`` table and the Verdict event.

The latest row per challenger is its latched state (a ``RESET`` row clears it). An
evaluation whose verdict differs from that state, or whose policy changed, appends a row
and is published on the verdict topic, keyed by challenger; one that changes nothing
writes nothing.

:func:`run_verdicts` is the whole cycle (aggregate, evaluate against the latched state,
write the changes) for the scheduler, the CLI and the web endpoint::

    verdicts = run_verdicts(client, settings, Policy.from_settings(settings))
    publish(publisher, settings, [v for v in verdicts if v.changed])

>>> v = Verdict("c1", "HOLD", 1_700_000_000_000, ["gate min_pairs: 10 of 1000"], "abc")
>>> rec = to_record(v)
>>> rec["verdict"], rec["reasons"]
('HOLD', ['gate min_pairs: 10 of 1000'])
>>> from_document(document(v)) == v
True
"""

from __future__ import annotations

import json
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.verdict.aggregate import aggregate
from shadowpipe.processors.verdict.engine import RESET, Verdict, changed, evaluate, latch
from shadowpipe.processors.verdict.policy import Policy
from shadowpipe.tables import database

COLUMNS = ["time", "challenger", "verdict", "previous", "latched", "policy_hash", "reasons",
           "warnings", "flagged", "suspects", "criterion", "decision", "estimate", "lo", "hi",
           "margin", "pairs", "document"]


def document(v: Verdict) -> str:
    """The verdict's full JSON (stored with each row, so the state reads back exactly)."""
    return v.to_json()


def from_document(text: str) -> Verdict:
    return Verdict.from_dict(json.loads(text))


def to_record(v: Verdict) -> dict[str, Any]:
    """The Avro ``Verdict`` record of ``v`` (JSON-safe numbers)."""
    doc = json.loads(v.to_json())
    doc.pop("changed", None)
    return doc


def _row(v: Verdict) -> list[Any]:
    c = v.criteria
    return [v.time_ms, v.challenger, v.verdict, v.previous, v.latched, v.policy_hash,
            v.reasons, v.warnings, v.flagged, v.suspects, [x.name for x in c],
            [x.decision for x in c], [x.estimate for x in c], [x.lo for x in c],
            [x.hi for x in c], [x.margin for x in c], [x.pairs for x in c], document(v)]


def write(client: Any, settings: Settings, verdicts: list[Verdict]) -> None:
    """Append one row per verdict."""
    if verdicts:
        client.insert("verdicts", [_row(v) for v in verdicts], column_names=COLUMNS,
                      database=database(settings))


def latest(client: Any, settings: Settings, challenger: str | None = None
           ) -> dict[str, Verdict]:
    """The latest stored verdict (or reset) per challenger: the latched state."""
    db = database(settings)
    where = "WHERE challenger = {c:String} " if challenger else ""
    rows = client.query(
        f"SELECT document FROM {db}.verdicts {where}"
        "ORDER BY challenger, time DESC LIMIT 1 BY challenger",
        parameters={"c": challenger} if challenger else None).result_rows
    out = {}
    for (text,) in rows:
        v = from_document(text)
        out[v.challenger] = v
    return out


def history(client: Any, settings: Settings, challenger: str | None = None,
            limit: int = 100) -> list[Verdict]:
    """Stored verdicts, newest first."""
    db = database(settings)
    where = "WHERE challenger = {c:String} " if challenger else ""
    rows = client.query(f"SELECT document FROM {db}.verdicts {where}ORDER BY time DESC "
                        f"LIMIT {int(limit)}",
                        parameters={"c": challenger} if challenger else None).result_rows
    return [from_document(text) for (text,) in rows]


def reset(client: Any, settings: Settings, challenger: str, now_ms: int,
          reason: str = "reset by a user") -> Verdict:
    """Clear ``challenger``'s latched verdict: the next evaluation starts afresh."""
    prev = latest(client, settings, challenger).get(challenger)
    time_ms = max(now_ms, prev.time_ms + 1) if prev else now_ms
    v = Verdict(challenger, RESET, time_ms, [reason], prev.policy_hash if prev else "",
                previous=prev.verdict if prev else None, changed=True)
    write(client, settings, [v])
    return v


def run_verdicts(client: Any, settings: Settings, policy: Policy, now_ms: int | None = None,
                 challenger: str | None = None, persist: bool = True) -> list[Verdict]:
    """Aggregate, evaluate every challenger (or one) against its latched state, append the
    changed verdicts to the table (``persist``), return them all (``changed`` marks those
    to publish).

    ``now_ms`` is the evaluation time (default: the wall clock); label maturity runs on
    the data clock (the latest event or label time stored).
    """
    import time

    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    agg = aggregate(client, settings, policy)
    previous = latest(client, settings, challenger)
    names = [challenger] if challenger else sorted(set(agg.challengers) | {
        n for n, v in previous.items() if v.verdict != RESET})
    out, new = [], []
    for name in names:
        prev = previous.get(name)
        time_ms = max(now_ms, prev.time_ms + 1) if prev else now_ms
        v = evaluate(agg, name, policy.for_challenger(name), prev, time_ms)
        v.changed = changed(v, None if prev is None or prev.verdict == RESET else prev)
        if v.changed:
            new.append(v)
        out.append(v)
    if persist:
        write(client, settings, new)
    return out


def publish(publisher: Any, settings: Settings, verdicts: list[Verdict]) -> int:
    """Produce each verdict as a ``Verdict`` event keyed by challenger (the caller flushes:
    ``publisher.flush_sync()`` or ``await publisher.flush()``); returns how many."""
    from shadowpipe.schemas.codec import Codec

    codec = Codec()
    topic = settings.topic("verdicts")
    for v in verdicts:
        publisher.produce(topic, v.challenger, codec.encode("Verdict", to_record(v)))
    return len(verdicts)


__all__ = ["document", "from_document", "history", "latch", "latest", "publish", "reset",
           "run_verdicts", "to_record", "write"]
