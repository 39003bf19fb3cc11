"""``shadowpipe compare``: per-arm accuracy or MAE with 95 % intervals, AUC, log-loss and
Brier where the arms give probabilities, the paired challenger-minus-primary difference with
its anytime-valid interval, agreement, coverage, latency percentiles and recent drift
events, from the named queries of :mod:`.queries`. With ``--by ATTR`` each challenger's
overall row comes first, then one row per value of ATTR.

The difference is paired (the same labelled requests scored by both arms) and its interval
is the verdict engine's confidence sequence (``asymptotic_cs`` of
:mod:`shadowpipe.processors.verdict.stats`): it stays valid however often compare is
re-run, unlike a fixed-n interval. It is flagged as not yet reliable until the engine's
guard holds (1,000 pairs, 10 discordant).

Where the rows come from: with a ClickHouse server, straight from it. With the embedded
engine only one process may open the data directory; while a monitor runs, that is the
monitor, so compare asks its web endpoint (``/shadowpipe/query/``) and opens the directory
itself only when no monitor answers.

>>> parse_duration("90m"), parse_duration("2d"), parse_duration("45")
(5400, 172800, 45)
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from shadowpipe.processors.monitor import queries
from shadowpipe.processors.monitor.stats import mean_ci, wilson
from shadowpipe.processors.verdict.stats import asymptotic_cs, guard_met, sample_variance

from shadowpipe.config import ConfigError, Settings

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
ALPHA = 0.05


def parse_duration(text: str) -> int:
    """``30s``, ``15m``, ``1h``, ``7d``, ``2w`` or plain seconds -> seconds."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    if not number.isdigit():
        raise ConfigError("--since", f"{text!r} is not a duration like 30m, 1h or 7d")
    return int(number) * (unit or 1)


def fetch(settings: Settings, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Rows of query ``name``: through the monitor's endpoint, or ClickHouse directly."""
    if settings.clickhouse.startswith("chdb:"):
        reply = _from_monitor(settings, name, params)
        if reply is not None:
            return reply
    return queries.run(_direct_client(settings), name, settings.clickhouse_database, params)


_clients: dict[str, Any] = {}


def _direct_client(settings: Settings) -> Any:
    """One client per ClickHouse URL (a process may read more than one, as the tests do)."""
    if settings.clickhouse not in _clients:
        from shadowpipe.stores import check_clickhouse

        _clients[settings.clickhouse] = check_clickhouse(settings, "compare")
    return _clients[settings.clickhouse]


def _from_monitor(settings: Settings, name: str, params: dict[str, Any]) -> dict | None:
    """The endpoint's answer, or None when no monitor listens there."""
    query = urllib.parse.urlencode({"name": name, **params})
    url = f"http://{settings.web_host}:{settings.web_port}/shadowpipe/query/?{query}"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and b"unknown query" not in exc.read():
            return None  # a worker without the monitor answers on that port
        raise ConfigError("clickhouse_url", f"monitor query {name} failed: {exc}") from None
    except OSError:
        return None


def _rows(reply: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(reply["columns"], row, strict=True)) for row in reply["rows"]]


def _interval(pair: tuple[float, float] | None) -> list[float] | None:
    return [round(pair[0], 4), round(pair[1], 4)] if pair else None


def _arm(row: dict[str, Any], arm: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n, correct = row[f"{arm}_labelled"], row[f"{arm}_correct"]
    if n:
        out.update(accuracy=correct / n, accuracy_ci95=_interval(wilson(correct, n)), labelled=n)
    m = row[f"{arm}_regressed"]
    if m:
        mae, sd = row[f"{arm}_mae"], row[f"{arm}_mae_sd"]
        out.update(mae=mae, mae_ci95=_interval(mean_ci(mae, sd, m)), regressed=m)
    if row.get(f"{arm}_scored"):
        out.update(auc=row[f"{arm}_auc"], log_loss=row[f"{arm}_log_loss"],
                   brier=row[f"{arm}_brier"], scored=row[f"{arm}_scored"])
    return out


def difference(row: dict[str, Any], alpha: float = ALPHA) -> dict[str, Any] | None:
    """Challenger minus primary over the same labelled requests, with its anytime-valid CS.

    Accuracy for labels (a positive difference: the challenger is right more often), MAE
    for values (positive: the challenger errs more); None without a labelled pair.

    >>> d = difference({"paired": 4000, "paired_losses": 90, "paired_wins": 130})
    >>> d["metric"], d["estimate"], d["reliable"], d["interval"][0] < 0.01 < d["interval"][1]
    ('accuracy', 0.01, True, True)
    """
    if row.get("paired"):
        n, losses, wins = row["paired"], row["paired_losses"], row["paired_wins"]
        # d = loss(challenger) - loss(primary) per pair; accuracy difference is -mean(d).
        cs = asymptotic_cs(n, losses - wins, losses + wins, alpha)
        variance = sample_variance(n, losses - wins, losses + wins)
        return {"metric": "accuracy", "estimate": -cs.estimate,
                "interval": _interval((-cs.hi, -cs.lo)), "pairs": n,
                "discordant": losses + wins, "anytime_valid": True,
                "reliable": guard_met(n, losses + wins, variance)}
    if row.get("paired_regressed"):
        n, s1, s2 = row["paired_regressed"], row["paired_ae_sum"], row["paired_ae_sumsq"]
        cs = asymptotic_cs(n, s1, s2, alpha)
        variance = sample_variance(n, s1, s2)
        return {"metric": "mae", "estimate": cs.estimate, "interval": _interval((cs.lo, cs.hi)),
                "pairs": n, "discordant": None, "anytime_valid": True,
                "reliable": guard_met(n, n, variance)}
    return None


def _percentiles(values: list[float | None] | None) -> dict[str, float | None]:
    values = values or [None, None, None]
    return {f"p{q}": v for q, v in zip((50, 95, 99), values, strict=True)}


def report(arms: list[dict], orphans: list[dict], alerts: list[dict]) -> dict[str, Any]:
    """The comparison as one JSON-able dict (pure: the tests and the CLI both use it)."""
    orphan_counts: dict[str, int] = {}
    for row in orphans:
        orphan_counts[row["challenger"]] = orphan_counts.get(row["challenger"], 0) + row["orphans"]
    rows = []
    for row in arms:
        agreement = row["agreed"] / row["compared"] if row["compared"] else None
        rows.append({
            "challenger": row["challenger"], "segment": row["segment"],
            "coverage": {"published": row["published"], "joined": row["joined"],
                         "labelled": row["labelled"], "errors": row["errors"],
                         "timeouts": row["timeouts"],
                         "orphaned": orphan_counts.get(row["challenger"], 0)},
            "agreement": agreement,
            "agreement_ci95": _interval(wilson(row["agreed"], row["compared"])),
            "primary": _arm(row, "primary"), "challenger_arm": _arm(row, "challenger"),
            "difference": difference(row),
            "latency_ms": {name: _percentiles(row[f"{name}_ms"])
                           for name in ("primary_latency", "model_time", "queue_lag")},
        })
    return {"arms": rows, "orphan_feedback": orphan_counts.get("", 0), "drift_events": alerts}


def gather(settings: Settings, challenger: str, since_s: int, by: str) -> dict[str, Any]:
    params = {"since_ms": int(time.time() * 1000) - since_s * 1000,
              "challenger": challenger, "by": by}
    return report(_rows(fetch(settings, "arms", params)),
                  _rows(fetch(settings, "orphans", params)),
                  _rows(fetch(settings, "alerts", params)))


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
    """Render :func:`report` with rich (``with_events``: also the drift events table)."""
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
