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
from typing import Any

from shadowpipe.processors.monitor.sink import Sink, joined_columns
from shadowpipe.processors.replay import progress, stored
from shadowpipe.processors.replay.progress import Mark
from shadowpipe.processors.replay.records import Who, joined
from shadowpipe.processors.shadow.challengers import ChallengerSpec, load_specs
from shadowpipe.processors.shadow.core import ShadowProcessor

from shadowpipe.config import ConfigError, Settings
from shadowpipe.tables import database, migrate

PAGE_ROWS = 20_000  # requests read, scored and written between two progress marks
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


def score(processor: ShadowProcessor, rows: list[dict[str, Any]], who: Who, batch: int
          ) -> list[dict[str, Any]]:
    """JoinedRecords of ``rows`` (stored requests or decoded events) scored in micro-batches
    of ``batch``, as the worker scores them; requests outside the sample yield none."""
    out = []
    for at in range(0, len(rows), batch):
        chunk = rows[at:at + batch]
        for outcome in processor.run_challengers(chunk):
            share_ms = outcome.pending.elapsed_s() * 1000 / max(len(outcome.picked), 1)
            out.extend(joined(chunk[i], who, result, share_ms)
                       for i, result in zip(outcome.picked, outcome.results, strict=True))
    return out


class Replayer:
    """Replays into ``database(settings)`` (``settings.run`` set) through challenger ``spec``."""

    def __init__(self, settings: Settings, spec: ChallengerSpec, client: Any) -> None:
        self.settings = settings
        self.db = database(settings)
        self.client = client
        self.who = Who(spec.name, spec.version, spec.is_control)
        self.processor = ShadowProcessor(settings, [spec])
        self.sink = Sink(settings, client_factory=lambda: client)

    def write(self, mark: Mark, rows: list[dict[str, Any]], records: list[dict[str, Any]]
              ) -> None:
        """Store a page's records, then move the mark past the page."""
        if records:
            self.sink.write({"joined_records": joined_columns(records)})
        mark.seen += len(rows)
        mark.scored += len(records)
        progress.save(self.client, self.db, mark)

    def from_clickhouse(self, mark: Mark, show: Show) -> None:
        """Replay the stored requests after the mark's cursor."""
        live = database(self.settings.replace(run=""))
        for page in stored.pages(self.client, live, mark.since_ms, mark.until_ms, mark.cursor,
                                 PAGE_ROWS):
            records = score(self.processor, page, self.who, self.settings.shadow_batch_size)
            mark.cursor_time, mark.cursor_id = page[-1]["event_time"], page[-1]["request_id"]
            self.write(mark, page, records)
            show(mark)

    def finish(self, mark: Mark) -> None:
        mark.done = True
        progress.save(self.client, self.db, mark)

    def close(self) -> None:
        self.processor.close()
