"""The producer library: what a production service embeds to emit shadow-mode events.

Create one :class:`Emitter` per process from the configuration, then emit predictions
and, when the real outcome is known, feedback. No call raises into the service or
blocks it: events that cannot be sent are dropped and counted (:meth:`Emitter.stats`).

.. code-block:: python

    from shadowpipe.producers import Emitter, current_request_id

    emitter = Emitter()  # SHADOWPIPE_* settings; flushes at interpreter exit

    @emitter.track(model="fraud", version="3")
    def predict(features: dict) -> str:
        return "fraud" if features["amount"] > 1000 else "ok"

    label = predict({"amount": 12.5, "country": "DE"})
    request_id = current_request_id()       # store it with the transaction...
    emitter.emit_feedback(request_id, "ok")  # ...and send the outcome when known

Details: :mod:`.emitter` (guarantees, counters), :mod:`.events` (input rules, privacy),
:mod:`shadowpipe.sampling` (the sampling hash), :mod:`.tracking` (decorator, request ids) and
``docs/producer.md``.

>>> from shadowpipe.producers import is_sampled
>>> is_sampled("any-request", 1.0)
True
"""

from shadowpipe.producers.emitter import Emitter, EmitterStats
from shadowpipe.producers.tracking import (
    InferenceCall,
    current_request_id,
    new_request_id,
    use_request_id,
)
from shadowpipe.sampling import SampleRates, is_sampled

__all__ = [
    "Emitter",
    "EmitterStats",
    "InferenceCall",
    "SampleRates",
    "current_request_id",
    "is_sampled",
    "new_request_id",
    "use_request_id",
]
