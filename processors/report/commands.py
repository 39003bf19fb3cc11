"""``shadowpipe report [--challenger X] [--since 7d] [--by ATTR ...] [--out FILE]``: the
verdict and the evidence behind it in one self-contained HTML file (docs/report.md).

Reads like ``shadowpipe compare`` and ``shadowpipe verdict``: from a ClickHouse server, or
on the embedded engine from the running monitor's endpoints when it holds the directory.
Prints the path of the written file. An unknown challenger or a bad ``--since`` is one line
naming the flag, exit 2; a failure to read is one line, exit 1.

>>> since_seconds("7d"), since_seconds("90m")
(604800, 5400)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shadowpipe.config import ConfigError, Settings

DEFAULT_OUT = Path("shadowpipe-report.html")
ERROR_EXIT = 1


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    report = sub.add_parser(
        "report", parents=[common],
        help="the verdict and its evidence as one self-contained HTML file",
        description="Write an HTML report that leads with the verdict, then accuracy and "
                    "agreement over time, per-segment differences, the coverage funnel, "
                    "label delays, alerts, latency and the most informative disagreements.")
    report.add_argument("--challenger", default="", help="only this challenger")
    report.add_argument("--since", default="7d",
                        help="look-back of the views: 30m, 1h, 7d (default 7d; the verdict "
                             "judges every stored record)")
    report.add_argument("--by", nargs="+", action="extend", metavar="ATTR",
                        help="context attributes of the per-segment view "
                             "(default: the configured segments)")
    report.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"the HTML file to write (default ./{DEFAULT_OUT})")
    report.set_defaults(func=report_cmd)


def since_seconds(text: str) -> int:
    """``--since`` in seconds; :class:`ConfigError` naming the flag unless positive."""
    from shadowpipe.processors.read import parse_duration

    seconds = parse_duration(text)
    if seconds <= 0:
        raise ConfigError("--since", f"{text!r} is not a positive duration")
    return seconds


def report_cmd(args: argparse.Namespace, settings: Settings) -> int:
    since_s = since_seconds(args.since)
    from shadowpipe.processors.report import page
    from shadowpipe.processors.report.data import gather

    try:
        data = gather(settings, args.challenger, since_s, tuple(args.by) if args.by else None)
        path = page.write(data, args.out)
    except ConfigError:
        raise
    except Exception as exc:  # one line and exit 1, like shadowpipe verdict
        print(f"shadowpipe: report failed: {str(exc).splitlines()[0] if str(exc) else exc!r}",
              file=sys.stderr)
        return ERROR_EXIT
    print(path.resolve())
    return 0
