"""Monitor commands: ``compare``, ``alerts tail``, ``reference set`` and ``clickhouse migrate``."""

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

    reference = sub.add_parser("reference", help="the reference data drift is measured against")
    ref_sub = reference.add_subparsers(dest="action", required=True, metavar="ACTION")
    ref_set = ref_sub.add_parser("set", parents=[common],
                                 help="store a reference profile from a CSV or Parquet file")
    ref_set.add_argument("--from", dest="source", required=True, metavar="FILE",
                         help="reference data (.csv with a header row, or .parquet)")
    ref_set.add_argument("--model", default="",
                         help="primary model it applies to (default: every model)")
    ref_set.add_argument("--features", default="", metavar="A,B",
                         help="only these columns (default: every column)")
    ref_set.set_defaults(func=reference_cmd)

    clickhouse = sub.add_parser("clickhouse", help="the monitor's ClickHouse tables")
    ch_sub = clickhouse.add_subparsers(dest="action", required=True, metavar="ACTION")
    ch_sub.add_parser("migrate", parents=[common],
                      help="create or migrate every table (idempotent)").set_defaults(
        func=migrate_cmd)


def compare_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.processors.monitor.compare import print_table
    from shadowpipe.processors.read import gather, parse_duration

    data = gather(settings, args.challenger, parse_duration(args.since), args.by)
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print_table(data)
    return 0


def format_alert(alert: dict[str, Any]) -> str:
    """One line per alert; an alert about the primary names its model.

    >>> format_alert({"severity": "warning", "kind": "drift", "detector": "ADWIN",
    ...               "metric": "error_rate", "challenger": "c1", "arm": "challenger",
    ...               "segment": "r=eu", "value": 0.31, "alert_id": "d-1"})
    'FIRING warning drift ADWIN error_rate c1 arm=challenger segment=r=eu value=0.31 id=d-1'
    >>> format_alert({"severity": "info", "kind": "drift", "detector": "PSI",
    ...               "metric": "score", "challenger": "", "arm": "primary",
    ...               "segment": None, "value": 0.1, "alert_id": "d-2",
    ...               "status": "resolved", "details": {"model": "m 2"}})
    "RESOLVED info drift PSI score primary model 'm 2' arm=primary segment=(all) value=0.1 id=d-2"
    """
    who = alert["challenger"]
    if not who:
        who = f"primary model {alert.get('details', {}).get('model', '')!r}"
    return (f"{alert.get('status', 'firing').upper()} {alert['severity']} {alert['kind']} "
            f"{alert['detector']} {alert['metric']} {who} arm={alert['arm'] or '-'} "
            f"segment={alert['segment'] or '(all)'} value={alert['value']:.4g} "
            f"id={alert['alert_id']}")


def tail_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.kafka import check_reachable
    from shadowpipe.processors.monitor.alerts import follow

    check_reachable(settings, "alerts tail")
    for count, alert in enumerate(follow(settings, from_now=args.from_now), start=1):
        print(json.dumps(alert) if args.format == "json" else format_alert(alert), flush=True)
        if args.max and count >= args.max:
            break
    return 0


def reference_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.processors.monitor.reference import set_reference

    features = [f.strip() for f in args.features.split(",") if f.strip()]
    done = set_reference(settings, args.source, model=args.model, features=features)
    kinds = done["features"]
    print(f"reference for model {done['model'] or '(every model)'!r}: {len(kinds)} features "
          f"({sum(k == 'numeric' for k in kinds.values())} numeric, "
          f"{sum(k == 'categorical' for k in kinds.values())} categorical) from "
          f"{done['source']}, version {done['version']}, stored via {done['via']}")
    return 0


def migrate_cmd(args: argparse.Namespace, settings: Settings) -> int:
    from shadowpipe.tables import ensure

    done = ensure(settings, "clickhouse migrate")
    print(f"clickhouse {settings.clickhouse_database}: "
          f"{'; '.join(done) if done else 'up to date'}", file=sys.stdout)
    return 0
