"""The monitor's logic: JoinedRecords in, window rows and alerts out. No Kafka, no I/O.

**Facts, counted once.** A JoinedRecord can carry up to three *facts* about its
(request, challenger) pair: ``PRED`` (both outputs known: coverage, agreement, latency;
timed by ``event_time``), ``LABEL`` (the label is known: per-arm accuracy or error; timed by
``label_time``, because labels arrive long after their window of predictions has closed)
and ``ORPHAN`` (timed by ``joined_at``, when the joiner gave up). The caller passes the bits
already counted for the pair (from :mod:`.dedup`); :meth:`Monitor.add` counts only the new
ones and returns the updated bits, so a redelivered or re-emitted record never counts twice,
and a ``labelled`` version after a ``predicted`` one adds only its label.

**Windows.** Tumbling event-time windows of ``window_s`` per challenger, overall (segment
``""``) and per ``attribute=value`` of each configured segment attribute. A fact updates one
*cell*: the accumulators of its (challenger, segment values, window); all accumulators are
additive, so a window row merges the cells it covers when it closes (one update per fact
instead of one per segment). The watermark is the
highest fact time seen; a window closes (its row is emitted) once the watermark reaches its
end + ``allowed_lateness_s``; a fact for a closed window is *dropped late* and counted in
``late_dropped`` of the overall window that holds the watermark. Lateness is judged per
record, so the rows do not depend on how records are batched.

**Detectors** (river): ADWIN on the disagreement indicator (1 = the arms disagree) and
ADWIN on each arm's error indicator (1 = wrong), per challenger and segment; an alert is
raised only when the detected change is an *increase* (ADWIN also detects improvements).
PSI of each arm's score and of each ``drift_features`` value against a reference (the first
``PSI_REFERENCE`` values) at each window close. Alert ids are deterministic and cooldowns are
measured in event time, so a replay raises the same alerts.

>>> from shadowpipe.config import Settings
>>> m = Monitor(Settings.load(env={"SHADOWPIPE_SEGMENTS": "region"}))
>>> rec = {"request_id": "r1", "challenger": "c", "state": "predicted", "event_time": 0,
...        "joined_at": 0, "context": {"region": "eu"},
...        "primary_output": {"label": "a", "probabilities": {}, "value": None},
...        "shadow_output": {"label": "b", "probabilities": {}, "value": None}}
>>> bits = m.add(rec, 0)
>>> m.add(rec, bits) == bits   # a duplicate adds nothing
True
>>> rows, alerts = m.advance(10**9)   # far-future watermark closes the window
>>> [(r["segment"], r["published"], r["agreement"]) for r in rows]
[('', 1, 0.0), ('region=eu', 1, 0.0)]
"""

from __future__ import annotations

import bisect
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

from river import metrics
from river.drift import ADWIN
from shadowpipe.processors.monitor.stats import LogSketch, bucket, psi, quantile_edges

from shadowpipe.config import Settings

PRED, LABEL, ORPHAN = 1, 2, 4
ARMS = ("primary", "challenger")
LATENCIES = ("primary_latency", "model_time", "queue_lag")
MAX_SEGMENT_VALUES = 100  # per attribute; rarer values share "attr=(other)" to bound state
PSI_REFERENCE = 1000  # values in a PSI reference
PSI_MIN_WINDOW = 200  # a window needs this many values to be compared
CACHE_MAX = 100_000  # memoised segment names and detector references
LATENCY_FIELDS = (("primary_latency", "primary_latency_ms"), ("model_time", "model_time_ms"),
                  ("queue_lag", "queue_lag_ms"))
Record = dict[str, Any]


def facts_of(rec: Record) -> int:
    """The fact bits a record carries (see module doc)."""
    state = rec.get("state")
    if state == "predicted":
        return PRED
    if state == "labelled":
        return PRED | LABEL
    return ORPHAN


def pair_key(rec: Record) -> str:
    return f"{rec['request_id']}\x1f{rec['challenger']}"


def record_time(rec: Record) -> int:
    """Event time of the request, or when the joiner emitted it if unknown (ms)."""
    t = rec.get("event_time")
    return int(t if t is not None else rec["joined_at"])


def alert_id(kind: str, detector: str, metric: str, challenger: str, arm: str | None,
             segment: str | None, window_start: int | None) -> str:
    """Deterministic id of an alert: a replay of the same condition yields the same id.

    >>> alert_id("drift", "ADWIN", "error_rate", "c", "challenger", None, 0)[:12]
    'drift-26469c'
    """
    raw = "\x1f".join(str(p) for p in (kind, detector, metric, challenger, arm, segment,
                                        window_start))
    return f"{kind}-{hashlib.sha1(raw.encode()).hexdigest()[:20]}"


@dataclass(slots=True)
class Window:
    """Additive accumulators of one (challenger, segment, window_start)."""

    published: int = 0
    scored: int = 0
    joined: int = 0
    labelled: int = 0
    orphaned: int = 0
    errors: int = 0
    timeouts: int = 0
    late_dropped: int = 0
    agree_cm: dict[tuple[str, str], int] = field(default_factory=dict)
    prob_delta: list[float] = field(default_factory=lambda: [0.0, 0])
    value_delta: list[float] = field(default_factory=lambda: [0.0, 0])
    arm_cm: dict[str, dict[tuple[str, str], int]] = field(
        default_factory=lambda: {arm: {} for arm in ARMS})
    arm_reg: dict[str, list[float]] = field(
        default_factory=lambda: {arm: [0, 0.0, 0.0] for arm in ARMS})
    latency: dict[str, LogSketch] = field(
        default_factory=lambda: {name: LogSketch() for name in LATENCIES})
    psi_counts: dict[str, list[int]] = field(default_factory=dict)

    def merge(self, other: Window, psi: bool = True) -> None:
        """Add ``other``'s accumulators (a window row merges its cells)."""
        for name in ("published", "scored", "joined", "labelled", "orphaned", "errors",
                     "timeouts", "late_dropped"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        _add_counts(self.agree_cm, other.agree_cm)
        for mine, theirs in ((self.prob_delta, other.prob_delta),
                             (self.value_delta, other.value_delta),
                             *((self.arm_reg[a], other.arm_reg[a]) for a in ARMS)):
            for i, x in enumerate(theirs):
                mine[i] += x
        for arm in ARMS:
            _add_counts(self.arm_cm[arm], other.arm_cm[arm])
        for name in LATENCIES:
            self.latency[name].merge(other.latency[name])
        for metric, counts in other.psi_counts.items() if psi else ():
            mine_counts = self.psi_counts.setdefault(metric, [0] * len(counts))
            for i, n in enumerate(counts):
                mine_counts[i] += n


def _add_counts(into: dict, counts: dict) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n


@dataclass(slots=True)
class Detector:
    """A river ADWIN plus how many values it has seen; alerts only on increases."""

    adwin: Any
    seen: int = 0

    before: float = 0.0

    def update(self, x: float) -> tuple[float, float] | None:
        """Feed ``x``; on an upward change return (mean before, mean after)."""
        adwin = self.adwin
        self.seen += 1
        if self.seen % adwin.clock == 0:  # ADWIN only tests for change on its clock ticks
            self.before = adwin.estimation
        adwin.update(x)
        if adwin.drift_detected and adwin.estimation > self.before:
            return self.before, adwin.estimation
        return None


@dataclass(slots=True)
class PsiReference:
    values: list[float] = field(default_factory=list)
    edges: list[float] | None = None
    counts: list[int] | None = None


@dataclass
class MonitorState:
    """Everything that must survive a restart (pickled into the Redis checkpoint)."""

    # cells: (challenger, segments, window start) -> accumulators; segments = the
    # record's ``attr=value`` strings (empty for the late-drop counter of a window)
    windows: dict[tuple[str, tuple[str, ...], int], Window] = field(default_factory=dict)
    watermark: int = -(2**62)
    detectors: dict[tuple[str, str, str], Detector] = field(default_factory=dict)
    psi_refs: dict[tuple[str, str], PsiReference] = field(default_factory=dict)
    last_alert: dict[tuple, int] = field(default_factory=dict)
    segment_values: dict[str, set[str]] = field(default_factory=dict)


def _output_label(out: Record | None) -> str | None:
    return out.get("label") if out else None


def _output_value(out: Record | None) -> float | None:
    return out.get("value") if out else None


def _score(out: Record | None) -> float | None:
    """The arm's score: its top probability (classification) or its value (regression)."""
    if not out:
        return None
    probs = out.get("probabilities") or {}
    return max(probs.values()) if probs else out.get("value")


def _total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    total = 0.0
    for k, v in p.items():
        total += abs(v - q.get(k, 0.0))
    for k, v in q.items():
        if k not in p:
            total += abs(v)
    return 0.5 * total


class Monitor:
    """Windows, detectors and alerts over deduplicated facts (see module doc)."""

    def __init__(self, settings: Settings, state: MonitorState | None = None) -> None:
        self.settings = settings
        self.state = state or MonitorState()
        self.window_ms = settings.window_s * 1000
        self.lateness_ms = settings.allowed_lateness_s * 1000
        self.delta = 10.0 ** -settings.monitor_drift_delta_exp
        self.pending_alerts: list[Record] = []
        self._features = [(name, f"feature:{name}") for name in settings.drift_features]
        self._segment_cache: dict[tuple[str | None, ...], tuple[str, ...]] = {}
        self._detector_cache: dict[tuple[str, tuple[str, ...], str],
                                   list[tuple[str, Detector]]] = {}

    # -- facts -----------------------------------------------------------------------------

    def add(self, rec: Record, counted: int) -> int:
        """Count the facts of ``rec`` not in ``counted``; return the pair's new bits."""
        new = facts_of(rec) & ~counted
        if new & PRED:
            self._predicted(rec)
        if new & LABEL:
            self._labelled(rec)
        if new & ORPHAN:
            self._orphan(rec)
        return counted | new

    def _segments(self, rec: Record) -> tuple[str, ...]:
        """The record's ``attr=value`` segments (memoised: a handful of distinct contexts)."""
        attrs = self.settings.segments
        if not attrs:
            return ()
        context = rec.get("context") or {}
        raw = tuple(context.get(attr) for attr in attrs)
        segs = self._segment_cache.get(raw)
        if segs is None:
            if len(self._segment_cache) > CACHE_MAX:
                self._segment_cache.clear()
            segs = self._segment_cache[raw] = self._segment_names(raw)
        return segs

    def _segment_names(self, raw: tuple[str | None, ...]) -> tuple[str, ...]:
        out = []
        for attr, value in zip(self.settings.segments, raw, strict=True):
            if value is None:
                continue
            known = self.state.segment_values.setdefault(attr, set())
            if value not in known and len(known) >= MAX_SEGMENT_VALUES:
                value = "(other)"
            known.add(value)
            out.append(f"{attr}={value}")
        return tuple(out)

    def _cell(self, challenger: str, segments: tuple[str, ...], t: int) -> Window | None:
        """The open cell of ``t``; None (and counted late) when its window has closed."""
        window_ms = self.window_ms
        start = t - t % window_ms
        state = self.state
        if start + window_ms + self.lateness_ms <= state.watermark:
            mark = state.watermark - state.watermark % window_ms
            self._window(challenger, (), mark).late_dropped += 1
            return None
        if t > state.watermark:
            state.watermark = t
        return self._window(challenger, segments, start)

    def _window(self, challenger: str, segments: tuple[str, ...], start: int) -> Window:
        key = (challenger, segments, start)
        window = self.state.windows.get(key)
        if window is None:
            window = self.state.windows[key] = Window()
        return window

    def _predicted(self, rec: Record) -> None:
        challenger, t = rec["challenger"], record_time(rec)
        segments = self._segments(rec)
        w = self._cell(challenger, segments, t)
        if w is None:
            return
        primary, shadow = rec.get("primary_output"), rec.get("shadow_output")
        kind = rec.get("shadow_error_kind") or ("exception" if rec.get("shadow_error") else None)
        ok = shadow is not None and kind is None
        w.published += 1
        if ok:
            w.scored += 1
            w.joined += 1
            self._compare(challenger, segments, w, primary, shadow, t)
        elif kind == "timeout":
            w.timeouts += 1
        elif kind is not None:
            w.errors += 1
        latency = w.latency
        for name, key in LATENCY_FIELDS:
            x = rec.get(key)
            if x is not None:
                latency[name].add_bucket(bucket(x))
        self._psi_values(challenger, rec, w, primary, shadow if ok else None)

    def _compare(self, challenger: str, segments: tuple[str, ...], w: Window,
                 primary: Record | None, shadow: Record, t: int) -> None:
        """Agreement, |Δ probability| and |Δ value| of a pair whose challenger answered."""
        p_label, s_label = _output_label(primary), shadow.get("label")
        if p_label is not None and s_label is not None:
            key = (p_label, s_label)
            w.agree_cm[key] = w.agree_cm.get(key, 0) + 1
            self._feed(challenger, segments, "disagreement", None, "disagreement",
                       float(p_label != s_label), t)
        if primary and primary.get("probabilities") and shadow.get("probabilities"):
            w.prob_delta[0] += _total_variation(primary["probabilities"],
                                                shadow["probabilities"])
            w.prob_delta[1] += 1
        pv, sv = _output_value(primary), shadow.get("value")
        if pv is not None and sv is not None:
            w.value_delta[0] += abs(pv - sv)
            w.value_delta[1] += 1

    def _labelled(self, rec: Record) -> None:
        challenger, t = rec["challenger"], int(rec.get("label_time") or rec["joined_at"])
        segments = self._segments(rec)
        w = self._cell(challenger, segments, t)
        if w is None:
            return
        kind = rec.get("shadow_error_kind") or ("exception" if rec.get("shadow_error") else None)
        y, y_value = rec.get("label"), rec.get("label_value")
        w.labelled += 1
        wrong: list[tuple[str, float]] = []
        for arm, out in (("primary", rec.get("primary_output")),
                         ("challenger", rec.get("shadow_output") if kind is None else None)):
            if not out:
                continue
            pred = out.get("label")
            if y is not None and pred is not None:
                wrong.append((arm, float(pred != y)))
                cm = w.arm_cm[arm]
                cm[(y, pred)] = cm.get((y, pred), 0) + 1
            value = out.get("value")
            if y_value is not None and value is not None:
                err = value - y_value
                reg = w.arm_reg[arm]
                reg[0] += 1
                reg[1] += abs(err)
                reg[2] += err * err
        for arm, x in wrong:
            self._feed(challenger, segments, "error_rate", arm, f"error_rate:{arm}", x, t)

    def _orphan(self, rec: Record) -> None:
        w = self._cell(rec["challenger"], self._segments(rec), int(rec["joined_at"]))
        if w is None:
            return
        w.orphaned += 1
        w.scored += rec.get("state") == "orphan_prediction" and rec.get("shadow_output") is not None

    # -- detectors -------------------------------------------------------------------------

    def _detectors(self, challenger: str, segments: tuple[str, ...],
                   name: str) -> list[tuple[str, Detector]]:
        """(segment, detector) of the overall series and each segment (memoised refs)."""
        key = (challenger, segments, name)
        found = self._detector_cache.get(key)
        if found is None:
            if len(self._detector_cache) > CACHE_MAX:
                self._detector_cache.clear()
            detectors = self.state.detectors
            found = []
            for segment in ("", *segments):
                detector = detectors.get((challenger, segment, name))
                if detector is None:
                    detector = detectors[(challenger, segment, name)] = Detector(
                        ADWIN(delta=self.delta))
                found.append((segment, detector))
            self._detector_cache[key] = found
        return found

    def _feed(self, challenger: str, segments: tuple[str, ...], metric: str, arm: str | None,
              name: str, x: float, t: int) -> None:
        """Feed ``x`` to the ``name`` detectors (``metric`` or ``metric:arm``) of a record."""
        for segment, detector in self._detectors(challenger, segments, name):
            change = detector.update(x)
            if change is None:
                continue
            start = t - t % self.window_ms
            self._alert("drift", "ADWIN", metric, challenger, arm, segment, start, t,
                        value=change[1], threshold=None, severity="warning",
                        details={"mean_before": f"{change[0]:.4f}",
                                 "mean_after": f"{change[1]:.4f}",
                                 "adwin_width": str(detector.adwin.width),
                                 "values_seen": str(detector.seen)})

    def _psi_values(self, challenger: str, rec: Record, window: Window,
                    primary: Record | None, shadow: Record | None) -> None:
        values: list[tuple[str, float | None]] = [("score:primary", _score(primary)),
                                                  ("score:challenger", _score(shadow))]
        if self._features:
            features = rec.get("num_features") or {}
            values += [(metric, features.get(name)) for name, metric in self._features]
        refs = self.state.psi_refs
        for metric, x in values:
            if x is None or not math.isfinite(x):
                continue
            ref = refs.get((challenger, metric))
            if ref is None:
                ref = refs[(challenger, metric)] = PsiReference()
            if ref.edges is None:
                self._grow_reference(ref, x)
                continue
            counts = window.psi_counts.get(metric)
            if counts is None:
                counts = window.psi_counts[metric] = [0] * (len(ref.edges) + 1)
            counts[bisect.bisect_right(ref.edges, x)] += 1

    @staticmethod
    def _grow_reference(ref: PsiReference, x: float) -> None:
        ref.values.append(x)
        if len(ref.values) >= PSI_REFERENCE:
            ref.edges = quantile_edges(ref.values)
            ref.counts = [0] * (len(ref.edges) + 1)
            for v in ref.values:
                ref.counts[bisect.bisect_right(ref.edges, v)] += 1
            ref.values = []

    def _alert(self, kind: str, detector: str, metric: str, challenger: str, arm: str | None,
               segment: str, start: int, t: int, *, value: float, threshold: float | None,
               severity: str, details: dict[str, str]) -> None:
        """Queue an alert unless the same condition fired within the cooldown (event time)."""
        condition = (kind, detector, metric, challenger, arm, segment)
        last = self.state.last_alert.get(condition)
        if last is not None and t - last < self.settings.alert_cooldown_s * 1000:
            return
        self.state.last_alert[condition] = t
        seg = segment or None
        self.pending_alerts.append({
            "alert_id": alert_id(kind, detector, metric, challenger, arm, seg, start),
            "kind": kind, "detector": detector, "metric": metric, "challenger": challenger,
            "arm": arm, "segment": seg, "window_start": start,
            "window_end": start + self.window_ms, "value": float(value),
            "threshold": threshold, "severity": severity, "time": int(time.time() * 1000),
            "details": {"event_time": str(t), **details},
        })

    # -- closing windows -------------------------------------------------------------------

    def advance(self, watermark: int | None = None) -> tuple[list[Record], list[Record]]:
        """Close windows the watermark has passed; return (window rows, alerts) since last."""
        state = self.state
        if watermark is not None:
            state.watermark = max(state.watermark, watermark)
        due = [k for k in state.windows
               if k[2] + self.window_ms + self.lateness_ms <= state.watermark]
        merged: dict[tuple[str, str, int], Window] = {}
        for key in due:
            challenger, segments, start = key
            cell = state.windows.pop(key)
            for segment in ("", *segments):
                window = merged.get((challenger, segment, start))
                if window is None:
                    window = merged[(challenger, segment, start)] = Window()
                window.merge(cell, psi=not segment)  # PSI is checked on overall windows
        rows = [self._close(key, merged[key]) for key in sorted(merged)]
        alerts, self.pending_alerts = self.pending_alerts, []
        return rows, alerts

    def _close(self, key: tuple[str, str, int], w: Window) -> Record:
        challenger, segment, start = key
        row = window_row(challenger, segment, start, start + self.window_ms, w)
        if challenger:
            self._rules(row, start, start + self.window_ms - 1)
        if challenger and not segment:
            self._psi_check(challenger, start, w)
        return row

    def _rules(self, row: Record, start: int, t: int) -> None:
        s = self.settings
        checks = [
            ("agreement", row["agreement"], row["joined"],
             s.monitor_agreement_min_pct / 100, lambda v, th: v < th),
            ("error_rate", row["error_rate"], row["published"],
             s.monitor_error_rate_max_pct / 100, lambda v, th: v > th),
            ("model_time_p95_ms", row["model_time_p95"],
             row["published"], float(s.monitor_model_time_sla_ms), lambda v, th: v > th),
        ]
        for metric, value, volume, threshold, tripped in checks:
            if value is None or volume < s.monitor_rule_min_records:
                continue
            if not tripped(value, threshold):
                continue
            self._alert("rule", "threshold", metric, row["challenger"],
                        "challenger" if metric != "agreement" else None, row["segment"],
                        start, t, value=value, threshold=threshold, severity="warning",
                        details={"records": str(volume)})

    def _psi_check(self, challenger: str, start: int, w: Window) -> None:
        threshold = self.settings.monitor_psi_threshold_pct / 100
        for metric, counts in sorted(w.psi_counts.items()):
            ref = self.state.psi_refs[(challenger, metric)]
            if sum(counts) < PSI_MIN_WINDOW or ref.counts is None:
                continue
            value = psi(ref.counts, counts)
            if value <= threshold:
                continue
            base, _, arm_or_feature = metric.partition(":")
            arm = arm_or_feature if base == "score" else None
            self._alert("drift", "PSI", metric if arm is None else "score", challenger, arm, "",
                        start, start + self.window_ms - 1, value=value, threshold=threshold,
                        severity="critical" if value > 2 * threshold else "warning",
                        details={"records": str(sum(counts))})


def _classification(cm_counts: dict[tuple[str, str], int]) -> dict[str, float | None]:
    """River metrics from a window's confusion counts (weighted updates are exact)."""
    if not cm_counts:
        return {"accuracy": None, "precision": None, "recall": None, "f1": None, "kappa": None}
    cm = metrics.ConfusionMatrix()
    for (y, p), n in cm_counts.items():
        cm.update(y, p, n)
    return {
        "accuracy": metrics.Accuracy(cm=cm).get(),
        "precision": metrics.MacroPrecision(cm=cm).get(),
        "recall": metrics.MacroRecall(cm=cm).get(),
        "f1": metrics.MacroF1(cm=cm).get(),
        "kappa": metrics.CohenKappa(cm=cm).get(),
    }


def _ratio(total: float, n: int) -> float | None:
    return total / n if n else None


def window_row(challenger: str, segment: str, start: int, end: int, w: Window) -> Record:
    """The ClickHouse ``windows`` row of a closed window."""
    agreement = _classification(w.agree_cm)
    row: Record = {
        "challenger": challenger, "segment": segment, "window_start": start, "window_end": end,
        "published": w.published, "scored": w.scored, "joined": w.joined,
        "labelled": w.labelled, "orphaned": w.orphaned, "errors": w.errors,
        "timeouts": w.timeouts, "late_dropped": w.late_dropped,
        "agreement": agreement["accuracy"], "kappa": agreement["kappa"],
        "mean_abs_delta_probability": _ratio(*w.prob_delta),
        "mean_abs_delta_value": _ratio(*w.value_delta),
        "error_rate": _ratio(w.errors + w.timeouts, w.published),
        "timeout_rate": _ratio(w.timeouts, w.published),
    }
    for arm in ARMS:
        cls = _classification(w.arm_cm[arm])
        for name in ("accuracy", "precision", "recall", "f1"):
            row[f"{arm}_{name}"] = cls[name]
        n, abs_sum, sq_sum = w.arm_reg[arm]
        row[f"{arm}_mae"] = _ratio(abs_sum, int(n))
        row[f"{arm}_rmse"] = math.sqrt(sq_sum / n) if n else None
    for name in LATENCIES:
        for q in (50, 95, 99):
            row[f"{name}_p{q}"] = w.latency[name].quantile(q / 100)
    return row
