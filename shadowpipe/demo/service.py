"""The simulated production service: answers with the primary, emits through the library.

Simulated time runs faster than the wall clock (``span_s`` of traffic in ``wall_s``), so
labels that arrive "ten minutes later" arrive seconds later here, in the same order they
would in production. Event and feedback times carry the simulated clock.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass

from shadowpipe.demo.world import Request, World
from shadowpipe.producers import Emitter

MODEL = "diagnosis"
MODEL_VERSION = "1.0"


@dataclass
class Sent:
    """What the service emitted (the demo's expected counts)."""

    inferences: int = 0
    feedback: int = 0
    shifted: int = 0


def serve(
    world: World, requests: list[Request], emitter: Emitter, start_ms: int, wall_s: float,
    progress: Callable[[int], None],
) -> Sent:
    """Serve ``requests`` paced over ``wall_s`` seconds; emit inferences and due feedback."""
    sent = Sent()
    pending: list[tuple[float, str, str]] = []  # (due offset s, request id, label)
    span_s = requests[-1].offset_s if requests else 0.0
    began = time.monotonic()
    for req in requests:
        _pace(began, wall_s * (req.offset_s / span_s if span_s else 1.0))
        _release(emitter, pending, req.offset_s, start_ms, sent)
        t0 = time.perf_counter()
        output = world.primary_predict(req.features)
        latency_ms = (time.perf_counter() - t0) * 1000
        sent.inferences += emitter.emit_inference(
            req.request_id, req.features, output, model=MODEL, version=MODEL_VERSION,
            latency_ms=latency_ms, context=req.context, ts=start_ms + int(req.offset_s * 1000),
        )
        sent.shifted += req.shifted
        if req.feedback_delay_s is not None:
            heapq.heappush(pending, (req.offset_s + req.feedback_delay_s, req.request_id,
                                     req.label))
        progress(1)
    # Labels not yet due when the run ends are not known yet: partial coverage, as in life.
    _release(emitter, pending, span_s, start_ms, sent)
    return sent


def _pace(began: float, at_s: float) -> None:
    delay = began + at_s - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _release(emitter: Emitter, pending: list[tuple[float, str, str]], now_s: float,
             start_ms: int, sent: Sent) -> None:
    while pending and pending[0][0] <= now_s:
        due_s, request_id, label = heapq.heappop(pending)
        sent.feedback += emitter.emit_feedback(
            request_id, label, ts=start_ms + int(due_s * 1000), model=MODEL
        )
