"""``shadowpipe bench emit`` end to end on a short run: one JSON object, everything counted."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from shadowpipe.bench import emit as bench
from shadowpipe.config import Settings


@pytest.mark.parametrize("down", [False, True])
def test_bench_emit_prints_its_figures_and_accounts_for_every_event(
        settings: Settings, capsys: pytest.CaptureFixture[str], down: bool,
        tmp_path: Path) -> None:
    plot = tmp_path / "emit.svg"
    args = argparse.Namespace(json=True, broker_down=down, requests=600, plot=str(plot))
    assert bench.run(args, settings) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["requests"] == 400  # 200 warm-up pairs are not counted
    assert result["exceptions"] == 0 and result["unaccounted"] == 0
    low, high = result["added_p99_ci95_us"]
    assert low <= high
    assert set(result["targets_met"]) >= {"throughput_ratio", "added_p99_us",
                                          "emit_cpu_us_per_event", "no_exceptions"}
    svg = plot.read_text()
    assert "<svg" in svg and "p99.9" in svg and "with emit" in svg
    if down:
        assert result["delivered"] == 0 and result["dropped"] + result["failed"] == 600
    else:
        assert result["delivered"] == result["sent"] == 600 and result["failed"] == 0
