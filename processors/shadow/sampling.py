"""Per-challenger sampling, deterministic on the request id.

The rule is the producer's (``shadowpipe.producers.sampling``), so sampled sets nest:
a request is in the sample at rate ``r`` exactly when the first 8 bytes of
SHA-256(UTF-8 request id), read as a big-endian unsigned integer, are below
``floor(r * 2**64)`` (``r >= 1``: always). A challenger at rate 0.1 fed by a producer at
rate 0.5 therefore scores a stable tenth of all requests, the same ones on every worker
and every replay.

>>> bound = threshold(0.5)
>>> digest = hashlib.sha256(b"req-1").digest()[:8]
>>> sampled(digest, bound) == (int.from_bytes(digest, "big") < 2**63)
True
>>> sampled(digest, threshold(1.0)), sampled(digest, threshold(0.0))
(True, False)
"""

from __future__ import annotations

import hashlib
import math

_SPACE = 2**64


def threshold(rate: float) -> bytes | None:
    """The 8-byte big-endian bound for ``rate``; None means every request."""
    if rate >= 1.0:
        return None
    return math.floor(rate * _SPACE).to_bytes(8, "big")


def digest(request_id: str) -> bytes:
    """The 8 hash bytes a request's sampling decisions compare."""
    return hashlib.sha256(request_id.encode()).digest()[:8]


def sampled(request_digest: bytes, bound: bytes | None) -> bool:
    """Equal-length big-endian byte strings compare like the integers they encode."""
    return bound is None or request_digest < bound
