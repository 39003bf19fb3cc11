"""Scoring one micro-batch: decode, validate, sample, run every challenger, encode.

Pure of Kafka: :meth:`ShadowProcessor.score` takes raw messages and returns the messages
to publish (ShadowPredictions and DeadLetters). The consumer loop
(:mod:`~shadowpipe.processors.shadow.service`) owns the I/O and the offsets.

>>> from shadowpipe.config import Settings
>>> from shadowpipe.processors.shadow.challengers import parse_specs
>>> from shadowpipe.schemas.codec import Codec
>>> specs = parse_specs([{"name": "echo", "version": "1", "kind": "callable",
...     "location": "shadowpipe.processors.shadow.challengers:echo_label"}], 1000)
>>> proc = ShadowProcessor(Settings.load(env={}), specs)
>>> event = {"request_id": "r1", "event_time": 1000, "model": "m", "model_version": "1",
...          "cat_features": {"label": "yes"}, "output": {}, "latency_ms": 1.0}
>>> raw = Message(Codec().encode("InferenceEvent", event), b"r1", "t", 0, 7)
>>> out = proc.score([raw, Message(b"garbage", b"x", "t", 0, 8)], consumed_at_ms=1500)
>>> [(k, Codec().decode(v, "ShadowPrediction")["output"]["label"]) for k, v in out.predictions]
[(b'r1', 'yes')]
>>> Codec().decode(out.dead_letters[0][1], "DeadLetter")["source_offset"]
8
>>> proc.close()
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from shadowpipe import sampling
from shadowpipe.config import Settings
from shadowpipe.processors.dead_letter import dead_letter
from shadowpipe.processors.runtime.message import Message
from shadowpipe.processors.shadow.challengers import ChallengerSpec, Model, load
from shadowpipe.processors.shadow.decode import InferenceDecoder
from shadowpipe.processors.shadow.encode import PredictionEncoder
from shadowpipe.processors.shadow.runner import Pending, Result, Runner
from shadowpipe.processors.shadow.stats import Stats
from shadowpipe.schemas.codec import Codec, DecodeError
from shadowpipe.schemas.wire import long_bytes

WORKER = "shadow"


@dataclass
class Scored:
    """What a batch produced: (key, value) pairs for each output topic."""

    predictions: list[tuple[bytes, bytes]] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)


@dataclass
class Challenger:
    """A loaded challenger with its runner, encoder and sampling bound."""

    spec: ChallengerSpec
    runner: Runner
    encoder: PredictionEncoder
    bound: bytes | None


class Scoring(NamedTuple):
    """One challenger's outcome on a batch (see :meth:`ShadowProcessor.run_challengers`)."""

    challenger: Challenger
    picked: list[int]
    pending: Pending
    results: list[Result]


class Started(NamedTuple):
    """A batch decoded and submitted (see :meth:`ShadowProcessor.start`)."""

    batch: Sequence[Message]
    records: list[dict[str, Any]]
    lags: list[float]
    calls: list[tuple[Challenger, list[int], Pending | None]]
    out: Scored


class ShadowProcessor:
    """Scores micro-batches of InferenceEvents with every challenger."""

    def __init__(
        self, settings: Settings, specs: Sequence[ChallengerSpec],
        models: Sequence[Model] | None = None, codec: Codec | None = None,
    ) -> None:
        self.codec = codec or Codec(settings.schema_registry_url)
        self.decoder = InferenceDecoder(self.codec)
        models = list(models) if models is not None else [load(s) for s in specs]
        self.challengers = [
            Challenger(
                spec,
                Runner(spec.name, model, spec.timeout_ms, spec.max_batch),
                PredictionEncoder(self.codec, spec.name, spec.version, spec.is_control),
                sampling.threshold(spec.sample_rate),
            )
            for spec, model in zip(specs, models, strict=True)
        ]
        self._hash = any(c.bound is not None for c in self.challengers)
        self.stats = Stats(s.name for s in specs)

    def score(self, batch: Sequence[Message], consumed_at_ms: int) -> Scored:
        """Score ``batch``; undecodable or invalid messages become dead letters."""
        return self.finish(self.start(batch, consumed_at_ms))

    @property
    def pipelined(self) -> bool:
        """Some challenger takes a batch while still scoring the one before (the worker
        then starts the next batch before finishing this one: :meth:`start`)."""
        return any(ch.runner.depth > 1 for ch in self.challengers)

    def start(self, batch: Sequence[Message], consumed_at_ms: int,
              ahead: bool = False) -> Started:
        """Decode ``batch`` and submit it to the challengers; :meth:`finish` collects it.
        ``ahead`` (the batch after one not finished yet): only the pipelined challengers
        are submitted now, the others at :meth:`finish`."""
        out = Scored()
        records, lags = self._decode(batch, consumed_at_ms, out)
        calls = self._submit(records, ahead) if records else []
        return Started(batch, records, lags, calls, out)

    def finish(self, started: Started) -> Scored:
        """The outputs of a started batch, once every challenger answered or timed out."""
        out = started.out
        # counted as consumed once finished (a batch started ahead may never be, at a stop)
        self.stats.record_batch(len(started.batch), started.lags)
        if not started.records:
            return out
        collected = self._collect(started.records, started.calls)
        scored_at = long_bytes(int(time.time() * 1000))
        for ch, picked, pending, results in collected:
            self._encode(ch, picked, pending, results, started.records, started.lags,
                         scored_at, out)
        return out

    def run_challengers(self, records: Sequence[dict[str, Any]]) -> list[Scoring]:
        """Every challenger's outcome on decoded ``records``: (challenger, indices of the
        records in its sample, its call, one Result per picked record). All calls are
        started before any is awaited, each under its own deadline. The worker encodes
        these; ``shadowpipe replay`` stores them (same sampling, isolation and outputs)."""
        return self._collect(records, self._submit(records, ahead=False))

    def _submit(self, records: Sequence[dict[str, Any]], ahead: bool
                ) -> list[tuple[Challenger, list[int], Pending | None]]:
        digests = [sampling.digest(r["request_id"]) for r in records] if self._hash else None
        calls = []
        for ch in self.challengers:
            picked = self._pick(ch, digests, len(records))
            now = not ahead or ch.runner.depth > 1
            calls.append((ch, picked, ch.runner.submit([records[i] for i in picked])
                          if now else None))
        return calls

    def _collect(self, records: Sequence[dict[str, Any]],
                 calls: list[tuple[Challenger, list[int], Pending | None]]) -> list[Scoring]:
        running = [(ch, picked, pending or ch.runner.submit([records[i] for i in picked]))
                   for ch, picked, pending in calls]
        return [Scoring(ch, picked, pending, ch.runner.collect(pending))
                for ch, picked, pending in running]

    def _decode(
        self, batch: Sequence[Message], consumed_at_ms: int, out: Scored
    ) -> tuple[list[dict[str, Any]], list[float]]:
        records, lags = [], []
        decode = self.decoder.decode
        for raw in batch:
            try:
                record = decode(raw.value)
            except DecodeError as exc:  # validated by the wire layer: kind decode|invalid
                self._dead(raw, exc.kind, exc.reason, out)
                continue
            records.append(record)
            lags.append(float(consumed_at_ms - record["event_time"]))
        return records, lags

    def _dead(self, raw: Message, kind: str, reason: str, out: Scored) -> None:
        rec = dead_letter(kind, reason, WORKER, raw.topic, raw.partition, raw.offset,
                          raw.key, raw.value, raw.timestamp)
        out.dead_letters.append((raw.key, self.codec.encode("DeadLetter", rec)))
        self.stats.count_dead_letter(kind)

    def _pick(self, ch: Challenger, digests: list[bytes] | None, n: int) -> list[int]:
        if ch.bound is None or digests is None:
            return list(range(n))
        bound = ch.bound
        return [i for i, d in enumerate(digests) if d < bound]

    def _encode(
        self, ch: Challenger, picked: list[int], pending: Pending, results: list[Result],
        records: list[dict[str, Any]], lags: list[float], scored_at: bytes, out: Scored,
    ) -> None:
        elapsed_s = pending.elapsed_s()
        self.stats.model_seconds[ch.spec.name].observe(elapsed_s)
        share_ms = elapsed_s * 1000 / max(len(picked), 1)
        if len(picked) == len(records):  # sampled at rate 1: no copies
            chosen, chosen_lags = records, lags
        else:
            chosen, chosen_lags = [records[i] for i in picked], [lags[i] for i in picked]
        keys = [rec["request_id"].encode() for rec in chosen]
        values = ch.encoder.encode_many(keys, [rec["event_time"] for rec in chosen], results,
                                        share_ms, chosen_lags, scored_at)
        out.predictions.extend(zip(keys, values, strict=True))
        kinds = Counter(r.error_kind for r in results)
        errors = len(results) - kinds[None] - kinds["timeout"]
        self.stats.challengers[ch.spec.name].add(
            kinds[None], errors, kinds["timeout"], len(records) - len(picked))
        self.stats.outputs += len(picked)

    def close(self) -> None:
        for ch in self.challengers:
            ch.runner.close()
