"""``shadowpipe replay --challenger NAME [--since 30d | --from-topic] [--run ID]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from shadowpipe.config import ConfigError, Settings

PAGE_ROWS = 50_000  # a page: read, scored and written between two progress marks


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``shadowpipe replay``."""
    p = sub.add_parser(
        "replay", parents=[common],
        help="re-score stored traffic through a challenger into a replay run (--run)",
        description="Score stored requests with a challenger declared in "
                    "SHADOWPIPE_CHALLENGERS, as the shadow worker would have, into the "
                    "ClickHouse database <clickhouse_database>_replay_<run>; then "
                    "`shadowpipe verdict --run RUN` judges it. Resumes where a killed "
                    "replay of the same run stopped. docs/replay.md")
    p.add_argument("--challenger", required=True, help="name of the challenger to replay")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--since", default=None,
                        help="only requests of this look-back: 30m, 1h, 7d (default: all)")
    source.add_argument("--from-topic", action="store_true",
                        help="read the inference topic's retention instead of ClickHouse")
    p.add_argument("--page-rows", type=int, default=PAGE_ROWS,
                   help=f"requests scored and written per progress mark (default {PAGE_ROWS})")
    p.set_defaults(func=replay_cmd)


@contextmanager
def _display(total: int, name: str) -> Iterator[Any]:
    """A progress bar on a terminal's stderr, else one line per page (logs, tests)."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import Progress

        with Progress(console=Console(stderr=True)) as bar:
            task = bar.add_task(f"replay {name}", total=total or None)
            yield lambda mark: bar.update(task, completed=mark.seen, total=mark.total or None)
        return
    yield lambda mark: print(f"replay {name}: {mark.seen}/{mark.total or '?'} requests, "
                             f"{mark.scored} scored", file=sys.stderr, flush=True)


def replay_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.processors.read import parse_duration
    from shadowpipe.processors.replay.replayer import Replayer, find_spec, run_id, start
    from shadowpipe.stores import check_clickhouse
    from shadowpipe.tables import database

    since_s = parse_duration(args.since) if args.since is not None else None
    if args.page_rows < 1:
        raise ConfigError("--page-rows", f"{args.page_rows} is below the minimum 1")
    spec = find_spec(settings, args.challenger)
    settings = settings.replace(run=settings.run or run_id(spec.name))
    database(settings)  # a bad --run is one line before anything is opened
    source = "topic" if args.from_topic else "clickhouse"
    client = check_clickhouse(settings, "replay")
    mark = start(client, settings, spec.name, source, since_s)
    if not mark.done:
        replayer = Replayer(settings, spec, client, args.page_rows)
        try:
            with _display(mark.total, spec.name) as show:
                show(mark)
                if args.from_topic:
                    from shadowpipe.processors.replay.topic import replay_topic

                    replay_topic(replayer, mark, show)
                else:
                    replayer.from_clickhouse(mark, show)
            replayer.finish(mark)
        finally:
            replayer.close()
    print(f"replay {spec.name}: {mark.scored} of {mark.seen} requests scored into "
          f"{database(settings)} (run {settings.run}); judge it with "
          f"`shadowpipe verdict --run {settings.run} --challenger {spec.name}`")
    return 0
