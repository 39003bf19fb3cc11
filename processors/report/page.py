"""The report as one self-contained HTML page: inline CSS and SVG, no script, nothing
fetched. The verdict comes first (the same HTML as the verdict's own renderer, from the
same documents ``shadowpipe verdict --format json`` prints), then one ``<section>`` per
view; a view without data says why instead of drawing an empty plot.

>>> missing("no labelled pairs yet")
'<p class="missing">no labelled pairs yet</p>'
>>> fmt_rate({"value": 0.9, "lo": 0.85, "hi": 0.95}), fmt_rate(None)
('0.900 [0.850, 0.950]', '-')
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

from shadowpipe.processors.report import figures
from shadowpipe.processors.report.data import funnel_stages, harm

e = html.escape
STYLE = """body{font-family:sans-serif;max-width:1050px;margin:auto;padding:0 12px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccc;padding:2px 6px;
font-size:12px;vertical-align:top}th{background:#f4f4f4}.missing{color:#8250df;
font-style:italic}.features{font-family:monospace;font-size:11px;color:#333}
section{margin:18px 0}svg{max-width:100%;height:auto}small{color:#555}"""


def missing(text: str) -> str:
    """The sentence a section shows instead of a plot or table without data."""
    return f'<p class="missing">{e(text)}</p>'


def fmt_rate(x: dict[str, float] | None) -> str:
    """A value with its interval, 3 decimals; '-' when absent."""
    if not x:
        return "-"
    return f"{x['value']:.3f} [{x['lo']:.3f}, {x['hi']:.3f}]"


def _utc(ms: float | None) -> str:
    if ms is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ms / 1000))


def _table(columns: list[str], rows: list[list[str]]) -> str:
    """An HTML table of escaped cells."""
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _section(sid: str, title: str, *parts: str, plot: bool = False) -> str:
    cls = "plot" if plot else "view"
    return f'<section class="{cls}" id="{e(sid)}"><h2>{e(title)}</h2>{"".join(parts)}</section>'


def _plot_or(svg: str | None, why: str) -> str:
    return svg if svg is not None else missing(why)


def header(data: dict[str, Any]) -> str:
    names = ", ".join(data["challengers"]) or "none"
    notes = "".join(f"<p>{e(n)}</p>" for n in data.get("notes", []))
    return (f"<h1>shadowpipe report</h1><p>Database <code>{e(data['database'])}</code>, "
            f"challengers in the window: {e(names)}. Window: event times since "
            f"{_utc(data['since_ms'])}; generated {_utc(data['generated_ms'])}. The verdict "
            f"judges every stored record, as <code>shadowpipe verdict</code> does.</p>{notes}")


def verdict(data: dict[str, Any]) -> str:
    from shadowpipe.processors.verdict.render import html_section

    return html_section(data["verdicts"])


def fmt_diff(d: dict[str, Any] | None) -> str:
    """A compare difference: metric, estimate, interval, ``*`` while not yet reliable."""
    if not d:
        return "-"
    lo, hi = d["interval"] or (None, None)
    interval = f" [{lo + 0.0:+.4f}, {hi + 0.0:+.4f}]" if lo is not None else ""
    # + 0.0: an estimate of -0.0 (no discordant pair) reads as 0
    return f"{d['metric']} {d['estimate'] + 0.0:+.4f}{interval}" + (
        "" if d["reliable"] else " *")


def _arm(a: dict[str, Any]) -> str:
    if "accuracy" in a:
        lo, hi = a["accuracy_ci95"]
        return f"accuracy {a['accuracy']:.3f} [{lo:.3f}, {hi:.3f}]"
    if "mae" in a and a.get("mae_ci95"):
        lo, hi = a["mae_ci95"]
        return f"MAE {a['mae']:.4g} [{lo:.4g}, {hi:.4g}]"
    return "-"


def summary(data: dict[str, Any]) -> str:
    rows = [[r["challenger"], str(r["coverage"]["published"]), str(r["coverage"]["labelled"]),
             _agreement(r), _arm(r["primary"]), _arm(r["challenger_arm"]),
             fmt_diff(r["difference"])]
            for r in data["overall"]]
    body = _table(["challenger", "published", "labelled", "agreement", "primary",
                   "challenger", "challenger - primary (anytime-valid 95 %)"], rows) if rows \
        else missing("no joined records in the window")
    note = "<p><small>* fewer than 1,000 pairs or 10 discordant pairs: not yet reliable." \
           "</small></p>" if rows else ""
    return _section("summary", "Both arms over the window", body, note)


def _agreement(r: dict[str, Any]) -> str:
    if r["agreement"] is None:
        return "-"
    lo, hi = r["agreement_ci95"]
    return f"{r['agreement']:.3f} [{lo:.3f}, {hi:.3f}]"


def over_time(data: dict[str, Any]) -> str:
    svg = figures.over_time(data["over_time"], data["marks"], data["alerts"])
    labelled = any(p["primary"] or p["challenger"] for points in data["over_time"].values()
                   for p in points)
    parts = [_plot_or(svg, "no joined records in the window")]
    if svg is not None and not labelled:
        parts.append(missing("no labelled pairs yet: only the agreement is drawn"))
    return _section("over-time", "Accuracy or error, and agreement, over time", *parts,
                    plot=svg is not None)


def segments(data: dict[str, Any]) -> str:
    if not data["by"]:
        return _section("segments", "Per-segment differences",
                        missing("no segment attribute: pass --by ATTR or configure "
                                "SHADOWPIPE_SEGMENTS"))
    parts = []
    for attr, rows in data["segments"].items():
        svg = figures.segments(rows, attr)
        parts.append(f"<h3>by {e(attr)}</h3>")
        if not rows or all(r["segment"] == "(none)" for r in rows):
            parts.append(missing(f"no record carries the context attribute {attr!r}"))
            continue
        parts.append(_plot_or(svg, f"no labelled pairs yet in any {attr} segment"))
        parts.append(_table(["challenger", attr, "pairs", "challenger - primary",
                             "worse by"], [
            [r["challenger"], r["segment"],
             str(r["difference"]["pairs"]) if r["difference"] else "0",
             fmt_diff(r["difference"]), "-" if harm(r) is None else f"{harm(r):+.4f}"]
            for r in rows]))
    return _section("segments", "Per-segment differences (worst first)", *parts,
                    plot=any("<svg" in p for p in parts))


def funnel(data: dict[str, Any]) -> str:
    funnels = data["funnel"]
    svg = figures.funnel(funnels)
    rows = []
    for name, f in funnels.items():
        stages = dict(funnel_stages(f))
        cutoff = f["mature_cutoff_ms"]
        rows.append([name, *(str(v) for v in stages.values()), str(f["errors"]),
                     str(f["timeouts"]), str(f["orphaned"]),
                     _utc(cutoff) if cutoff is not None else "horizon not known yet"])
    parts = [_plot_or(svg, "no joined records in the window")]
    if rows:
        parts.append(_table(["challenger", "published", "scored", "joined", "labelled",
                             "mature", "errors", "timeouts", "orphaned",
                             "mature: event time up to"], rows))
    parts.append(human_labels(data))
    return _section("funnel", "Coverage funnel", *parts, plot=svg is not None)


def human_labels(data: dict[str, Any]) -> str:
    """How many labels came from human review (``feedback_source = 'human'``)."""
    counts = [(name, f["human_labels"], f["labels"]) for name, f in data["funnel"].items()]
    if not any(total for _, _, total in counts):
        return '<p id="human-labels">' + missing("no labels yet, from review or otherwise") \
            + "</p>"
    text = "; ".join(f"{name}: {human} of {total} labels"
                     + (f" ({100 * human / total:.1f} %)" if total else "")
                     for name, human, total in counts)
    return f'<p id="human-labels">Labels from human review: {e(text)}.</p>'


def label_delays(data: dict[str, Any]) -> str:
    svg = figures.label_delays(data["label_delays"], data["maturity_ms"])
    rows = [[name, "-" if h is None else f"{h / 1000:.0f} s"]
            for name, h in data["maturity_ms"].items()]
    parts = [_plot_or(svg, "no labels yet: no label delay to draw")]
    if rows:
        parts.append(_table(["challenger", "maturity horizon (verdict)"], rows))
    return _section("label-delay", "Label delay and the maturity horizon", *parts,
                    plot=svg is not None)


def alerts(data: dict[str, Any]) -> str:
    found = data["alerts"]
    svg = figures.alerts(found, data["marks"])
    parts = [_plot_or(svg, "no drift events or alerts in the window")]
    if found:
        parts.append(_table(["at", "status", "challenger", "detector", "metric", "arm",
                             "segment", "value", "threshold", "severity"], [
            [_utc(a["at_ms"]), a["status"], a["challenger"], a["detector"], a["metric"],
             a["arm"] or "", a["segment"] or "(all)", f"{a['value']:.4g}",
             "-" if a["threshold"] is None else f"{a['threshold']:.4g}", a["severity"]]
            for a in found[-50:]]))
        if len(found) > 50:
            parts.append(f"<p><small>the last 50 of {len(found)} shown</small></p>")
    return _section("alerts", "Drift and alert timeline", *parts, plot=svg is not None)


def latency(data: dict[str, Any]) -> str:
    svg = figures.latency(data["latency"], data["slo_ms"])
    return _section("latency", "Latency against the SLO",
                    _plot_or(svg, "no latency measured in the window"), plot=svg is not None)


def _features(row: dict[str, Any]) -> str:
    items = [f"{k}={v:.4g}" for k, v in sorted(row["num_features"].items())]
    items += [f"{k}={v}" for k, v in sorted(row["cat_features"].items())]
    items += [f"{k}=null" for k in row["null_features"]]
    return ", ".join(items) or "(none)"


def _output(label: Any, p: float | None, value: float | None) -> str:
    if label is not None:
        return f"{label}" + ("" if p is None else f" ({p:.2f})")
    return "-" if value is None else f"{value:.4g}"


DISAGREEMENT_COLUMNS = ("challenger", "request", "event time", "context", "primary (top p)",
                        "challenger (top p)", "label", "right", "label source")


def _disagreement(name: str, r: dict[str, Any]) -> str:
    """Two table rows: the request, then its features across the whole width."""
    truth = r["label"] if r["label"] is not None else r["label_value"]
    cells = [name, r["request_id"], _utc(r["event_time_ms"]),
             ", ".join(f"{k}={v}" for k, v in sorted(r["context"].items())),
             _output(r["primary_label"], r["primary_top_p"], r["primary_value"]),
             _output(r["shadow_label"], r["shadow_top_p"], r["shadow_value"]),
             "-" if truth is None else str(truth), r["right_arm"] or "-",
             r["feedback_source"] or "-"]
    return ("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>"
            f'<tr><td colspan="{len(cells)}" class="features">features: '
            f"{e(_features(r))}</td></tr>")


def disagreements(data: dict[str, Any]) -> str:
    found = [_disagreement(name, r) for name, rows in data["disagreements"].items()
             for r in rows]
    agreeing = [name for name in data["challengers"] if not data["disagreements"].get(name)]
    parts = ["<p><small>Up to 20 per challenger: labelled ones first (they decide the paired "
             "difference), then the largest distance between the arms.</small></p>"]
    if agreeing:
        parts.append(missing("no disagreement with the primary in the window: "
                             + ", ".join(agreeing)))
    elif not found:
        parts.append(missing("no disagreement between the arms in the window"))
    if found:
        head = "".join(f"<th>{e(c)}</th>" for c in DISAGREEMENT_COLUMNS)
        parts.append(f"<table><tr>{head}</tr>{''.join(found)}</table>")
    return _section("disagreements", "The most informative disagreements", *parts)


def render(data: dict[str, Any]) -> str:
    """The whole page."""
    parts = [header(data), verdict(data), summary(data), over_time(data), segments(data),
             funnel(data), label_delays(data), alerts(data), latency(data),
             disagreements(data)]
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>shadowpipe report "
            f"{e(data['database'])}</title><style>{STYLE}</style></head><body>"
            + "\n".join(parts) + "</body></html>")


def write(data: dict[str, Any], path: Path) -> Path:
    """Render and write the page (to a temporary name first: no half-written report)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render(data), encoding="utf-8")
    tmp.replace(path)
    return path
