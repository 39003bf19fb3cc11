"""``shadowpipe export`` and ``shadowpipe review publish``: joined records out, for training
data and for human review (docs/export.md, docs/review.md). Both select through
:mod:`shadowpipe.processors.selection`; this module only reads the flags.

>>> build(argparse.Namespace(kind="uncertain", challenger="", segment=["clinic=east"],
...                          since=None, until=None, threshold=0.1, measure="top")).segments
(('clinic', 'east'),)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors.selection import KINDS, MEASURES, Selection, parse_segment, parse_time


def _selection_flags(p: argparse.ArgumentParser, kind_default: str | None) -> None:
    p.add_argument("--kind", choices=KINDS, default=kind_default, required=not kind_default,
                   help="which records: " + ", ".join(KINDS))
    p.add_argument("--challenger", default="", help="only this challenger's records")
    p.add_argument("--segment", action="append", default=[], metavar="ATTR=VALUE",
                   help="only records whose context has ATTR=VALUE (repeatable)")
    p.add_argument("--since", default=None,
                   help="event time from: a look-back (30m, 7d) or an ISO date/time (UTC)")
    p.add_argument("--until", default=None, help="event time before: same forms as --since")
    p.add_argument("--threshold", type=float, default=0.2,
                   help="kind uncertain: the challenger's score below this (default 0.2)")
    p.add_argument("--measure", choices=MEASURES, default="margin",
                   help="the score: margin (top minus second probability) or top probability")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser(
        "export", parents=[common], help="joined records of one kind to Parquet, JSONL or CSV",
        description="Stream the joined records a kind selects (features, both outputs, label, "
                    "label delay) out of ClickHouse into a file. docs/export.md")
    _selection_flags(export, None)
    export.add_argument("--format", choices=("parquet", "jsonl", "csv"), default=None,
                        help="default: from the --out suffix, else parquet")
    export.add_argument("--out", type=Path, required=True, help="the file to write")
    export.set_defaults(func=export_cmd)

    review = sub.add_parser("review", help="human review of selected requests")
    review_sub = review.add_subparsers(dest="action", required=True, metavar="ACTION")
    publish = review_sub.add_parser(
        "publish", parents=[common], help="put selected requests on the review topic",
        description="Produce a ReviewRequest per selected joined record (most uncertain "
                    "first) to the review topic; reviewers answer with Feedback source "
                    "human. docs/review.md")
    _selection_flags(publish, "uncertain")
    publish.add_argument("--limit", type=int, default=100, help="at most this many requests")
    publish.set_defaults(func=publish_cmd)


def build(args: argparse.Namespace) -> Selection:
    """The :class:`Selection` the flags describe."""
    return Selection(
        kind=args.kind, challenger=args.challenger,
        segments=tuple(parse_segment(s) for s in args.segment),
        since_ms=parse_time(args.since, "--since") if args.since else None,
        until_ms=parse_time(args.until, "--until") if args.until else None,
        threshold=args.threshold, measure=args.measure)


def _format(args: argparse.Namespace) -> str:
    if args.format:
        return args.format
    suffix = args.out.suffix.lower().lstrip(".")
    return {"json": "jsonl", "ndjson": "jsonl"}.get(suffix, suffix) \
        if suffix in ("parquet", "jsonl", "csv", "json", "ndjson") else "parquet"


def export_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.processors.export import Progress, export
    from shadowpipe.tables import database

    fmt = _format(args)
    rows = export(settings, database(settings), build(args), fmt, args.out, Progress())
    print(f"exported {rows} {args.kind} records to {args.out} ({fmt})")
    return 0


def publish_cmd(args: argparse.Namespace, settings: Settings) -> int:
    if args.limit < 1:
        raise ConfigError("--limit", f"{args.limit} is below the minimum 1")
    from shadowpipe.kafka import check_reachable
    from shadowpipe.processors.review import publish, select
    from shadowpipe.stores import check_clickhouse
    from shadowpipe.tables import database

    selection = build(args)
    check_reachable(settings, "review")
    requests = select(check_clickhouse(settings, "review"), database(settings), selection,
                      args.limit)
    sent = publish(settings, requests)
    print(f"published {sent} review requests to {settings.topic('review')}", file=sys.stdout)
    return 0
