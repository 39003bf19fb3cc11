"""A real Open Inference Protocol server for the tests: Seldon MLServer in a child process
(:mod:`shadowpipe.bench.mlserver`) serving scikit-learn models with its own runtime and,
if asked, :class:`SleepyModel`, a custom runtime that hangs on request."""

from __future__ import annotations

import asyncio
from pathlib import Path

from shadowpipe.bench.mlserver import MLServer, sklearn_model
from shadowpipe.bench.mlserver import start as start_mlserver

REPO = Path(__file__).resolve().parents[1]

try:  # only the MLServer child uses it (the `dev` extra installs MLServer)
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceRequest, InferenceResponse
except ImportError:  # the tests skip without mlserver
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


def start(folder: Path, sklearn: dict[str, Path], sleepy: str | None = None) -> MLServer:
    """MLServer serving each joblib file of ``sklearn`` under its name (and ``sleepy``)."""
    models = {name: sklearn_model(name, path) for name, path in sklearn.items()}
    if sleepy:
        models[sleepy] = {"name": sleepy, "implementation": "tests.oip_server.SleepyModel"}
    return start_mlserver(folder, models, env={"PYTHONPATH": str(REPO)})
