"""The report's plots as inline SVG (matplotlib, no pyplot state, no files, no fonts
fetched): each function takes a section of :func:`.data.gather`'s dict and returns the
``<svg>`` element, or None when there is nothing to draw (the page then says so).

>>> svg = funnel({"c": {"published": 10, "scored": 9, "joined": 9, "labelled": 5,
...                     "mature": 4}})
>>> svg.startswith("<svg") and "</svg>" in svg
True
>>> funnel({}) is None
True
"""

from __future__ import annotations

import datetime as dt
import io
from typing import Any

from shadowpipe.processors.report.data import funnel_stages, harm

ARM_COLORS = {"primary": "black", "challenger": "tab:blue", "agreement": "tab:orange"}
WIDTH = 9.0


def _figure(height: float, rows: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height * rows), layout="constrained")
    axes = fig.subplots(rows, 1, squeeze=False)[:, 0]
    return fig, list(axes)


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def when(ms: float) -> dt.datetime:
    """Epoch milliseconds as a UTC datetime (the x axis of time plots).

    >>> when(0).isoformat()
    '1970-01-01T00:00:00+00:00'
    """
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def _marks(ax: Any, marks: list[dict[str, Any]]) -> None:
    for mark in marks:
        ax.axvline(when(mark["t_ms"]), color="black", ls="--", lw=1.2)
        ax.text(when(mark["t_ms"]), 0.02, " " + mark["label"], fontsize=7,
                transform=ax.get_xaxis_transform())


def _band(ax: Any, points: list[dict[str, Any]], key: str, label: str, style: str) -> bool:
    shown = [(when(p["t_ms"]), p[key]) for p in points if p[key] is not None]
    if not shown:
        return False
    xs = [x for x, _ in shown]
    color = ARM_COLORS[key]
    ax.plot(xs, [v["value"] for _, v in shown], style, color=color, lw=1.5, label=label)
    ax.fill_between(xs, [v["lo"] for _, v in shown], [v["hi"] for _, v in shown],
                    color=color, alpha=0.15, lw=0)
    return True


def over_time(series: dict[str, list[dict[str, Any]]], marks: list[dict[str, Any]],
              alerts: list[dict[str, Any]]) -> str | None:
    """Per challenger: each arm's accuracy (or MAE) and the agreement per event-time bucket
    with 95 % bands; firing alerts as red lines, ``marks`` dashed."""
    names = [n for n, points in series.items() if points]
    if not names:
        return None
    fig, axes = _figure(2.6, len(names))
    for ax, name in zip(axes, names, strict=True):
        points = series[name]
        metric = "accuracy" if any(p["metric"] == "accuracy" for p in points) else "MAE"
        drawn = [_band(ax, points, "primary", f"primary {metric}", "-"),
                 _band(ax, points, "challenger", f"{name} {metric}", "-")]
        if metric == "accuracy":
            drawn.append(_band(ax, points, "agreement", "agreement", ":"))
            ax.set_ylim(0, 1.02)
        for a in alerts:
            if a["status"] == "firing" and a["challenger"] == name:
                ax.axvline(when(a["at_ms"]), color="crimson", alpha=0.3, lw=1)
        _marks(ax, marks)
        ax.set_title(f"{name}: {metric} and agreement per event-time bucket (95 % bands; "
                     "red: firing alerts)", fontsize=9)
        if any(drawn):
            ax.legend(fontsize=7, loc="lower left")
    return _svg(fig)


def segments(rows: list[dict[str, Any]], attr: str) -> str | None:
    """Forest plot of the paired difference per segment value, worst on top: how much worse
    the challenger is (accuracy lost or MAE added) with its anytime-valid 95 % interval."""
    shown = [r for r in rows if harm(r) is not None]
    if not shown:
        return None
    fig, (ax,) = _figure(0.45 * len(shown) + 1.2)
    ys = list(range(len(shown)))[::-1]
    for y, r in zip(ys, shown, strict=True):
        d = r["difference"]
        lo, hi = d["interval"] if d["interval"] else (d["estimate"], d["estimate"])
        if d["metric"] == "accuracy":  # accuracy gained -> accuracy lost
            lo, hi = -hi, -lo
        worse = lo > 0
        ax.plot([lo, hi], [y, y], color="crimson" if worse else "tab:blue", lw=2)
        ax.plot([harm(r)], [y], "o", color="crimson" if worse else "tab:blue")
    ax.axvline(0, color="black", lw=1)
    ax.set_yticks(ys, [f"{r['challenger']}  {r['segment']}  ({r['difference']['metric']}, "
                       f"{r['difference']['pairs']} pairs)" for r in shown], fontsize=7)
    ax.set_xlabel("challenger worse by (accuracy lost, or MAE added); left of 0: better",
                  fontsize=8)
    ax.set_title(f"paired difference per {attr}, worst first (red: worse with 95 % "
                 "confidence)", fontsize=9)
    return _svg(fig)


def funnel(funnels: dict[str, dict[str, Any]]) -> str | None:
    """Horizontal bars per stage (published -> mature), one group per challenger."""
    names = [n for n, f in funnels.items() if f.get("published")]
    if not names:
        return None
    fig, (ax,) = _figure(0.9 + 0.35 * 5 * len(names))
    labels, values = [], []
    for name in names:
        for stage, count in funnel_stages(funnels[name]):
            labels.append(f"{name}: {stage}")
            values.append(count)
    ys = list(range(len(values)))[::-1]
    ax.barh(ys, values, color="tab:blue", alpha=0.7)
    for y, v in zip(ys, values, strict=True):
        ax.text(v, y, f" {v}", va="center", fontsize=7)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.set_xlabel("requests", fontsize=8)
    ax.set_title("coverage funnel: each stage within the previous one", fontsize=9)
    return _svg(fig)


def label_delays(curves: dict[str, dict[str, Any]], maturity: dict[str, float | None]
                 ) -> str | None:
    """The share of labels that arrived within each delay (log axis), with each verdict's
    maturity horizon as a dashed line."""
    names = [n for n, c in curves.items() if c["labels"]]
    if not names:
        return None
    fig, (ax,) = _figure(3.0)
    for name in names:
        curve = curves[name]
        line, = ax.step([e / 1000 for e in curve["edges_ms"]], curve["share"], where="post",
                        label=f"{name} ({curve['labels']} labels)")
        if maturity.get(name):
            ax.axvline(maturity[name] / 1000, color=line.get_color(), ls="--", lw=1)
            ax.text(maturity[name] / 1000, 0.05, f" {name} horizon", fontsize=7,
                    color=line.get_color(), rotation=90)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("label delay (s, log scale)", fontsize=8)
    ax.set_ylabel("share of labels", fontsize=8)
    ax.set_title("label delay: share of the labels that arrived within a delay "
                 "(dashed: the verdict's maturity horizon)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    return _svg(fig)


def _alert_row(a: dict[str, Any]) -> str:
    return f"{a['challenger']} {a['detector']} {a['metric']} {a['arm'] or ''} " \
           f"{a['segment'] or '(all)'}"


def alerts(found: list[dict[str, Any]], marks: list[dict[str, Any]]) -> str | None:
    """One row per alert series (challenger, detector, metric, arm, segment): firing red
    diamonds, resolved green dots, at their window start."""
    if not found:
        return None
    rows = sorted({_alert_row(a) for a in found})
    fig, (ax,) = _figure(0.35 * len(rows) + 1.2)
    for a in found:
        firing = a["status"] == "firing"
        ax.scatter([when(a["at_ms"])], [rows.index(_alert_row(a))], s=30,
                   color="crimson" if firing else "seagreen", marker="D" if firing else "o")
    _marks(ax, marks)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(f"drift and alert timeline ({len(found)} alerts; red: firing, green: "
                 "resolved)", fontsize=9)
    return _svg(fig)


def latency(hists: dict[str, dict[str, list[list[float]]]], slo_ms: dict[str, float]
            ) -> str | None:
    """Per challenger, the primary's latency in the service and the challenger's model time
    per record (log axes), with the latency SLO of the verdict policy."""
    names = [n for n, arms in hists.items() if any(arms.values())]
    if not names:
        return None
    fig, axes = _figure(2.4, len(names))
    for ax, name in zip(axes, names, strict=True):
        for arm, label in (("primary", "primary latency (in the service)"),
                           ("challenger", f"{name} model time (per record)")):
            bins = hists[name].get(arm) or []
            if bins:
                ax.stairs([b[2] for b in bins], [bins[0][0]] + [b[1] for b in bins],
                          color=ARM_COLORS[arm], lw=1.5, label=label)
        if name in slo_ms:
            ax.axvline(slo_ms[name], color="crimson", ls="--", lw=1.2,
                       label=f"SLO {slo_ms[name]:g} ms")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)  # empty bins fall off the bottom instead of below it
        ax.set_xlabel("ms (log scale)", fontsize=8)
        ax.set_ylabel("records", fontsize=8)
        ax.set_title(f"{name}: latency distributions against the SLO", fontsize=9)
        ax.legend(fontsize=7)
    return _svg(fig)
