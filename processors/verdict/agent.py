"""The verdict inside the monitor process (the embedded engine belongs to it).

* A Faust timer evaluates every challenger each ``SHADOWPIPE_VERDICT_INTERVAL_S`` on the
  monitor's ClickHouse client, in the monitor's executor thread; a changed verdict is first
  published (a Verdict event keyed by challenger on the verdict topic, retried until the
  broker has it), then appended to the ``verdicts`` table. A crash in between publishes the
  change again, it never loses it.
* ``GET /shadowpipe/verdict/?challenger=X`` evaluates on demand and returns the same JSON
  as ``shadowpipe verdict --format json`` (without ``challenger``: ``{"verdicts": [...]}``).
  ``gate=promote`` answers HTTP 412 unless the verdict is PROMOTE, ``gate=no-reject``
  answers 412 on REJECT (for Flagger, which reads only the status); POST is accepted too,
  and the challenger may come in the body's ``metadata.challenger`` (Flagger's payload).
  ``policy=PATH`` evaluates with another policy file: a what-if, neither recorded nor
  published unless it is the monitor's own policy. ``run=ID`` judges that replay run's
  records (``shadowpipe replay``), never recorded nor published either.
* ``POST /shadowpipe/verdict/reset/?challenger=X`` records a reset that lifts a latched
  decision, and re-evaluates.

>>> [gate for gate, passes in sorted(GATES.items()) if passes("HOLD")]
['no-reject']
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors.publisher import Publisher
from shadowpipe.processors.runtime.loop import deliver

log = logging.getLogger(__name__)
VERDICT_PATH = "/shadowpipe/verdict/"
RESET_PATH = "/shadowpipe/verdict/reset/"
# gate -> does this verdict pass (HTTP 200) or not (HTTP 412)
GATES = {"promote": lambda v: v == "PROMOTE", "no-reject": lambda v: v != "REJECT"}


def install(app: Any, settings: Settings, pipeline: Any, executor: Executor,
            leader: Callable[[], bool] = lambda: True) -> None:
    """Declare the verdict timer and endpoints on the monitor's app, client and thread;
    the timer evaluates only while ``leader()`` (one publisher among N processes)."""
    from faust.web import View

    from shadowpipe.processors.verdict.service import Evaluator

    evaluator = Evaluator(settings, pipeline.sink.connect)
    publisher = Publisher(settings)
    lock = asyncio.Lock()

    async def run(challenger: str = "", policy: str | None = None,
                  reset: bool = False, replay: str = "") -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        async with lock:  # one evaluation at a time: each compares with the latched state
            outcome = await loop.run_in_executor(
                executor, evaluator.evaluate, challenger, policy, reset, replay)
            if not (challenger or policy or reset or replay):  # every live one: /metrics
                pipeline.verdicts.update({d["challenger"]: d["verdict"]
                                          for d in outcome.reply["verdicts"]})
            if outcome.events:
                await loop.run_in_executor(executor, _publish, publisher, outcome.events,
                                           pipeline.pause)
                await loop.run_in_executor(executor, evaluator.record, outcome)
        return outcome.reply

    @app.timer(settings.verdict_interval_s, name=f"{settings.topic_prefix}verdict")
    async def verdicts() -> None:
        if not leader():
            return
        try:
            await run()
        except Exception:  # keep the timer alive; the next tick tries again
            log.exception("verdict evaluation failed")

    class VerdictView(View):
        async def get(self, request: Any) -> Any:
            return await self._answer(request, reset=False)

        async def post(self, request: Any) -> Any:
            return await self._answer(request, reset=False)

        async def _answer(self, request: Any, reset: bool) -> Any:
            params = dict(request.query)
            challenger = params.get("challenger") or await _metadata_challenger(request)
            gate = params.get("gate", "")
            if gate and gate not in GATES:
                return self.json({"error": f"unknown gate {gate!r}", "gates": sorted(GATES)},
                                 status=400)
            if reset and not challenger:
                return self.json({"error": "reset needs ?challenger="}, status=400)
            try:
                reply = await run(challenger, params.get("policy") or None, reset,
                                  params.get("run", ""))
            except ConfigError as exc:
                return self.json({"error": str(exc), "setting": exc.setting}, status=400)
            except Exception as exc:  # report, keep serving
                log.exception("verdict request failed")
                return self.json({"error": str(exc).splitlines()[0] if str(exc) else repr(exc)},
                                 status=500)
            status = 200
            if gate:
                verdict = (reply.get("verdict") or {}) if reset else reply
                ok = "verdicts" not in verdict and GATES[gate](verdict.get("verdict"))
                status = 200 if ok else 412
            return self.json(reply, status=status)

    class ResetView(VerdictView):
        async def post(self, request: Any) -> Any:
            return await self._answer(request, reset=True)

        async def get(self, request: Any) -> Any:
            return self.json({"error": "reset is a POST"}, status=405)

    app.page(VERDICT_PATH)(VerdictView)
    app.page(RESET_PATH)(ResetView)


async def _metadata_challenger(request: Any) -> str:
    """``metadata.challenger`` of a Flagger webhook payload, or ''."""
    if request.method != "POST":
        return ""
    try:
        body = json.loads(await request.read() or b"{}")
    except ValueError:
        return ""
    meta = body.get("metadata") if isinstance(body, dict) else None
    return str(meta.get("challenger", "")) if isinstance(meta, dict) else ""


def _publish(publisher: Publisher, events: list[tuple[str, str, bytes]],
             pause: Callable[[float], None]) -> None:
    """Produce and flush until the broker has every event (a repeat is the same decision),
    with the workers' one delivery retry; the verdicts are recorded only after this
    returns. A stop (``pause`` raises) gives up: nothing is recorded."""
    deliver(publisher, [(topic, [(key, value)]) for topic, key, value in events], pause,
            what="verdict delivery")
