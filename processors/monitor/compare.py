"""``shadowpipe compare`` as rich tables: the comparison that
:func:`shadowpipe.processors.read.report` builds (per arm with 95 % intervals, the paired
difference with its anytime-valid interval marked ``*`` until the verdict engine's guard
holds), then the recent drift events and alerts.
"""

from __future__ import annotations

import sys
import time
from typing import Any


def _fmt(value: Any, ci: list[float] | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text


def _fmt_diff(diff: dict[str, Any] | None) -> str:
    """``+0.012 [-0.004, +0.028] acc`` (``*``: the engine's guard is not met yet)."""
    if not diff:
        return "-"
    lo, hi = diff["interval"]
    star = "" if diff["reliable"] else " *"
    return f"{diff['estimate']:+.3f} [{lo:+.3f}, {hi:+.3f}] {diff['metric']}{star}"


def _scores(arm: dict[str, Any]) -> str:
    if "scored" not in arm:
        return "-"
    return "/".join(_fmt(arm[k]) for k in ("auc", "log_loss", "brier"))


def print_table(data: dict[str, Any], console: Any = None, with_events: bool = True) -> None:
    """Render a :func:`~shadowpipe.processors.read.report` with rich (``with_events``: also
    the drift events table)."""
    from rich.console import Console
    from rich.table import Table

    # Piped output would otherwise be cut to 80 columns and the intervals truncated.
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="shadow comparison (per arm: 95 % intervals; challenger - primary: "
                        "paired, anytime-valid 95 % confidence sequence)")
    for col in ("challenger", "segment", "published", "labelled", "agreement",
                "primary acc / MAE", "challenger acc / MAE", "challenger - primary",
                "AUC / log-loss / Brier (primary | challenger)", "errors", "timeouts",
                "model p50/p95/p99 ms"):
        table.add_column(col)
    unreliable = False
    for row in data["arms"]:
        metric = []
        for arm in (row["primary"], row["challenger_arm"]):
            metric.append(_fmt(arm.get("accuracy"), arm.get("accuracy_ci95")) if "accuracy"
                          in arm else _fmt(arm.get("mae"), arm.get("mae_ci95")))
        diff = row.get("difference")
        unreliable = unreliable or bool(diff and not diff["reliable"])
        lat = row["latency_ms"]["model_time"]
        table.add_row(row["challenger"], row["segment"] or "(all)",
                      str(row["coverage"]["published"]), str(row["coverage"]["labelled"]),
                      _fmt(row["agreement"], row["agreement_ci95"]), *metric, _fmt_diff(diff),
                      f"{_scores(row['primary'])} | {_scores(row['challenger_arm'])}",
                      str(row["coverage"]["errors"]), str(row["coverage"]["timeouts"]),
                      "/".join(_fmt(lat[k]) for k in ("p50", "p95", "p99")))
    console.print(table)
    if unreliable:
        console.print("* fewer than 1,000 pairs or 10 discordant pairs: the verdict engine "
                      "would not act on this interval yet")
    if not with_events:
        return
    events = Table(title="recent drift events and alerts")
    for col in ("time", "status", "kind", "detector", "metric", "challenger", "arm", "segment",
                "value"):
        events.add_column(col)
    for a in data["drift_events"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["time_ms"] / 1000))
        events.add_row(when, a["status"].upper(), a["kind"], a["detector"], a["metric"],
                       a["challenger"], a["arm"] or "", a["segment"] or "(all)",
                       _fmt(a["value"]))
    console.print(events)
    console.print(f"orphan feedback (no request): {data['orphan_feedback']}")
