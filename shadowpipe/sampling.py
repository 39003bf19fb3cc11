"""Deterministic sampling by request id, reproducible in any language: the one rule the
producer (which events to send) and the shadow worker (which requests each challenger
scores) both apply, so sampled sets nest.

A request is sampled at rate ``r`` (0 <= r <= 1) exactly when::

    h = first 8 bytes of SHA-256(UTF-8 bytes of the request id), read as an unsigned
        big-endian 64-bit integer
    sampled = r >= 1  or  h < r * 2**64        (exact arithmetic; r is an IEEE double)

Because the test is a threshold on one hash, a request sampled at some rate is sampled at
every higher rate, so an inference and its feedback agree whenever the feedback is tested
at a rate no lower than the inference's (see :class:`SampleRates`).

>>> is_sampled("req-1", 1.0), is_sampled("req-1", 0.0)
(True, False)
>>> h = int.from_bytes(hashlib.sha256(b"req-1").digest()[:8], "big")
>>> is_sampled("req-1", 0.5) == (h < 2**63)
True
>>> d = digest("req-1")
>>> sampled(d, threshold(0.5)) == is_sampled("req-1", 0.5), sampled(d, threshold(0.0))
(True, False)
>>> rates = SampleRates.parse(("*=0.1", "fraud=0.5"))
>>> rates.rate("fraud"), rates.rate("churn"), rates.feedback_rate(None)
(0.5, 0.1, 0.5)
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from shadowpipe.config import ConfigError, env_name

SETTING = "producer_sample_rates"
_SPACE = 2**64


def threshold(rate: float) -> bytes | None:
    """The 8-byte big-endian bound a hash prefix must be below; None means "always"."""
    if rate >= 1.0:
        return None
    return math.floor(rate * _SPACE).to_bytes(8, "big")


def sampled_below(request_id: bytes, bound: bytes | None) -> bool:
    """The decision for an already UTF-8 encoded id against a :func:`threshold`.

    Comparing big-endian byte strings of equal length is comparing the integers.
    """
    return bound is None or hashlib.sha256(request_id).digest()[:8] < bound


def digest(request_id: str) -> bytes:
    """The 8 hash bytes a request's sampling decisions compare (hash once, test per rate)."""
    return hashlib.sha256(request_id.encode()).digest()[:8]


def sampled(request_digest: bytes, bound: bytes | None) -> bool:
    """The decision for a :func:`digest` against a :func:`threshold`."""
    return bound is None or request_digest < bound


def is_sampled(request_id: str, rate: float) -> bool:
    """True when ``request_id`` is in the sample at ``rate`` (the documented rule)."""
    return sampled_below(request_id.encode(), threshold(rate))


@dataclass(frozen=True)
class SampleRates:
    """Per-model rates with a default (``*``), from ``SHADOWPIPE_PRODUCER_SAMPLE_RATES``.

    Feedback carries no model: without one it is tested at the highest configured rate,
    so no sampled inference loses its feedback (extra feedback for requests no model
    sampled is harmless: it joins nothing). Passing ``model=`` to ``emit_feedback`` gives
    the exact decision of that model's inference.
    """

    default: float = 1.0
    per_model: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> SampleRates:
        """``("*=0.1", "fraud=1")`` -> rates; ConfigError naming the setting if malformed."""
        default, per_model = 1.0, {}
        for entry in entries:
            name, sep, value = entry.partition("=")
            try:
                rate = float(value)
            except ValueError:
                rate = math.nan
            if not sep or not name.strip() or not 0.0 <= rate <= 1.0:
                raise ConfigError(
                    env_name(SETTING), f"{entry!r} is not MODEL=RATE with 0 <= RATE <= 1"
                )
            if name.strip() == "*":
                default = rate
            else:
                per_model[name.strip()] = rate
        return cls(default, per_model)

    def rate(self, model: str) -> float:
        """The sampling rate of ``model``."""
        return self.per_model.get(model, self.default)

    def feedback_rate(self, model: str | None) -> float:
        """The rate feedback is tested at: the model's, else the highest configured."""
        if model is not None:
            return self.rate(model)
        return max([self.default, *self.per_model.values()])
