"""Capture predictions without writing emit calls: a decorator and a context manager.

Both time the prediction, emit it when it returns normally (an exception from the
prediction propagates untouched and nothing is emitted), and expose the request id so
feedback can be sent later:

* :func:`current_request_id` is the id of the latest tracked prediction in this
  thread / asyncio task; inside ``with use_request_id("req-42"):`` tracked predictions use
  that id instead of generating one.
* generated ids are ``<16 random hex digits>-<counter in hex>``: unique per process (the
  random part is re-drawn in forked children) and cheap (~0.3 us).

>>> with use_request_id("req-42") as rid:
...     rid
'req-42'
>>> rid = new_request_id()
>>> len(rid.split("-")[0]), rid != new_request_id()
(16, True)
"""

from __future__ import annotations

import functools
import inspect
import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])
_given: ContextVar[str | None] = ContextVar("shadowpipe_given_request_id", default=None)
_last: ContextVar[str | None] = ContextVar("shadowpipe_last_request_id", default=None)
_prefix = os.urandom(8).hex()
_counter = itertools.count()


def _reseed() -> None:
    global _prefix, _counter
    _prefix, _counter = os.urandom(8).hex(), itertools.count()


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """A fresh request id, unique across processes."""
    return f"{_prefix}-{next(_counter):x}"


def current_request_id() -> str | None:
    """The request id of the latest prediction tracked in this context, if any."""
    return _last.get()


@contextmanager
def use_request_id(request_id: str) -> Iterator[str]:
    """Tracked predictions inside the block use ``request_id`` (your service's own id)."""
    token = _given.set(request_id)
    try:
        yield request_id
    finally:
        _given.reset(token)


def _first_argument(*args: Any, **kwargs: Any) -> Any:
    return args[0] if args else None


def _identity(result: Any) -> Any:
    return result


def track(
    emitter: Any,
    *,
    model: str,
    version: str,
    features: Callable[..., Mapping[str, Any] | None] = _first_argument,
    output: Callable[[Any], Any] = _identity,
    context: Callable[..., Mapping[str, str] | None] | None = None,
    request_id: Callable[..., str | None] | None = None,
) -> Callable[[_F], _F]:
    """Decorate a sync or async predict function so each call is emitted.

    ``features``, ``context`` and ``request_id`` are called with the function's
    arguments (default features: the first positional argument); ``output`` converts its
    result. An exception in any of them is counted (``extract_error``), never raised.
    """

    def extract(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        rid = None
        if request_id is not None:
            try:
                rid = request_id(*args, **kwargs)
            except Exception as exc:
                emitter._drop("extract_error", exc)
        rid = rid or _given.get() or new_request_id()
        _last.set(rid)
        return rid

    def emit(rid: str, start: float, args: tuple[Any, ...], kwargs: dict[str, Any],
             result: Any) -> None:
        latency_ms = (time.perf_counter() - start) * 1000.0
        try:
            feats = features(*args, **kwargs)
            ctx = context(*args, **kwargs) if context is not None else None
            out = output(result)
        except Exception as exc:
            emitter._drop("extract_error", exc)
            return
        emitter.emit_inference(rid, feats, out, model=model, version=version,
                               latency_ms=latency_ms, context=ctx)

    def decorate(fn: _F) -> _F:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                rid = extract(args, kwargs)
                start = time.perf_counter()
                result = await fn(*args, **kwargs)
                emit(rid, start, args, kwargs, result)
                return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            rid = extract(args, kwargs)
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            emit(rid, start, args, kwargs, result)
            return result

        return wrapper  # type: ignore[return-value]

    return decorate


class InferenceCall:
    """One prediction timed by a ``with`` (or ``async with``) block, emitted at its end.

    Set ``output`` (and optionally ``features``, ``context``, ``latency_ms``) inside the
    block; ``request_id`` is known from the start. Nothing is emitted if the block raises.
    """

    def __init__(
        self,
        emitter: Any,
        *,
        model: str,
        version: str,
        features: Mapping[str, Any] | None = None,
        context: Mapping[str, str] | None = None,
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> None:
        self.emitter = emitter
        self.model, self.version = model, version
        self.features, self.context, self.trace_id = features, context, trace_id
        self.request_id = request_id or _given.get() or new_request_id()
        self.output: Any = None
        self.latency_ms: float | None = None
        self.sent = False
        self._start = 0.0

    def __enter__(self) -> InferenceCall:
        _last.set(self.request_id)
        self._start = time.perf_counter()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            return
        latency_ms = self.latency_ms
        if latency_ms is None:
            latency_ms = (time.perf_counter() - self._start) * 1000.0
        self.sent = self.emitter.emit_inference(
            self.request_id, self.features, self.output, model=self.model,
            version=self.version, latency_ms=latency_ms, context=self.context,
            trace_id=self.trace_id,
        )

    async def __aenter__(self) -> InferenceCall:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.__exit__(exc_type)
