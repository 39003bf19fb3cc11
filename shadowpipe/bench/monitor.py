"""``shadowpipe bench monitor --json``: sustained JoinedRecords/s through decoding, dedup,
windows, detectors, ClickHouse inserts, alert publishing and Redis checkpoints.

Records are pre-produced to a fresh joined topic, then drained by a confluent-kafka
consumer driving the same :class:`.pipeline.Pipeline` the Faust agent drives, committing
after each checkpoint (throughput phase). A second phase produces at half that rate and
measures, per record, produce time to committed (``p99_end_to_end_ms``). The embedded
stack is used when reachable, else one is started on free ports in a temp directory; the
ClickHouse data always goes to a temp chdb directory. ``decode_only_records_per_s`` (Avro
decoding alone, same run) is the baseline the pipeline figure compares with.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.stack import reachable_or_embedded


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """The flags of ``shadowpipe bench monitor`` (name and help: ``shadowpipe.cli.BENCHES``)."""
    bench.add_argument("--records", type=int, default=100_000)
    bench.add_argument("--latency-seconds", type=float, default=5.0)
    bench.add_argument("--json", action="store_true", help="print one JSON object (default)")
    bench.set_defaults(func=bench_cmd)


def _records(n: int, seed: int, start_ms: int) -> list[bytes]:
    from shadowpipe.bench import synthetic
    from shadowpipe.schemas.codec import Codec

    codec = Codec()
    spec = synthetic.Spec(requests=n // 4 + 1, challengers=("c1", "c2"), seed=seed,
                          start_ms=start_ms, interval_ms=1.0, error_rate=0.01,
                          timeout_rate=0.01)
    return [codec.encode("JoinedRecord", r) for r in synthetic.stream(spec)[:n]]


def _produce(settings: Settings, values: list[bytes], rate: float = 0.0) -> None:
    from shadowpipe.kafka import producer

    prod = producer(settings)
    topic = settings.topic("joined")
    started = time.perf_counter()
    for i, value in enumerate(values):
        if rate and i % 100 == 0:
            ahead = started + i / rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        while True:
            try:
                prod.produce(topic, value, str(i).encode())
                break
            except BufferError:
                prod.poll(0.05)
        prod.poll(0)
    prod.flush(30)


class _Drain:
    """Consume ``total`` records through the pipeline, commit after each checkpoint."""

    def __init__(self, settings: Settings, pipeline: Any) -> None:
        from shadowpipe.kafka import consumer
        from shadowpipe.processors.publisher import Publisher
        from shadowpipe.schemas.codec import Codec

        self.settings, self.pipeline = settings, pipeline
        self.consumer = consumer(settings, f"{settings.topic_prefix}bench-{uuid.uuid4()}")
        self._assign(settings.topic("joined"))
        self.publisher = Publisher(settings)
        self.codec = Codec()
        self.latencies: list[float] = []

    def _assign(self, topic: str) -> None:
        """Every partition from the start, assigned directly: a group join (seconds on the
        embedded broker) is start-up, not sustained throughput; commits still go to the
        group."""
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        partitions = self.consumer.list_topics(topic, timeout=10).topics[topic].partitions
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])

    def run(self, total: int, batch: int, record_latency: bool = False) -> int:
        from shadowpipe.processors.monitor.pipeline import Message

        done = rows = 0
        while done < total:
            msgs = self.consumer.consume(batch, timeout=0.2)
            msgs = [m for m in msgs if not m.error()]
            if not msgs:
                continue
            result = self.pipeline.process([
                Message(m.value(), m.key(), m.topic(), m.partition(), m.offset(),
                        m.timestamp()[1]) for m in msgs])
            for alert in result.alerts:
                self.publisher.produce(self.settings.topic("alerts"), alert["challenger"],
                                       self.codec.encode("Alert", alert))
            self.publisher.flush_sync()
            self.pipeline.checkpoint()
            self.consumer.commit(asynchronous=False)
            if record_latency:
                now = time.time() * 1000
                self.latencies += [now - m.timestamp()[1] for m in msgs]
            done += len(msgs)
            rows += result.rows
        return rows


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def bench_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.kafka import ensure_topics
    from shadowpipe.processors.monitor.pipeline import Pipeline
    from shadowpipe.schemas.codec import Codec

    tmp = Path(tempfile.mkdtemp(prefix="shadowpipe-bench-monitor-"))
    with reachable_or_embedded(settings, "bench monitor", _say) as base:
        run = base.replace(topic_prefix=f"bench{uuid.uuid4().hex[:8]}.",
                           clickhouse_url=f"chdb://{tmp / 'clickhouse'}",
                           clickhouse_database="bench", segments=("region",),
                           drift_features=("amount",))
        ensure_topics(run)
        start_ms = int(time.time() * 1000) - 3_600_000
        values = _records(args.records, 1, start_ms)
        codec = Codec()
        t0 = time.perf_counter()
        for v in values:
            codec.decode(v, "JoinedRecord")
        decode_rate = len(values) / (time.perf_counter() - t0)
        print(f"producing {len(values)} records", file=sys.stderr)
        _produce(run, values)
        pipeline = Pipeline(run)
        pipeline.migrate()
        drain = _Drain(run, pipeline)
        t0 = time.perf_counter()
        rows = drain.run(len(values), run.monitor_batch_size)
        elapsed = time.perf_counter() - t0
        rate = len(values) / elapsed
        print(f"throughput {rate:.0f} records/s; latency phase", file=sys.stderr)
        paced = _records(int(rate * 0.5 * args.latency_seconds), 2, start_ms + 3_000_000)
        producer = threading.Thread(target=_produce, args=(run, paced, rate * 0.5))
        producer.start()
        drain.run(len(paced), run.monitor_batch_size, record_latency=True)
        producer.join()
        lat = sorted(drain.latencies)
        print(json.dumps({
            "records": len(values),
            "records_per_s": round(rate, 1),
            "clickhouse_rows_per_s": round(rows / elapsed, 1),
            "p99_end_to_end_ms": round(lat[int(0.99 * (len(lat) - 1))], 1) if lat else None,
            "latency_phase_records": len(lat),
            "latency_phase_rate_per_s": round(rate * 0.5, 1),
            "decode_only_records_per_s": round(decode_rate, 1),
            "ratio_to_decode_only": round(rate / decode_rate, 3),
            "target_records_per_s": 20000,
            "batch_size": run.monitor_batch_size,
        }))
    return 0
