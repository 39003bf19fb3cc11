"""The documented example service really emits its prediction and feedback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, TopicPartition

from shadowpipe import kafka
from shadowpipe.config import Settings
from shadowpipe.schemas.codec import Codec
from tests.conftest import free_port

EXAMPLE = Path(__file__).parent.parent / "docs" / "examples" / "example_service.py"


def post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.urlopen(f"http://127.0.0.1:{port}{path}",
                                     data=json.dumps(body).encode(), timeout=10)
    return json.loads(request.read())


def _exit_code(service: subprocess.Popen, timeout: float) -> int:
    """The exit code; a service still running after ``timeout`` fails the test with the
    stacks of all its threads (SIGABRT under ``-X faulthandler``)."""
    try:
        service.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        service.send_signal(signal.SIGABRT)
        _, stacks = service.communicate()
        raise AssertionError(f"no exit {timeout} s after SIGTERM; stacks:\n{stacks}") from None
    return service.returncode


def test_example_service_emits_inference_and_feedback(settings: Settings) -> None:
    port = free_port()
    # -X faulthandler: a service that does not exit is made to print where it is stuck.
    service = subprocess.Popen([sys.executable, "-X", "faulthandler", str(EXAMPLE), str(port)],
                               env={**os.environ, **settings.to_env()},
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90  # imports alone take seconds on a busy machine
        while True:
            try:
                answer = post(port, "/predict", {"amount": 1250.0, "country": "DE"})
                break
            except OSError:
                assert time.monotonic() < deadline, "example service did not start"
                time.sleep(0.1)
        assert answer["label"] == "review"
        assert post(port, "/outcome", {"request_id": answer["request_id"], "label": "ok"})
        service.terminate()  # the example exits normally on SIGTERM: events are flushed
        assert _exit_code(service, timeout=30) == 0
    finally:
        service.kill()
    consumer = kafka.consumer(settings, f"example-{uuid.uuid4().hex}")
    # Assigned, not subscribed: a new group waits ~20 s on the embedded broker.
    consumer.assign([TopicPartition(settings.topic(kind), p, OFFSET_BEGINNING)
                     for kind in ("inference", "feedback") for p in range(settings.partitions)])
    names = {settings.topic("inference"): "InferenceEvent", settings.topic("feedback"): "Feedback"}
    got = {}
    deadline = time.monotonic() + 120
    while len(got) < 2 and time.monotonic() < deadline:
        for msg in consumer.consume(10, timeout=0.5):
            if not msg.error():
                got[names[msg.topic()]] = Codec().decode(msg.value(), names[msg.topic()])
    consumer.close()
    assert got["InferenceEvent"]["request_id"] == answer["request_id"]
    assert got["InferenceEvent"]["num_features"] == {"amount": 1250.0}
    assert got["InferenceEvent"]["cat_features"] == {"country": "DE"}
    assert (got["Feedback"]["request_id"], got["Feedback"]["label"]) == (answer["request_id"], "ok")
