"""Seldon MLServer in a child process: the Open Inference Protocol server that ``bench
shadow --kind oip`` (and the oip kind's tests) score against.

>>> sklearn_model("lr", "/models/lr.joblib")["implementation"]
'mlserver_sklearn.SKLearnModel'
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shadowpipe.stack import free_port


def sklearn_model(name: str, path: str | Path) -> dict[str, Any]:
    """The model settings of a joblib file served by MLServer's scikit-learn runtime."""
    return {"name": name, "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": str(path)}}


class MLServer:
    """A running MLServer on 127.0.0.1; ``url(name)`` is a model's OIP location."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path) -> None:
        self.proc, self.port, self.log = proc, port, log

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/v2/models/{name}"

    def stop(self) -> None:
        """Kill the server (at once: a test stands for a crash with it)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def start(folder: Path, models: Mapping[str, Mapping[str, Any]], env: Mapping[str, str] = {},
          timeout_s: float = 120) -> MLServer:
    """MLServer serving ``models`` (name -> model settings) from ``folder``, once every
    model answers ready. Inference runs in the server's own process (no worker pool)."""
    mlserver = Path(sys.executable).with_name("mlserver")
    if not mlserver.exists():
        raise RuntimeError("MLServer is not installed (pip install mlserver mlserver-sklearn)")
    port = free_port()
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
                "metrics_port": free_port(), "parallel_workers": 0, "debug": False}
    (folder / "settings.json").write_text(json.dumps(settings))
    for name, spec in models.items():
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(json.dumps(spec))
    log = folder / "mlserver.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(mlserver), "start", str(folder)], cwd=folder,
                                env={**os.environ, **env}, stdout=out, stderr=out)
    server = MLServer(proc, port, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"MLServer exited: {log.read_text()[-2000:]}")
        if all(_ready(server.url(name)) for name in models):
            return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"MLServer not ready in {timeout_s:.0f} s (log: {log})")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
