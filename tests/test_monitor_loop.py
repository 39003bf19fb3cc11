"""The monitor's consuming loop (librdkafka, group ``<prefix>monitor``) on the embedded
stack: an upgrade from the Faust agent's group resumes at its offsets, and a live worker
commits every record it stored in its own group."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from confluent_kafka import TopicPartition

from shadowpipe import kafka
from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.processors.app import app_id
from shadowpipe.processors.monitor.agent import adopt_offsets, group_id
from shadowpipe.processors.monitor.runtime import LockedExecutor
from shadowpipe.processors.monitor.source import MergedSource
from shadowpipe.schemas.codec import Codec
from tests.conftest import chdb_rows, spawn_cli, wait_for


def _committed(s: Settings, group: str) -> dict[int, int]:
    consumer = kafka.consumer(s, group)
    try:
        tps = [TopicPartition(s.topic("joined"), p) for p in range(s.partitions)]
        return {tp.partition: tp.offset for tp in consumer.committed(tps, timeout=10)
                if tp.offset >= 0}
    finally:
        consumer.close()


def _commit(s: Settings, group: str, offsets: dict[int, int]) -> None:
    consumer = kafka.consumer(s, group)
    consumer.commit(offsets=[TopicPartition(s.topic("joined"), p, o)
                             for p, o in offsets.items()], asynchronous=False)
    consumer.close()


def test_an_upgrade_adopts_the_faust_groups_offsets_once(settings: Settings) -> None:
    s = settings
    old = app_id(s, ["monitor"])
    topics = [s.topic("joined")]
    assert adopt_offsets(s, group_id(s), [old], topics) is None  # nothing anywhere
    _commit(s, old, {0: 5, 2: 9})
    assert adopt_offsets(s, group_id(s), ["nobody", old], topics) == old
    assert _committed(s, group_id(s)) == {0: 5, 2: 9}
    # Once the new group has offsets of its own, the old group's never replace them.
    _commit(s, old, {0: 50, 2: 90})
    assert adopt_offsets(s, group_id(s), [old], topics) is None
    assert _committed(s, group_id(s)) == {0: 5, 2: 9}


def test_batches_merge_a_backlog_of_every_partition_in_timestamp_order(
        settings: Settings) -> None:
    """A backlog comes from librdkafka as one run per partition; the monitor's batches must
    interleave them by timestamp (the one watermark would make the later runs late)."""
    s = settings
    prod = kafka.producer(s, **{"linger.ms": 500})  # one run per partition
    n = 4000
    for i in range(n):
        prod.produce(s.topic("joined"), b"x", partition=i % s.partitions, timestamp=1000 + i)
    prod.flush(30)
    source = MergedSource(s, f"{s.topic_prefix}merge", [s.topic("joined")], 1000, 0.2)
    source.open(lambda: None, lambda: None)
    stamps: list[int] = []

    def drained() -> bool:
        stamps.extend(m.timestamp for m in source.poll())
        return len(stamps) >= n

    try:
        wait_for("the whole backlog", drained, timeout_s=120)
    finally:
        source.close()
    assert len(stamps) == n
    assert stamps == sorted(stamps)


def test_locked_executor_holds_the_lock_for_each_job() -> None:
    lock = threading.Lock()
    with LockedExecutor(lock) as executor:
        lock.acquire()  # a batch in progress on the loop's thread
        job = executor.submit(lambda: "ran")
        assert not job.done() and not wait_for_done(job, 0.3)
        lock.release()
        assert job.result(timeout=10) == "ran"


def wait_for_done(job: Any, timeout_s: float) -> bool:
    """Whether ``job`` finished within ``timeout_s`` (False is the expected answer here)."""
    try:
        job.result(timeout=timeout_s)
    except TimeoutError:
        return False
    return True


def test_worker_commits_what_it_stored_in_its_own_group(settings: Settings, tmp_path) -> None:
    s = settings.replace(clickhouse_url=f"chdb://{tmp_path / 'ch'}", clickhouse_database="loop")
    # Recent event times: the tables' TTL drops old rows.
    spec = synthetic.Spec(requests=400, challengers=("c1", "c2"), seed=3,
                          start_ms=int(time.time() * 1000) - 600_000)
    records = synthetic.stream(spec)
    codec = Codec()
    prod = kafka.producer(s)
    for r in records:
        prod.produce(s.topic("joined"), codec.encode("JoinedRecord", r), r["request_id"].encode())
    prod.flush(30)
    end_offsets = kafka.EndOffsets(s)
    ends = {p: o for (_, p), o in end_offsets(
        [TopicPartition(s.topic("joined"), p) for p in range(s.partitions)]).items()}
    end_offsets.close()
    worker = spawn_cli(s, "worker", "monitor", log=tmp_path / "monitor.log")
    try:
        wait_for(f"the monitor group's commits at the topic's end {ends}",
                 lambda: all(
                     _committed(s, group_id(s)).get(p, -1) >= o for p, o in ends.items() if o),
                 timeout_s=100)
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(60)
    assert worker.returncode == 0
    (rows,) = chdb_rows(tmp_path / "ch", "SELECT count() FROM loop.joined_records FINAL "
                                         "WHERE state IN ('predicted', 'labelled')")
    stored = {(r["request_id"], r["challenger"]) for r in records
              if r["state"] in ("predicted", "labelled")}
    assert rows[0] == len(stored)
