"""Dead letters: a message a worker cannot process is published with why and where from.

>>> rec = dead_letter("decode", "unrecognised framing", "shadow", "t", 0, 5, b"k", b"\\x99")
>>> rec["source_offset"], rec["error_kind"]
(5, 'decode')
"""

from __future__ import annotations

import time
from typing import Any


def dead_letter(
    error_kind: str,
    reason: str,
    worker: str,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    timestamp: int | None = None,
) -> dict[str, Any]:
    """A DeadLetter record (schema ``DeadLetter``); ``error_kind`` is decode|invalid|processing."""
    return {
        "reason": reason,
        "error_kind": error_kind,
        "worker": worker,
        "source_topic": topic,
        "source_partition": partition,
        "source_offset": offset,
        "source_timestamp": timestamp,
        "key": key,
        "value": value,
        "time": int(time.time() * 1000),
    }
