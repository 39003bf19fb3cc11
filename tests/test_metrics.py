"""``/metrics`` on every worker's web port, on the real embedded stack.

The shadow worker, the joiner and the monitor run as three processes on their own ports;
N inference events (plus a few undecodable ones) and N labels go through them. Every
worker's ``/metrics`` is scraped until its counters reach what that traffic must produce,
then checked: the names documented in ``docs/operations.md`` are present (parsed with
``prometheus_client.parser``), the counters moved by the amount sent, and the metric names
in ``deploy/prometheus/alerts.yml`` all exist in the scrapes (and ``promtool check rules``
passes when promtool is installed).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shadowpipe.config import Settings
from shadowpipe.stack import free_port
from tests.conftest import spawn_cli, wait_for
from tests.test_bench_runs import _bench
from tests.test_verdict_e2e import (
    CHALLENGERS,
    REPO,
    _produce_feedback,
    _produce_inference,
    _requests,
    _stop,
)

N = 3000  # the verdict test's requests (two to one hour old, with labels)
BAD = 3  # undecodable inference events: dead-lettered by the shadow worker and the joiner
ARMS = ("worse", "equal", "broken")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples | None:
    """Every sample of ``/metrics`` on ``port`` by (name, sorted labels); None if down."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            assert resp.headers.get_content_type() == "text/plain"
            text = resp.read().decode()
    except OSError:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of ``name`` over the samples carrying ``labels`` (and any others)."""
    return sum(v for (n, ls), v in samples.items()
               if n == name and set(labels.items()) <= set(ls))


def _lags(samples: Samples) -> dict[str, float]:
    """Consumer lag by partition."""
    return {dict(ls)["partition"]: v for (n, ls), v in samples.items()
            if n == "shadowpipe_consumer_lag_records"}


def documented() -> set[str]:
    """Metric names of the table in docs/operations.md (first column)."""
    text = (REPO / "docs" / "operations.md").read_text()
    return set(re.findall(r"^\| `(shadowpipe_[a-z0-9_]+)` \|", text, re.M))


def exported(samples: Samples) -> set[str]:
    """Family names as documented: counters with ``_total``, histograms without suffix."""
    names = set()
    for name, _labels in samples:
        names.add(re.sub(r"_(bucket|count|sum)$", "", name))
    return names


def _send_bad(s: Settings) -> None:
    from shadowpipe import kafka

    producer = kafka.producer(s)
    for i in range(BAD):
        producer.produce(s.topic("inference"), b"not avro", f"bad-{i}")
    assert producer.flush(30) == 0


def _wait(worker: dict[str, Any], done: Any, timeout_s: float = 400.0) -> Samples:
    """Scrape ``worker`` until ``done(samples)``; that scrape."""
    def reached() -> Samples | None:
        assert worker["proc"].poll() is None, worker["log"].read_text()[-3000:]
        samples = scrape(worker["port"])
        return samples if samples and done(samples) else None

    return wait_for(f"{worker['name']}: counters to reach the traffic", reached, timeout_s)


@pytest.fixture
def workers(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the worker imports the test challengers
    (tmp_path / "challengers.toml").write_text(CHALLENGERS)
    s = settings.replace(
        challengers=str(tmp_path / "challengers.toml"),
        clickhouse_url=f"chdb://{tmp_path / 'ch'}", allowed_lateness_s=86400,
        feedback_horizon_s=86400, verdict_interval_s=2, monitor_batch_ms=100,
        log_level="WARNING")
    running = {}
    try:
        for name in ("shadow", "join", "monitor"):
            port = free_port()
            log = tmp_path / f"{name}.log"
            running[name] = {"name": name, "port": port, "log": log,
                             "proc": spawn_cli(s.replace(web_port=port), "worker", name,
                                               log=log)}
        yield s, running
    finally:
        for w in running.values():
            _stop(w["proc"])


def test_every_worker_exports_its_counters_as_documented(workers: Any) -> None:
    s, running = workers
    requests = _requests()
    assert len(requests) == N
    _produce_inference(s, requests)
    _send_bad(s)
    _produce_feedback(s, requests)
    inference = s.topic("inference")

    # Done when every event is scored and the lag (read from watermarks the consuming
    # thread refreshes once a second) reached 0 on every partition.
    shadow = _wait(running["shadow"], lambda m: sum(
        total(m, f"shadowpipe_challenger_{w}_total") for w in ("scored", "errors", "timeouts")
    ) >= N * len(ARMS) and _lags(m) == {str(p): 0 for p in range(s.partitions)})
    assert value(shadow, "shadowpipe_events_in_total", worker="shadow") == N + BAD
    assert total(shadow, "shadowpipe_events_dead_lettered_total", worker="shadow") == BAD
    assert value(shadow, "shadowpipe_events_out_total", worker="shadow") == N * len(ARMS)
    for arm in ("worse", "equal"):
        assert value(shadow, "shadowpipe_challenger_scored_total", challenger=arm) == N
        assert value(shadow, "shadowpipe_challenger_model_seconds_count", challenger=arm) > 0
    broken = {w: value(shadow, f"shadowpipe_challenger_{w}_total", challenger="broken")
              for w in ("scored", "errors", "timeouts")}
    assert broken["scored"] == 0 and broken["errors"] + broken["timeouts"] == N, broken
    assert value(shadow, "shadowpipe_worker_ready", worker="shadow") == 1
    assert {dict(ls)["topic"] for (n, ls) in shadow
            if n == "shadowpipe_consumer_lag_records"} == {inference}

    # The joiner reads the inference (valid and not), every prediction and every label.
    join = _wait(running["join"], lambda m: total(
        m, "shadowpipe_events_in_total", worker="join") >= N * (2 + len(ARMS)))
    assert value(join, "shadowpipe_events_in_total", worker="join") == N * (2 + len(ARMS))
    assert total(join, "shadowpipe_events_dead_lettered_total", worker="join") == BAD
    # A labelled record per request and arm, after a predicted one unless the label came
    # first.
    assert value(join, "shadowpipe_events_out_total", worker="join") >= N * len(ARMS)
    assert value(join, "shadowpipe_join_pending_requests") == N  # held until the horizon
    assert value(join, "shadowpipe_join_orphans_total", kind="feedback_late") == 0

    # The monitor stores every joined record (predicted, then labelled) and judges.
    out = value(join, "shadowpipe_events_out_total", worker="join")
    monitor = _wait(running["monitor"], lambda m: total(
        m, "shadowpipe_events_in_total", worker="monitor") >= out and total(
        m, "shadowpipe_verdict", verdict="REJECT") >= 1)
    assert value(monitor, "shadowpipe_events_in_total", worker="monitor") == out
    assert value(monitor, "shadowpipe_clickhouse_insert_rows_total") >= out
    assert value(monitor, "shadowpipe_clickhouse_insert_failures_total") == 0
    assert value(monitor, "shadowpipe_clickhouse_insert_seconds_count") > 0
    # Every labelled joined record observed once (a label per request and arm, at least).
    assert value(monitor, "shadowpipe_label_delay_seconds_count") >= N * len(ARMS)
    for arm in ARMS:
        states = [value(monitor, "shadowpipe_verdict", challenger=arm, verdict=v)
                  for v in ("PROMOTE", "HOLD", "INCONCLUSIVE", "REJECT")]
        assert sorted(states) == [0, 0, 0, 1], (arm, states)
    assert value(monitor, "shadowpipe_verdict", challenger="broken", verdict="REJECT") == 1

    names = exported(shadow) | exported(join) | exported(monitor)
    missing = documented() - names
    assert not missing, missing
    assert not {n for n in names if n.startswith("shadowpipe_")} - documented()
    _check_rules(names)


def _check_rules(names: set[str]) -> None:
    """Every metric in the alerting rules is exported; promtool accepts the rules."""
    rules = REPO / "deploy" / "prometheus" / "alerts.yml"
    used = set(re.findall(r"\b(shadowpipe_[a-z0-9_]+)", rules.read_text()))
    assert used and used <= names, used - names
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # checked by test_rules_pass_promtool (skipped with its reason)
    out = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_scrape_never_waits_for_the_consuming_thread(settings: Settings) -> None:
    """Regression: the lag asked the consumer for its watermarks from the scraping thread,
    which waited for the loop thread's ``consume()`` (up to its wait) while holding the
    worker's event loop, so the web port stopped answering during traffic."""
    from shadowpipe import kafka
    from shadowpipe.processors.runtime.health import loop_lag
    from shadowpipe.processors.runtime.loop import BatchLoop, Handler, KafkaSource

    topic = settings.topic("inference")
    producer = kafka.producer(settings)
    producer.produce(topic, b"x", b"k", partition=0)
    assert producer.flush(30) == 0
    source = KafkaSource(settings, f"{settings.topic_prefix}lag", [topic], 10, 0.2)
    source.open(lambda: None, lambda: None)
    loop = BatchLoop(Handler(), lambda: None, source)
    try:
        deadline = time.monotonic() + 60
        while (topic, 0) not in source.highwater or not loop.positions:
            assert time.monotonic() < deadline, "the consumer never saw the record"
            for m in source.poll():
                loop.positions[(m.topic, m.partition)] = m.offset + 1
        consuming = threading.Thread(target=source.consumer.consume, args=(1, 15.0))
        consuming.start()  # nothing more to read: blocks its full 15 s
        assert loop_lag(loop)() == {(topic, 0): 0}
        assert consuming.is_alive()  # answered while the consumer was busy
        consuming.join()
    finally:
        source.close()


def test_bench_shadow_measures_the_scrape_cost_in_the_same_run(
        settings: Settings, tmp_path: Path) -> None:
    """``bench shadow --scrape S`` adds a pass scraped every S s beside the plain one, and
    the worker's CPU per scrape."""
    out = _bench(settings, tmp_path, "shadow", "--events", "2000", "--lag-events", "200",
                 "--lag-rate", "1000", "--passes", "1", "--scrape", "0.05")
    assert out["scrape_interval_s"] == 0.05
    assert out["scrapes"] > 0 and out["scrape_failures"] == 0, out
    ratio = out["scrape_events_per_s"] / out["worker_events_per_s"]
    assert out["scrape_ratio"] == pytest.approx(ratio, abs=0.002)
    # a scrape's work shows in the worker's CPU (200 back-to-back scrapes, idle subtracted)
    assert out["scrape_cpu_ms"] > 0, out
    assert out["scrape_cost"] == pytest.approx(out["scrape_cpu_ms"] / 1000 / 0.05,
                                                  rel=0.01, abs=1e-4)
    assert out["predictions"] == 2200  # the plain pass's; the scraped one is not counted
