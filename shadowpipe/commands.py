"""Foundation commands: ``stack``, ``schemas`` and ``smoke``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shadowpipe.config import Settings


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    stack = sub.add_parser("stack", help="the embedded stack (broker, Redis, ClickHouse)")
    stack_sub = stack.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, help_text in (
        ("up", "start the embedded services and create topics"),
        ("status", "report each service and its address"),
        ("down", "stop exactly what `up` started"),
    ):
        parser = stack_sub.add_parser(action, parents=[common], help=help_text)
        parser.set_defaults(func=stack_cmd)
        if action == "up":
            parser.add_argument(
                "--workers", default="", metavar="KIND=N,...",
                help="also start N processes of each worker kind (shadow, join, monitor), "
                     "each on its own web port, e.g. shadow=2,join=2,monitor=2")
            parser.add_argument(
                "--redis-cluster", type=int, default=0, metavar="N",
                help="also start a local Redis Cluster of N masters for the joiners")

    schemas = sub.add_parser("schemas", help="Avro contracts")
    schemas_sub = schemas.add_subparsers(dest="action", required=True, metavar="ACTION")
    check = schemas_sub.add_parser(
        "check", parents=[common], help="prove current schemas read every released version"
    )
    check.add_argument("--fixtures", type=Path, default=None, help="encoded fixtures directory")
    check.set_defaults(func=schemas_check)

    init = sub.add_parser(
        "init", parents=[common], help="create topics (and ClickHouse tables) on any stack"
    )
    init.set_defaults(func=init_cmd)

    smoke = sub.add_parser(
        "smoke", parents=[common], help="round trip events through the broker and read them back"
    )
    smoke.add_argument("--events", type=int, default=1000)
    smoke.add_argument("--no-stack", action="store_true", help="do not start the embedded stack")
    smoke.set_defaults(func=smoke_cmd)


def stack_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.fleet import Fleet, check_cluster_size, parse_workers
    from shadowpipe.stack import EmbeddedStack

    stack, fleet = EmbeddedStack(settings), Fleet(settings)
    if args.action == "status":
        rows = stack.status() + fleet.status()
        for name, detail, healthy in rows:
            print(f"{name:<13} {'up' if healthy else 'DOWN':<5} {detail}")
        return 0 if all(ok for _, _, ok in rows) else 1
    if args.action == "down":  # the workers first: they would retry the services forever
        for line in fleet.down() + stack.down():
            print(line)
        return 0
    counts = parse_workers(args.workers) if args.workers else {}  # before starting anything
    check_cluster_size(args.redis_cluster)
    for line in stack.up():
        print(line, flush=True)
    if counts or args.redis_cluster:
        fleet.up(counts, args.redis_cluster, say=lambda line: print(line, flush=True))
    return 0


def schemas_check(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.schemas import NAMES, released_versions
    from shadowpipe.schemas.evolution import DEFAULT_FIXTURES, check

    problems = check(args.fixtures or DEFAULT_FIXTURES)
    for line in problems:
        print(line, file=sys.stderr)
    versions = ", ".join(released_versions())
    print(f"{len(NAMES)} schemas against released versions {versions}: "
          f"{'compatible' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def init_cmd(args: argparse.Namespace, settings: Settings) -> int:
    """Idempotent set-up of a production (or embedded) stack: the deploy entry point."""
    from shadowpipe.kafka import check_reachable, ensure_topics

    check_reachable(settings, "init")
    created = ensure_topics(settings)
    print(f"topics: {len(created)} created ({', '.join(created) or 'all existed'})")
    from shadowpipe.tables import ensure

    done = ensure(settings, "init")
    print(f"clickhouse {settings.clickhouse_database}: {'; '.join(done) or 'up to date'}")
    return 0


def smoke_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.kafka import check_reachable
    from shadowpipe.smoke import round_trip
    from shadowpipe.stack import EmbeddedStack

    if not args.no_stack:
        for line in EmbeddedStack(settings).up():
            print(line)
    check_reachable(settings, "smoke")
    counts = round_trip(settings, args.events)
    print(json.dumps(counts))
    ok = (counts["inference_received"] == counts["inference_sent"]
          and counts["feedback_received"] == counts["feedback_sent"])
    return 0 if ok else 1
