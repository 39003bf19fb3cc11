"""A challenger for the replay tests (imported by the replay child process)."""

from __future__ import annotations

import time
from typing import Any


def slow_threshold(features: dict[str, Any]) -> dict[str, Any]:
    """Deterministic, and slow enough (2 ms a request) for a kill to land mid-replay."""
    time.sleep(0.002)
    big = features["mean_radius"] > 14.0
    return {"label": "malignant" if big else "benign",
            "probabilities": {"malignant": float(big), "benign": float(not big)}}
