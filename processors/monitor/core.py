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
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Any

from river import metrics
from river.drift import ADWIN

from shadowpipe.config import Settings
from shadowpipe.processors.monitor.reference import Profile
from shadowpipe.processors.monitor.stats import LogSketch, bucket, psi, quantile_edges

PRED, LABEL, ORPHAN = 1, 2, 4
ARMS = ("primary", "challenger")
LATENCIES = ("primary_latency", "model_time", "queue_lag")
MAX_SEGMENT_VALUES = 100  # per attribute; rarer values share "attr=(other)" to bound state
PSI_REFERENCE = 1000  # values in a PSI reference
PSI_MIN_WINDOW = 200  # a window needs this many values to be compared
CACHE_MAX = 100_000  # memoised segment names and detector references
# Requests remembered to count the primary's facts once per request: a request's records
# (one per challenger) are emitted together by the joiner, so recent ones suffice.
REQUEST_MEMORY = 20_000
RESOLVE_MIN_VALUES = 128  # an ADWIN estimate over fewer values does not resolve an alert
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
             segment: str | None, window_start: int | None, *, model: str = "",
             status: str = "firing") -> str:
    """Deterministic id of an alert: a replay of the same condition yields the same id
    (``model`` names the primary of a condition of the primary's; ``status`` resolved for
    a resolution).

    >>> alert_id("drift", "ADWIN", "error_rate", "c", "challenger", None, 0)[:12]
    'drift-26469c'
    """
    parts: list[object] = [kind, detector, metric, challenger, arm, segment, window_start]
    if model:
        parts.append(f"model={model}")
    if status != "firing":
        parts.append(status)
    raw = "\x1f".join(str(p) for p in parts)
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

    def merge(self, other: Window) -> None:
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


def _add_counts(into: dict, counts: dict) -> None:
    for key, n in counts.items():
        into[key] = into.get(key, 0) + n


@dataclass(slots=True)
class Detector:
    """A river ADWIN plus how many values it has seen and its mean before a change."""

    adwin: Any
    seen: int = 0

    before: float = 0.0
    # while its increase alert is resolving: the estimate at or below which it resolved
    resolve_at: float | None = None

    def __setstate__(self, state: Any) -> None:
        """Load a checkpoint, including one from before ``resolve_at`` existed."""
        self.resolve_at = None
        for name, value in (state[1] if isinstance(state, tuple) else state).items():
            setattr(self, name, value)

    def update(self, x: float) -> tuple[float, float] | None:
        """Feed ``x``; on a detected change (either way) return (mean before, mean after)."""
        adwin = self.adwin
        self.seen += 1
        if self.seen % adwin.clock == 0:  # ADWIN only tests for change on its clock ticks
            self.before = adwin.estimation
        adwin.update(x)
        if adwin.drift_detected:
            return self.before, adwin.estimation
        return None


@dataclass(slots=True)
class PsiReference:
    values: list[float] = field(default_factory=list)
    edges: list[float] | None = None
    counts: list[int] | None = None


@dataclass(slots=True)
class DriftCounts:
    """One metric's values in one window: binned against the reference named by ``tag``
    (``stream``: the first values; ``profile:<version>``: a stored profile)."""

    tag: str
    values: int = 0
    counts: list[int] | None = None  # None while the stream reference is being built


@dataclass(slots=True)
class Condition:
    """A firing alert condition (resolved ones are forgotten)."""

    fired_at: int  # event time it started firing
    raised_at: int  # event time of its last firing alert (the first, or a repeat)
    alert_id: str  # that alert's id
    baseline: float | None = None  # ADWIN: the mean before the increase


# (kind, detector, metric, challenger, model, arm, segment)
ConditionKey = tuple[str, str, str, str, str, str | None, str]


@dataclass
class MonitorState:
    """Everything that must survive a restart (pickled into the Redis checkpoint)."""

    # cells: (challenger, segments, window start) -> accumulators; segments = the
    # record's ``attr=value`` strings (empty for the late-drop counter of a window)
    windows: dict[tuple[str, tuple[str, ...], int], Window] = field(default_factory=dict)
    watermark: int = -(2**62)
    # (challenger, segment, name) -> detector of a challenger's series
    detectors: dict[tuple[str, str, str], Detector] = field(default_factory=dict)
    # (primary model, segment, name) -> detector of the primary's series
    model_detectors: dict[tuple[str, str, str], Detector] = field(default_factory=dict)
    # (model, challenger, metric) -> the first values of the stream (challenger '' = the
    # primary's score and the features, which are the same for every challenger)
    stream_refs: dict[tuple[str, str, str], PsiReference] = field(default_factory=dict)
    # (model, challenger, window start) -> metric -> values of the window
    drift: dict[tuple[str, str, int], dict[str, DriftCounts]] = field(default_factory=dict)
    conditions: dict[ConditionKey, Condition] = field(default_factory=dict)
    segment_values: dict[str, set[str]] = field(default_factory=dict)
    # request id -> facts of the request counted for the primary (bounded, oldest dropped;
    # a plain dict: it pickles ~10x faster than an OrderedDict at every checkpoint)
    request_facts: dict[str, int] = field(default_factory=dict)

    def __setstate__(self, saved: dict[str, Any]) -> None:
        """Load a checkpoint of an older version: unknown fields go, new ones default.
        Its per-challenger primary detectors go too (the primary's are per model now)."""
        fresh = MonitorState().__dict__
        fresh.update((k, v) for k, v in saved.items() if k in fresh)
        fresh["detectors"] = {k: d for k, d in fresh["detectors"].items()
                              if not k[2].endswith(":primary")}
        self.__dict__.update(fresh)


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
        self.cooldown_ms = settings.alert_cooldown_s * 1000
        self.repeat_ms = settings.alert_repeat_s * 1000
        self.pending_alerts: list[Record] = []
        self.pending_drift: list[Record] = []
        self.profiles: dict[str, Profile] = {}
        self._features = [(name, f"feature:{name}") for name in settings.drift_features]
        self._segment_cache: dict[tuple[str | None, ...], tuple[str, ...]] = {}
        self._detector_cache: dict[tuple[bool, str, tuple[str, ...], str],
                                   list[tuple[str, Detector]]] = {}

    def set_profiles(self, profiles: dict[str, Profile]) -> None:
        """Use these reference profiles (by model, ``''`` = any model) from now on."""
        self.profiles = dict(profiles)

    def open_rows(self) -> list[Record]:
        """Rows of the windows still open, as they stand (merged as a close would): the
        provisional rows of a stop."""
        merged: dict[tuple[str, str, int], Window] = {}
        for (challenger, segments, start), cell in self.state.windows.items():
            for segment in ("", *segments):
                merged.setdefault((challenger, segment, start), Window()).merge(cell)
        return [window_row(c, seg, start, start + self.window_ms, w)
                for (c, seg, start), w in sorted(merged.items())]

    def drain_drift_stats(self) -> list[Record]:
        """The ``drift_stats`` rows of the windows closed since the last call."""
        rows, self.pending_drift = self.pending_drift, []
        return rows

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

    def _first_for_request(self, request_id: str, fact: int) -> bool:
        """True once per request and fact: the primary's series count each request once,
        however many challengers it has (a bounded memory: see REQUEST_MEMORY)."""
        seen = self.state.request_facts
        bits = seen.get(request_id)
        if bits is None:
            seen[request_id] = fact
            if len(seen) > REQUEST_MEMORY:  # forget the older half (dicts keep insertion order)
                self.state.request_facts = dict(
                    itertools.islice(seen.items(), REQUEST_MEMORY // 2, None))
            return True
        if bits & fact:
            return False
        seen[request_id] = bits | fact
        return True

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
        self._drift_values(rec, t, primary, shadow if ok else None)

    def _compare(self, challenger: str, segments: tuple[str, ...], w: Window,
                 primary: Record | None, shadow: Record, t: int) -> None:
        """Agreement, |Δ probability| and |Δ value| of a pair whose challenger answered."""
        p_label, s_label = _output_label(primary), shadow.get("label")
        if p_label is not None and s_label is not None:
            key = (p_label, s_label)
            w.agree_cm[key] = w.agree_cm.get(key, 0) + 1
            self._feed(False, challenger, segments, "disagreement", None, "disagreement",
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
        wrong: dict[str, float] = {}
        for arm, out in (("primary", rec.get("primary_output")),
                         ("challenger", rec.get("shadow_output") if kind is None else None)):
            if not out:
                continue
            pred = out.get("label")
            if y is not None and pred is not None:
                wrong[arm] = float(pred != y)
                cm = w.arm_cm[arm]
                cm[(y, pred)] = cm.get((y, pred), 0) + 1
            value = out.get("value")
            if y_value is not None and value is not None:
                err = value - y_value
                reg = w.arm_reg[arm]
                reg[0] += 1
                reg[1] += abs(err)
                reg[2] += err * err
        if "primary" in wrong and self._first_for_request(rec["request_id"], LABEL):
            self._feed(True, rec.get("model") or "", segments, "error_rate", "primary",
                       "error_rate:primary", wrong["primary"], t)
        # the control is a copy of the primary: its error drift is the primary's, alerted once
        if "challenger" in wrong and not rec.get("is_control"):
            self._feed(False, challenger, segments, "error_rate", "challenger",
                       "error_rate:challenger", wrong["challenger"], t)

    def _orphan(self, rec: Record) -> None:
        w = self._cell(rec["challenger"], self._segments(rec), int(rec["joined_at"]))
        if w is None:
            return
        w.orphaned += 1
        w.scored += rec.get("state") == "orphan_prediction" and rec.get("shadow_output") is not None

    # -- detectors -------------------------------------------------------------------------

    def _detectors(self, of_model: bool, owner: str, segments: tuple[str, ...],
                   name: str) -> list[tuple[str, Detector]]:
        """(segment, detector) of the overall series and each segment (memoised refs) of a
        challenger or (``of_model``) of a primary model."""
        key = (of_model, owner, segments, name)
        found = self._detector_cache.get(key)
        if found is None:
            if len(self._detector_cache) > CACHE_MAX:
                self._detector_cache.clear()
            detectors = self.state.model_detectors if of_model else self.state.detectors
            found = []
            for segment in ("", *segments):
                detector = detectors.get((owner, segment, name))
                if detector is None:
                    detector = detectors[(owner, segment, name)] = Detector(
                        ADWIN(delta=self.delta))
                found.append((segment, detector))
            self._detector_cache[key] = found
        return found

    def _feed(self, of_model: bool, owner: str, segments: tuple[str, ...], metric: str,
              arm: str | None, name: str, x: float, t: int) -> None:
        """Feed ``x`` to the ``name`` detectors (``metric`` or ``metric:arm``) of a record:
        an increase fires the condition; a later decrease starts its resolution, done once
        the estimate is back at most halfway between the levels before and after the rise."""
        for segment, detector in self._detectors(of_model, owner, segments, name):
            change = detector.update(x)
            if change is None:
                if detector.resolve_at is not None:
                    self._resolving(detector, of_model, owner, metric, arm, segment, t)
                continue
            before, after = change
            challenger, model = ("", owner) if of_model else (owner, "")
            key = ("drift", "ADWIN", metric, challenger, model, arm, segment)
            if after > before:
                detector.resolve_at = None
                self._fire(key, t - t % self.window_ms, t, value=after, threshold=None,
                           severity="warning", details=_adwin_details(detector, before, after),
                           baseline=before)
                continue
            cond = self.state.conditions.get(key)
            if cond is not None and cond.baseline is not None:
                # river's ADWIN restarts its window at a change: ``before`` is the raised level
                detector.resolve_at = (cond.baseline + before) / 2

    def _resolving(self, detector: Detector, of_model: bool, owner: str, metric: str,
                   arm: str | None, segment: str, t: int) -> None:
        """Resolve a decreasing condition once its estimate, over enough values, is back."""
        adwin = detector.adwin
        if detector.seen % adwin.clock or adwin.width < RESOLVE_MIN_VALUES:
            return
        if adwin.estimation > detector.resolve_at:  # type: ignore[operator]
            return
        detector.resolve_at = None
        challenger, model = ("", owner) if of_model else (owner, "")
        key = ("drift", "ADWIN", metric, challenger, model, arm, segment)
        cond = self.state.conditions.get(key)
        details = _adwin_details(detector, cond.baseline or 0.0 if cond else 0.0,
                                 adwin.estimation)
        self._resolve(key, t - t % self.window_ms, t, value=adwin.estimation, threshold=None,
                      details=details, hold=False)

    # -- covariate drift (PSI) ---------------------------------------------------------------

    def _profile(self, model: str) -> Profile | None:
        profiles = self.profiles
        return profiles.get(model) or profiles.get("") if profiles else None

    def _drift_cells(self, model: str, challenger: str, t: int) -> dict[str, DriftCounts]:
        key = (model, challenger, t - t % self.window_ms)
        cells = self.state.drift.get(key)
        if cells is None:
            cells = self.state.drift[key] = {}
        return cells

    def _drift_values(self, rec: Record, t: int, primary: Record | None,
                      shadow: Record | None) -> None:
        """Bin the scores and watched features of a record (the primary's score and the
        features once per request: they are the same for every challenger)."""
        model = rec.get("model") or ""
        if shadow is not None:
            self._count_stream(self._drift_cells(model, rec["challenger"], t), model,
                               rec["challenger"], "score:challenger", _score(shadow))
        if not self._first_for_request(rec["request_id"], PRED):
            return
        cells = self._drift_cells(model, "", t)
        self._count_stream(cells, model, "", "score:primary", _score(primary))
        profile = self._profile(model)
        numbers = rec.get("num_features") or {}
        watched = profile.features if profile is not None else {}
        for name, metric in self._features:
            if name not in watched:
                self._count_stream(cells, model, "", metric, numbers.get(name))
        if profile is None:
            return
        labels = rec.get("cat_features") or {}
        for name, fp in watched.items():
            x = numbers.get(name) if fp.kind == "numeric" else labels.get(name)
            i = fp.bin(x)
            if i is None:
                continue
            metric = f"feature:{name}"
            counts = cells.get(metric)
            if counts is None or counts.tag != profile.tag:  # a new profile restarts the bins
                counts = cells[metric] = DriftCounts(profile.tag, 0, [0] * len(fp.counts))
            counts.values += 1
            counts.counts[i] += 1  # type: ignore[index]

    def _count_stream(self, cells: dict[str, DriftCounts], model: str, challenger: str,
                      metric: str, x: float | None) -> None:
        """Bin ``x`` against the stream's first values (grown from it until complete)."""
        if x is None or not math.isfinite(x):
            return
        counts = cells.get(metric)
        if counts is None:
            counts = cells[metric] = DriftCounts("stream")
        counts.values += 1
        ref = self.state.stream_refs.get((model, challenger, metric))
        if ref is None:
            ref = self.state.stream_refs[(model, challenger, metric)] = PsiReference()
        if ref.edges is None:
            self._grow_reference(ref, x)
            return
        if counts.counts is None:
            counts.counts = [0] * (len(ref.edges) + 1)
        counts.counts[bisect.bisect_right(ref.edges, x)] += 1

    @staticmethod
    def _grow_reference(ref: PsiReference, x: float) -> None:
        ref.values.append(x)
        if len(ref.values) >= PSI_REFERENCE:
            ref.edges = quantile_edges(ref.values)
            ref.counts = [0] * (len(ref.edges) + 1)
            for v in ref.values:
                ref.counts[bisect.bisect_right(ref.edges, v)] += 1
            ref.values = []

    # -- alert conditions (firing / resolved) -----------------------------------------------

    def _fire(self, key: ConditionKey, start: int, t: int, *, value: float,
              threshold: float | None, severity: str, details: dict[str, str],
              baseline: float | None = None) -> None:
        """The condition holds at ``t``: alert when it starts, or again once it has been
        firing for the repeat interval (event time, so a replay behaves the same)."""
        cond = self.state.conditions.get(key)
        if cond is not None:
            if t - cond.raised_at < self.repeat_ms:
                return
            details = {**details, "firing_since": str(cond.fired_at),
                       "repeat_of": cond.alert_id}
        else:
            cond = self.state.conditions[key] = Condition(t, t, "", baseline)
        cond.raised_at = t
        cond.alert_id = self._publish(key, "firing", start, t, value=value,
                                      threshold=threshold, severity=severity, details=details)

    def _resolve(self, key: ConditionKey, start: int, t: int, *, value: float,
                 threshold: float | None, details: dict[str, str], hold: bool = True) -> None:
        """The condition no longer holds at ``t``: publish its resolution (with ``hold``,
        not before it has been firing for the cooldown, which damps flapping)."""
        cond = self.state.conditions.get(key)
        if cond is None or (hold and t - cond.fired_at < self.cooldown_ms):
            return
        del self.state.conditions[key]
        self._publish(key, "resolved", start, t, value=value, threshold=threshold,
                      severity="info", details={**details, "firing_since": str(cond.fired_at),
                                                "resolves": cond.alert_id})

    def _publish(self, key: ConditionKey, status: str, start: int, t: int, *, value: float,
                 threshold: float | None, severity: str, details: dict[str, str]) -> str:
        kind, detector, metric, challenger, model, arm, segment = key
        seg = segment or None
        aid = alert_id(kind, detector, metric, challenger, arm, seg, start, model=model,
                       status=status)
        extra = {"model": model} if model else {}
        self.pending_alerts.append({
            "alert_id": aid, "kind": kind, "detector": detector, "metric": metric,
            "challenger": challenger, "arm": arm, "segment": seg, "window_start": start,
            "window_end": start + self.window_ms, "value": float(value),
            "threshold": threshold, "severity": severity, "time": int(time.time() * 1000),
            "details": {"event_time": str(t), **extra, **details}, "status": status,
        })
        return aid

    # -- closing windows -------------------------------------------------------------------

    def advance(self, watermark: int | None = None) -> tuple[list[Record], list[Record]]:
        """Close windows the watermark has passed; return (window rows, alerts) since last.
        Their drift statistics wait in :meth:`drain_drift_stats`."""
        state = self.state
        if watermark is not None:
            state.watermark = max(state.watermark, watermark)
        horizon = state.watermark - self.window_ms - self.lateness_ms
        due = [k for k in state.windows if k[2] <= horizon]
        merged: dict[tuple[str, str, int], Window] = {}
        for key in due:
            challenger, segments, start = key
            cell = state.windows.pop(key)
            for segment in ("", *segments):
                window = merged.get((challenger, segment, start))
                if window is None:
                    window = merged[(challenger, segment, start)] = Window()
                window.merge(cell)
        rows = [self._close(key, merged[key]) for key in sorted(merged)]
        for key in sorted(k for k in state.drift if k[2] <= horizon):
            self._close_drift(key, state.drift.pop(key))
        alerts, self.pending_alerts = self.pending_alerts, []
        return rows, alerts

    def _close(self, key: tuple[str, str, int], w: Window) -> Record:
        challenger, segment, start = key
        row = window_row(challenger, segment, start, start + self.window_ms, w)
        if challenger:
            self._rules(row, start, start + self.window_ms - 1)
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
            key = ("rule", "threshold", metric, row["challenger"], "",
                   "challenger" if metric != "agreement" else None, row["segment"])
            details = {"records": str(volume)}
            if tripped(value, threshold):
                self._fire(key, start, t, value=value, threshold=threshold,
                           severity="warning", details=details)
            else:
                self._resolve(key, start, t, value=value, threshold=threshold,
                              details=details)

    def _close_drift(self, key: tuple[str, str, int], cells: dict[str, DriftCounts]) -> None:
        """Each metric's PSI of a closed window against its reference: a drift_stats row
        (computed or not, and why), and the PSI condition fired or resolved."""
        model, challenger, start = key
        t = start + self.window_ms - 1
        threshold = self.settings.monitor_psi_threshold_pct / 100
        for metric, counts in sorted(cells.items()):
            ref_counts, reference, version = self._reference_counts(model, challenger, metric,
                                                                    counts.tag)
            compared = sum(counts.counts) if counts.counts is not None else 0
            value = None
            if ref_counts is not None and compared >= PSI_MIN_WINDOW:
                value = psi(ref_counts, counts.counts)  # type: ignore[arg-type]
            base, _, name = metric.partition(":")
            arm = name if base == "score" else None
            cond_key = ("drift", "PSI", metric if arm is None else "score", challenger,
                        model, arm, "")
            if value is not None:
                details = {"records": str(compared), "reference": reference}
                if value > threshold:
                    self._fire(cond_key, start, t, value=value, threshold=threshold,
                               severity="critical" if value > 2 * threshold else "warning",
                               details=details)
                else:
                    self._resolve(cond_key, start, t, value=value, threshold=threshold,
                                  details=details)
            elif counts.tag == "stream" and counts.counts is None:
                reference = "stream (building)"  # every value went into the reference
            self.pending_drift.append({
                "model": model, "challenger": challenger, "metric": metric,
                "window_start": start, "window_end": start + self.window_ms,
                "statistic": "psi", "value": value, "threshold": threshold,
                "records": counts.values, "compared": compared, "reference": reference,
                "reference_version": version,
                "firing": cond_key in self.state.conditions,
            })

    def _reference_counts(self, model: str, challenger: str, metric: str,
                          tag: str) -> tuple[list[int] | tuple[int, ...] | None, str, int]:
        """(reference counts, which reference, its version) of a window's metric."""
        if tag == "stream":
            ref = self.state.stream_refs.get((model, challenger, metric))
            return (ref.counts if ref is not None else None), "stream", 0
        profile = self._profile(model)
        fp = profile.features.get(metric.partition(":")[2]) if profile is not None else None
        if profile is None or fp is None or profile.tag != tag:
            return None, "profile (replaced)", 0  # the profile changed since: not compared
        return fp.counts, "profile", profile.version


def _adwin_details(detector: Detector, before: float, after: float) -> dict[str, str]:
    return {"mean_before": f"{before:.4f}", "mean_after": f"{after:.4f}",
            "adwin_width": str(detector.adwin.width), "values_seen": str(detector.seen)}


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
