"""The README's ten-line consumer really decodes a message from the embedded broker."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings
from shadowpipe.producers import Emitter

REPO = Path(__file__).resolve().parents[1]


class _Got(Exception):
    """Ends the README's loop at its first decoded record."""


def _consumer_block() -> str:
    section = (REPO / "README.md").read_text().split("## Wire format", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "the wire-format section shows a Python consumer"
    return block.group(1)


def test_readme_consumer_is_ten_lines_and_decodes_an_emitted_event(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _consumer_block()
    assert len([line for line in code.splitlines() if line.strip()]) == 10
    with Emitter(settings, kafka_overrides={"log_level": 0}) as emitter:
        assert emitter.emit_inference("readme-1", {"amount": 12.5, "country": "DE"}, "ok",
                                      model="fraud", version="3", latency_ms=2.0)
    # The embedded defaults, pointed at this test's stack and topics.
    code = (code.replace("127.0.0.1:19092", settings.kafka_bootstrap)
            .replace('"shadowpipe.inference"', repr(settings.topic("inference")))
            .replace("range(4)", f"range({settings.partitions})"))
    got: list[Any] = []

    def collect(record: Any) -> None:
        got.append(record)
        raise _Got

    monkeypatch.chdir(REPO)  # the block opens schemas/ relative to a checkout
    with pytest.raises(_Got):
        exec(compile(code, "README.md", "exec"), {"print": collect})  # noqa: S102
    assert got[0]["request_id"] == "readme-1" and got[0]["num_features"] == {"amount": 12.5}
    assert got[0]["cat_features"] == {"country": "DE"} and got[0]["output"]["label"] == "ok"
