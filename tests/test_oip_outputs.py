"""The oip kind's fast paths give what the generic ones give: request bodies, the
binary-class outputs built straight from the reply's list, and the Runner's one-pass
Results for models returning ready Output dicts. No server: the model is built without
its metadata call (the real-server checks are in test_challenger_kinds.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shadowpipe.processors.shadow.challengers import InvalidOutput, Model
from shadowpipe.processors.shadow.models import proba_outputs
from shadowpipe.processors.shadow.runner import Runner

orjson = pytest.importorskip("orjson")


def offline(names: tuple[str, ...], classes: list[str], outputs: list[str]) -> Any:
    """An OipModel as the constructor leaves it, without asking a server."""
    from shadowpipe.processors.shadow.oip_model import OipModel

    model = OipModel.__new__(OipModel)
    model.names, model._classes = names, classes
    model.infer_path, model._input, model._datatype = "/v2/models/m/infer", "x", "FP32"
    model._requested = [{"name": n} for n in outputs]
    model._head, model._middle, model._tail = model._framing()
    return model


@pytest.mark.parametrize(("names", "outputs"), [(("a", "b"), ["predict_proba"]),
                                                (("a",), [])])
def test_request_body_is_the_protocol_tensor(names: tuple[str, ...],
                                             outputs: list[str]) -> None:
    model = offline(names, [], outputs)
    rows = [tuple(float(i + j) for j in range(len(names))) for i in range(3)]
    body = orjson.loads(model.body(rows))
    assert body["inputs"] == [{"name": "x", "shape": [3, len(names)], "datatype": "FP32",
                               "data": [list(r) for r in rows]}]
    assert body.get("outputs") == ([{"name": "predict_proba"}] if outputs else None)


def reply(matrix: list[list[Any]]) -> dict[str, Any]:
    flat = [v for row in matrix for v in row]
    return {"outputs": [{"name": "predict_proba", "datatype": "FP64",
                         "shape": [len(matrix), len(matrix[0])], "data": flat}]}


@pytest.mark.parametrize("classes", [["no", "yes"], ["a", "b", "c"]])
def test_probability_outputs_equal_the_sklearn_kinds(classes: list[str]) -> None:
    rng = np.random.default_rng(5)
    proba = rng.dirichlet(np.ones(len(classes)), size=50)
    proba[0] = 1 / len(classes)  # a tie: the first class, as argmax
    model = offline(("f",), classes, ["predict_proba"])
    got = model.outputs(reply(proba.tolist()), 50)
    assert got == proba_outputs(proba, classes)
    assert got[0]["label"] == classes[0]


def test_non_float_probabilities_are_checked_row_by_row() -> None:
    model = offline(("f",), ["no", "yes"], ["predict_proba"])
    got = model.outputs(reply([[0, 1], [0.3, None], [0.6, 0.4]]), 3)
    assert got[0] == {"label": "yes", "probabilities": {"no": 0.0, "yes": 1.0}, "value": None}
    assert isinstance(got[1], InvalidOutput)
    assert got[2]["label"] == "no"


class Ready(Model):
    """Returns ready Output dicts, an error instance for a negative input."""

    vectorized = True
    normalized = True

    def predict_batch(self, records: Any) -> list[Any]:
        return [ValueError("negative") if r["num_features"]["x"] < 0 else
                {"label": None, "probabilities": {}, "value": r["num_features"]["x"]}
                for r in records]


def test_runner_keeps_each_outputs_place_and_error() -> None:
    runner = Runner("ready", Ready(), timeout_ms=5000, max_batch=2)
    xs = [1.0, -1.0, 2.0, 3.0, -4.0]
    try:
        results = runner.collect(runner.submit([{"num_features": {"x": x}} for x in xs]))
    finally:
        runner.close()
    assert [r.output["value"] if r.output else r.error_kind for r in results] == [
        1.0, "exception", 2.0, 3.0, "exception"]
    assert results[1].error == "ValueError: negative"
