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
``""``) and per ``attribute=value`` of each configured segment attribute. The watermark is the
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

    windows: dict[tuple[str, str, int], Window] = field(default_factory=dict)
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
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in p.keys() | q.keys())


class Monitor:
    """Windows, detectors and alerts over deduplicated facts (see module doc)."""

    def __init__(self, settings: Settings, state: MonitorState | None = None) -> None:
        self.settings = settings
        self.state = state or MonitorState()
        self.window_ms = settings.window_s * 1000
        self.lateness_ms = settings.allowed_lateness_s * 1000
        self.delta = 10.0 ** -settings.monitor_drift_delta_exp
        self.pending_alerts: list[Record] = []

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

    def _segments(self, rec: Record) -> list[str]:
        context = rec.get("context") or {}
        out = [""]
        for attr in self.settings.segments:
            value = context.get(attr)
            if value is None:
                continue
            known = self.state.segment_values.setdefault(attr, set())
            if value not in known and len(known) >= MAX_SEGMENT_VALUES:
                value = "(other)"
            known.add(value)
            out.append(f"{attr}={value}")
        return out

    def _windows(self, challenger: str, segments: list[str], t: int) -> list[Window]:
        """Open windows of ``t``; empty (and counted late) when its window has closed."""
        start = t - t % self.window_ms
        state = self.state
        if start + self.window_ms + self.lateness_ms <= state.watermark:
            mark = state.watermark - state.watermark % self.window_ms
            self._window(challenger, "", mark).late_dropped += 1
            return []
        state.watermark = max(state.watermark, t)
        return [self._window(challenger, seg, start) for seg in segments]

    def _window(self, challenger: str, segment: str, start: int) -> Window:
        key = (challenger, segment, start)
        window = self.state.windows.get(key)
        if window is None:
            window = self.state.windows[key] = Window()
        return window

    def _predicted(self, rec: Record) -> None:
        challenger, t = rec["challenger"], record_time(rec)
        segments = self._segments(rec)
        windows = self._windows(challenger, segments, t)
        if not windows:
            return
        primary, shadow = rec.get("primary_output"), rec.get("shadow_output")
        kind = rec.get("shadow_error_kind") or ("exception" if rec.get("shadow_error") else None)
        ok = shadow is not None and kind is None
        p_label, s_label = _output_label(primary), _output_label(shadow)
        agree_key = (p_label, s_label) if ok and p_label is not None and s_label is not None \
            else None
        prob = (_total_variation(primary.get("probabilities") or {},
                                 shadow.get("probabilities") or {})
                if ok and primary and primary.get("probabilities") and shadow.get("probabilities")
                else None)
        pv, sv = _output_value(primary), _output_value(shadow)
        value = abs(pv - sv) if ok and pv is not None and sv is not None else None
        lat_keys = [(name, bucket(x)) for name, x in (
            ("primary_latency", rec.get("primary_latency_ms")),
            ("model_time", rec.get("model_time_ms")),
            ("queue_lag", rec.get("queue_lag_ms"))) if x is not None]
        for w in windows:
            w.published += 1
            if ok:
                w.scored += 1
                w.joined += 1
            elif kind == "timeout":
                w.timeouts += 1
            elif kind is not None:
                w.errors += 1
            if agree_key is not None:
                w.agree_cm[agree_key] = w.agree_cm.get(agree_key, 0) + 1
            if prob is not None:
                w.prob_delta[0] += prob
                w.prob_delta[1] += 1
            if value is not None:
                w.value_delta[0] += value
                w.value_delta[1] += 1
            for name, key in lat_keys:
                w.latency[name].add_bucket(key)
        if agree_key is not None:
            disagree = float(p_label != s_label)
            for seg in segments:
                self._detect(challenger, seg, "disagreement", None, disagree, t)
        self._psi_values(challenger, rec, windows[0], primary, shadow if ok else None)

    def _labelled(self, rec: Record) -> None:
        challenger, t = rec["challenger"], int(rec.get("label_time") or rec["joined_at"])
        segments = self._segments(rec)
        windows = self._windows(challenger, segments, t)
        if not windows:
            return
        kind = rec.get("shadow_error_kind") or ("exception" if rec.get("shadow_error") else None)
        outputs = {"primary": rec.get("primary_output"),
                   "challenger": rec.get("shadow_output") if kind is None else None}
        y, y_value = rec.get("label"), rec.get("label_value")
        wrong: dict[str, float] = {}
        for arm, out in outputs.items():
            pred = _output_label(out)
            if y is not None and pred is not None:
                wrong[arm] = float(pred != y)
                for w in windows:
                    cm = w.arm_cm[arm]
                    cm[(y, pred)] = cm.get((y, pred), 0) + 1
            value = _output_value(out)
            if y_value is not None and value is not None:
                err = value - y_value
                for w in windows:
                    reg = w.arm_reg[arm]
                    reg[0] += 1
                    reg[1] += abs(err)
                    reg[2] += err * err
        for w in windows:
            w.labelled += 1
        for arm, x in wrong.items():
            for seg in segments:
                self._detect(challenger, seg, "error_rate", arm, x, t)

    def _orphan(self, rec: Record) -> None:
        windows = self._windows(rec["challenger"], self._segments(rec), int(rec["joined_at"]))
        scored = rec.get("state") == "orphan_prediction" and rec.get("shadow_output") is not None
        for w in windows:
            w.orphaned += 1
            w.scored += scored

    # -- detectors -------------------------------------------------------------------------

    def _detect(self, challenger: str, segment: str, metric: str, arm: str | None,
                x: float, t: int) -> None:
        key = (challenger, segment, metric if arm is None else f"{metric}:{arm}")
        detector = self.state.detectors.get(key)
        if detector is None:
            detector = self.state.detectors[key] = Detector(ADWIN(delta=self.delta))
        change = detector.update(x)
        if change is None:
            return
        start = t - t % self.window_ms
        self._alert("drift", "ADWIN", metric, challenger, arm, segment, start, t,
                    value=change[1], threshold=None, severity="warning",
                    details={"mean_before": f"{change[0]:.4f}", "mean_after": f"{change[1]:.4f}",
                             "adwin_width": str(detector.adwin.width),
                             "values_seen": str(detector.seen)})

    def _psi_values(self, challenger: str, rec: Record, window: Window,
                    primary: Record | None, shadow: Record | None) -> None:
        values: list[tuple[str, float | None]] = [("score:primary", _score(primary)),
                                                  ("score:challenger", _score(shadow))]
        features = rec.get("num_features") or {}
        values += [(f"feature:{name}", features.get(name)) for name in self.settings.drift_features]
        for metric, x in values:
            if x is None or not math.isfinite(x):
                continue
            ref = self.state.psi_refs.get((challenger, metric))
            if ref is None:
                ref = self.state.psi_refs[(challenger, metric)] = PsiReference()
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
        due = sorted(k for k in state.windows
                     if k[2] + self.window_ms + self.lateness_ms <= state.watermark)
        rows = [self._close(key, state.windows.pop(key)) for key in due]
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
