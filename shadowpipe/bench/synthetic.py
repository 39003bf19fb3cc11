"""Seeded JoinedRecord streams for tests and the benchmark (the joiner's output contract).

Each request yields, per challenger, a ``predicted`` record (version 1, at ``event_time``)
and, for labelled requests, a ``labelled`` record (version 2, ``label_delay_ms`` later);
records come out in emission order. ``drift`` makes one challenger's accuracy drop in one
segment from a given event time on.

>>> recs = stream(Spec(requests=10, seed=1))
>>> len(recs), sorted({r["state"] for r in recs})
(20, ['labelled', 'predicted'])
>>> stream(Spec(requests=10, seed=1)) == recs   # deterministic
True
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

CLASSES = ("a", "b", "c")


@dataclass(frozen=True)
class Drift:
    """From ``at_ms`` on, ``challenger``'s accuracy drops by ``drop`` where attr == value."""

    at_ms: int
    challenger: str
    attribute: str
    value: str
    drop: float = 0.15


@dataclass(frozen=True)
class Spec:
    requests: int = 1000
    challengers: tuple[str, ...] = ("c1",)
    start_ms: int = 1_700_000_000_000
    interval_ms: float = 10.0
    seed: int = 0
    segments: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: {"region": ("eu", "us", "apac")})
    features: tuple[str, ...] = ("amount",)
    labelled_fraction: float = 1.0
    label_delay_ms: int = 1000
    primary_accuracy: float = 0.85
    challenger_accuracy: float = 0.85
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    drift: Drift | None = None


def _prediction(rng: random.Random, truth: str, accuracy: float) -> dict[str, Any]:
    label = truth if rng.random() < accuracy else rng.choice([c for c in CLASSES if c != truth])
    top = 0.5 + 0.5 * rng.random()
    rest = (1 - top) / (len(CLASSES) - 1)
    return {"label": label, "probabilities": {c: top if c == label else rest for c in CLASSES},
            "value": None}


def stream(spec: Spec) -> list[dict[str, Any]]:
    """The records of ``spec`` in emission order."""
    rng = random.Random(spec.seed)
    out: list[tuple[int, int, dict[str, Any]]] = []
    for i in range(spec.requests):
        t = spec.start_ms + int(i * spec.interval_ms)
        context = {attr: rng.choice(values) for attr, values in spec.segments.items()}
        truth = rng.choice(CLASSES)
        primary = _prediction(rng, truth, spec.primary_accuracy)
        features = {name: rng.gauss(100.0, 15.0) for name in spec.features}
        labelled = rng.random() < spec.labelled_fraction
        latency = rng.lognormvariate(2.0, 0.5)
        for challenger in spec.challengers:
            accuracy = spec.challenger_accuracy
            d = spec.drift
            if d and challenger == d.challenger and t >= d.at_ms \
                    and context.get(d.attribute) == d.value:
                accuracy -= d.drop
            roll = rng.random()
            kind = ("timeout" if roll < spec.timeout_rate else
                    "exception" if roll < spec.timeout_rate + spec.error_rate else None)
            base = {
                "request_id": f"r{spec.seed}-{i}", "challenger": challenger, "version": 1,
                "state": "predicted", "event_time": t, "model": "m", "context": context,
                "num_features": features, "primary_output": primary,
                "primary_latency_ms": latency,
                "shadow_output": None if kind else _prediction(rng, truth, accuracy),
                "shadow_error": f"challenger {kind}" if kind else None,
                "shadow_error_kind": kind,
                "model_time_ms": rng.lognormvariate(1.5, 0.4),
                "queue_lag_ms": rng.lognormvariate(3.0, 0.3), "joined_at": t,
            }
            out.append((t, len(out), base))
            if labelled:
                lt = t + spec.label_delay_ms
                out.append((lt, len(out), {**base, "version": 2, "state": "labelled",
                                           "label": truth, "label_time": lt,
                                           "label_delay_ms": spec.label_delay_ms,
                                           "joined_at": lt}))
    out.sort(key=lambda item: (item[0], item[1]))
    return [rec for _, _, rec in out]
