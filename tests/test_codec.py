import json
import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowpipe.schemas import NAMES, schema
from shadowpipe.schemas.codec import Codec, DecodeError
from shadowpipe.schemas.evolution import sample
from shadowpipe.schemas.validate import InvalidRecord, check

INFERENCE = {
    "request_id": "req-1",
    "event_time": 1_700_000_000_123,
    "model": "fraud",
    "model_version": "3.1",
    "num_features": {"amount": 12.5, "age_days": 400.0},
    "cat_features": {"country": "DE"},
    "null_features": ["referrer"],
    "output": {"label": "fraud", "probabilities": {"fraud": 0.8, "ok": 0.2}, "value": None},
    "latency_ms": 3.25,
    "context": {"segment": "mobile"},
    "inclusion_prob": 0.5,
    "trace_id": None,
}


def test_three_wire_formats_decode_to_equal_records() -> None:
    codec = Codec(known_ids={42: schema("InferenceEvent")})
    single = codec.encode("InferenceEvent", INFERENCE)
    confluent = codec.confluent_frame(42, "InferenceEvent", INFERENCE)
    as_json = json.dumps(INFERENCE).encode()
    assert single[:2] == b"\xc3\x01"
    assert confluent[0] == 0 and confluent[1:5] == (42).to_bytes(4, "big")
    decoded = [codec.decode(data, "InferenceEvent") for data in (single, confluent, as_json)]
    assert decoded[0] == decoded[1] == decoded[2] == INFERENCE


def test_json_fills_defaults() -> None:
    minimal = {k: INFERENCE[k] for k in ("request_id", "event_time", "model", "model_version",
                                         "output", "latency_ms")}
    record = Codec().decode(json.dumps(minimal).encode(), "InferenceEvent")
    assert record["inclusion_prob"] == 1.0 and record["context"] == {}


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (os.urandom(0) + b"\x7fgarbage", "unrecognised framing"),
        (b"\xc3\x01" + b"\x00" * 8 + b"abc", "unknown schema fingerprint"),
        (b"\x00\x00\x00\x00\x63abc", "unknown schema id 99"),
        (b'{"request_id": 5}', "does not match"),
        (b"{not json", "invalid JSON"),
        (b"[1, 2]", "unrecognised framing"),
    ],
)
def test_bad_input_gives_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        Codec().decode(data, "InferenceEvent")
    assert reason in err.value.reason


def test_wrong_kind_is_rejected() -> None:
    codec = Codec()
    feedback = codec.encode("Feedback", {"request_id": "r", "event_time": 1})
    with pytest.raises(DecodeError, match="expected io.shadowpipe.InferenceEvent"):
        codec.decode(feedback, "InferenceEvent")


def test_truncated_body_is_decode_error() -> None:
    data = Codec().encode("InferenceEvent", INFERENCE)
    with pytest.raises(DecodeError, match="corrupt Avro body"):
        Codec().decode(data[:-7], "InferenceEvent")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        Codec().decode(data, "InferenceEvent")
    except DecodeError as err:
        assert err.reason


@pytest.mark.parametrize("name", NAMES)
def test_every_schema_round_trips(name: str) -> None:
    import random

    codec = Codec()
    for i in range(20):
        record = sample(schema(name), random.Random(i))
        data = codec.encode(name, record)
        try:
            expected = check(name, record)
        except InvalidRecord as err:  # random times are negative half of the time
            with pytest.raises(InvalidRecord, match=re.escape(err.reason)):
                codec.decode(data, name)
            continue
        assert codec.decode(data, name) == expected
