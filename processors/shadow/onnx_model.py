"""The ``onnx`` challenger kind: an ONNX model run by onnxruntime on the batch matrix.

The model takes one 2-D input tensor (float or double; rows = records, columns =
``features`` in order), as ``skl2onnx.to_onnx(model, X[:1])`` writes it. Outputs:

* a classifier's probabilities, either a ZipMap (a sequence of class -> probability maps:
  skl2onnx's default, the class names come with it) or a ``[N, C]`` tensor (then
  ``classes = [...]`` names the columns); the label is the most probable class;
* otherwise the first output, one value per row: a string is a label, a number a value.

onnxruntime runs with one intra-op thread: the worker already runs one thread per
challenger beside its consumer loop, and spinning pools would fight them for the CPUs.

>>> import numpy as np
>>> from skl2onnx import to_onnx
>>> from sklearn.linear_model import LogisticRegression
>>> x = np.array([[0.0], [1.0], [2.0], [3.0]], dtype=np.float32)
>>> lr = LogisticRegression().fit(x, ["a", "a", "b", "b"])
>>> model = OnnxModel(to_onnx(lr, x[:1]).SerializeToString(), ("x",))
>>> [o["label"] for o in model.predict_batch([{"num_features": {"x": v}} for v in (0.0, 3.0)])]
['a', 'b']
"""

from __future__ import annotations

from collections.abc import Sequence
from math import isfinite
from typing import Any

from shadowpipe.processors.shadow.challengers import InvalidOutput
from shadowpipe.processors.shadow.models import MatrixModel, column_outputs, proba_outputs

DTYPES = {"tensor(float)": "float32", "tensor(double)": "float64"}


class OnnxModel(MatrixModel):
    """An onnxruntime session over the numeric features (``model``: a path or the bytes)."""

    def __init__(self, model: str | bytes, names: Sequence[str],
                 classes: Sequence[str] = ()) -> None:
        import onnxruntime as ort

        if not names:
            raise ValueError("set features = [...]: the input columns in order")
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        model, unzipped = _without_zipmap(model)
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        super().__init__(names)
        self._input, self._dtype = self._check_input()
        self._outputs = [o.name for o in self.session.get_outputs()]
        self._proba, self._zipmap = self._find_probabilities()
        self._classes = [str(c) for c in classes] or unzipped
        if self._proba is not None and not self._zipmap and not self._classes:
            raise ValueError(f"set classes = [...]: output {self._proba!r} holds class "
                             "probabilities without their names")

    def _check_input(self) -> tuple[str, str]:
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 2 or inputs[0].type not in DTYPES:
            found = [(i.name, i.type, i.shape) for i in inputs]
            raise ValueError(f"expected one 2-D float or double input tensor, found {found}")
        width = inputs[0].shape[1]
        if isinstance(width, int) and width != len(self.names):
            raise ValueError(f"the model expects {width} features, {len(self.names)} configured")
        return inputs[0].name, DTYPES[inputs[0].type]

    def _find_probabilities(self) -> tuple[str | None, bool]:
        for out in self.session.get_outputs():
            if out.type.startswith("seq(map("):
                return out.name, True
        for out in self.session.get_outputs():
            shape = out.shape
            if out.type in DTYPES and len(shape) == 2 and shape[1] != 1:
                return out.name, False
        return None, False

    def _predict(self, x: Any) -> list[Any]:
        import numpy as np

        feed = {self._input: x.astype(self._dtype, copy=False)}
        if self._proba is None:
            (values,) = self.session.run(self._outputs[:1], feed)
            return column_outputs(np.asarray(values).reshape(len(x)).tolist())
        (proba,) = self.session.run([self._proba], feed)
        if self._zipmap:
            return self._zipmap_outputs(proba)
        return proba_outputs(np.asarray(proba, dtype=float), self._classes)

    def _zipmap_outputs(self, maps: list[dict[Any, float]]) -> list[Any]:
        """The maps are already class -> probability: used as they come (no matrix)."""
        if maps and not isinstance(next(iter(maps[0])), str):
            maps = [{str(k): v for k, v in m.items()} for m in maps]
        return [
            {"label": max(m, key=m.__getitem__), "probabilities": m, "value": None}
            if all(map(isfinite, m.values())) and m else InvalidOutput("non-finite probability")
            for m in maps
        ]


def _without_zipmap(model: str | bytes) -> tuple[str | bytes, list[str]]:
    """The model with its ZipMap output replaced by the probability tensor it wraps, and
    the class names the ZipMap held; unchanged (and no names) without a ZipMap or
    without the ``onnx`` package. A tensor is read ~10x faster than onnxruntime builds
    one dict per row."""
    try:
        import onnx
    except ImportError:
        return model, []
    proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else onnx.load(model)
    outputs = {o.name for o in proto.graph.output}
    zipmaps = [n for n in proto.graph.node if n.op_type == "ZipMap" and n.output[0] in outputs]
    if len(zipmaps) != 1:
        return model, []
    node = zipmaps[0]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    labels = attrs.get("classlabels_strings") or attrs.get("classlabels_int64s") or []
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in labels]
    if not classes:
        return model, []
    kept = [o for o in proto.graph.output if o.name != node.output[0]]
    tensor = onnx.helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT,
                                                [None, len(classes)])
    del proto.graph.output[:]
    proto.graph.output.extend([*kept, tensor])
    proto.graph.node.remove(node)
    return proto.SerializeToString(), classes
