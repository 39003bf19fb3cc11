"""The ``oip`` challenger kind: a model server speaking the Open Inference Protocol.

KServe v2, Triton, Seldon MLServer and others answer ``POST /v2/models/{name}/infer``
with JSON tensors. ``location`` is the model's URL, ``http://host:port/v2/models/{name}``
(optionally ``/versions/{v}``). One request per batch (or per ``max_batch`` records): one
``[N, len(features)]`` input tensor of the numeric features. Its name and datatype come
from the server's model metadata (``GET`` on ``location``) when it declares exactly one
input, else ``input-0`` and ``FP64``. ``outputs = [...]`` asks for named outputs
(MLServer's scikit-learn runtime: ``["predict_proba"]``); in the reply, a ``[N, C]`` float
output is class probabilities (columns named by ``classes = [...]``, label = most
probable), else the first output holds one label (string) or value (number) per row.

Timeouts and failures: the socket times out after ``timeout_ms``; a request that times
out, cannot connect, or gets a 5xx answer fails its records (``timeout`` or
``exception``) without being retried record by record, so a hung or dead server costs
one timeout per batch, never a stuck worker. A 4xx answer (the server refuses the input)
is retried record by record by the runner, to find the records it refuses. The
metadata is fetched when the worker starts: a wrong URL or model name stops it with one
line (exit 2).

>>> model = OipModel.__new__(OipModel)
>>> model.infer_path, model._input, model._datatype = "/v2/models/m/infer", "input-0", "FP64"
>>> model._requested = [{"name": "predict_proba"}]
>>> import orjson, numpy as np
>>> model.names = ("a", "b")
>>> model._head, model._middle, model._tail = model._framing()
>>> orjson.loads(model.body(np.array([[1.0, 2.0]])))["inputs"][0]
{'name': 'input-0', 'shape': [1, 2], 'datatype': 'FP64', 'data': [[1.0, 2.0]]}
"""

from __future__ import annotations

import http.client
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from shadowpipe.processors.shadow.challengers import ChallengerSpec, InvalidOutput
from shadowpipe.processors.shadow.models import MatrixModel, column_outputs, proba_outputs

MODEL_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/?$")
FLOAT_TYPES = {"FP16", "FP32", "FP64"}
FLOAT_ONLY = {float}
# A failed keep-alive connection (closed by the server while idle) before any answer.
STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


class ServerError(RuntimeError):
    """The server answered the batch with an error status."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:200]}")
        self.status = status


class OipModel(MatrixModel):
    """The model behind ``spec.location``, called over keep-alive HTTP connections.

    ``pipelined``: the worker sends the next batch while the server still works on the
    previous one, so the client's encoding and decoding overlap the server's work.
    """

    pipelined = True

    def __init__(self, spec: ChallengerSpec) -> None:
        import orjson  # noqa: F401  (the oip extra: fail at start-up, not per batch)

        url = urlparse(spec.location)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"{spec.location!r} is not an http(s) URL")
        if not MODEL_PATH.match(url.path):
            raise ValueError(f"{spec.location!r}: the path must be /v2/models/<name>"
                             "[/versions/<version>]")
        if not spec.features:
            raise ValueError("set features = [...]: the input columns in order")
        super().__init__(spec.features)
        self.spec = spec
        self._url = url
        self._timeout_s = spec.timeout_ms / 1000
        self._headers = {"Content-Type": "application/json", **spec.headers}
        self.infer_path = url.path.rstrip("/") + "/infer"
        self._requested = [{"name": n} for n in spec.outputs]
        self._classes = list(spec.classes)
        # Kept-alive connections not in use (list append/pop are atomic): the Runner has
        # up to two calls in flight (``pipelined``), each on a connection of its own.
        self._idle: list[http.client.HTTPConnection] = []
        self._closed = False
        self._input, self._datatype = self._metadata()
        self._head, self._middle, self._tail = self._framing()

    def _connect(self) -> http.client.HTTPConnection:
        cls = (http.client.HTTPSConnection if self._url.scheme == "https"
               else http.client.HTTPConnection)
        return cls(self._url.hostname, self._url.port, timeout=self._timeout_s)

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        """``method path`` on a kept-alive connection (one per call in flight); the body of
        a 200 answer, else :class:`ServerError` (and socket errors: ``TimeoutError``,
        ``OSError``)."""
        for attempt in (1, 2):
            try:
                conn, reused = self._idle.pop(), True
            except IndexError:
                conn, reused = self._connect(), False
            try:
                conn.request(method, path, body, self._headers)
                resp = conn.getresponse()
                data = resp.read()
            except STALE:
                conn.close()
                if reused and attempt == 1:
                    continue  # the server closed an idle connection: once more, afresh
                raise
            except BaseException:
                conn.close()
                raise
            if self._closed:
                conn.close()
            else:
                self._idle.append(conn)
            if resp.status != 200:
                raise ServerError(resp.status, data.decode(errors="replace"))
            return data
        raise AssertionError("unreachable")

    def _metadata(self) -> tuple[str, str]:
        import orjson

        try:
            meta = orjson.loads(self.request("GET", self.infer_path[: -len("/infer")]))
        except ServerError as exc:
            raise ValueError(f"model metadata at {self.spec.location}: {exc}") from None
        except OSError as exc:
            raise ValueError(f"cannot reach {self.spec.location}: {exc}") from None
        inputs = (meta.get("inputs") or []) if isinstance(meta, dict) else []
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            return str(inputs[0].get("name", "input-0")), str(inputs[0].get("datatype", "FP64"))
        return "input-0", "FP64"

    def body(self, rows: Any) -> bytes:
        """The inference request for ``rows`` (a float matrix, or a list of tuples), with
        the data nested row by row (the protocol takes nested or flat tensor data)."""
        import orjson

        data = orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)
        return self._wrap(data, len(rows))

    def _wrap(self, data: bytes, n: int) -> bytes:
        return b"".join((self._head, str(n).encode(), self._middle, data, self._tail))

    def _framing(self) -> tuple[bytes, bytes, bytes]:
        """The request body around the row count and the data: the same for every batch,
        so made once."""
        import orjson

        tail = b"}]" + (b',"outputs":' + orjson.dumps(self._requested)
                        if self._requested else b"") + b"}"
        return (b'{"inputs":[{"name":' + orjson.dumps(self._input) + b',"shape":[',
                f',{len(self.names)}],"datatype":'.encode() + orjson.dumps(self._datatype)
                + b',"data":', tail)

    def predict_batch(self, records: Sequence[dict[str, Any]]) -> list[Any]:
        """The common case without numpy: tuples of the features straight into JSON. A
        missing feature (KeyError) or a non-finite one (written as ``null``) takes the
        matrix path, where such rows fail on their own."""
        import orjson

        get = self._get
        try:
            if len(self.names) > 1:
                rows = [get(r["num_features"]) for r in records]
            else:
                rows = [(get(r["num_features"]),) for r in records]
        except KeyError:
            return super().predict_batch(records)
        data = orjson.dumps(rows)
        if b"null" in data:
            return super().predict_batch(records)
        return self._send(self._wrap(data, len(rows)), len(rows))

    def _predict(self, x: Any) -> list[Any]:
        return self._send(self.body(x), len(x))

    def _send(self, body: bytes, n: int) -> list[Any]:
        import orjson

        try:
            reply = self.request("POST", self.infer_path, body)
        except ServerError as exc:
            if 400 <= exc.status < 500:
                raise  # the input was refused: the runner retries record by record
            return [exc] * n
        except Exception as exc:  # timeout, refused, reset: the whole batch, once
            return [exc] * n
        return self.outputs(orjson.loads(reply), n)

    def outputs(self, reply: Any, n: int) -> list[Any]:
        """One output (or InvalidOutput) per row from the decoded ``reply``."""
        tensors = reply.get("outputs") if isinstance(reply, dict) else None
        if not isinstance(tensors, list) or not tensors:
            raise InvalidOutput("the reply has no outputs")
        proba = next((t for t in tensors if _is_matrix(t, n)), None)
        if proba is not None:
            return self._proba_outputs(proba, n)
        first = tensors[0]
        data = _flat(first.get("data"))
        if len(data) != n:
            raise InvalidOutput(f"output {first.get('name')!r} holds no {n} values")
        return column_outputs(data)

    def _proba_outputs(self, tensor: dict[str, Any], n: int) -> list[Any]:
        width = tensor["shape"][1]
        classes = self._classes
        if len(classes) != width:
            raise InvalidOutput(f"output {tensor.get('name')!r} has {width} probability "
                                f"columns: set classes = [...] to name them in order")
        data = _flat(tensor.get("data"))
        if len(data) != n * width:
            raise InvalidOutput(f"output {tensor.get('name')!r} holds no {n}x{width} values")
        if set(map(type, data)) != FLOAT_ONLY:  # ints, nulls: checked one by one
            import numpy as np

            return proba_outputs(np.array(data, dtype=float).reshape(n, width), classes)
        # JSON floats are finite: rows straight from the list, label = the first most
        # probable (as proba_outputs' argmax)
        it = iter(data)
        if width == 2:  # the common binary case, a third of the generic loop's cost
            no, yes = classes
            return [{"label": yes if b > a else no, "probabilities": {no: a, yes: b},
                     "value": None} for a, b in zip(it, it)]  # noqa: B905 - checked
        return [{"label": classes[row.index(max(row))],
                 "probabilities": dict(zip(classes, row)), "value": None}  # noqa: B905
                for row in zip(*[it] * width)]  # noqa: B905 - lengths checked above

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


def _flat(data: Any) -> list[Any]:
    """Tensor data as a flat list (servers may nest it row by row)."""
    if not isinstance(data, list):
        raise InvalidOutput("an output without a data list")
    if data and isinstance(data[0], list):
        return [v for row in data for v in (row if isinstance(row, list) else [row])]
    return data


def _is_matrix(tensor: Any, n: int) -> bool:
    """A ``[n, C>1]`` float tensor: class probabilities."""
    if not isinstance(tensor, dict):
        return False
    shape = tensor.get("shape")
    return (tensor.get("datatype") in FLOAT_TYPES and isinstance(shape, list)
            and len(shape) == 2 and shape[0] == n and shape[1] > 1)

