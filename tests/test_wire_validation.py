"""One validation for every consumer (issue 15): the shadow worker, the joiner (its Python
and compiled fast paths included) and the monitor give the same verdict, with the same
reason, on the same message; JSON input fills nested defaults, takes Avro's JSON encoding
of unions, and treats a NaN numeric feature as a missing value, like Avro input."""

from __future__ import annotations

import io
import json
import math
import uuid
from typing import Any

import fastavro
import pytest

from shadowpipe.config import Settings
from shadowpipe.processors.join import fastpath, parts
from shadowpipe.processors.join.core import decode_part
from shadowpipe.processors.monitor.pipeline import Pipeline
from shadowpipe.processors.runtime.message import Message
from shadowpipe.processors.shadow.challengers import parse_specs
from shadowpipe.processors.shadow.core import ShadowProcessor
from shadowpipe.processors.shadow.decode import InferenceDecoder
from shadowpipe.schemas import schema
from shadowpipe.schemas.codec import SINGLE_OBJECT_MARKER, Codec, DecodeError, schema_fingerprint

CODEC = Codec()
EVENT = {
    "request_id": "r1", "event_time": 1_700_000_000_000, "model": "m", "model_version": "1",
    "num_features": {f"f{i}": i / 4 for i in range(6)}, "cat_features": {"c": "x"},
    "null_features": [], "output": {"label": "a", "probabilities": {}, "value": None},
    "latency_ms": 1.0, "context": {}, "inclusion_prob": 1.0, "trace_id": None,
}
PREDICTION = {
    "request_id": "r1", "challenger": "c", "challenger_version": "1", "is_control": False,
    "event_time": 1_700_000_000_000, "scored_at": 1_700_000_000_010,
    "output": {"label": "a", "probabilities": {}, "value": None}, "model_time_ms": 0.5,
    "queue_lag_ms": 1.0, "error": None, "error_kind": None,
}


def _avro(name: str, record: dict[str, Any]) -> bytes:
    """Single-object Avro as any writer (a foreign client) would produce, NaN included."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema(name), record)
    return SINGLE_OBJECT_MARKER + schema_fingerprint(schema(name)) + buf.getvalue()


def _shadow_verdict(data: bytes) -> tuple[str, str] | dict[str, Any]:
    proc = ShadowProcessor(Settings.load(env={}), parse_specs([{
        "name": "echo", "version": "1", "kind": "callable",
        "location": "shadowpipe.processors.shadow.challengers:echo_label"}], 1000))
    try:
        out = proc.score([Message(data, b"r1", "inference", 0, 1)], 1_700_000_000_500)
    finally:
        proc.close()
    if out.dead_letters:
        dead = CODEC.decode(out.dead_letters[0][1], "DeadLetter")
        return dead["error_kind"], dead["reason"]
    return CODEC.decode(out.predictions[0][1], "ShadowPrediction")


def _join_verdict(kind: str, data: bytes, layouts: parts.FeatureLayouts | None
                  ) -> tuple[str, str] | bytes:
    try:
        return decode_part(CODEC, kind, Message(data, b"r1", kind, 0, 1), layouts).blob
    except DecodeError as exc:
        return exc.kind, exc.reason


@pytest.mark.parametrize("event_time", [-5, 0])
@pytest.mark.parametrize("fmt", ["avro", "json"])
def test_a_time_that_is_not_epoch_ms_gets_one_verdict_everywhere(event_time: int,
                                                                 fmt: str) -> None:
    event = {**EVENT, "event_time": event_time}
    data = _avro("InferenceEvent", event) if fmt == "avro" else json.dumps(event).encode()
    verdict = ("invalid", f"event_time {event_time} is not a positive epoch-ms")
    assert _shadow_verdict(data) == verdict
    for layouts in (None, parts.FeatureLayouts()):  # inline and interned feature blocks
        assert _join_verdict("inference", data, layouts) == verdict
    # the joiner's walkers, compiled and Python, hand it to the Codec rather than judge it
    assert fastpath.walk_inference(data, parts.FeatureLayouts()) is None
    if fastpath.compiled is not None:
        assert fastpath.compiled.inference_part(data, fastpath.HEADERS["InferenceEvent"],
                                                None) is None
    prediction = {**PREDICTION, "event_time": event_time}
    pdata = (_avro("ShadowPrediction", prediction) if fmt == "avro"
             else json.dumps(prediction).encode())
    assert _join_verdict("predictions", pdata, None) == verdict
    feedback = json.dumps({"request_id": "r1", "label": "a", "event_time": event_time})
    assert _join_verdict("feedback", feedback.encode(), None) == verdict


def test_the_joiner_accepts_what_the_shadow_worker_scores() -> None:
    data = CODEC.encode("InferenceEvent", EVENT)
    assert _shadow_verdict(data)["request_id"] == "r1"
    assert _join_verdict("inference", data, None) == parts.encode_inference(
        CODEC.decode(data, "InferenceEvent"))


def test_a_blank_request_id_gets_one_verdict_everywhere() -> None:
    data = CODEC.encode("InferenceEvent", {**EVENT, "request_id": "  "})
    assert _shadow_verdict(data) == ("invalid", "empty request_id")
    assert _join_verdict("inference", data, None) == ("invalid", "empty request_id")


def test_the_monitor_refuses_a_negative_time_with_the_same_reason(settings: Settings) -> None:
    joined = {"request_id": "r1", "challenger": "c", "version": 1, "state": "predicted",
              "event_time": -5, "joined_at": 1_700_000_000_000}
    good = {**joined, "request_id": "r2", "event_time": 1_700_000_000_000}
    pipeline = Pipeline(settings.replace(clickhouse_database=f"m{uuid.uuid4().hex[:10]}"))
    records, dead = pipeline.decode([Message(CODEC.encode("JoinedRecord", r))
                                     for r in (joined, good)])
    assert [r["request_id"] for r in records] == ["r2"]
    assert [(d["error_kind"], d["reason"]) for d in dead] == [
        ("invalid", "event_time -5 is not a positive epoch-ms")]


# -- JSON input ----------------------------------------------------------------------------

def test_json_defaults_apply_inside_nested_records() -> None:
    minimal = {"request_id": "r1", "event_time": 5, "model": "m", "model_version": "1",
               "output": {"label": "a"}, "latency_ms": 1.0}
    record = CODEC.decode(json.dumps(minimal).encode(), "InferenceEvent")
    assert record["output"] == {"label": "a", "probabilities": {}, "value": None}
    pred = {k: v for k, v in PREDICTION.items() if k not in ("error", "error_kind")}
    pred["output"] = {"value": 2.5}
    decoded = CODEC.decode(json.dumps(pred).encode(), "ShadowPrediction")
    assert decoded["output"] == {"label": None, "probabilities": {}, "value": 2.5}


def test_json_takes_avro_json_encoded_unions_as_well_as_plain_values() -> None:
    wrapped = {**EVENT, "output": {"label": {"string": "a"}}, "trace_id": {"string": "t1"}}
    record = CODEC.decode(json.dumps(wrapped).encode(), "InferenceEvent")
    assert record == {**EVENT, "trace_id": "t1"}
    for name in ("io.shadowpipe.Output", "Output"):  # the full name, and the short one
        pred = {**PREDICTION, "output": {name: {"value": {"double": 2.5}}}, "error": None}
        decoded = CODEC.decode(json.dumps(pred).encode(), "ShadowPrediction")
        assert decoded["output"] == {"label": None, "probabilities": {}, "value": 2.5}
    fb = {"request_id": "r1", "label": None, "value": {"double": 3}, "event_time": 5}
    assert CODEC.decode(json.dumps(fb).encode(), "Feedback")["value"] == 3.0
    with pytest.raises(DecodeError, match="does not match"):  # not a branch of the union
        CODEC.decode(json.dumps({**fb, "value": {"long": 3}}).encode(), "Feedback")


@pytest.mark.parametrize("fmt", ["avro", "json"])
def test_a_nan_feature_is_a_missing_value_in_every_format_and_processor(fmt: str) -> None:
    event = {**EVENT, "num_features": {**EVENT["num_features"], "f2": math.nan},
             "null_features": ["z"]}
    data = _avro("InferenceEvent", event) if fmt == "avro" else json.dumps(event).encode()
    expected = {**EVENT, "num_features": {k: v for k, v in EVENT["num_features"].items()
                                          if k != "f2"}, "null_features": ["z", "f2"]}
    assert CODEC.decode(data, "InferenceEvent") == expected
    fast = InferenceDecoder(CODEC)
    assert fast.decode(data) == fast.decode(data) == expected  # the 2nd: a learnt layout
    assert _shadow_verdict(data)["request_id"] == "r1"  # scored, not dead-lettered
    for layouts in (None, parts.FeatureLayouts()):
        assert _join_verdict("inference", data, layouts) == parts.encode_inference(
            expected, parts.FeatureLayouts() if layouts is not None else None)


@pytest.mark.parametrize("fmt", ["avro", "json"])
def test_an_infinite_feature_is_refused_in_every_format_and_processor(fmt: str) -> None:
    event = {**EVENT, "num_features": {**EVENT["num_features"], "f2": math.inf}}
    data = _avro("InferenceEvent", event) if fmt == "avro" else json.dumps(event).encode()
    verdict = ("invalid", "numeric feature 'f2' is inf (not finite)")
    assert _shadow_verdict(data) == verdict
    assert _join_verdict("inference", data, parts.FeatureLayouts()) == verdict


def test_large_finite_features_are_not_missing() -> None:
    """Finiteness is tested by one sum; a sum that overflows must not lose features."""
    event = {**EVENT, "num_features": {"a": 1e308, "b": 1e308}}
    data = CODEC.encode("InferenceEvent", event)
    assert CODEC.decode(data, "InferenceEvent") == event
    assert InferenceDecoder(CODEC).decode(data) == event
