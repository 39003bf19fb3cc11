"""The replay loop: pages of stored requests, scored in the shadow worker's micro-batches by
its own :class:`~shadowpipe.processors.shadow.core.ShadowProcessor` (the challenger declared
in ``SHADOWPIPE_CHALLENGERS``, loaded, sampled, called under its timeout with errors
contained), written as JoinedRecords into the replay run's ``joined_records`` with the
monitor's columns and sink, then the progress mark.

>>> run_id("gbm-v3.1")
'gbm_v3_1'
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors.monitor.sink import Sink
from shadowpipe.processors.replay import progress, stored
from shadowpipe.processors.replay.progress import Mark
from shadowpipe.processors.replay.records import Who, columns, concat, inputs
from shadowpipe.processors.shadow.challengers import ChallengerSpec, load_specs
from shadowpipe.processors.shadow.core import ShadowProcessor
from shadowpipe.processors.shadow.service import tune_gc
from shadowpipe.tables import database, migrate

Show = Callable[[Mark], None]


def run_id(challenger: str) -> str:
    """The default run id of a challenger's replay: its name as an identifier."""
    return re.sub(r"[^A-Za-z0-9_]", "_", challenger)


def find_spec(settings: Settings, name: str) -> ChallengerSpec:
    """The challenger ``name`` of ``SHADOWPIPE_CHALLENGERS``; ConfigError naming --challenger."""
    specs = load_specs(settings)
    for spec in specs:
        if spec.name == name:
            return spec
    declared = ", ".join(s.name for s in specs)
    raise ConfigError("--challenger", f"{name!r} is not declared in {settings.challengers} "
                                      f"(declared: {declared})")


def start(client: Any, settings: Settings, name: str, source: str, since_s: int | None) -> Mark:
    """The replay's mark: resumed from the run's database, or a new one whose window
    (``since_s`` back from now, to now) stays fixed across restarts."""
    db = database(settings)
    migrate(client, settings)
    progress.ensure(client, db)
    mark = progress.load(client, db, name)
    if mark is not None:
        if mark.source != source:
            raise ConfigError("--run", f"run {settings.run!r} holds a replay of {name!r} from "
                                       f"the {mark.source}; choose another --run")
        return mark
    now = int(time.time() * 1000)
    mark = Mark(name, source, now - since_s * 1000 if since_s else 0, now)
    if source == "clickhouse":
        mark.total = stored.count(client, database(settings.replace(run="")), mark.since_ms,
                                  mark.until_ms)
    progress.save(client, db, mark)
    return mark


def score(processor: ShadowProcessor, page: dict[str, list[Any]], who: Who, batch: int
          ) -> dict[str, list[Any]]:
    """``joined_records`` columns of ``page`` (stored requests) scored in micro-batches of
    ``batch``, as the worker scores them; requests outside the sample yield no row."""
    records, parts = inputs(page), []
    for at in range(0, len(records), batch):
        chunk = records[at:at + batch]
        for outcome in processor.run_challengers(chunk):
            share_ms = outcome.pending.elapsed_s() * 1000 / max(len(outcome.picked), 1)
            rows = {name: values[at:at + batch] for name, values in page.items()}
            parts.append(columns(rows, outcome.picked, outcome.results, who, share_ms))
    return concat(parts)


class Replayer:
    """Replays into ``database(settings)`` (``settings.run`` set) through challenger ``spec``."""

    def __init__(self, settings: Settings, spec: ChallengerSpec, client: Any,
                 page_rows: int = 50_000) -> None:
        self.page_rows = page_rows  # requests scored and written per progress mark
        self.settings = settings
        self.db = database(settings)
        self.client = client
        self.who = Who(spec.name, spec.version, spec.is_control)
        self.processor = ShadowProcessor(settings, [spec])
        self.sink = Sink(settings, client_factory=lambda: client)

    def write(self, mark: Mark, seen: int, cols: dict[str, list[Any]],
              cursor: tuple[int, str] | None = None, offsets: dict[int, int] | None = None
              ) -> None:
        """Store a page's rows, then move the mark past the page (to the stored request
        ``cursor``, or the topic's next ``offsets``)."""
        if cols.get("request_id"):
            self.sink.write({"joined_records": cols})
        if cursor is not None:
            mark.cursor_time, mark.cursor_id = cursor
        if offsets is not None:
            mark.offsets = offsets
        mark.seen += seen
        mark.scored += len(cols.get("request_id", ()))
        progress.save(self.client, self.db, mark)

    def from_clickhouse(self, mark: Mark, show: Show) -> None:
        """Replay the stored requests after the mark's cursor.

        The next page is read and the previous one written on their own threads while
        this one is scored: ClickHouse works without the GIL meanwhile. Writes (and marks)
        stay in page order.
        """
        live = database(self.settings.replace(run=""))
        tune_gc()  # as in the worker: pages of containers must not trigger full collections
        source = stored.pages(self.client, live, mark.since_ms, mark.until_ms, mark.cursor,
                              self.page_rows)
        with ThreadPoolExecutor(1, "replay-read") as reader, \
                ThreadPoolExecutor(1, "replay-write") as writer:
            ahead: Future = reader.submit(next, source, None)
            written: Future | None = None
            while (page := ahead.result()) is not None:
                ahead = reader.submit(next, source, None)
                cols = score(self.processor, page, self.who, self.settings.shadow_batch_size)
                cursor = page["event_time"][-1], page["request_id"][-1]
                if written is not None:
                    written.result()
                    show(mark)
                written = writer.submit(self.write, mark, len(page["request_id"]), cols, cursor)
            if written is not None:
                written.result()
                show(mark)

    def finish(self, mark: Mark) -> None:
        mark.done = True
        progress.save(self.client, self.db, mark)

    def close(self) -> None:
        self.processor.close()
