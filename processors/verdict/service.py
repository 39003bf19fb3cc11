"""One verdict evaluation with its side effects, shared by the monitor's timer and endpoint
(:mod:`.agent`) and by ``shadowpipe verdict`` when no monitor owns the engine.

:meth:`Evaluator.evaluate` aggregates (one SQL pass), judges every challenger against its
latched state and returns the reply plus the Verdict events of the changed ones; the caller
publishes them and only then calls :meth:`Evaluator.record` (append to ``verdicts``), so a
change is never stored without its event (a reset is stored first: it must hold before
the evaluation that follows it). An evaluation with a policy other than the
configured one is a what-if: nothing is recorded or published.

>>> Outcome({"verdicts": []}).events  # nothing changed: nothing to publish
[]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from shadowpipe.config import ConfigError, Settings, env_name
from shadowpipe.processors.verdict import store
from shadowpipe.processors.verdict.engine import Verdict
from shadowpipe.processors.verdict.policy import Policy


@dataclass
class Outcome:
    """The reply (JSON-ready), and the changed verdicts to publish then record."""

    reply: dict[str, Any]
    changed: list[Verdict] = field(default_factory=list)
    events: list[tuple[str, str, bytes]] = field(default_factory=list)


class Evaluator:
    """Evaluations on one ClickHouse client (``connect()`` returns it)."""

    def __init__(self, settings: Settings, connect: Callable[[], Any]) -> None:
        from shadowpipe.schemas.codec import Codec

        self.settings, self.connect = settings, connect
        self.policy = Policy.from_settings(settings)
        self.codec = Codec(settings.schema_registry_url)

    def _policy(self, path: str | None) -> Policy:
        if not path or path == self.settings.policy:
            return self.policy
        return Policy.load(path)

    def evaluate(self, challenger: str = "", policy_path: str | None = None,
                 reset: bool = False, run: str = "") -> Outcome:
        """Judge every challenger (or ``challenger``); ``reset`` first records a RESET row
        that lifts ``challenger``'s latched decision. ``run``: judge that replay run's
        records instead of the live ones (like a what-if, never published nor recorded:
        a replay must not move a live gate)."""
        client = self.connect()
        settings = self.settings.replace(run=run) if run else self.settings
        policy = self._policy(policy_path)
        what_if = policy.hash != self.policy.hash or bool(settings.run)
        if reset and settings.run:
            raise ConfigError(env_name("run"), "a replay run's verdicts are never latched: "
                                               "there is nothing to reset")
        resets = []
        if reset:
            resets = [store.reset(client, settings, challenger, int(time.time() * 1000))]
        verdicts = store.run_verdicts(client, settings, policy,
                                      challenger=challenger or None, persist=False)
        for v in verdicts:
            # Nothing known and nothing before (a mistyped name): not worth a row and an
            # event, or any GET could fill the table.
            unknown = not v.criteria and v.previous is None
            v.changed = v.changed and not what_if and not unknown
        changed = [v for v in verdicts if v.changed]
        topic = self.settings.topic("verdicts")
        events = [(topic, v.challenger, self.codec.encode("Verdict", store.to_record(v)))
                  for v in resets + changed]
        events += [(self.settings.topic("alerts"), v.challenger, self.codec.encode("Alert", a))
                   for v in changed if (a := revocation_alert(v)) is not None]
        docs = {v.challenger: _doc(v, what_if) for v in verdicts}
        if reset:
            reply = {"reset": challenger, "verdict": docs[challenger]}
        elif challenger:
            reply = docs[challenger]
        else:
            reply = {"verdicts": [docs[name] for name in sorted(docs)]}
        return Outcome(reply, changed, events)

    def record(self, outcome: Outcome) -> None:
        """Append the changed verdicts (after their events were published)."""
        store.write(self.connect(), self.settings, outcome.changed)


def revocation_alert(v: Verdict) -> dict[str, Any] | None:
    """The critical Alert raised when harm turns a PROMOTE into a REJECT, else None.

    >>> from shadowpipe.processors.verdict.engine import Verdict
    >>> a = revocation_alert(Verdict("c1", "REJECT", 5, ["worse in clinic=east"], "h",
    ...                               previous="PROMOTE"))
    >>> a["alert_id"], a["severity"], a["details"]["reasons"]
    ('verdict-c1-5', 'critical', 'worse in clinic=east')
    >>> revocation_alert(Verdict("c1", "REJECT", 5, [], "h", previous="HOLD")) is None
    True
    """
    if v.verdict != "REJECT" or v.previous != "PROMOTE":
        return None
    return {"alert_id": f"verdict-{v.challenger}-{v.time_ms}", "kind": "verdict",
            "detector": "verdict", "metric": "promotion_revoked", "challenger": v.challenger,
            "arm": None, "segment": v.flagged[0] if v.flagged else None, "window_start": None,
            "window_end": None, "value": 1.0, "threshold": None, "severity": "critical",
            "time": v.time_ms, "details": {"previous": "PROMOTE", "verdict": "REJECT",
                                           "reasons": "; ".join(v.reasons)}}


def _doc(v: Verdict, what_if: bool) -> dict[str, Any]:
    doc = json.loads(v.to_json())
    if what_if:
        doc["what_if"] = True
    return doc


def direct(settings: Settings, action: str, challenger: str,
           client: Any = None) -> dict[str, Any]:
    """Evaluate here (no monitor answers): open ClickHouse (or use ``client``), migrate,
    evaluate, publish and record the changes when the broker is reachable (else warn and
    record nothing)."""
    from shadowpipe.kafka import check_reachable
    from shadowpipe.processors.publisher import Publisher
    from shadowpipe.stores import check_clickhouse
    from shadowpipe.tables import migrate

    client = client or check_clickhouse(settings, "verdict")
    migrate(client, settings)
    evaluator = Evaluator(settings, lambda: client)
    outcome = evaluator.evaluate(challenger, settings.policy or None, action == "reset")
    if outcome.events:
        try:
            check_reachable(settings, "verdict", timeout_s=5)
        except ConfigError as exc:
            if action == "reset":
                raise
            print(f"shadowpipe: warning: verdict changes not recorded: {exc}", file=sys.stderr)
            return outcome.reply
        publisher = Publisher(settings)
        for topic, key, value in outcome.events:
            publisher.produce(topic, key, value)
        publisher.flush_sync()
        evaluator.record(outcome)
    return outcome.reply
