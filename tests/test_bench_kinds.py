"""``shadowpipe bench shadow --kind onnx|oip`` on short runs against the session's stack:
the kind's figures are in the JSON next to the scikit-learn ones, and every event was
scored without errors by both. Timings are not judged (a shared test machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowpipe.config import Settings
from tests.test_bench_runs import _bench

SHORT = ("--events", "2000", "--lag-events", "200", "--lag-rate", "1000", "--passes", "1")


def test_bench_shadow_onnx_against_sklearn(settings: Settings, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("skl2onnx")
    out = _bench(settings, tmp_path, "shadow", "--kind", "onnx", *SHORT)
    assert out["kind"] == "onnx"
    assert out["onnx_vs_sklearn"] == pytest.approx(
        out["onnx_worker_events_per_s"] / out["worker_events_per_s"], abs=0.002)
    assert len(out["onnx_runs_events_per_s"]) == len(out["onnx_vs_sklearn_runs"]) == 1
    assert out["worker_errors"] == out["onnx_worker_errors"] == 0
    assert out["predictions"] == 2200 and out["onnx_predictions"] == 2000


def test_bench_shadow_oip_against_the_raw_round_trip(settings: Settings,
                                                     tmp_path: Path) -> None:
    pytest.importorskip("mlserver_sklearn")
    pytest.importorskip("orjson")
    out = _bench(settings, tmp_path, "shadow", "--kind", "oip", *SHORT)
    assert out["kind"] == "oip"
    assert out["oip_worker_errors"] == 0 and out["oip_predictions"] == 2000
    kind, raw = out["oip_kind_us_per_event"], out["oip_raw_us_per_event"]
    assert kind > 0 and raw > 0
    # relative: the us figures are rounded to 0.01, which moves a large ratio by over 0.01
    assert out["oip_overhead"] + 1 == pytest.approx(kind / raw, rel=0.01)
    piped = out["oip_raw_pipelined_us_per_event"]
    assert piped > 0
    assert out["oip_overhead_vs_pipelined_raw"] == pytest.approx(kind / piped - 1, abs=0.01)
    assert len(out["oip_worker_model_us_per_event"]) == 1
