"""Model adapters: scikit-learn (vectorised), river (per record), HTTP (async, bounded),
and the pieces the ONNX, MLflow and Open Inference Protocol kinds share (a feature
matrix with per-row missing values, probability and column outputs).

Adapters return either raw outputs (normalised by the caller with
:func:`~shadowpipe.processors.shadow.challengers.to_output`) or, when ``normalized`` is
true, ready ``Output`` dicts; an exception *instance* in the list is that record's error.

>>> import numpy as np
>>> from sklearn.linear_model import LogisticRegression
>>> lr = LogisticRegression().fit(np.array([[0.0], [1.0], [2.0], [3.0]]), ["a", "a", "b", "b"])
>>> model = SklearnModel(lr, ("x",))
>>> out = model.predict_batch([{"num_features": {"x": 0.0}}, {"num_features": {}}])
>>> out[0]["label"], isinstance(out[1], ValueError)
('a', True)
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from shadowpipe.processors.shadow.challengers import (
    ChallengerSpec,
    Features,
    InvalidOutput,
    Model,
    features,
    to_output,
)

NAN = math.nan


class MatrixModel(Model):
    """A model fed the numeric features as a float matrix in ``names`` column order.

    A record missing a feature (or with a non-finite one) fails on its own with a
    ``ValueError``; the complete rows are scored together by :meth:`_predict`, which
    returns one ``Output`` dict (or exception instance) per row.
    """

    vectorized = True
    normalized = True

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._get = itemgetter(*self.names)

    def _row(self, nums: dict[str, float]) -> Any:
        try:
            row = self._get(nums)
        except KeyError:
            return tuple(nums.get(n, NAN) for n in self.names)
        return row if len(self.names) > 1 else (row,)

    def predict_batch(self, records: Sequence[dict[str, Any]]) -> list[Any]:
        import numpy as np

        x = np.array([self._row(r["num_features"]) for r in records], dtype=float)
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            # Score the complete rows together; the rest fail on their own.
            good = np.flatnonzero(~bad)
            missing = ValueError("input contains NaN or infinity (missing feature?)")
            out: list[Any] = [missing] * len(x)
            for i, value in zip(good, self._predict(x[good]) if len(good) else [], strict=True):
                out[i] = value
            return out
        return self._predict(x)

    def _predict(self, x: Any) -> list[Any]:
        raise NotImplementedError

    def predict_one(self, feats: Features) -> Any:
        return self.predict_batch([{"num_features": feats}])[0]


class SklearnModel(MatrixModel):
    """A scikit-learn-compatible estimator on the numeric features, in ``features`` order.

    Classifiers with ``predict_proba`` give label + probabilities; others ``predict``
    (a number is a regression value, anything else a label). A record missing a feature
    gets NaN; if the estimator rejects NaN only that record fails.
    """

    def __init__(self, estimator: Any, names: Sequence[str] = ()) -> None:
        if not hasattr(estimator, "predict"):
            raise TypeError(f"{type(estimator).__name__} has no predict()")
        names = tuple(names) or tuple(getattr(estimator, "feature_names_in_", ()))
        if not names:
            raise ValueError("set features = [...]: the estimator does not name its inputs")
        expected = getattr(estimator, "n_features_in_", len(names))
        if expected != len(names):
            raise ValueError(f"estimator expects {expected} features, {len(names)} configured")
        super().__init__(names)
        self.estimator = estimator
        self._proba = hasattr(estimator, "predict_proba") and hasattr(estimator, "classes_")
        self._classes = [str(c) for c in getattr(estimator, "classes_", ())]

    def _predict(self, x: Any) -> list[Any]:
        if self._proba:
            return proba_outputs(self.estimator.predict_proba(x), self._classes)
        return [_scalar(v) for v in self.estimator.predict(x).tolist()]


def proba_outputs(proba: Any, classes: Sequence[str]) -> list[Any]:
    """One ``Output`` per row of the class-probability matrix ``proba`` (columns in
    ``classes`` order; label = most probable, the first on a tie); a row holding a
    non-finite probability is an :class:`InvalidOutput`.

    >>> import numpy as np
    >>> proba_outputs(np.array([[0.2, 0.8]]), ["no", "yes"])[0]["label"]
    'yes'
    """
    import numpy as np

    if proba.ndim != 2 or proba.shape[1] != len(classes):
        raise InvalidOutput(f"probabilities of shape {list(proba.shape)} for "
                            f"{len(classes)} classes {list(classes)}")
    best = proba.argmax(axis=1)
    ok = np.isfinite(proba).all(axis=1)
    classes = list(classes)
    return [
        {"label": classes[b], "probabilities": dict(zip(classes, row, strict=True)),
         "value": None}
        if good else InvalidOutput("non-finite probability")
        for row, b, good in zip(proba.tolist(), best.tolist(), ok.tolist(), strict=True)
    ]


def column_outputs(values: Sequence[Any]) -> list[Any]:
    """One ``Output`` per value of a column of predictions (a string is a label, a number
    a value, a mapping an output), or the :class:`InvalidOutput` of a bad one.

    >>> [o["label"] if isinstance(o, dict) else type(o).__name__
    ...  for o in column_outputs(["yes", float("nan")])]
    ['yes', 'InvalidOutput']
    """
    out: list[Any] = []
    for v in values:
        try:
            out.append(to_output(v))
        except InvalidOutput as exc:
            out.append(exc)
    return out


def _scalar(v: Any) -> dict[str, Any] | Exception:
    if isinstance(v, bool | str):
        return {"label": str(v), "probabilities": {}, "value": None}
    if isinstance(v, int | float):
        if not math.isfinite(v):
            return InvalidOutput(f"value {v!r} is not finite")
        return {"label": None, "probabilities": {}, "value": float(v)}
    return InvalidOutput(f"a {type(v).__name__} is not a prediction")


class RiverModel(Model):
    """A river model: ``predict_proba_one`` (label = most probable) or ``predict_one``."""

    def __init__(self, model: Any) -> None:
        if not hasattr(model, "predict_one"):
            raise TypeError(f"{type(model).__name__} has no predict_one()")
        self.model = model
        self._proba = hasattr(model, "predict_proba_one")

    def predict_one(self, feats: Features) -> Any:
        if self._proba:
            proba = self.model.predict_proba_one(feats)
            if proba:
                label = max(proba, key=proba.__getitem__)
                return {"label": label, "probabilities": proba}
        return self.model.predict_one(feats)


class HttpModel(Model):
    """POST ``{"request_id", "features"}`` as JSON per record; the reply body is the output.

    Calls run on a private event loop thread with at most ``max_concurrency`` in flight and
    ``timeout_ms`` per call; a call that times out or fails is that record's error.
    """

    vectorized = True

    def __init__(self, spec: ChallengerSpec) -> None:
        from urllib.parse import urlparse

        if urlparse(spec.location).scheme not in ("http", "https"):
            raise ValueError(f"{spec.location!r} is not an http(s) URL")
        self.spec = spec
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"http-{spec.name}", daemon=True
        )
        self._thread.start()
        self._session: Any = None
        self._limit: asyncio.Semaphore | None = None

    def predict_batch(self, records: Sequence[dict[str, Any]]) -> list[Any]:
        future = asyncio.run_coroutine_threadsafe(self._post_all(records), self._loop)
        try:
            return future.result()
        finally:
            future.cancel()  # abandoned by a timed-out caller: stop the calls

    def predict_one(self, feats: Features) -> Any:
        record = {"request_id": "", "num_features": feats, "cat_features": {}, "null_features": []}
        result = self.predict_batch([record])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    async def _post_all(self, records: Sequence[dict[str, Any]]) -> list[Any]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.spec.timeout_ms / 1000),
                headers=dict(self.spec.headers),
            )
            self._limit = asyncio.Semaphore(self.spec.max_concurrency)
        calls = [self._post(r) for r in records]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    async def _post(self, record: dict[str, Any]) -> Any:
        assert self._limit is not None
        body = {"request_id": record["request_id"], "features": features(record)}
        async with self._limit, self._session.post(self.spec.location, json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
            return await resp.json(content_type=None)

    def close(self) -> None:
        async def _close() -> None:
            if self._session is not None:
                await self._session.close()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
