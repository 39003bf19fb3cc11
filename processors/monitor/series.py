"""The partitioned monitor's unit of ownership: one *series key*, one :class:`SeriesMonitor`.

In partitioned mode (``monitor_mode=partitioned``, :mod:`.partitioned`) every joined
record is re-keyed onto a repartition topic, once per series it feeds
(:func:`series_keys`), the way Kafka Streams and Faust ``group_by`` repartition a stream.
A key is ``(role, owner, segment)``:

* ``("c", challenger, segment)``: that challenger's window cells, rule alerts and
  disagreement / challenger-error detectors of one segment (``""`` = overall);
* ``("m", primary model, segment)``: the primary's facts, counted once per request
  whatever the number of challengers: its error-rate detector of one segment and, for
  segment ``""``, the PSI of its score and of the watched features.

Every record of a key lands on one partition of the repartition topic, so exactly one
:class:`SeriesMonitor` (in whichever process owns that partition) sees all of that
series' records: no window row is split between processes, none is counted twice, and
the rows are the same whatever the number of processes. Its watermark is the key's own
(the highest fact time of the series).

**Detectors in event-time order.** A record's detector inputs are held with the window
they fall in and fed, sorted by (event time, detector, value), when that window closes:
arrival order across the joined topic's partitions is not reproducible (it depends on
fetch timing and on how many processes read them), event-time order is. Drift alerts come
out at window close instead of at the record that crossed the threshold.

>>> from shadowpipe.config import Settings
>>> rec = {"request_id": "r1", "challenger": "c", "state": "predicted", "event_time": 0,
...        "joined_at": 0, "context": {"region": "eu"}, "model": "m",
...        "primary_output": {"label": "a", "probabilities": {}, "value": None},
...        "shadow_output": {"label": "b", "probabilities": {}, "value": None}}
>>> [decode_key(k) for k in series_keys(rec, ("region",))]
[('c', 'c', ''), ('c', 'c', 'region=eu'), ('m', 'm', '')]
>>> m = SeriesMonitor(Settings.load(env={"SHADOWPIPE_SEGMENTS": "region"}), ("c", "c", "region=eu"))
>>> m.add(rec, 0)
1
>>> rows, alerts = m.advance(10**9)
>>> [(r["segment"], r["published"], r["agreement"]) for r in rows]
[('region=eu', 1, 0.0)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shadowpipe.config import Settings
from shadowpipe.processors.monitor.core import (
    LABEL,
    Detector,
    Monitor,
    MonitorState,
    Record,
    Window,
    pair_key,
    record_time,
)

SEP = "\x1f"
SeriesKey = tuple[str, str, str]  # (role "c" | "m", challenger or model, segment)
# A held detector input: (event time, detector name, value, of_model, owner, metric, arm)
Feed = tuple[int, str, float, bool, str, str, "str | None"]
PRIMARY_STATES = ("predicted", "labelled")


def segments_of(rec: Record, attrs: Sequence[str]) -> list[str]:
    """The record's segments: ``""`` (overall) then ``attr=value`` per attribute it has.

    Unlike the single monitor, rare values are not folded into ``attr=(other)`` after 100
    distinct ones: that fold depends on arrival order, which differs between processes.

    >>> segments_of({"context": {"region": "eu"}}, ("region", "clinic"))
    ['', 'region=eu']
    """
    context = rec.get("context") or {}
    return ["", *(f"{a}={context[a]}" for a in attrs if context.get(a) is not None)]


def encode_key(key: SeriesKey) -> bytes:
    return SEP.join(key).encode()


def decode_key(raw: bytes) -> SeriesKey:
    role, owner, segment = raw.decode().split(SEP)
    return role, owner, segment


def series_keys(rec: Record, attrs: Sequence[str]) -> list[bytes]:
    """The repartition keys of a record: each series it feeds (see module doc)."""
    segments = segments_of(rec, attrs)
    keys = [("c", rec["challenger"], s) for s in segments]
    if rec.get("state") in PRIMARY_STATES:
        model = rec.get("model") or ""
        keys.append(("m", model, ""))
        if rec.get("state") == "labelled":  # the primary's error detectors, per segment
            keys += [("m", model, s) for s in segments[1:]]
    return [encode_key(k) for k in keys]


def dedup_pair(key: SeriesKey, rec: Record) -> str:
    """The fact-dedup identity of a record within a series (one pair feeds many series)."""
    return SEP.join((*key, pair_key(rec)))


class SeriesMonitor(Monitor):
    """:class:`~.core.Monitor` restricted to one series key (module doc); ``feeds`` are
    the held detector inputs of a checkpoint."""

    def __init__(self, settings: Settings, key: SeriesKey, state: MonitorState | None = None,
                 feeds: list[Feed] | None = None) -> None:
        super().__init__(settings, state)
        self.key = key
        self.role, self.owner, self.segment = key
        self.feeds: list[Feed] = feeds or []
        # The earliest window start among the feeds: most advances close none of them, and
        # a scan of every held feed per batch grew with the window.
        self._feeds_from = _earliest_start(self.feeds, self.window_ms)

    def due_starts(self) -> list[int]:
        """Window starts holding anything still to close (cells, PSI values, feeds)."""
        w = self.window_ms
        return sorted({*(k[2] for k in self.state.windows), *(k[2] for k in self.state.drift),
                       *(f[0] - f[0] % w for f in self.feeds)})

    # -- what this key counts ----------------------------------------------------------------

    def _segments(self, rec: Record) -> tuple[str, ...]:
        return (self.segment,) if self.segment else ()

    def _first_for_request(self, request_id: str, fact: int) -> bool:
        # A challenger key never counts the primary's facts: the model keys do, once each.
        return self.role == "m" and super()._first_for_request(request_id, fact)

    def _drift_values(self, rec: Record, t: int, primary: Record | None,
                      shadow: Record | None) -> None:
        if not self.segment:  # PSI is per model and challenger, not per segment
            super()._drift_values(rec, t, primary, shadow if self.role == "c" else None)

    def _predicted(self, rec: Record) -> None:
        if self.role == "c":
            super()._predicted(rec)
            return
        t = record_time(rec)
        if self._admit(t):
            self._drift_values(rec, t, rec.get("primary_output"), None)

    def _labelled(self, rec: Record) -> None:
        if self.role == "c":
            super()._labelled(rec)
            return
        t = int(rec.get("label_time") or rec["joined_at"])
        primary, y = rec.get("primary_output"), rec.get("label")
        pred = primary.get("label") if primary else None
        if (self._admit(t) and y is not None and pred is not None
                and self._first_for_request(rec["request_id"], LABEL)):
            self._feed(True, rec.get("model") or "", (), "error_rate", "primary",
                       "error_rate:primary", float(pred != y), t)

    def _orphan(self, rec: Record) -> None:
        if self.role == "c":
            super()._orphan(rec)

    def _admit(self, t: int) -> bool:
        """A model key's lateness rule (the challenger keys' is in ``_cell``)."""
        state = self.state
        if t - t % self.window_ms + self.window_ms + self.lateness_ms <= state.watermark:
            return False
        state.watermark = max(state.watermark, t)
        return True

    # -- detectors, fed in event-time order at window close -----------------------------------

    def _detectors(self, of_model: bool, owner: str, segments: tuple[str, ...],
                   name: str) -> list[tuple[str, Detector]]:
        from river.drift import ADWIN

        detectors = self.state.model_detectors if of_model else self.state.detectors
        key = (owner, self.segment, name)
        detector = detectors.get(key)
        if detector is None:
            detector = detectors[key] = Detector(ADWIN(delta=self.delta))
        return [(self.segment, detector)]

    def _feed(self, of_model: bool, owner: str, segments: tuple[str, ...], metric: str,
              arm: str | None, name: str, x: float, t: int) -> None:
        self.feeds.append((t, name, x, of_model, owner, metric, arm))
        start = t - t % self.window_ms
        if self._feeds_from is None or start < self._feeds_from:
            self._feeds_from = start

    def advance(self, watermark: int | None = None) -> tuple[list[Record], list[Record]]:
        """As :meth:`.core.Monitor.advance`, first feeding the held detector inputs of the
        windows that close, in event-time order; only this key's segment's rows."""
        state = self.state
        if watermark is not None:
            state.watermark = max(state.watermark, watermark)
        horizon = state.watermark - self.window_ms - self.lateness_ms
        if self._feeds_from is not None and self._feeds_from <= horizon:
            self._feed_due(horizon)
        rows, alerts = super().advance()
        return [r for r in rows if r["segment"] == self.segment], alerts

    def _feed_due(self, horizon: int) -> None:
        """Feed the held inputs of the windows starting at or before ``horizon``, in
        event-time order; keep the rest."""
        w = self.window_ms
        due, kept = [], []
        for f in self.feeds:
            (due if f[0] - f[0] % w <= horizon else kept).append(f)
        self.feeds = kept
        self._feeds_from = _earliest_start(kept, w)
        for t, name, x, of_model, owner, metric, arm in sorted(due, key=_feed_order):
            Monitor._feed(self, of_model, owner, (), metric, arm, name, x, t)

    def open_rows(self) -> list[Record]:
        """This key's segment's rows of :meth:`.core.Monitor.open_rows`."""
        return [r for r in super().open_rows() if r["segment"] == self.segment]

    def _close(self, key: tuple[str, str, int], w: Window) -> Record:
        if key[1] != self.segment:  # another key's row (the overall one of a segment key)
            return {"segment": key[1]}
        return super()._close(key, w)


def _earliest_start(feeds: list[Feed], window_ms: int) -> int | None:
    """The start of the earliest window holding one of ``feeds`` (None: none held)."""
    return min((f[0] - f[0] % window_ms for f in feeds), default=None)


def _feed_order(feed: Feed) -> tuple[int, str, float]:
    return feed[0], feed[1], feed[2]


def snapshot(monitors: dict[bytes, SeriesMonitor]) -> dict[bytes, tuple[MonitorState, list]]:
    """What a partition's checkpoint holds: each key's state and held detector inputs."""
    return {k: (m.state, m.feeds) for k, m in monitors.items()}


def restore(settings: Settings, saved: dict[bytes, Any]) -> dict[bytes, SeriesMonitor]:
    return {k: SeriesMonitor(settings, decode_key(k), state, feeds)
            for k, (state, feeds) in saved.items()}
