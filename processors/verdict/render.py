"""Verdicts for people: terminal tables (``shadowpipe verdict``, the demo summary) and an
HTML section (the demo report), all from the verdict JSON (``Verdict.to_dict()``).

>>> v = {"challenger": "gbm-v2", "verdict": "REJECT", "reasons": ["worse in clinic=east"],
...      "latched": False}
>>> headline(v)
'gbm-v2: REJECT (worse in clinic=east)'
"""

from __future__ import annotations

import html
import sys
import time
from typing import Any

STYLE = {"PROMOTE": "bold green", "HOLD": "bold yellow", "INCONCLUSIVE": "bold magenta",
         "REJECT": "bold red"}
COLOR = {"PROMOTE": "#1a7f37", "HOLD": "#9a6700", "INCONCLUSIVE": "#8250df",
         "REJECT": "#cf222e"}


def headline(v: dict[str, Any]) -> str:
    """``challenger: VERDICT (first reason)``."""
    reason = f" ({v['reasons'][0]})" if v.get("reasons") else ""
    return f"{v['challenger']}: {v['verdict']}{reason}"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _interval(c: dict[str, Any]) -> str:
    if c.get("estimate") is None:
        return "-"
    if c.get("lo") is None or c.get("hi") is None:
        return _num(c["estimate"])
    return f"{_num(c['estimate'])} [{_num(c['lo'])}, {_num(c['hi'])}]"


def _eta(c: dict[str, Any]) -> str:
    if c.get("eta_pairs") is None:
        return "-"
    text = f"{c['eta_pairs']} pairs"
    seconds = c.get("eta_seconds")
    if seconds is not None:
        text += f", ~{_duration(seconds)}"
    return text


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def notes(v: dict[str, Any]) -> list[str]:
    """Informational criteria as sentences (the control's noise floor among them).

    >>> notes({"criteria": [{"name": "excess_disagreement", "kind": "info", "note": "n",
    ...                      "estimate": 0.08, "lo": 0.07, "hi": 0.09}]})
    ['excess_disagreement 0.08 [0.07, 0.09]: n']
    """
    return [f"{c['name']} {_interval(c)}: {c['note']}" for c in v.get("criteria", [])
            if c.get("kind") == "info" and c.get("note")]


def criteria_rows(v: dict[str, Any]) -> list[list[str]]:
    """One row per criterion: name, kind, estimate [lo, hi], margin/limit, pairs, decision, ETA."""
    return [[c["name"], c["kind"], _interval(c), _num(c.get("margin")), str(c.get("pairs", 0)),
             c["decision"], _eta(c)] for c in v.get("criteria", [])]


CRITERIA_COLUMNS = ("criterion", "kind", "estimate [confidence sequence]", "margin / limit",
                    "pairs", "decision", "ETA")


def print_verdicts(verdicts: list[dict[str, Any]], console: Any = None) -> None:
    """Each verdict: the decision and its reasons first, then criteria, gates, segments."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    if not verdicts:
        console.print("no challenger has joined records yet: INCONCLUSIVE")
    for v in verdicts:
        latched = " (latched)" if v.get("latched") else ""
        console.print(f"[{STYLE.get(v['verdict'], 'bold')}]{v['challenger']}: "
                      f"{v['verdict']}{latched}[/]")
        for reason in v.get("reasons", []):
            console.print(f"  - {reason}", markup=False, highlight=False)
        for line in notes(v):
            console.print(f"  {line}", markup=False, highlight=False)
        if v.get("criteria"):
            table = Table(show_edge=False, pad_edge=False)
            for col in CRITERIA_COLUMNS:
                table.add_column(col)
            for row in criteria_rows(v):
                table.add_row(*row)
            console.print(table)
        gates = [f"{g['name']} {'ok' if g['passed'] else 'not yet'}" for g in v.get("gates", [])]
        if gates:
            console.print("  gates: " + ", ".join(gates), highlight=False)
        if v.get("suspects"):
            console.print("  suspect segments: " + ", ".join(v["suspects"]), highlight=False)
        for warning in v.get("warnings", []):
            console.print(f"  warning: {warning}", markup=False, highlight=False)
        console.print("")


def html_section(verdicts: list[dict[str, Any]]) -> str:
    """The verdicts as an HTML ``<section>`` (escaped; inline colours, no script)."""
    e = html.escape
    parts = ['<section class="verdict"><h2>Verdict</h2>']
    if not verdicts:
        parts.append("<p>No challenger has joined records yet: INCONCLUSIVE.</p>")
    for v in verdicts:
        color = COLOR.get(v["verdict"], "#000")
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(v.get("time_ms", 0) / 1000))
        latched = " (latched)" if v.get("latched") else ""
        parts.append(f'<h3>{e(v["challenger"])}: <span style="color:{color}">'
                     f'{e(v["verdict"])}</span>{latched} <small>{e(when)}</small></h3>')
        parts.append("<ul>" + "".join(f"<li>{e(r)}</li>" for r in v.get("reasons", []))
                     + "</ul>")
        parts.extend(f"<p>{e(line)}</p>" for line in notes(v))
        rows = criteria_rows(v)
        if rows:
            head = "".join(f"<th>{e(c)}</th>" for c in CRITERIA_COLUMNS)
            body = "".join("<tr>" + "".join(f"<td>{e(x)}</td>" for x in row) + "</tr>"
                           for row in rows)
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        if v.get("suspects"):
            parts.append(f"<p>Suspect segments: {e(', '.join(v['suspects']))}</p>")
        for warning in v.get("warnings", []):
            parts.append(f"<p>Warning: {e(warning)}</p>")
    parts.append("</section>")
    return "\n".join(parts)
