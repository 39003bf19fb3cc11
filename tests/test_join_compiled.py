"""The compiled joiner functions (processors/join/_fastpath.c) return exactly what their Python
references return: the decode walkers (fastpath.walk_*), build_bodies (parts.python_bodies) and
the merge command's packing (hiredis.pack_command of store.merge_command), on valid inputs and
on mutated, truncated and random bytes (pure logic, no services)."""

from __future__ import annotations

import importlib.machinery
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowpipe.processors.join import fastpath, parts, store
from shadowpipe.schemas import wire
from shadowpipe.schemas.codec import Codec

CODEC = Codec()
INFERENCE = fastpath.HEADERS["InferenceEvent"]
SHADOW = fastpath.HEADERS["ShadowPrediction"]
compiled = fastpath.compiled
needs_compiled = pytest.mark.skipif(compiled is None, reason="built without a C compiler")
EXAMPLES = settings(max_examples=250, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

texts = st.text(max_size=12).filter(lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))
doubles = st.floats(allow_nan=True, allow_infinity=True)
# a few shared names so that layouts repeat, some odd ones so that they do not
names = st.one_of(st.sampled_from(["f0", "f1", "f2", "f3", "f4", "é", "%s"]), texts)
outputs = st.fixed_dictionaries({
    "label": st.none() | texts, "probabilities": st.dictionaries(texts, doubles, max_size=3),
    "value": st.none() | doubles,
})
inference_events = st.fixed_dictionaries({
    "request_id": texts, "event_time": st.integers(-(2**63), 2**63 - 1), "model": texts,
    "model_version": texts, "num_features": st.dictionaries(names, doubles, max_size=24),
    "cat_features": st.dictionaries(texts, texts, max_size=3),
    "null_features": st.lists(texts, max_size=3), "output": outputs, "latency_ms": doubles,
    "context": st.dictionaries(texts, texts, max_size=3), "inclusion_prob": doubles,
    "trace_id": st.none() | texts,
})
shadow_predictions = st.fixed_dictionaries({
    "request_id": texts, "challenger": texts, "challenger_version": texts,
    "is_control": st.booleans(), "event_time": st.integers(-(2**63), 2**63 - 1),
    "scored_at": st.integers(-(2**63), 2**63 - 1), "output": st.none() | outputs,
    "model_time_ms": doubles, "queue_lag_ms": doubles, "error": st.none() | texts,
    "error_kind": st.none() | texts,
})


@st.composite
def mutated(draw: Any, valid: bytes, start: int = 10) -> bytes:
    """``valid`` with a few bytes flipped, inserted or deleted, or cut short (not before
    ``start``: the single-object header)."""
    data = bytearray(valid)
    rng = draw(st.randoms(use_true_random=False))  # positions uniform over the message
    for _ in range(draw(st.integers(1, 3))):
        at = rng.randint(start, max(start, len(data)))
        op = draw(st.sampled_from(("set", "insert", "delete", "cut")))
        byte = draw(st.sampled_from((0x00, 0x01, 0x02, 0x03, 0x7F, 0x80, 0xC0, 0xED, 0xFF))
                    | st.integers(0, 255))
        if op == "set" and at < len(data):
            data[at] = byte
        elif op == "insert":
            data.insert(at, byte)
        elif op == "delete" and at < len(data):
            del data[at]
        else:
            del data[at:]
    return bytes(data)


def check_inference(data: bytes, layouts: parts.FeatureLayouts | None) -> Any:
    """Compiled == Python; before the Python walker has interned new names the compiled one
    may defer (NotImplemented), after it must answer."""
    sigs = None if layouts is None else layouts.signatures
    first = compiled.inference_part(data, INFERENCE, sigs)
    expected = fastpath.walk_inference(data, layouts)
    assert first is NotImplemented or first == expected
    assert compiled.inference_part(data, INFERENCE, sigs) == expected
    assert fastpath.inference_part(data, layouts) == expected
    return expected


def check_shadow(data: bytes) -> Any:
    expected = fastpath.walk_shadow(data)
    assert compiled.shadow_part(data, SHADOW) == expected
    assert fastpath.shadow_part(data) == expected
    return expected


@needs_compiled
@EXAMPLES
@given(event=inference_events, interned=st.booleans())
def test_compiled_inference_equals_python_on_valid_events(event: dict, interned: bool) -> None:
    data = CODEC.encode("InferenceEvent", event)
    layouts = parts.FeatureLayouts() if interned else None
    got = check_inference(data, layouts)
    # What the wire validation judges (a time that is not positive, a non-finite feature)
    # is handed back to the Codec; the ids are checked by the caller.
    judged = event["event_time"] <= 0 or not all(map(math.isfinite,
                                                     event["num_features"].values()))
    assert (got is None) == judged
    if got is not None:
        assert got == (event["request_id"], parts.encode_inference(
            CODEC._decode(data, "InferenceEvent"),  # unvalidated: blank ids are allowed here
            parts.FeatureLayouts() if interned else None))


@needs_compiled
@EXAMPLES
@given(pred=shadow_predictions)
def test_compiled_shadow_equals_python_on_valid_predictions(pred: dict) -> None:
    data = CODEC.encode("ShadowPrediction", pred)
    got = check_shadow(data)
    assert (got is None) == (pred["event_time"] <= 0)  # judged by the wire validation
    if got is None:
        return
    rid, challenger, answered, part = got
    assert (rid, challenger, answered) == (
        pred["request_id"], pred["challenger"],
        pred["output"] is not None or pred["error"] is not None)
    assert part == parts.encode_shadow(CODEC._decode(data, "ShadowPrediction"))


@needs_compiled
@EXAMPLES
@given(data=st.data(), event=inference_events, interned=st.booleans())
def test_compiled_inference_equals_python_on_mutated_bytes(data: Any, event: dict,
                                                            interned: bool) -> None:
    layouts = parts.FeatureLayouts() if interned else None
    valid = CODEC.encode("InferenceEvent", event)
    check_inference(valid, layouts)  # names interned, so mutants hit the compiled lookup
    check_inference(data.draw(mutated(valid)), layouts)


@needs_compiled
@EXAMPLES
@given(data=st.data(), pred=shadow_predictions)
def test_compiled_shadow_equals_python_on_mutated_bytes(data: Any, pred: dict) -> None:
    check_shadow(data.draw(mutated(CODEC.encode("ShadowPrediction", pred))))


@needs_compiled
@EXAMPLES
@given(tail=st.binary(max_size=200), interned=st.booleans())
def test_compiled_walkers_equal_python_on_random_bytes(tail: bytes, interned: bool) -> None:
    check_inference(INFERENCE + tail, parts.FeatureLayouts() if interned else None)
    check_shadow(SHADOW + tail)
    assert compiled.shadow_part(INFERENCE + tail, SHADOW) is None  # another header
    assert compiled.inference_part(tail, INFERENCE, None) == fastpath.walk_inference(tail, None)


EXAMPLE_EVENT = {
    "request_id": "r1", "event_time": 1, "model": "m", "model_version": "1",
    "num_features": {f"f{n}": n / 7 for n in range(20)}, "cat_features": {"c": "x"},
    "null_features": ["n"], "output": {"label": "a", "probabilities": {"a": 1.0}, "value": 0.5},
    "latency_ms": 1.0, "context": {"k": "v"}, "trace_id": "t",
}
EXAMPLE_PREDICTIONS = [{
    "request_id": "r1", "challenger": "c", "challenger_version": "2", "is_control": True,
    "event_time": 1, "scored_at": 1, "output": output, "model_time_ms": 0.5, "queue_lag_ms": 1.0,
    "error": error, "error_kind": error,
} for output, error in ((EXAMPLE_EVENT["output"], None), (None, "boom"))]
# every byte a union index, a length, a count or a varint could be, and their neighbours
SUBSTITUTES = (0x00, 0x01, 0x02, 0x03, 0x04, 0x7E, 0x7F, 0x80, 0x81, 0xC0, 0xED, 0xFE, 0xFF)


@needs_compiled
def test_compiled_equals_python_for_every_single_byte_change_and_cut() -> None:
    """Exhaustive over positions: each byte replaced, deleted, or the message cut there."""
    inf = CODEC.encode("InferenceEvent", EXAMPLE_EVENT)
    layouts = parts.FeatureLayouts()
    assert check_inference(inf, layouts) is not None
    preds = [CODEC.encode("ShadowPrediction", p) for p in EXAMPLE_PREDICTIONS]
    for pred in preds:
        assert check_shadow(pred) is not None
    for data, check in [(inf, lambda d: check_inference(d, layouts)),
                        (inf, lambda d: check_inference(d, None))] + [
            (pred, check_shadow) for pred in preds]:
        for at in range(len(data) + 1):
            check(data[:at])
            check(data[:at] + data[at + 1:])
            for byte in SUBSTITUTES:
                check(data[:at] + bytes((byte,)) + data[at + 1:])


@needs_compiled
@pytest.mark.parametrize("extra", range(12))
def test_compiled_skips_times_like_python(extra: int) -> None:
    """Times are skipped as at most 10 bytes (wire.skip_long); longer forms are None."""
    padded = b"\x82" + b"\x80" * extra + b"\x00" if extra else b"\x02"  # 1, then padding
    inf = CODEC.encode("InferenceEvent", EXAMPLE_EVENT)
    at = 10 + len(wire.string_bytes("r1"))
    got = check_inference(inf[:at] + padded + inf[at + 1:], parts.FeatureLayouts())
    assert (got is not None) == (extra <= 8)
    pred = CODEC.encode("ShadowPrediction", EXAMPLE_PREDICTIONS[0])
    at = 10 + len(wire.string_bytes("r1") + wire.string_bytes("c") + wire.string_bytes("2"))
    at += 1  # is_control
    assert pred[at:at + 2] == b"\x02\x02"  # event_time, scored_at
    for changed in (padded + pred[at + 1:], pred[at:at + 1] + padded + pred[at + 2:]):
        assert (check_shadow(pred[:at] + changed) is not None) == (extra <= 8)


def _with_model(raw: bytes, size: bytes | None = None) -> bytes:
    """A valid InferenceEvent whose model name is ``raw`` (any bytes), its length encoded as
    ``size`` (default: canonical)."""
    event = {"request_id": "r", "event_time": 1, "model": "\x00MODEL\x00", "model_version": "1",
             "num_features": {f"f{n}": n / 3 for n in range(6)},
             "output": {"label": None, "probabilities": {}, "value": None},
             "latency_ms": 1.0}
    data = CODEC.encode("InferenceEvent", event)
    marker = wire.string_bytes("\x00MODEL\x00")
    return data.replace(marker, (size or wire.long_bytes(len(raw))) + raw)


@needs_compiled
@EXAMPLES
@given(raw=st.binary(max_size=8))
def test_compiled_utf8_check_is_pythons(raw: bytes) -> None:
    got = check_inference(_with_model(raw), parts.FeatureLayouts())
    try:
        raw.decode()
    except UnicodeDecodeError:
        assert got is None
    else:
        assert got is not None


@needs_compiled
@pytest.mark.parametrize("raw", [
    b"\xc0\x80", b"\xc1\xbf", b"\xe0\x80\x80", b"\xe0\x9f\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf",
    b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xe2\x82", b"\x80",
    b"\xef\xbf\xbf", b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\xed\x9f\xbf", b"\x00",
])
def test_compiled_utf8_edges(raw: bytes) -> None:
    """Overlongs, surrogates, beyond U+10FFFF, truncated sequences, and their valid borders."""
    try:
        valid = raw.decode() is not None
    except UnicodeDecodeError:
        valid = False
    assert (check_inference(_with_model(raw), None) is not None) == valid


@needs_compiled
@pytest.mark.parametrize("extra", [0, 1, 5, 9, 10, 12, 30])
def test_compiled_reads_long_varints_like_python(extra: int) -> None:
    """Non-canonical lengths (continuation bytes up to the 10 bytes of a long, as
    wire.read_long) and values past 64 bits."""
    for raw in (b"", b"m", b"model"):
        size = wire.long_bytes(len(raw))
        padded = bytes([size[0] | 0x80]) + b"\x80" * extra + b"\x00" if extra else size
        got = check_inference(_with_model(raw, padded), None)
        assert (got is not None) == (extra <= 8)
        negative = b"\xff" * (extra + 1) + b"\x01"
        assert check_inference(_with_model(raw, negative), parts.FeatureLayouts()) is None
        positive = b"\xfe" + b"\xff" * extra + b"\x01"
        got = check_inference(_with_model(raw, positive), parts.FeatureLayouts())
        assert got is None or extra < 9


# -- build_bodies ------------------------------------------------------------------------------

times = st.integers(-(2**61), 2**61)  # differences fit in 64 bits (else Python's big ints)
feedbacks = st.fixed_dictionaries({
    "request_id": texts, "label": st.none() | texts, "value": st.none() | doubles,
    "event_time": times, "source": st.sampled_from(["explicit", "implicit", "human"]),
    "weight": doubles, "inclusion_prob": doubles,
})
challengers = st.one_of(texts, texts.map(str.encode))
versions = st.integers(0, 2**62)


def _part(name: str, record: dict) -> dict:
    # Unvalidated: the bodies are built from whatever parts the encoders can write.
    return CODEC._decode(CODEC.encode(name, record), name)


@st.composite
def body_inputs(draw: Any) -> dict[str, Any]:
    """Stored parts as the encoders write them, in every combination build_bodies sees."""
    layouts = parts.FeatureLayouts() if draw(st.booleans()) else None
    primary = feedback = None
    if draw(st.booleans()):
        event = draw(inference_events) | {"event_time": draw(times)}
        primary = parts.encode_inference(_part("InferenceEvent", event), layouts)
    if draw(st.booleans()):
        feedback = parts.encode_feedback(_part("Feedback", draw(feedbacks)))
    shadows: list[Any] = []
    for pred in draw(st.lists(st.none() | shadow_predictions, max_size=3)):
        shadow = None
        if pred is not None:
            shadow = parts.encode_shadow(_part("ShadowPrediction", pred | {
                "event_time": draw(times)}))
        shadows += [draw(challengers), draw(versions), shadow]
    return {"request_id": draw(texts), "primary": primary, "feedback": feedback,
            "shadows": shadows, "joined_at": draw(times), "layouts": layouts,
            "prefix": draw(st.binary(max_size=12))}


def compiled_bodies(args: dict[str, Any]) -> Any:
    layouts = args["layouts"]
    return compiled.build_bodies(args["request_id"], args["primary"], args["feedback"],
                                 args["shadows"], args["joined_at"], args["prefix"],
                                 None if layouts is None else layouts._names)


def check_bodies(args: dict[str, Any]) -> Any:
    """Compiled == Python, or the compiled one leaves the input to Python (NotImplemented),
    which it must whenever Python raises."""
    got = compiled_bodies(args)
    try:
        expected = parts.python_bodies(**{k: v for k, v in args.items() if k != "shadows"},
                                       shadows=args["shadows"])
    except Exception:  # a corrupt stored part: LayoutError, IndexError, struct.error...
        assert got is NotImplemented
        return NotImplemented
    assert got is NotImplemented or got == expected
    return got


@needs_compiled
@EXAMPLES
@given(args=body_inputs())
def test_compiled_bodies_equal_python_on_stored_parts(args: dict[str, Any]) -> None:
    got = check_bodies(args)
    assert got is not NotImplemented  # every part the encoders write is handled in C
    assert parts.build_bodies(**args) == got
    for body in got:  # and they are JoinedRecords
        assert parts.decode_body(body[len(args["prefix"]):])["request_id"] == args["request_id"]


@needs_compiled
@EXAMPLES
@given(data=st.data(), args=body_inputs(), which=st.sampled_from(["primary", "feedback", "s"]))
def test_compiled_bodies_equal_python_on_corrupt_parts(data: Any, args: dict[str, Any],
                                                       which: str) -> None:
    if which == "s":
        shadows = args["shadows"]
        at = data.draw(st.sampled_from([n for n in range(2, len(shadows), 3)
                                        if shadows[n] is not None] or [-1]))
        if at >= 0:
            shadows[at] = data.draw(mutated(shadows[at], 0))
    elif args[which] is not None:
        args[which] = data.draw(mutated(args[which], 0))
    check_bodies(args)


@needs_compiled
def test_compiled_bodies_leave_unknown_layouts_to_python() -> None:
    """A layout another joiner made: Python fetches its names, then C has them too."""
    writer = parts.FeatureLayouts()
    primary = parts.encode_inference(_part("InferenceEvent", EXAMPLE_EVENT), writer)
    reader = parts.FeatureLayouts(fetch=lambda ids: [writer.unsaved.get(i) for i in ids])
    args = {"request_id": "r1", "primary": primary, "feedback": None,
            "shadows": ["c", 1, None], "joined_at": 5, "layouts": reader, "prefix": b""}
    assert compiled_bodies(args) is NotImplemented
    expected = parts.build_bodies(**args)
    assert compiled_bodies(args) == expected
    assert compiled_bodies(args | {"layouts": None}) is NotImplemented
    with pytest.raises(parts.LayoutError):
        parts.build_bodies(**args | {"layouts": None})


# -- the merge command -----------------------------------------------------------------------

try:
    import hiredis
except ImportError:  # pragma: no cover - redis-py packs in Python then
    hiredis = None
needs_hiredis = pytest.mark.skipif(hiredis is None, reason="hiredis is not installed")
int64s = st.integers(-(2**63), 2**63 - 1)
store_parts = st.builds(store.Part, st.sampled_from("isf"), texts, texts, st.binary(max_size=40),
                        int64s, st.integers(0, 2**53))


@needs_compiled
@needs_hiredis
@EXAMPLES
@given(parts_=st.lists(store_parts, max_size=30), state=texts, tomb=texts,
       head=st.tuples(texts, texts, int64s, texts), middle=st.tuples(int64s, int64s, int64s))
def test_compiled_merge_packing_is_hiredis(parts_: list[store.Part], state: str, tomb: str,
                                           head: tuple, middle: tuple) -> None:
    command = store.merge_command(head, state, tomb, middle, parts_)
    assert compiled.pack_merge(head, state, tomb, middle, parts_) == hiredis.pack_command(command)


@needs_compiled
@pytest.mark.parametrize("odd", [1.5, True, 2**64, "\udc80", None])
def test_compiled_merge_packing_leaves_other_types_to_hiredis(odd: Any) -> None:
    part = store.Part("i", "r", "c", b"x", 0, 1)
    for head, state, middle, parts_ in [
            (("EVALSHA", odd), "s:", (1,), [part]), (("EVALSHA",), "s:", (odd,), [part]),
            (("EVALSHA",), "s:", (1,), [part._replace(rank=odd)]),
            (("EVALSHA",), "s:", (1,), [part._replace(request_id=odd)])]:
        assert compiled.pack_merge(head, state, "t:", middle, parts_) is NotImplemented


def _extension_files() -> list[Path]:
    folder = Path(fastpath.__file__).parent
    return [p for suffix in importlib.machinery.EXTENSION_SUFFIXES
            for p in folder.glob(f"_fastpath{suffix}")]


def test_a_built_extension_is_used() -> None:
    """A compiled module next to fastpath.py must be the one in use: a silent fallback to the
    Python code (import failure, stale build, constants out of step) fails here, not as a
    slow benchmark."""
    built = bool(_extension_files())
    assert (fastpath.compiled is not None) == built
    assert (parts._compiled_bodies is not None) == built
    assert (store._pack_merge is not None) == built


@needs_compiled
def test_the_compiled_path_serves_known_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    event = {"request_id": "r1", "event_time": 5, "model": "m", "model_version": "1",
             "num_features": {f"f{n}": n / 7 for n in range(20)},
             "output": {"label": "a", "probabilities": {"a": 1.0}, "value": None},
             "latency_ms": 1.0}
    pred = {"request_id": "r1", "challenger": "c", "challenger_version": "2", "event_time": 5,
            "scored_at": 6, "output": None, "model_time_ms": 0.5, "queue_lag_ms": 1.0,
            "error": "boom"}
    inf, shadow = CODEC.encode("InferenceEvent", event), CODEC.encode("ShadowPrediction", pred)
    layouts = parts.FeatureLayouts()
    expected = fastpath.inference_part(inf, layouts), fastpath.shadow_part(shadow)

    def python_walker(*args: Any) -> None:
        raise AssertionError("the Python walker ran")

    monkeypatch.setattr(fastpath, "walk_inference", python_walker)
    monkeypatch.setattr(fastpath, "walk_shadow", python_walker)
    assert (fastpath.inference_part(inf, layouts), fastpath.shadow_part(shadow)) == expected
    assert fastpath.inference_part(inf, None)[0] == "r1"
    bodies = parts.python_bodies("r1", expected[0][1], None, ["c", 1, expected[1][3]],
                                 joined_at=9, layouts=layouts)
    monkeypatch.setattr(parts, "python_bodies", python_walker)
    assert parts.build_bodies("r1", expected[0][1], None, ["c", 1, expected[1][3]],
                              joined_at=9, layouts=layouts) == bodies
