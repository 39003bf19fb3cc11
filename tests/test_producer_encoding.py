"""The hand-written Avro encoder writes exactly fastavro's bytes, and the input rules hold."""

from __future__ import annotations

import hashlib
import hmac
import io
import math

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowpipe.config import ConfigError
from shadowpipe.producers.events import (
    EventEncoder,
    Invalid,
    Privacy,
    compiled_inference,
    reason_of,
)
from shadowpipe.sampling import SampleRates, is_sampled
from shadowpipe.schemas import schema
from shadowpipe.schemas.codec import Codec
from shadowpipe.schemas.wire import long_bytes, string_bytes, time_bytes

CODEC = Codec()


def read(data: bytes, name: str) -> dict:
    """The encoder's bytes as fastavro reads them, without the consumers' validation (the
    event times here are arbitrary, and a NaN feature must be seen as the writer wrote it)."""
    return CODEC._decode(data, name)
KEY = b"secret"
names = st.text(min_size=1, max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False)
feature_values = st.one_of(finite, st.integers(-(2**53), 2**53), st.booleans(), st.text(),
                           st.none())
outputs = st.one_of(
    st.text(), st.booleans(), st.integers(-1000, 1000), finite,
    st.fixed_dictionaries({}, optional={
        "label": st.one_of(st.none(), st.text()),
        "probabilities": st.dictionaries(names, finite, max_size=5),
        "value": st.one_of(st.none(), finite),
    }),
)


def encoder(privacy: Privacy | None = None, compiled: bool = True) -> EventEncoder:
    return EventEncoder(CODEC.header("InferenceEvent"), CODEC.header("Feedback"),
                        privacy, compiled=compiled)


def fastavro_body(name: str, record: dict) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema(name), record)
    return buf.getvalue()


def expected_output(output: object) -> dict:
    if isinstance(output, dict):
        return {"label": output.get("label"), "probabilities": output.get("probabilities", {}),
                "value": output.get("value")}
    if isinstance(output, bool):
        return {"label": "true" if output else "false", "probabilities": {}, "value": None}
    if isinstance(output, int | str):
        return {"label": str(output), "probabilities": {}, "value": None}
    return {"label": None, "probabilities": {}, "value": output}


def surrogate_free(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


@settings(max_examples=300, deadline=None)
@given(
    request_id=st.text(min_size=1).filter(surrogate_free),
    features=st.dictionaries(names.filter(surrogate_free), feature_values, max_size=25),
    output=outputs,
    context=st.dictionaries(names, st.text(), max_size=4),
    event_time=st.integers(-(2**63), 2**63 - 1),
    latency=finite,
    trace_id=st.one_of(st.none(), st.text()),
)
def test_inference_bytes_equal_fastavro_and_decode(
    request_id, features, output, context, event_time, latency, trace_id
) -> None:
    try:
        data = encoder().inference(
            request_id.encode(), features, output, model="m", version="1", latency_ms=latency,
            context=context, event_time=event_time, inclusion_prob=0.25, trace_id=trace_id,
        )
    except Exception as exc:
        # Only lone surrogates in generated strings may be refused here.
        assert reason_of(exc) == "invalid_string"
        return
    record = read(data, "InferenceEvent")
    assert data == CODEC.header("InferenceEvent") + fastavro_body("InferenceEvent", record)
    numbers = {k: float(v) for k, v in features.items()
               if v is not None and not isinstance(v, str)}
    assert record["num_features"] == numbers
    assert record["cat_features"] == {k: v for k, v in features.items() if isinstance(v, str)}
    assert record["null_features"] == [k for k, v in features.items() if v is None]
    assert record["output"] == expected_output(output)
    assert (record["request_id"], record["event_time"], record["latency_ms"]) == (
        request_id, event_time, latency)
    assert (record["context"], record["trace_id"], record["inclusion_prob"]) == (
        context, trace_id, 0.25)


@settings(max_examples=200, deadline=None)
@given(
    label=st.one_of(st.none(), st.text(), st.booleans(), st.integers(-10, 10)),
    value=st.one_of(st.none(), finite),
    source=st.sampled_from(["explicit", "implicit", "human"]),
    weight=finite,
    event_time=st.integers(-(2**63), 2**63 - 1),
)
def test_feedback_bytes_equal_fastavro(label, value, source, weight, event_time) -> None:
    try:
        data = encoder().feedback(b"r", label, value=value, event_time=event_time, source=source,
                                  weight=weight, inclusion_prob=1.0)
    except Exception as exc:
        assert reason_of(exc) in ("missing_outcome", "invalid_string")
        return
    record = read(data, "Feedback")
    assert data == CODEC.header("Feedback") + fastavro_body("Feedback", record)
    assert (record["value"], record["source"], record["weight"]) == (value, source, weight)


@given(st.integers(-(2**63), 2**63 - 1))
def test_longs_match_fastavro(n: int) -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, "long", n)
    assert long_bytes(n) == buf.getvalue() == time_bytes(n)


@given(st.text().filter(surrogate_free))
def test_strings_match_fastavro(text: str) -> None:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, "string", text)
    assert string_bytes(text) == buf.getvalue()


@pytest.mark.parametrize(("features", "output", "latency", "reason"), [
    ({"x": math.inf}, "ok", 1.0, "non_finite"),
    ({"x": 1.0}, "ok", math.nan, "non_finite"),
    ({"x": [1, 2]}, "ok", 1.0, "unsupported_type"),
    ({1: 1.0}, "ok", 1.0, "unsupported_type"),
    ({"x": 1.0}, {"label": "a", "extra": 1}, 1.0, "unsupported_type"),
    ({"x": 1.0}, {"probabilities": {"a": math.nan}}, 1.0, "non_finite"),
    ({"x": 1.0}, None, 1.0, "missing_output"),
    ({"x": 1.0}, object(), 1.0, "unsupported_type"),
    ("not a mapping", "ok", 1.0, "unsupported_type"),
    ({"x": 10**400}, "ok", 1.0, "unsupported_type"),  # not representable as a double
    ({"x": "\ud800"}, "ok", 1.0, "invalid_string"),
])
def test_invalid_inputs_have_reasons(features, output, latency, reason) -> None:
    with pytest.raises(Exception) as caught:
        encoder().inference(b"r", features, output, model="m", version="1", latency_ms=latency,
                            context=None, event_time=0, inclusion_prob=1.0, trace_id=None)
    assert reason_of(caught.value) == reason


def test_nan_feature_is_missing_and_oversize_is_refused() -> None:
    data = encoder().inference(b"r", {"a": math.nan, "b": 2}, 1.5, model="m", version="1",
                               latency_ms=1.0, context=None, event_time=0, inclusion_prob=1.0,
                               trace_id=None)
    record = read(data, "InferenceEvent")
    assert record["num_features"] == {"b": 2.0} and record["null_features"] == ["a"]
    small = EventEncoder(CODEC.header("InferenceEvent"), b"", max_bytes=300)
    with pytest.raises(Invalid, match="too_large"):
        small.inference(b"r", {f"f{i}": 1.0 for i in range(40)}, "ok", model="m", version="1",
                        latency_ms=1.0, context=None, event_time=0, inclusion_prob=1.0,
                        trace_id=None)


def test_privacy_drops_and_hashes_features_and_context() -> None:
    privacy = Privacy(frozenset({"email"}), frozenset({"user", "zip"}), KEY)
    data = encoder(privacy).inference(
        b"r", {"email": "a@b.c", "user": "u1", "zip": 12345, "amount": 3.0}, "ok", model="m",
        version="1", latency_ms=1.0, context={"email": "x", "user": "u1", "tenant": "t"},
        event_time=0, inclusion_prob=1.0, trace_id=None)
    record = read(data, "InferenceEvent")

    def digest(text: str) -> str:
        return hmac.new(KEY, text.encode(), hashlib.sha256).digest()[:16].hex()

    assert record["num_features"] == {"amount": 3.0}
    assert record["cat_features"] == {"user": digest("u1"), "zip": digest("12345.0")}
    assert record["context"] == {"user": digest("u1"), "tenant": "t"}
    assert b"a@b.c" not in data and b"u1" not in data


@given(st.text(), st.floats(0, 1), st.floats(0, 1))
def test_sampling_is_the_documented_hash_and_monotone(request_id, low, high) -> None:
    low, high = min(low, high), max(low, high)
    h = int.from_bytes(hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).digest()[:8],
                       "big")
    if not surrogate_free(request_id):
        return
    assert is_sampled(request_id, low) == (low >= 1 or h < low * 2**64)
    assert not is_sampled(request_id, low) or is_sampled(request_id, high)


def test_sampling_rate_is_respected_and_rates_parse() -> None:
    hits = sum(is_sampled(f"req-{i}", 0.2) for i in range(20000))
    assert 0.18 < hits / 20000 < 0.22
    rates = SampleRates.parse(("*=0.2", "fraud=0.6", "churn=0.4"))
    assert rates.rate("other") == 0.2 and rates.feedback_rate(None) == 0.6
    assert rates.feedback_rate("churn") == 0.4
    for bad in (("fraud",), ("fraud=2",), ("=0.1",), ("fraud=x",)):
        with pytest.raises(ConfigError, match="SHADOWPIPE_PRODUCER_SAMPLE_RATES"):
            SampleRates.parse(bad)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=3), st.dictionaries(names, finite, min_size=1,
                                                                max_size=4)), max_size=8))
def test_classifier_outputs_reuse_plans_and_equal_fastavro(outputs) -> None:
    """The {label, probabilities} fast path (plans cached per label and class names) writes
    the general path's bytes, whatever order the shapes come in on one encoder."""
    shared = encoder()
    for label, probs in outputs:
        output = {"label": label, "probabilities": probs}
        try:
            data = shared.inference(b"r", {}, output, model="m", version="1", latency_ms=1.0,
                                    context=None, event_time=0, inclusion_prob=1.0,
                                    trace_id=None)
        except Exception as exc:
            assert reason_of(exc) == "invalid_string"
            continue
        record = read(data, "InferenceEvent")
        assert record["output"] == {"label": label, "probabilities": probs, "value": None}
        assert data == CODEC.header("InferenceEvent") + fastavro_body(
            "InferenceEvent", record)


@pytest.mark.parametrize("bad", [math.nan, math.inf, "0.5", None])
def test_classifier_output_with_bad_probability_is_refused(bad) -> None:
    output = {"label": "a", "probabilities": {"a": 0.5, "b": bad}}
    with pytest.raises(Exception) as caught:
        encoder().inference(b"r", {}, output, model="m", version="1", latency_ms=1.0,
                            context=None, event_time=0, inclusion_prob=1.0, trace_id=None)
    assert reason_of(caught.value) == ("non_finite" if isinstance(bad, float)
                                       else "unsupported_type")


anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(), st.binary(),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.floats(),
                                                         max_size=3),
)
loose_mappings = st.dictionaries(st.one_of(names, st.integers()), anything, max_size=8)
loose_outputs = st.one_of(anything, outputs, st.dictionaries(
    st.sampled_from(["label", "probabilities", "value", "other"]), anything, max_size=3))


@pytest.mark.skipif(compiled_inference is None, reason="built without a C compiler")
@settings(max_examples=500, deadline=None)
@given(
    request_id=st.text(min_size=1),
    features=st.one_of(st.none(), loose_mappings, anything),
    output=loose_outputs,
    context=st.one_of(st.none(), loose_mappings, st.dictionaries(names, st.text(), max_size=3)),
    event_time=st.one_of(st.integers(), anything),
    latency=anything,
    trace_id=st.one_of(st.none(), st.text(), anything),
)
def test_compiled_encoder_writes_pythons_bytes_or_defers(
    request_id, features, output, context, event_time, latency, trace_id
) -> None:
    """On any input the compiled encoder either returns exactly what the Python encoder
    returns, or None (the Python encoder then decides, and refuses with its reason)."""
    key = request_id.encode(errors="surrogatepass")
    args = dict(model="m", version="1", latency_ms=latency, context=context,
                event_time=event_time, inclusion_prob=0.25, trace_id=trace_id)
    try:
        expected = encoder(compiled=False).inference(key, features, output, **args)
    except Exception:
        expected = None
    got = compiled_inference(CODEC.header("InferenceEvent"), key, features, output,
                             string_bytes("m") + string_bytes("1"), latency, context,
                             event_time, 0.25, trace_id)
    assert got is None or got == expected


@pytest.mark.skipif(compiled_inference is None, reason="built without a C compiler")
def test_compiled_encoder_takes_the_plain_case() -> None:
    features = {"amount": 12.5, "n": 3, "flag": True, "country": "DE", "ref": None}
    outputs_ = ["ok", 0.5, {"label": "1", "probabilities": {"0": 0.25, "1": 0.75}},
                {"value": 2.0}, {"label": None, "probabilities": {}}]
    for output in outputs_:
        got = compiled_inference(CODEC.header("InferenceEvent"), b"r1", features,
                                 output, string_bytes("m") + string_bytes("1"), 0.5,
                                 {"country": "DE"}, 1_700_000_000_000, 1.0, "t")
        assert got is not None and got == encoder(compiled=False).inference(
            b"r1", features, output, model="m", version="1", latency_ms=0.5,
            context={"country": "DE"}, event_time=1_700_000_000_000, inclusion_prob=1.0,
            trace_id="t")
