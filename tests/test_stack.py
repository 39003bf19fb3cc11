"""The embedded stack's CLI and the real services it starts."""

import subprocess
import sys
import uuid

from shadowpipe import kafka
from shadowpipe.schemas.codec import Codec
from shadowpipe.smoke import round_trip
from shadowpipe.stack import port_open
from shadowpipe.stores import check_clickhouse, redis_client
from tests.conftest import free_port


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadowpipe.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_up_status_down_leaves_nothing(tmp_path) -> None:
    import os

    kport, rport = free_port(), free_port()
    env = {**os.environ, "SHADOWPIPE_HOME": str(tmp_path),
           "SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{kport}",
           "SHADOWPIPE_REDIS_URL": f"redis://127.0.0.1:{rport}/0"}
    up = _cli(env, "stack", "up")
    assert up.returncode == 0, up.stderr
    status = _cli(env, "stack", "status")
    assert status.returncode == 0 and f"127.0.0.1:{kport}" in status.stdout
    # A port already in use is a clear error naming the setting.
    other = {**env, "SHADOWPIPE_HOME": str(tmp_path / "other")}
    clash = _cli(other, "stack", "up")
    assert clash.returncode == 2 and "SHADOWPIPE_KAFKA_BOOTSTRAP" in clash.stderr
    assert "already in use" in clash.stderr
    down = _cli(env, "stack", "down")
    assert down.returncode == 0
    assert not port_open("127.0.0.1", kport) and not port_open("127.0.0.1", rport)
    assert _cli(env, "stack", "status").returncode == 1


def test_kafka_round_trip(settings) -> None:
    counts = round_trip(settings, 500)
    assert counts["inference_received"] == counts["inference_sent"] == 500
    assert counts["feedback_received"] == counts["feedback_sent"] == 250


def test_keys_partition_like_java_clients(settings) -> None:
    """murmur2_random: a key's partition is murmur2(key) % n, as in the Java client."""
    producer = kafka.producer(settings)
    codec = Codec()
    delivered = []
    for i in range(50):
        rid = f"req-{i}"
        producer.produce(settings.topic("feedback"), codec.encode(
            "Feedback", {"request_id": rid, "event_time": i}), key=rid,
            on_delivery=lambda err, msg: delivered.append((msg.key(), msg.partition())))
    producer.flush(10)
    assert len(delivered) == 50
    from tests.murmur2 import java_partition

    for key, partition in delivered:
        assert partition == java_partition(key, settings.partitions)


def test_end_offsets_count_every_record_of_the_last_batch(settings) -> None:
    """The embedded broker lists a partition's end as its last batch's base offset + 1;
    :class:`kafka.EndOffsets` reads on to the real end (a batch at a time, as workers
    produce)."""
    from confluent_kafka import TopicPartition

    producer = kafka.producer(settings, **{"linger.ms": 200})
    topic = settings.topic("feedback")
    tps = [TopicPartition(topic, p) for p in range(settings.partitions)]
    ends = kafka.EndOffsets(settings)
    try:
        assert ends(tps) == {(topic, p): 0 for p in range(settings.partitions)}
        written = 0
        for batch in (1, 120, 300):
            for _ in range(batch):
                producer.produce(topic, b"x", partition=0)
            producer.flush(10)
            written += batch
            assert ends(tps)[(topic, 0)] == written
        assert ends(tps)[(topic, 0)] == written  # unchanged: from what it knows
        assert all(ends(tps)[(topic, p)] == 0 for p in range(1, settings.partitions))
    finally:
        ends.close()


def test_redis_round_trip(stack_settings) -> None:
    client = redis_client(stack_settings)
    key = f"test:{uuid.uuid4()}"
    client.set(key, b"v", ex=10)
    assert client.get(key) == b"v"
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"


def test_clickhouse_engine_round_trip(stack_settings) -> None:
    client = check_clickhouse(stack_settings, "test")
    db = f"t_{uuid.uuid4().hex[:8]}"
    client.command(f"CREATE DATABASE {db}")
    client.command(f"CREATE TABLE {db}.x (id String, v Float64) ENGINE = MergeTree ORDER BY id")
    client.insert(f"{db}.x", [["a", 1.0], ["b", 2.5]], column_names=["id", "v"])
    assert client.query(f"SELECT sum(v) FROM {db}.x").result_rows[0][0] == 3.5
    client.command(f"DROP DATABASE {db} SYNC")


def test_ensure_topics_is_idempotent(settings) -> None:
    assert kafka.ensure_topics(settings) == []
    topics = kafka.admin(settings).list_topics(timeout=5).topics
    assert len(topics[settings.topic("inference")].partitions) == settings.partitions


def _own_stack(tmp_path) -> tuple:
    """A dedicated embedded stack on free ports in ``tmp_path`` (the session's is shared)."""
    from shadowpipe.config import Settings
    from shadowpipe.stack import EmbeddedStack

    settings = Settings.load(env={
        "SHADOWPIPE_HOME": str(tmp_path), "SHADOWPIPE_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
        "SHADOWPIPE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'clickhouse'}"})
    stack = EmbeddedStack(settings)
    stack.up()
    return settings, stack


def test_redis_keys_survive_down_up_and_a_kill(tmp_path) -> None:
    """Pending joins and checkpoints live in Redis: a restart must not empty it."""
    import os
    import signal
    import time

    from shadowpipe.stack import _pid_alive

    settings, stack = _own_stack(tmp_path)
    try:
        client = redis_client(settings)
        client.mset({f"k{i}": str(i) for i in range(500)})
        client.zadd("deadlines", {"r1": 1.0})
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("appendfsync")["appendfsync"] == "everysec"
        stack.down()
        stack.up()
        client = redis_client(settings)
        assert client.dbsize() == 501
        assert client.get("k499") == b"499" and client.zscore("deadlines", "r1") == 1.0
        # kill -9: a reply is sent only after its write reached the append-only file.
        client.set("after-restart", b"x")
        pid = stack._recorded()["redis"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _pid_alive(pid)
        stack.up()
        client = redis_client(settings)
        assert client.dbsize() == 502 and client.get("after-restart") == b"x"
    finally:
        stack.down()
