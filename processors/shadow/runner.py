"""Isolation: each challenger runs its batch calls on its own thread, under a deadline.

* A call that raises in a vectorised batch is retried record by record, so only the bad
  records carry an error (``error_kind="exception"``).
* At the deadline the records not yet scored are marked ``"timeout"``; the call is told to
  stop (per-record loops check between records) and the worker moves on.
* While a hung call still occupies the challenger's thread, the next batches fail fast
  as ``"timeout"`` instead of queueing behind it: memory stays bounded and the stream
  keeps its pace; the challenger recovers by itself as soon as the hung call returns.
* A model with ``pipelined = True`` (a remote server) has a second thread: the worker
  submits the next batch before it collects the current one (at most two in flight).

>>> from shadowpipe.processors.shadow.challengers import CallableModel
>>> runner = Runner("inv", CallableModel(lambda f: 1 / f["x"], False), timeout_ms=1000)
>>> records = [{"num_features": {"x": x}, "cat_features": {}, "null_features": []}
...            for x in (2.0, 0.0)]
>>> [(r.output, r.error_kind) for r in runner.collect(runner.submit(records))]
[({'label': None, 'probabilities': {}, 'value': 0.5}, None), (None, 'exception')]
>>> runner.close()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any, NamedTuple

from shadowpipe.processors.shadow.affinity import current_cpu, pin_thread
from shadowpipe.processors.shadow.challengers import InvalidOutput, Model, features, to_output

ERROR_CHARS = 500


class Result(NamedTuple):
    """One record's outcome: an Output dict, or an error and its kind (a tuple: one is
    made per record and prediction, and a frozen dataclass is slower to build)."""

    output: dict[str, Any] | None
    error: str | None = None
    error_kind: str | None = None


def failure(exc: BaseException) -> Result:
    """The Result for an exception raised (or returned) for one record."""
    if isinstance(exc, TimeoutError):
        kind = "timeout"
    elif isinstance(exc, InvalidOutput):
        kind = "invalid_output"
    else:
        kind = "exception"
    text = f"{type(exc).__name__}: {exc}"
    return Result(None, text[:ERROR_CHARS], kind)


def _result(raw: Any, normalized: bool) -> Result:
    if isinstance(raw, BaseException):
        return failure(raw)
    if normalized:
        return Result(raw)
    try:
        return Result(to_output(raw))
    except InvalidOutput as exc:
        return failure(exc)


@dataclass
class Pending:
    """A submitted batch call: its slots fill in as records are scored."""

    slots: list[Result | None]
    started: float
    future: Future | None
    cancel: threading.Event
    reason: str = ""
    finished: float | None = None
    # The call still running when this one was sent (pipelined models): a server answers
    # them in turn, so this call's own time starts when that one ends.
    ahead: Pending | None = None
    begun: float | None = None

    def elapsed_s(self) -> float:
        """The call's own duration (so far, if it is still running): from when it was sent,
        or from when the call ahead of it ended, whichever is later. The wait behind that
        call is the shadow worker's pipelining, not a latency the model would add to a
        request if it served users."""
        return (self.finished or time.perf_counter()) - (self.begun or self.started)

    def finish(self) -> None:
        """Mark the call ended (on its thread); drops the link to the call ahead."""
        self.finished = time.perf_counter()
        ahead, self.ahead = self.ahead, None
        ended = ahead.finished if ahead is not None else None
        self.begun = max(self.started, ended) if ended is not None else self.started


class Runner:
    """Run one challenger's model on batches with a per-call deadline."""

    def __init__(self, name: str, model: Model, timeout_ms: int, max_batch: int = 0) -> None:
        self.name = name
        self.model = model
        self.timeout_s = timeout_ms / 1000
        self.max_batch = max_batch
        # A model with ``pipelined = True`` (a remote server: the oip kind) takes the next
        # batch while the previous one is still on the server, on a second thread.
        self.depth = 2 if getattr(model, "pipelined", False) else 1
        self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix=f"challenger-{name}",
                                        initializer=self._started)
        self._calls: list[Pending] = []  # submitted, possibly still running
        self._tids: list[int] = []  # the challenger threads, as they start
        self._pinned = 0  # how many of them follow the caller's CPU
        self._cpu = -1
        self._normalized = getattr(model, "normalized", False)

    def submit(self, records: Sequence[dict[str, Any]]) -> Pending:
        """Start scoring ``records``; fails fast if a previous call is still hung (or, for a
        pipelined model, two are still running)."""
        now = time.perf_counter()
        pending = Pending([None] * len(records), now, None, threading.Event())
        running = [p for p in self._calls if p.future is not None and not p.future.done()]
        if running and now - running[0].started > self.timeout_s:
            pending.reason = "previous call still running past its timeout"
            return pending
        if len(running) >= self.depth:
            pending.reason = f"{len(running)} previous calls still running"
            return pending
        self._follow_caller()
        pending.ahead = running[-1] if running else None
        pending.future = self._pool.submit(self._score, records, pending)
        self._calls = [*running, pending]
        return pending

    def _started(self) -> None:
        self._tids.append(threading.get_native_id())

    def _follow_caller(self) -> None:
        """Wake the challenger's threads on the CPU the caller runs on (see
        :mod:`~shadowpipe.processors.shadow.affinity`: sharing data across CPUs made
        both threads ~1.6x slower per event)."""
        if self._pinned < 0 or current_cpu is None or not self._tids:
            return
        cpu = current_cpu()
        if cpu != self._cpu or self._pinned != len(self._tids):
            tids = list(self._tids)
            if all(pin_thread(tid, cpu) for tid in tids):
                self._cpu, self._pinned = cpu, len(tids)
            else:  # not allowed here: leave it to the scheduler
                self._pinned = -1

    def _score(self, records: Sequence[dict[str, Any]], pending: Pending) -> None:
        step = self.max_batch or len(records) or 1
        for start in range(0, len(records), step):
            if pending.cancel.is_set():
                break
            self._score_chunk(records[start:start + step], pending.slots, start, pending.cancel)
        pending.finish()

    def _score_chunk(
        self, records: Sequence[dict[str, Any]], slots: list[Result | None], offset: int,
        cancel: threading.Event,
    ) -> None:
        norm = self._normalized
        if self.model.vectorized:
            try:
                raws = self.model.predict_batch(records)
                if len(raws) != len(records):
                    raise InvalidOutput(f"{len(raws)} outputs for {len(records)} inputs")
            except Exception:  # find the bad records: retry one by one
                raws = None
            if raws is not None:
                if norm:  # Output dicts: a Result each without a call per record (half the cost)
                    slots[offset:offset + len(raws)] = [
                        Result(raw) if type(raw) is dict else _result(raw, norm) for raw in raws]
                    return
                for i, raw in enumerate(raws, offset):
                    slots[i] = _result(raw, norm)
                return
        for i, record in enumerate(records, offset):
            if cancel.is_set():
                return
            try:
                slots[i] = _result(self.model.predict_one(features(record)), norm)
            except Exception as exc:
                slots[i] = failure(exc)

    def collect(self, pending: Pending, deadline: float | None = None) -> list[Result]:
        """Wait until the call ends or ``deadline`` (default: submit time + timeout)."""
        if pending.future is not None:
            end = pending.started + self.timeout_s if deadline is None else deadline
            wait_futures([pending.future], timeout=max(0.0, end - time.perf_counter()))
            if not pending.future.done():
                pending.cancel.set()
                pending.reason = f"no answer within {self.timeout_s * 1000:.0f} ms"
            elif pending.future.exception() is not None:
                pending.reason = f"call failed: {pending.future.exception()!r}"
        timed_out = Result(None, f"timeout: {pending.reason}", "timeout")
        return [r if r is not None else timed_out for r in list(pending.slots)]

    def close(self) -> None:
        """Stop the thread (without waiting for a hung call) and release the model."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.model.close()
