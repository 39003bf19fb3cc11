"""Every hand-written fast path of the wire layer against fastavro, on random valid records,
in both framings (single-object and Confluent): the encoders write fastavro's bytes after
``Codec.header``, and the fast decoder reads what the Codec reads without asking it."""

from __future__ import annotations

import io
import random
import socket
from types import SimpleNamespace
from typing import Any

import fastavro
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors.shadow.decode import InferenceDecoder
from shadowpipe.processors.shadow.encode import PredictionEncoder
from shadowpipe.producers.emitter import wire_headers
from shadowpipe.producers.events import EventEncoder
from shadowpipe.schemas import schema
from shadowpipe.schemas.codec import CONFLUENT, SINGLE_OBJECT, Codec
from shadowpipe.schemas.evolution import sample
from shadowpipe.schemas.validate import check
from shadowpipe.schemas.wire import LAYOUTS, long_bytes

IDS = {11: "InferenceEvent", 12: "Feedback", 13: "ShadowPrediction", 14: "JoinedRecord"}
FRAMINGS = (SINGLE_OBJECT, CONFLUENT)
FAST = settings(max_examples=40, deadline=None)

text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
ident = text.filter(lambda s: s and not s.isspace())
finite = st.floats(allow_nan=False, allow_infinity=False)
times = st.integers(1, 2**63 - 1)
maybe_text = st.one_of(st.none(), text)
outputs = st.fixed_dictionaries({
    "label": maybe_text,
    "probabilities": st.dictionaries(text, finite, max_size=4),
    "value": st.one_of(st.none(), finite),
})
features = st.dictionaries(text, st.one_of(finite, text, st.none()), max_size=8)


class CountingCodec(Codec):
    """A Codec that counts the messages handed to it (the fast decoder's fallbacks)."""

    def __init__(self) -> None:
        super().__init__(known_ids={i: schema(name) for i, name in IDS.items()})
        self.fallbacks = 0

    def decode(self, data: bytes | None, name: str) -> dict[str, Any]:
        self.fallbacks += 1
        return super().decode(data, name)


CODEC = CountingCodec()


def body(name: str, record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schema(name), record)
    return buf.getvalue()


def test_every_layout_has_a_property_here() -> None:
    covered = {"InferenceEvent", "Feedback", "ShadowPrediction"}
    # JoinedRecord's fast path (join/parts.py, join/_fastpath.c) is compared with fastavro
    # in tests/test_join_parts.py and tests/test_join_compiled.py.
    assert set(LAYOUTS) == covered | {"JoinedRecord"}


def test_headers_of_both_framings() -> None:
    rng = random.Random(0)
    for schema_id, name in IDS.items():
        assert CODEC.header(name, CONFLUENT) == b"\x00" + schema_id.to_bytes(4, "big")
        assert CODEC.header(name, SINGLE_OBJECT)[:2] == b"\xc3\x01"
        datum = sample(schema(name), rng)
        for framing in FRAMINGS:  # the Codec resolves what its header names
            data = CODEC.header(name, framing) + body(name, datum)
            assert CODEC._decode(data, name) == CODEC._decode(CODEC.encode(name, datum), name)


@pytest.mark.parametrize("framing", FRAMINGS)
@pytest.mark.parametrize("compiled", [True, False])
@FAST
@given(request_id=ident, feats=features, output=outputs, model=ident, version=text,
       latency=finite, context=st.dictionaries(text, text, max_size=3), event_time=times,
       prob=finite, trace_id=maybe_text)
def test_inference_event(framing, compiled, request_id, feats, output, model, version,
                         latency, context, event_time, prob, trace_id) -> None:
    header = CODEC.header("InferenceEvent", framing)
    enc = EventEncoder(header, b"", compiled=compiled)
    data = enc.inference(request_id.encode(), feats, output, model=model, version=version,
                         latency_ms=latency, context=context, event_time=event_time,
                         inclusion_prob=prob, trace_id=trace_id)
    record = {
        "request_id": request_id, "event_time": event_time, "model": model,
        "model_version": version,
        "num_features": {k: v for k, v in feats.items() if isinstance(v, float)},
        "cat_features": {k: v for k, v in feats.items() if isinstance(v, str)},
        "null_features": [k for k, v in feats.items() if v is None],
        "output": output, "latency_ms": latency, "context": context, "inclusion_prob": prob,
        "trace_id": trace_id,
    }
    assert data == header + body("InferenceEvent", record)
    before = CODEC.fallbacks
    decoded = InferenceDecoder(CODEC).decode(data)
    assert CODEC.fallbacks == before  # read by the fast path, in either framing
    assert decoded == check("InferenceEvent", record) == CODEC.decode(data, "InferenceEvent")


@pytest.mark.parametrize("framing", FRAMINGS)
@FAST
@given(request_id=ident, label=maybe_text, value=st.one_of(st.none(), finite),
       event_time=times, source=st.sampled_from(["explicit", "implicit", "human"]), weight=finite,
       prob=finite)
def test_feedback(framing, request_id, label, value, event_time, source, weight, prob) -> None:
    if label is None and value is None:
        label = "x"  # a Feedback carries an outcome
    header = CODEC.header("Feedback", framing)
    enc = EventEncoder(b"", header)
    data = enc.feedback(request_id.encode(), label, value=value, event_time=event_time,
                        source=source, weight=weight, inclusion_prob=prob)
    record = {"request_id": request_id, "label": label, "value": value,
              "event_time": event_time, "source": source, "weight": weight,
              "inclusion_prob": prob}
    assert data == header + body("Feedback", record)
    assert CODEC.decode(data, "Feedback") == record


@pytest.mark.parametrize("framing", FRAMINGS)
@FAST
@given(request_id=ident, challenger=ident, version=text, control=st.booleans(),
       event_time=times, scored_at=times,
       answer=st.one_of(outputs.map(lambda o: (o, None, None)),
                        st.tuples(st.none(), text, maybe_text),
                        st.tuples(outputs, text, maybe_text)),
       model_time=finite, lag=finite)
def test_shadow_prediction(framing, request_id, challenger, version, control, event_time,
                           scored_at, answer, model_time, lag) -> None:
    output, error, error_kind = answer
    enc = PredictionEncoder(CODEC, challenger, version, control, framing)
    header = CODEC.header("ShadowPrediction", framing)
    record = {"request_id": request_id, "challenger": challenger,
              "challenger_version": version, "is_control": control, "event_time": event_time,
              "scored_at": scored_at, "output": output, "model_time_ms": model_time,
              "queue_lag_ms": lag, "error": error, "error_kind": error_kind}
    expected = header + body("ShadowPrediction", record)
    one = enc.encode(request_id, event_time, scored_at, output, model_time, lag, error,
                     error_kind)
    result = SimpleNamespace(output=output, error=error, error_kind=error_kind)
    (many,) = enc.encode_many([request_id.encode()], [event_time], [result], model_time,
                              [lag], long_bytes(scored_at))
    assert one == many == expected
    assert CODEC.decode(one, "ShadowPrediction") == record


def test_registry_framing_asks_the_registry_once_and_names_the_setting() -> None:
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(OSError):
        Codec(url).header("Feedback")  # Confluent by default with a registry
    settings_ = Settings.load(env={"SHADOWPIPE_SCHEMA_REGISTRY_URL": url})
    with pytest.raises(ConfigError, match="SHADOWPIPE_SCHEMA_REGISTRY_URL"):
        wire_headers(settings_)
    assert wire_headers(Settings.load(env={})) == (CODEC.header("InferenceEvent", SINGLE_OBJECT),
                                                   CODEC.header("Feedback", SINGLE_OBJECT))
