"""Monitor commands: ``compare``, ``alerts tail`` and ``clickhouse migrate``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from shadowpipe.config import Settings


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    compare = sub.add_parser("compare", parents=[common],
                             help="compare challengers with the primary (from ClickHouse)")
    compare.add_argument("--challenger", default="", help="only this challenger")
    compare.add_argument("--since", default="1h", help="look-back: 30m, 1h, 7d (default 1h)")
    compare.add_argument("--by", default="", metavar="SEGMENT",
                         help="slice by this context attribute")
    compare.add_argument("--format", choices=("table", "json"), default="table")
    compare.set_defaults(func=compare_cmd)

    alerts = sub.add_parser("alerts", help="drift and rule alerts")
    alerts_sub = alerts.add_subparsers(dest="action", required=True, metavar="ACTION")
    tail = alerts_sub.add_parser("tail", parents=[common], help="follow the alert topic")
    tail.add_argument("--format", choices=("text", "json"), default="text")
    tail.add_argument("--from-now", action="store_true", help="skip alerts raised before now")
    tail.add_argument("--max", type=int, default=0, help="exit after this many alerts")
    tail.set_defaults(func=tail_cmd)

    clickhouse = sub.add_parser("clickhouse", help="the monitor's ClickHouse tables")
    ch_sub = clickhouse.add_subparsers(dest="action", required=True, metavar="ACTION")
    ch_sub.add_parser("migrate", parents=[common],
                      help="create or migrate every table (idempotent)").set_defaults(
        func=migrate_cmd)


def compare_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.processors.monitor.compare import gather, parse_duration, print_table

    data = gather(settings, args.challenger, parse_duration(args.since), args.by)
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print_table(data)
    return 0


def format_alert(alert: dict[str, Any]) -> str:
    """One line per alert.

    >>> format_alert({"severity": "warning", "kind": "drift", "detector": "ADWIN",
    ...               "metric": "error_rate", "challenger": "c1", "arm": "challenger",
    ...               "segment": "region=eu", "value": 0.31, "alert_id": "drift-1"})
    'warning drift ADWIN error_rate c1 arm=challenger segment=region=eu value=0.31 id=drift-1'
    """
    return (f"{alert['severity']} {alert['kind']} {alert['detector']} {alert['metric']} "
            f"{alert['challenger']} arm={alert['arm'] or '-'} "
            f"segment={alert['segment'] or '(all)'} value={alert['value']:.4g} "
            f"id={alert['alert_id']}")


def tail_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.processors.monitor.alerts import follow

    from shadowpipe.kafka import check_reachable

    check_reachable(settings, "alerts tail")
    for count, alert in enumerate(follow(settings, from_now=args.from_now), start=1):
        print(json.dumps(alert) if args.format == "json" else format_alert(alert), flush=True)
        if args.max and count >= args.max:
            break
    return 0


def migrate(settings: Settings, service: str) -> list[str]:
    """Create or migrate the monitor's tables; what was done (empty when up to date)."""
    from shadowpipe.processors.monitor.sink import migrate as run

    from shadowpipe.stores import check_clickhouse

    return run(check_clickhouse(settings, service), settings)


def migrate_cmd(args: argparse.Namespace, settings: Settings) -> int:
    done = migrate(settings, "clickhouse migrate")
    print(f"clickhouse {settings.clickhouse_database}: "
          f"{'; '.join(done) if done else 'up to date'}", file=sys.stdout)
    return 0
