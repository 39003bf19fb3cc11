"""Challengers for the shadow worker tests (imported by the worker child process)."""

from __future__ import annotations

import time
from typing import Any


def flaky(features: dict[str, Any]) -> dict[str, Any]:
    """Raises on ~1 % of uniform inputs (x0 < 0.01)."""
    if features["x0"] < 0.01:
        raise ValueError(f"flaky challenger rejects x0={features['x0']:.4f}")
    return {"label": "hi" if features["x1"] > 0.5 else "lo",
            "probabilities": {"hi": features["x1"], "lo": 1 - features["x1"]}}


def slow(features: dict[str, Any]) -> float:
    """Hangs for 0.4 s on ~0.3 % of inputs (x2 < 0.003): past its timeout."""
    if features["x2"] < 0.003:
        time.sleep(0.4)
    return features["x2"] * 2


def vector_sum(batch: list[dict[str, Any]]) -> list[float]:
    """Vectorised: the sum of x0..x3; raises for the whole batch if any x0 is negative."""
    if any(f["x0"] < 0 for f in batch):
        raise ValueError("negative x0 in batch")
    return [sum(f[f"x{i}"] for i in range(4)) for f in batch]


def bad_output(features: dict[str, Any]) -> Any:
    """Returns something that is not a prediction."""
    return [1, 2]
