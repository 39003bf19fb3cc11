"""Stored parts and spliced JoinedRecords (pure logic, no services)."""

from __future__ import annotations

import copy
import random

import pytest

from shadowpipe.processors.join import fastpath, parts
from shadowpipe.processors.join.core import InvalidInput, decode_part
from shadowpipe.processors.runtime.message import Message
from shadowpipe.schemas import schema, wire
from shadowpipe.schemas.codec import Codec, DecodeError
from tests.test_join_core import expected_records, make_requests

CODEC = Codec()


def _roundtrip(kind: str, record: dict) -> dict:
    name = {"i": "InferenceEvent", "s": "ShadowPrediction", "f": "Feedback"}[kind]
    return CODEC.decode(CODEC.encode(name, record), name)


@pytest.mark.parametrize("interned", [False, True])
def test_spliced_record_equals_the_contract(interned: bool) -> None:
    layouts = parts.FeatureLayouts() if interned else None
    for req in make_requests(random.Random(1), 60):
        inf = parts.encode_inference(_roundtrip("i", req["inference"]), layouts)
        fbs = sorted(req["feedback"], key=lambda f: f["event_time"])
        fb = parts.encode_feedback(_roundtrip("f", fbs[-1])) if fbs else None
        for pred in req["predictions"]:
            shadow = parts.encode_shadow(_roundtrip("s", pred))
            body = parts.build_body(req["id"], pred["challenger"], 4, inf, shadow, fb,
                                    joined_at=123, layouts=layouts)
            rec = parts.decode_body(body)
            assert (rec.pop("version"), rec.pop("joined_at")) == (4, 123)
            assert rec == expected_records(req)[(req["id"], pred["challenger"])]


def test_orphans_fill_missing_parts_with_defaults() -> None:
    req = make_requests(random.Random(2), 1)[0]
    pred = req["predictions"][0]
    fb = {"request_id": req["id"], "label": "x", "event_time": pred["event_time"] + 70}
    rec = parts.decode_body(parts.build_body(
        req["id"], pred["challenger"], 1, None, parts.encode_shadow(_roundtrip("s", pred)),
        parts.encode_feedback(_roundtrip("f", fb)), joined_at=1))
    assert rec["state"] == "orphan_prediction"
    assert (rec["event_time"], rec["label_delay_ms"], rec["model"]) == (
        pred["event_time"], 70, "")
    only_fb = parts.decode_body(parts.build_body(
        req["id"], "", 1, None, None, parts.encode_feedback(_roundtrip("f", fb)), joined_at=1))
    assert (only_fb["state"], only_fb["label"], only_fb["event_time"]) == (
        "orphan_feedback", "x", None)


def test_interning_halves_the_primary_part() -> None:
    inf = _roundtrip("i", {**make_requests(random.Random(3), 1)[0]["inference"],
                           "num_features": {f"feature_{n:02d}": n / 3 for n in range(20)}})
    inline, interned = parts.encode_inference(inf), parts.encode_inference(
        inf, parts.FeatureLayouts())
    assert len(interned) < len(inline) - 20 * len("feature_00")


def test_layouts_are_shared_and_bounded() -> None:
    writer = parts.FeatureLayouts(capacity=1)
    lid = writer.intern(("a", "b", "c", "d"))
    assert writer.intern(("a", "b", "c", "e")) is None  # over capacity: inline
    assert writer.intern(("a", "b")) is None  # too few to be worth it
    reader = parts.FeatureLayouts(fetch=lambda ids: [writer.unsaved.get(i) for i in ids])
    values = bytes(range(32))
    assert reader.map_encoder(lid)(values) == writer.map_encoder(lid)(values)
    with pytest.raises(parts.LayoutError):
        parts.FeatureLayouts().map_encoder(b"\0" * 8)


def test_schema_change_is_detected() -> None:
    changed = copy.deepcopy(schema("JoinedRecord"))
    changed["fields"].insert(7, {"name": "new", "type": "string", "default": ""})
    problem = wire.layout_problem("JoinedRecord", changed)
    assert problem is not None and "field 'new'" in problem
    assert "processors/join/parts.py" in problem


def test_varints_roundtrip() -> None:
    rng = random.Random(4)
    for n in [0, -1, 1, 63, 64, -65, 2**40, -(2**62)] + [rng.randint(-2**62, 2**62)
                                                          for _ in range(200)]:
        assert wire.read_long(wire.long_bytes(n), 0) == (n, len(wire.long_bytes(n)))


def test_invalid_inputs_are_rejected() -> None:
    req = make_requests(random.Random(5), 1)[0]
    cases = [
        ("inference", {**req["inference"], "request_id": ""}, "InferenceEvent"),
        ("predictions", {**req["predictions"][0], "output": None, "error": None},
         "ShadowPrediction"),
        ("feedback", {"request_id": "r", "event_time": 1}, "Feedback"),
    ]
    for kind, record, name in cases:
        with pytest.raises(InvalidInput):
            decode_part(CODEC, kind, Message(CODEC.encode(name, record)))


def test_fast_path_is_enabled_for_the_current_schemas() -> None:
    assert all(fastpath.HEADERS.values())


@pytest.mark.parametrize("interned", [False, True])
def test_fast_path_builds_the_same_parts_as_the_codec(interned: bool) -> None:
    fast_layouts = parts.FeatureLayouts() if interned else None
    slow_layouts = parts.FeatureLayouts() if interned else None
    rng = random.Random(8)
    for req in make_requests(rng, 80):
        inf = {**req["inference"], "null_features": rng.choice(([], ["x", "é"])),
               "context": rng.choice(({}, {"pays": "Île"}))}
        data = CODEC.encode("InferenceEvent", inf)
        rid, blob = fastpath.inference_part(data, fast_layouts)
        assert (rid, blob) == (req["id"], parts.encode_inference(
            CODEC.decode(data, "InferenceEvent"), slow_layouts))
        for pred in req["predictions"]:
            data = CODEC.encode("ShadowPrediction", pred)
            assert fastpath.shadow_part(data) == (
                req["id"], pred["challenger"], True,
                parts.encode_shadow(CODEC.decode(data, "ShadowPrediction")))


def test_fast_path_leaves_anything_unusual_to_the_codec() -> None:
    req = make_requests(random.Random(9), 1)[0]
    good = CODEC.encode("InferenceEvent", req["inference"])
    assert fastpath.inference_part(good[:-1], None) is None  # truncated
    assert fastpath.inference_part(good + b"\x00", None) is None  # trailing byte
    bad_utf8 = good.replace(b"\x02m", b"\x02\xff", 1)  # the model name "m"
    assert fastpath.inference_part(bad_utf8, None) is None
    with pytest.raises(DecodeError):
        CODEC.decode(bad_utf8, "InferenceEvent")
    pred = CODEC.encode("ShadowPrediction", req["predictions"][0])
    assert fastpath.shadow_part(pred[:-3]) is None
    assert fastpath.shadow_part(good) is None  # another schema's fingerprint


def test_known_feature_maps_match_only_the_same_names() -> None:
    layouts, slow = parts.FeatureLayouts(), parts.FeatureLayouts()
    req = make_requests(random.Random(10), 1)[0]
    base = ["a.b", "(x|y)", "50%", "d*", "é"]
    variants = [base, base, base[:4] + ["f"], base + ["g"], base[:1] + base[2:] + base[1:2]]
    for n, names in enumerate(variants):  # the first name is shared: one pattern is tried
        inf = {**req["inference"], "num_features": {k: n + i / 7 for i, k in enumerate(names)}}
        data = CODEC.encode("InferenceEvent", inf)
        assert fastpath.inference_part(data, layouts) == (req["id"], parts.encode_inference(
            CODEC.decode(data, "InferenceEvent"), slow))
        assert fastpath.inference_part(data[:-1], layouts) is None
