"""The demo's summary: read back from ClickHouse and printed as tables (its HTML report is
``shadowpipe report``'s, :mod:`shadowpipe.processors.report`).

Every number comes from the demo's ClickHouse tables through the same named queries as
``shadowpipe compare`` (:mod:`shadowpipe.processors.read`), so the summary equals a direct
query.
"""

from __future__ import annotations

from typing import Any

from shadowpipe.config import Settings

ALL_TIME = {"since_ms": 0, "challenger": ""}
SEGMENT_ATTRS = ("clinic", "device")


def summarize(settings: Settings) -> dict[str, Any]:
    """Everything the summary shows, from ClickHouse."""
    from shadowpipe.processors.read import fetch, report
    from shadowpipe.processors.read import rows as as_dicts

    def rows(name: str, **params: Any) -> list[dict[str, Any]]:
        return as_dicts(fetch(settings, name, {**ALL_TIME, "by": "", **params}))

    orphans, alerts = rows("orphans"), rows("alerts")
    data: dict[str, Any] = {
        "verdicts": _verdicts(settings),
        "overall": report(rows("arms"), orphans, alerts),
        "by": {attr: report(rows("arms", by=attr), orphans, []) for attr in SEGMENT_ATTRS},
        "windows": rows("windows"),
    }
    return data


def _verdicts(settings: Settings) -> list[dict[str, Any]]:
    """The verdict on each challenger, evaluated now (recorded and published if changed)."""
    from shadowpipe.processors.read import client
    from shadowpipe.processors.verdict.service import direct

    return direct(settings, "verdict", "", client=client(settings))["verdicts"]


# -- terminal ----------------------------------------------------------------------------


def print_summary(data: dict[str, Any]) -> None:
    """Rich tables: the verdicts first, then overall and per segment comparison, drift
    events, alerts received."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from shadowpipe.processors.monitor.compare import print_table
    from shadowpipe.processors.verdict.render import print_verdicts

    console = Console(width=None if sys.stdout.isatty() else 160)
    print_verdicts(data["verdicts"], console)
    print_table(data["overall"], console)
    print_table(data["by"]["clinic"], console, with_events=False)
    received = Table(title=f"alerts received on the alert topic ({len(data['alerts_received'])})")
    for col in ("detector", "metric", "challenger", "arm", "segment", "severity"):
        received.add_column(col)
    for a in data["alerts_received"][:25]:
        received.add_row(a["detector"], a["metric"], a["challenger"], a["arm"] or "",
                         a["segment"] or "(all)", a["severity"])
    console.print(received)
    sent = data["sent"]
    console.print(f"sent {sent['inferences']} inferences ({sent['shifted']} after the "
                  f"scanner change in clinic east) and {sent['feedback']} labels")
