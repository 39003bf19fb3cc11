"""A real Open Inference Protocol server for the tests: Seldon MLServer in a child process.

:func:`start` serves scikit-learn models (MLServer's own scikit-learn runtime) and, if
asked, :class:`SleepyModel`, a custom runtime that hangs on request, on free ports of
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from shadowpipe.stack import free_port

REPO = Path(__file__).resolve().parents[1]

try:  # only the MLServer child imports it (the `dev` extra installs MLServer)
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceRequest, InferenceResponse
except ImportError:  # pragma: no cover - the tests skip without mlserver
    MLModel = object  # type: ignore[assignment,misc]


class SleepyModel(MLModel):  # type: ignore[misc,valid-type]
    """value = x0 + x1 per row; a batch with a negative x0 hangs for 60 s first."""

    async def load(self) -> bool:
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        if (x[:, 0] < 0).any():
            await asyncio.sleep(60)
        value = (x[:, 0] + x[:, 1]).reshape(-1, 1)
        return InferenceResponse(model_name=self.name,
                                 outputs=[NumpyCodec.encode_output("value", value)])


class Server:
    """A running MLServer: ``url(name)`` is a model's OIP location."""

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc, self.port = proc, port

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/v2/models/{name}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def start(folder: Path, sklearn: dict[str, Path], sleepy: str | None = None,
          timeout_s: float = 120) -> Server:
    """MLServer serving each joblib file of ``sklearn`` under its name (and ``sleepy``)."""
    port = free_port()
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(),
                "metrics_port": free_port(), "parallel_workers": 0, "debug": False}
    (folder / "settings.json").write_text(json.dumps(settings))
    models: dict[str, dict[str, Any]] = {
        name: {"name": name, "implementation": "mlserver_sklearn.SKLearnModel",
               "parameters": {"uri": str(path)}}
        for name, path in sklearn.items()
    }
    if sleepy:
        models[sleepy] = {"name": sleepy, "implementation": "tests.oip_server.SleepyModel"}
    for name, spec in models.items():
        (folder / name).mkdir()
        (folder / name / "model-settings.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    mlserver = Path(sys.executable).with_name("mlserver")
    with open(folder / "mlserver.log", "ab") as log:
        proc = subprocess.Popen([str(mlserver), "start", str(folder)], env=env,
                                stdout=log, stderr=log, cwd=folder)
    server = Server(proc, port)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"MLServer exited: {(folder / 'mlserver.log').read_text()[-2000:]}")
        if all(_ready(server.url(name)) for name in models):
            return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"MLServer not ready in {timeout_s:.0f} s")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False
