"""``GET /shadowpipe/query/?name=arms&since_ms=...&challenger=...&by=...``: the named read
queries of :mod:`shadowpipe.processors.read` as JSON, on the ClickHouse client of the
process that writes ClickHouse (the single monitor, or the partitioned monitor that runs the
sink). With the embedded engine only that process may open the data directory, so this is
how ``shadowpipe compare``, ``report`` and ``verdict`` read while the pipeline runs.

``run=ID`` reads a replay run's database (stored earlier in the same data directory). An
unknown query is a 404 listing the known ones; a failing one a 400 with its first line.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.monitor.sink import Sink
from shadowpipe.processors.read import QUERIES
from shadowpipe.processors.read import run as run_query
from shadowpipe.tables import database

QUERY_PATH = "/shadowpipe/query/"


def serve(app: Any, settings: Settings, sink: Sink, executor: Executor) -> None:
    """Declare the query page on ``app``; queries run on ``executor``, the thread that may
    use ``sink``'s client."""

    @app.page(QUERY_PATH)
    async def query(web: Any, request: Any) -> Any:
        params = dict(request.query)
        name = params.pop("name", "")
        if name not in QUERIES:
            return web.json({"error": f"unknown query {name!r}", "queries": sorted(QUERIES)},
                            status=404)
        loop = asyncio.get_running_loop()
        try:
            db = database(settings.replace(run=params.pop("run", "")))
            payload = await loop.run_in_executor(executor, run_query, sink, name, db, params)
        except Exception as exc:  # report query errors to the caller, keep serving
            return web.json({"error": str(exc).splitlines()[0]}, status=400)
        return web.json(payload)
