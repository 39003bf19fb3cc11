"""The replay loop: pages of stored requests, scored in the shadow worker's micro-batches by
its own :class:`~shadowpipe.processors.shadow.core.ShadowProcessor` (the challenger declared
in ``SHADOWPIPE_CHALLENGERS``, loaded, sampled, called under its timeout with errors
contained), written into the replay run's ``joined_records`` as one Arrow insert per page
(ClickHouse parses the stored columns it sent, Python never holds them), then the
progress mark.

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
from shadowpipe.processors.replay import progress, stored
from shadowpipe.processors.replay.progress import Mark
from shadowpipe.processors.replay.records import Who, inputs, rows
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


def score(processor: ShadowProcessor, page: Any, who: Who, batch: int) -> Any:
    """``joined_records`` rows (Arrow) of ``page`` (stored requests, Arrow) scored in
    micro-batches of ``batch``, as the worker scores them; requests outside the sample
    yield no row."""
    records = inputs(page)
    picked: list[int] = []
    results: list[Any] = []
    shares: list[float] = []
    for at in range(0, len(records), batch):
        for outcome in processor.run_challengers(records[at:at + batch]):
            share_ms = outcome.pending.elapsed_s() * 1000 / max(len(outcome.picked), 1)
            picked.extend(at + i for i in outcome.picked)
            results.extend(outcome.results)
            shares.extend([share_ms] * len(outcome.picked))
    return rows(page, picked, results, shares, who)


def insert(client: Any, table: str, rows: Any) -> None:
    """Insert an Arrow table as an uncompressed Arrow stream: ClickHouse reads it as it
    is (clickhouse-connect's ``insert_arrow`` writes a file, compressed for a server)."""
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as writer:
        writer.write_table(rows)
    client.raw_insert(table, rows.column_names, sink.getvalue().to_pybytes(), fmt="ArrowStream")


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

    def write(self, mark: Mark, seen: int, scored: Any,
              cursor: tuple[int, str] | None = None, offsets: dict[int, int] | None = None
              ) -> None:
        """Store a page's rows (an Arrow table), then move the mark past the page (to the
        stored request ``cursor``, or the topic's next ``offsets``)."""
        if scored.num_rows:
            insert(self.client, f"{self.db}.joined_records", scored)
        if cursor is not None:
            mark.cursor_time, mark.cursor_id = cursor
        if offsets is not None:
            mark.offsets = offsets
        mark.seen += seen
        mark.scored += scored.num_rows
        progress.save(self.client, self.db, mark)

    def from_clickhouse(self, mark: Mark, show: Show) -> None:
        """Replay the stored requests after the mark's cursor.

        The next page is read and the previous one written on their own threads while
        this one is scored: ClickHouse works without the GIL meanwhile. Writes (and marks)
        stay in page order.
        """
        live = database(self.settings.replace(run=""))
        tune_gc()  # as in the worker: pages of containers must not trigger full collections
        source = stored.pages(self.settings, live, mark.since_ms, mark.until_ms, mark.cursor,
                              self.page_rows)
        with ThreadPoolExecutor(1, "replay-read") as reader, \
                ThreadPoolExecutor(1, "replay-write") as writer:
            try:
                self._pipeline(mark, show, source, reader, writer)
            finally:  # on the thread that opened the stream
                reader.submit(source.close).result()

    def _pipeline(self, mark: Mark, show: Show, source: Any, reader: ThreadPoolExecutor,
                  writer: ThreadPoolExecutor) -> None:
        ahead: Future = reader.submit(next, source, None)
        written: Future | None = None
        while (page := ahead.result()) is not None:
            ahead = reader.submit(next, source, None)
            scored = score(self.processor, page, self.who, self.settings.shadow_batch_size)
            last = page.slice(page.num_rows - 1)
            cursor = (last.column("event_time").cast("int64")[0].as_py(),
                      last.column("request_id")[0].as_py())
            if written is not None:
                written.result()
                show(mark)
            written = writer.submit(self.write, mark, page.num_rows, scored, cursor)
        if written is not None:
            written.result()
            show(mark)

    def finish(self, mark: Mark) -> None:
        mark.done = True
        progress.save(self.client, self.db, mark)

    def close(self) -> None:
        self.processor.close()
