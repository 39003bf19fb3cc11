"""Challengers for the scale-out tests and ``bench pipeline`` (imported by worker children)."""

from __future__ import annotations

from typing import Any


def threshold(features: dict[str, Any]) -> dict[str, Any]:
    """Deterministic and never failing: a label from ``x1``."""
    return {"label": "hi" if features["x1"] > 0.5 else "lo",
            "probabilities": {"hi": features["x1"], "lo": 1 - features["x1"]}}
