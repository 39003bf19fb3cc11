"""What the report shows: gathered through the read side, shaped by pure helpers.

:func:`gather` asks for the verdict exactly as ``shadowpipe verdict`` does
(:func:`shadowpipe.processors.verdict.commands.request`: the running monitor's endpoint, or
an evaluation here), then runs the report's named queries of
:mod:`shadowpipe.processors.read` over the look-back window. The verdict judges every
stored record (as ``shadowpipe verdict`` does); the other sections cover ``--since``.

The result is one JSON-able dict; every section is present, empty when there is no data,
so the page can say so instead of drawing an empty plot.

>>> funnel_stages({"published": 10, "scored": 9, "joined": 9, "labelled": 5, "mature": 4})
[('published', 10), ('scored', 9), ('joined', 9), ('labelled', 5), ('mature', 4)]
"""

from __future__ import annotations

import time
from typing import Any

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors import read
from shadowpipe.processors.monitor.stats import mean_ci, wilson
from shadowpipe.tables import database

STAGES = ("published", "scored", "joined", "labelled", "mature")
DEFAULT_SINCE_S = 7 * 86400


def gather(settings: Settings, challenger: str = "", since_s: int = DEFAULT_SINCE_S,
           by: tuple[str, ...] | None = None, now_ms: int | None = None) -> dict[str, Any]:
    """Everything the report shows; :class:`ConfigError` naming ``--challenger`` when no
    record of that challenger is stored."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    by = settings.segments if by is None else tuple(by)
    verdicts = verdict_docs(settings, challenger)  # first: a direct evaluation migrates
    base = {"since_ms": now_ms - since_s * 1000, "challenger": challenger, "by": ""}

    def rows(name: str, **params: Any) -> list[dict[str, Any]]:
        return read.rows(read.fetch(settings, name, {**base, **params}))

    known = {r["challenger"]: r for r in rows("challengers")}
    if challenger and challenger not in known:
        raise ConfigError("--challenger", f"{challenger!r} has no stored records in database "
                          f"{database(settings)} (known: {', '.join(known) or 'none'})")
    orphans = rows("orphans")
    overall = read.report(rows("arm_counts"), orphans, [])["arms"]
    names = [r["challenger"] for r in overall]
    cutoffs = {v["challenger"]: mature_cutoff(v) for v in verdicts}
    return {
        "generated_ms": now_ms, "database": database(settings), "since_s": since_s,
        "since_ms": base["since_ms"], "challenger": challenger, "by": list(by),
        "verdicts": verdicts, "challengers": names, "known": sorted(known),
        "overall": overall,
        "over_time": over_time(rows("over_time")),
        "segments": {attr: worst_first([r for r in read.report(
            rows("arm_counts", by=attr), [], [])["arms"] if r["segment"]]) for attr in by},
        "funnel": {name: {**_one(rows("funnel", challenger=name,
                                      mature_ms=cutoffs.get(name) or 0)),
                          "mature_cutoff_ms": cutoffs.get(name),
                          "orphaned": sum(o["orphans"] for o in orphans
                                          if o["challenger"] == name)}
                   for name in names},
        "label_delays": delay_curves(rows("label_delays")),
        "maturity_ms": {v["challenger"]: v.get("maturity_ms") for v in verdicts},
        "latency": histograms(rows("latency")),
        "slo_ms": _slo_ms(settings, names),
        "alerts": rows("alert_timeline"),
        "disagreements": _by_challenger(rows("disagreements")),
        "marks": [],
    }


def verdict_docs(settings: Settings, challenger: str) -> list[dict[str, Any]]:
    """The verdict documents ``shadowpipe verdict --format json`` prints for the same
    settings (one per challenger)."""
    from shadowpipe.processors.verdict.commands import request

    reply = request(settings, "verdict", challenger)
    return [reply] if challenger else reply["verdicts"]


def mature_cutoff(verdict: dict[str, Any]) -> int | None:
    """The latest mature event time (ms) under the verdict's maturity horizon, None while
    the horizon is unknown.

    >>> mature_cutoff({"data_clock_ms": 10_000, "maturity_ms": 2500.5})
    7499
    >>> mature_cutoff({"data_clock_ms": 10_000, "maturity_ms": None}) is None
    True
    """
    clock, horizon = verdict.get("data_clock_ms"), verdict.get("maturity_ms")
    if clock is None or horizon is None:
        return None
    return int(clock - horizon)


def _one(found: list[dict[str, Any]]) -> dict[str, Any]:
    # Empty only if the challenger's records expired (TTL) since the overall query ran.
    return found[0] if found else {**{s: 0 for s in STAGES}, "errors": 0, "timeouts": 0,
                                   "labels": 0, "human_labels": 0}


def _slo_ms(settings: Settings, names: list[str]) -> dict[str, float]:
    """Each challenger's latency SLO under the verdict policy."""
    from shadowpipe.processors.verdict.policy import Policy

    policy = Policy.from_settings(settings)
    return {name: policy.for_challenger(name).limits.latency_slo_ms for name in names}


def _by_challenger(found: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in found:
        out.setdefault(row["challenger"], []).append(row)
    return out


def funnel_stages(row: dict[str, Any]) -> list[tuple[str, int]]:
    """The funnel's stages in order, each within the previous one."""
    return [(stage, int(row.get(stage) or 0)) for stage in STAGES]


def rate(hits: int, n: int) -> dict[str, float] | None:
    """A proportion with its Wilson 95 % interval; None without observations.

    >>> r = rate(90, 100)
    >>> r["value"], round(r["lo"], 3), round(r["hi"], 3)
    (0.9, 0.826, 0.945)
    >>> rate(0, 0) is None
    True
    """
    interval = wilson(hits, n)
    if interval is None:
        return None
    return {"value": hits / n, "lo": interval[0], "hi": interval[1], "n": n}


def mean(value: float | None, sd: float | None, n: int) -> dict[str, float] | None:
    """A mean (MAE) with its normal 95 % interval; None without two observations.

    >>> m = mean(2.0, 1.0, 100)
    >>> m["value"], round(m["lo"], 3), round(m["hi"], 3)
    (2.0, 1.804, 2.196)
    """
    interval = mean_ci(value, sd, n) if value is not None and sd is not None else None
    if interval is None:
        return None
    return {"value": value, "lo": interval[0], "hi": interval[1], "n": n}


def over_time(found: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per challenger, one point per event-time bucket: agreement and each arm's accuracy
    (or MAE, for values), each with its 95 % interval (None where the bucket has none).

    >>> row = {"challenger": "c", "bucket_ms": 0, "width_ms": 60000, "compared": 10,
    ...        "agreed": 9, "primary_labelled": 4, "primary_correct": 4,
    ...        "challenger_labelled": 4, "challenger_correct": 2, "primary_regressed": 0,
    ...        "challenger_regressed": 0}
    >>> p = over_time([row])["c"][0]
    >>> p["t_ms"], p["agreement"]["value"], p["challenger"]["value"], p["metric"]
    (30000, 0.9, 0.5, 'accuracy')
    """
    out: dict[str, list[dict[str, Any]]] = {}
    for r in found:
        labelled = r["primary_labelled"] or r["challenger_labelled"]
        point: dict[str, Any] = {"t_ms": r["bucket_ms"] + r["width_ms"] // 2,
                                 "agreement": rate(r["agreed"], r["compared"]),
                                 "metric": "accuracy" if labelled else "mae"}
        for arm in ("primary", "challenger"):
            point[arm] = (rate(r[f"{arm}_correct"], r[f"{arm}_labelled"]) if labelled else
                          mean(r.get(f"{arm}_mae"), r.get(f"{arm}_mae_sd"),
                               r[f"{arm}_regressed"]))
        out.setdefault(r["challenger"], []).append(point)
    return out


def harm(row: dict[str, Any]) -> float | None:
    """How much worse the challenger is in a compare row (accuracy lost, MAE gained);
    None without a labelled pair.

    >>> harm({"difference": {"metric": "accuracy", "estimate": -0.05}})
    0.05
    >>> harm({"difference": {"metric": "mae", "estimate": 0.2}}), harm({"difference": None})
    (0.2, None)
    """
    d = row.get("difference")
    if not d:
        return None
    return -d["estimate"] if d["metric"] == "accuracy" else d["estimate"]


def worst_first(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Segment rows ordered by :func:`harm`, the worst first; rows without pairs last.

    >>> rows = [{"segment": s, "difference": d} for s, d in (
    ...     ("a", {"metric": "accuracy", "estimate": 0.01}), ("b", None),
    ...     ("c", {"metric": "accuracy", "estimate": -0.04}))]
    >>> [r["segment"] for r in worst_first(rows)]
    ['c', 'a', 'b']
    """
    return sorted(found, key=lambda r: (harm(r) is None, -(harm(r) or 0.0), r["segment"]))


def delay_curves(found: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per challenger, the cumulative share of labels that arrived within each delay: the
    upper edge of each quarter-octave bin (ms) and the share at it.

    >>> c = delay_curves([{"challenger": "c", "bin": 40, "labels": 1},
    ...                   {"challenger": "c", "bin": 44, "labels": 3}])["c"]
    >>> c["edges_ms"], c["share"], c["labels"]
    ([1218.0, 2435.0], [0.25, 1.0], 4)
    """
    out: dict[str, dict[str, Any]] = {}
    for r in found:
        curve = out.setdefault(r["challenger"], {"edges_ms": [], "counts": [], "labels": 0})
        curve["edges_ms"].append(round(2 ** ((r["bin"] + 1) / 4)))
        curve["counts"].append(r["labels"])
        curve["labels"] += r["labels"]
    for curve in out.values():
        running, share = 0, []
        for count in curve.pop("counts"):
            running += count
            share.append(running / curve["labels"])
        curve["share"] = share
        curve["edges_ms"] = [float(e) for e in curve["edges_ms"]]
    return out


def histograms(found: list[dict[str, Any]]) -> dict[str, dict[str, list[list[float]]]]:
    """Per challenger and arm, ``[lower ms, upper ms, records]`` per quarter-octave bin,
    contiguous from the first to the last non-empty bin.

    >>> histograms([{"challenger": "c", "arm": "primary", "bin": 4, "records": 7},
    ...             {"challenger": "c", "arm": "primary", "bin": 6, "records": 1}])
    {'c': {'primary': [[2.0, 2.378, 7], [2.378, 2.828, 0], [2.828, 3.364, 1]]}}
    """
    counts: dict[tuple[str, str], dict[int, int]] = {}
    for r in found:
        counts.setdefault((r["challenger"], r["arm"]), {})[r["bin"]] = r["records"]
    out: dict[str, dict[str, list[list[float]]]] = {}
    for (challenger, arm), bins in counts.items():
        out.setdefault(challenger, {})[arm] = [
            [round(2 ** (k / 4), 3), round(2 ** ((k + 1) / 4), 3), bins.get(k, 0)]
            for k in range(min(bins), max(bins) + 1)]
    return out
