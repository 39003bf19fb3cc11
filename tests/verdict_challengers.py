"""Challengers with known accuracy for the verdict end-to-end test (imported by the worker
child process). Features x0, x1 are uniform; the truth is ``hi`` when x0 >= 0.5 and the
primary is wrong exactly when x1 < 0.15 (85 % accurate)."""

from __future__ import annotations

import time
from typing import Any


def truth(features: dict[str, Any]) -> str:
    return "hi" if features["x0"] >= 0.5 else "lo"


def answer(features: dict[str, Any], wrong: bool) -> str:
    right = truth(features)
    return ("lo" if right == "hi" else "hi") if wrong else right


def primary(features: dict[str, Any]) -> str:
    return answer(features, features["x1"] < 0.15)


def worse(features: dict[str, Any]) -> dict[str, Any]:
    """Wrong on every request the primary gets wrong and on 5 % more: 5 points worse."""
    return {"label": answer(features, features["x1"] < 0.20)}


def equal(features: dict[str, Any]) -> dict[str, Any]:
    """As accurate as the primary, on other requests: wrong when 0.05 <= x1 < 0.20, so it
    wins 5 % of pairs and loses 5 % (discordance 10 %: thousands of pairs to decide)."""
    return {"label": answer(features, 0.05 <= features["x1"] < 0.20)}


def broken(features: dict[str, Any]) -> dict[str, Any]:
    """Never answers within its timeout."""
    time.sleep(0.2)
    return {"label": truth(features)}
