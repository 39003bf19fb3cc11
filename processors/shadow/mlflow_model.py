"""The ``mlflow`` challenger kind: an MLflow pyfunc model, called once per batch.

``location`` is a model directory (``mlflow.sklearn.save_model`` & co.) or any URI
``mlflow.pyfunc.load_model`` takes (``models:/name/version``, ``models:/name@alias``,
``runs:/<run id>/model``); registry and run URIs are resolved against ``tracking_uri``
(else ``MLFLOW_TRACKING_URI``). The model gets a DataFrame of the numeric features, columns
named as the model's input signature (or ``features``, which wins). What it returns:

* a DataFrame whose columns are ``label`` / ``probabilities`` / ``value``: one output
  per row; any other DataFrame: columns are classes, rows their probabilities;
* a 2-D array of probabilities (``pyfunc_predict_fn="predict_proba"``): columns named by
  ``classes = [...]``;
* one value per row (``predict``): a string is a label, a number a value.

>>> import tempfile, mlflow.sklearn, numpy as np, pandas as pd
>>> from sklearn.linear_model import LogisticRegression
>>> x = pd.DataFrame({"x": [0.0, 1.0, 2.0, 3.0]})
>>> folder = tempfile.mkdtemp() + "/model"
>>> mlflow.sklearn.save_model(LogisticRegression().fit(x, ["a", "a", "b", "b"]), folder,
...                           serialization_format="pickle")
>>> model = MlflowModel(folder, ("x",))
>>> [o["label"] for o in model.predict_batch([{"num_features": {"x": v}} for v in (0.0, 3.0)])]
['a', 'b']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shadowpipe.processors.shadow.challengers import InvalidOutput
from shadowpipe.processors.shadow.models import MatrixModel, column_outputs, proba_outputs

OUTPUT_COLUMNS = {"label", "probabilities", "value"}


class MlflowModel(MatrixModel):
    """A loaded pyfunc model over the numeric features."""

    def __init__(self, location: str, names: Sequence[str] = (), classes: Sequence[str] = (),
                 tracking_uri: str = "") -> None:
        import mlflow
        import mlflow.pyfunc

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        self.model = mlflow.pyfunc.load_model(location)
        schema = self.model.metadata.get_input_schema()
        names = tuple(names) or tuple(schema.input_names() if schema is not None else ())
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError("set features = [...]: the model has no named input signature")
        super().__init__(names)
        self._classes = [str(c) for c in classes]
        if not self._classes and _probability_columns(self.model) > 1:
            raise ValueError("set classes = [...]: the model's output signature is a matrix "
                             "of probabilities without class names")

    def _predict(self, x: Any) -> list[Any]:
        import pandas as pd

        raw = self.model.predict(pd.DataFrame(x, columns=list(self.names)))
        out = self._outputs(raw)
        if len(out) != len(x):
            raise InvalidOutput(f"{len(out)} outputs for {len(x)} inputs")
        return out

    def _outputs(self, raw: Any) -> list[Any]:
        import numpy as np
        import pandas as pd

        if isinstance(raw, pd.DataFrame):
            if set(raw.columns) <= OUTPUT_COLUMNS:
                return column_outputs(raw.to_dict("records"))
            return proba_outputs(raw.to_numpy(dtype=float), [str(c) for c in raw.columns])
        if isinstance(raw, pd.Series):
            return column_outputs(raw.tolist())
        values = np.asarray(raw)
        if values.ndim == 2 and values.shape[1] > 1:
            if not self._classes:
                raise InvalidOutput(f"the model returned {values.shape[1]} columns of "
                                    "probabilities: set classes = [...] to name them")
            return proba_outputs(values.astype(float), self._classes)
        return column_outputs(values.reshape(len(values)).tolist())


def _probability_columns(model: Any) -> int:
    """Columns of the model's output signature when it is one unnamed 2-D tensor, else 0."""
    schema = model.metadata.get_output_schema()
    if schema is None or not schema.is_tensor_spec() or len(schema.inputs) != 1:
        return 0
    shape = schema.inputs[0].shape
    return shape[1] if len(shape) == 2 and shape[1] > 0 else 0
