"""Avro contracts of shadowpipe: one ``.avsc`` per message kind, plus released history.

The current schemas are the readers every consumer uses; ``released/<version>/`` keeps each
published version so that evolution can be proven (``shadowpipe schemas check``).

>>> from shadowpipe.schemas import schema, NAMES
>>> "InferenceEvent" in NAMES
True
>>> schema("Feedback")["name"]
'io.shadowpipe.Feedback'
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro

HERE = Path(__file__).parent
RELEASED = HERE / "released"
NAMES = ("InferenceEvent", "Feedback", "ShadowPrediction", "JoinedRecord", "Alert", "DeadLetter",
         "Verdict", "ReviewRequest")


@cache
def schema(name: str) -> dict[str, Any]:
    """The parsed current schema ``name`` (fastavro form, cached)."""
    return parse_file(HERE / f"{name}.avsc")


def parse_file(path: Path) -> dict[str, Any]:
    """Parse one ``.avsc`` file into a self-contained fastavro schema."""
    return fastavro.parse_schema(json.loads(path.read_text()))


def released_versions() -> list[str]:
    """Released schema versions, oldest first."""
    return sorted((p.name for p in RELEASED.iterdir() if p.is_dir()), key=int)


def released(version: str, name: str) -> dict[str, Any] | None:
    """The schema ``name`` as released in ``version``, or None if it did not exist then."""
    path = RELEASED / version / f"{name}.avsc"
    return parse_file(path) if path.exists() else None
