"""The demo's results: read back from ClickHouse, printed as tables, drawn as an HTML report.

Every number comes from the demo's ClickHouse tables through the same named queries as
``shadowpipe compare`` (:mod:`shadowpipe.processors.read`), so the summary
equals a direct query. Plots are matplotlib SVGs inlined into one self-contained file.
"""

from __future__ import annotations

import html
import io
import time
from pathlib import Path
from typing import Any

from shadowpipe.config import Settings

ALL_TIME = {"since_ms": 0, "challenger": ""}
SEGMENT_ATTRS = ("clinic", "device")


def summarize(settings: Settings) -> dict[str, Any]:
    """Everything the summary and the report show, from ClickHouse."""
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
        "latency": _latency_samples(settings),
    }
    return data


def _verdicts(settings: Settings) -> list[dict[str, Any]]:
    """The verdict on each challenger, evaluated now (recorded and published if changed)."""
    from shadowpipe.processors.read import client
    from shadowpipe.processors.verdict.service import direct

    return direct(settings, "verdict", "", client=client(settings))["verdicts"]


def _latency_samples(settings: Settings) -> dict[str, list[float]]:
    from shadowpipe.processors.read import latency_samples

    # Queue lag is left out: event times run on the demo's compressed simulated clock.
    samples: dict[str, list[float]] = {}
    for challenger, primary, model in latency_samples(settings):
        samples.setdefault("primary latency (in the service)", []).append(primary)
        samples.setdefault(f"{challenger} model time (per record)", []).append(model)
    return samples


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


# -- HTML report -------------------------------------------------------------------------


def _svg(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _series(windows: list[dict], segment: str, challenger: str, column: str
            ) -> tuple[list[Any], list[float]]:
    xs, ys = [], []
    for w in windows:
        if w["segment"] == segment and w["challenger"] == challenger and w[column] is not None:
            xs.append(_when(w["window_start_ms"]))
            ys.append(w[column])
    return xs, ys


def _when(ms: int) -> Any:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _alert_lines(ax: Any, alerts: list[dict], segment: str | None = None) -> None:
    for a in alerts:
        if a["status"] == "firing" and (segment is None or a["segment"] == segment):
            ax.axvline(_when(a["window_start_ms"] or a["time_ms"]), color="crimson",
                       alpha=0.25, lw=1)


def _over_time(data: dict, segment: str, title: str) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    challengers = sorted({w["challenger"] for w in data["windows"]} - {""})
    for challenger in challengers:
        for column, style in (("agreement", ":"), ("challenger_accuracy", "-")):
            xs, ys = _series(data["windows"], segment, challenger, column)
            ax.plot(xs, ys, style, label=f"{challenger} {column.replace('_', ' ')}")
    if challengers:
        xs, ys = _series(data["windows"], segment, challengers[0], "primary_accuracy")
        ax.plot(xs, ys, "-", color="black", lw=2, label="primary accuracy")
    _alert_lines(ax, data["overall"]["drift_events"], segment)
    if data["run"].get("shift_ms"):
        ax.axvline(_when(data["run"]["shift_ms"]), color="black", ls="--", lw=1.5)
        ax.text(_when(data["run"]["shift_ms"]), 0.05, " scanner change in clinic east",
                fontsize=7)
    ax.set_title(title + " (red: alerts, dashed: the injected change)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower left")
    return _svg(fig)


def _latency(data: dict) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3))
    for name, values in sorted(data["latency"].items()):
        clean = sorted(v for v in values if v is not None and v > 0)
        if clean:
            ax.hist(clean, bins=60, histtype="step", lw=1.5, label=name, log=True)
    ax.set_xlabel("ms")
    ax.set_title("latency distributions")
    ax.legend(fontsize=7)
    return _svg(fig)


def _coverage(data: dict) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3))
    challengers = sorted({w["challenger"] for w in data["windows"]} - {""})
    if challengers:
        for column, style in (("published", "-"), ("joined", "--"), ("labelled", "-"),
                              ("orphaned", ":"), ("errors", ":")):
            xs, ys = _series(data["windows"], "", challengers[0], column)
            ax.plot(xs, ys, style, label=column)
    ax.set_title(f"coverage per window ({challengers[0] if challengers else '-'})")
    ax.legend(fontsize=7)
    return _svg(fig)


def _timeline(data: dict) -> str:
    import matplotlib.pyplot as plt

    alerts = data["overall"]["drift_events"]
    fig, ax = plt.subplots(figsize=(9, 0.4 * max(4, len({_alert_row(a) for a in alerts}))))
    rows = sorted({_alert_row(a) for a in alerts})
    for a in alerts:
        firing = a["status"] == "firing"
        ax.scatter([_when(a["window_start_ms"] or a["time_ms"])], [rows.index(_alert_row(a))],
                   color="crimson" if firing else "seagreen", marker="D" if firing else "o",
                   s=30)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(f"drift and alert timeline ({len(alerts)} alerts; red: firing, "
                 "green: resolved)")
    if not rows:
        ax.text(0.5, 0.5, "no alerts", ha="center", transform=ax.transAxes)
    return _svg(fig)


def _alert_row(a: dict) -> str:
    return (f"{a['challenger']} {a['detector']} {a['metric']} {a['arm'] or ''} "
            f"{a['segment'] or '(all)'}")


def _segments(data: dict) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in data["by"]["clinic"]["arms"] if r["segment"]]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    labels = [f"{r['challenger']}\n{r['segment']}" for r in rows]
    x = np.arange(len(rows))
    for offset, arm, color in ((-0.2, "primary", "black"), (0.2, "challenger_arm", "tab:blue")):
        acc = [r[arm].get("accuracy") or 0.0 for r in rows]
        ci = [r[arm].get("accuracy_ci95") or [a, a] for r, a in zip(rows, acc, strict=True)]
        err = [[a - c[0] for a, c in zip(acc, ci, strict=True)],
               [c[1] - a for a, c in zip(acc, ci, strict=True)]]
        ax.bar(x + offset, acc, 0.4, yerr=err, capsize=3, color=color, alpha=0.75,
               label=arm.replace("_arm", ""))
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("accuracy per clinic, whole run (95 % intervals)")
    ax.legend(fontsize=7)
    return _svg(fig)


def write_report(data: dict[str, Any], path: Path) -> Path:
    """Write the self-contained HTML report and return its path."""
    import matplotlib

    from shadowpipe.processors.verdict.render import html_section

    matplotlib.use("svg")
    figures = [
        ("Agreement and accuracy over time, all traffic", _over_time(data, "", "all traffic")),
        ("Agreement and accuracy over time, clinic east",
         _over_time(data, "clinic=east", "clinic east")),
        ("Per-segment comparison", _segments(data)),
        ("Latency", _latency(data)),
        ("Coverage", _coverage(data)),
        ("Drift and alert timeline", _timeline(data)),
    ]
    body = "\n".join(f'<section class="plot"><h2>{html.escape(t)}</h2>{svg}</section>'
                     for t, svg in figures)
    table = _arms_table(data["overall"]["arms"])
    run = data["run"]
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>shadowpipe demo report {html.escape(run['id'])}</title>
<style>body{{font-family:sans-serif;max-width:1000px;margin:auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:2px 6px;font-size:12px}}
</style></head><body>
<h1>shadowpipe demo report</h1>
<p>Run {html.escape(run['id'])}: {run['events']} requests, seed {run['seed']}, generated
{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}. ClickHouse database
<code>{html.escape(run['database'])}</code>. Clinic <b>east</b> changed scanner firmware halfway
through (worst_* measurements +30 %).</p>
{html_section(data["verdicts"])}
{table}
{body}
</body></html>"""
    path.write_text(page)
    return path


def _arms_table(arms: list[dict]) -> str:
    def fmt(value: Any, ci: Any = None) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")

    rows = "".join(
        f"<tr><td>{html.escape(r['challenger'])}</td><td>{r['coverage']['published']}</td>"
        f"<td>{r['coverage']['labelled']}</td><td>{fmt(r['agreement'], r['agreement_ci95'])}</td>"
        f"<td>{fmt(r['primary'].get('accuracy'), r['primary'].get('accuracy_ci95'))}</td>"
        f"<td>{fmt(r['challenger_arm'].get('accuracy'), r['challenger_arm'].get('accuracy_ci95'))}"
        f"</td></tr>" for r in arms)
    return ("<table><tr><th>challenger</th><th>published</th><th>labelled</th><th>agreement"
            "</th><th>primary accuracy</th><th>challenger accuracy</th></tr>" + rows + "</table>")
