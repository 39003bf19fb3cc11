"""Which joined records to hand out: the one definition of each kind, as SQL over
``{db}.joined_records FINAL`` (the latest version of every (challenger, request) pair).
``shadowpipe export`` and ``shadowpipe review publish`` both select through here.

Kinds (classification outputs; a record where an arm has no label is never a disagreement):

* ``disagreements``: the primary and the challenger gave different labels;
* ``challenger-wrong``: labelled, the primary right and the challenger wrong;
* ``primary-wrong``: labelled, the challenger right and the primary wrong;
* ``uncertain``: the challenger's ``score`` is below ``threshold``;
* ``unlabelled``: no outcome (label or value) has arrived yet;
* ``all``: every record (a validation corpus, a model-risk log).

Every selected row carries ``score``, the challenger's confidence: with ``measure =
"margin"`` its top probability minus the second one (the top one alone when it gave one
class), with ``"top"`` its top probability; NULL without probabilities (an error, a
regressor). For two classes margin = 2 * top - 1.

>>> sel = Selection("uncertain", challenger="gbm-v2", segments=(("clinic", "east"),),
...                 threshold=0.1)
>>> sql, params = sel.where()
>>> "score < {threshold:Float64}" in sql and params["threshold"]
0.1
>>> params["segment_key_0"], params["segment_value_0"]
('clinic', 'east')
>>> parse_segment("clinic=east")
('clinic', 'east')
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from shadowpipe.config import ConfigError

KINDS = ("disagreements", "challenger-wrong", "primary-wrong", "uncertain", "unlabelled", "all")
MEASURES = ("margin", "top")

_DISAGREE = "primary_label IS NOT NULL AND shadow_label IS NOT NULL"
CONDITIONS: dict[str, str] = {
    "disagreements": f"{_DISAGREE} AND primary_label != shadow_label",
    "challenger-wrong": f"label IS NOT NULL AND {_DISAGREE} AND primary_label = label "
                        "AND shadow_label != label",
    "primary-wrong": f"label IS NOT NULL AND {_DISAGREE} AND shadow_label = label "
                     "AND primary_label != label",
    "uncertain": "score < {threshold:Float64}",
    "unlabelled": "label IS NULL AND label_value IS NULL",
    "all": "1",
}
# The challenger's probabilities, highest first (an empty array without any).
_RANKED = "arrayReverseSort(mapValues(shadow_probabilities))"
SCORES: dict[str, str] = {
    "margin": f"if(empty(shadow_probabilities), NULL, {_RANKED}[1] - "
              f"if(length(shadow_probabilities) > 1, {_RANKED}[2], 0))",
    "top": f"if(empty(shadow_probabilities), NULL, {_RANKED}[1])",
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(\d+)([smhdw]?)$")


@dataclass(frozen=True)
class Selection:
    """One kind of joined records, optionally of one challenger, segment and time range
    (``since_ms`` inclusive, ``until_ms`` exclusive, epoch ms)."""

    kind: str
    challenger: str = ""
    segments: tuple[tuple[str, str], ...] = ()
    since_ms: int | None = None
    until_ms: int | None = None
    threshold: float = 0.2
    measure: str = "margin"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError("--kind", f"{self.kind!r} is not one of {', '.join(KINDS)}")
        if self.measure not in MEASURES:
            raise ConfigError("--measure", f"{self.measure!r} is not one of margin, top")

    def where(self) -> tuple[str, dict[str, Any]]:
        """The WHERE condition (over the columns and ``score``) and its parameters."""
        parts = [f"({CONDITIONS[self.kind]})",
                 "({challenger:String} = '' OR challenger = {challenger:String})"]
        params: dict[str, Any] = {"challenger": self.challenger, "threshold": self.threshold}
        if self.since_ms is not None:
            parts.append("event_time >= fromUnixTimestamp64Milli({since_ms:Int64})")
            params["since_ms"] = self.since_ms
        if self.until_ms is not None:
            parts.append("event_time < fromUnixTimestamp64Milli({until_ms:Int64})")
            params["until_ms"] = self.until_ms
        for i, (key, value) in enumerate(self.segments):
            parts.append(f"context[{{segment_key_{i}:String}}] = {{segment_value_{i}:String}}")
            params[f"segment_key_{i}"], params[f"segment_value_{i}"] = key, value
        return " AND ".join(parts), params

    def sql(self, db: str, columns: str, tail: str = "") -> tuple[str, dict[str, Any]]:
        """``SELECT columns`` (which may use ``score`` and ``kind``) of the selected records
        of database ``db``, then ``tail`` (ORDER BY, LIMIT...)."""
        where, params = self.where()
        params["kind"] = self.kind
        sql = (f"SELECT {columns} FROM (SELECT *, {SCORES[self.measure]} AS score, "
               f"{{kind:String}} AS kind FROM {db}.joined_records FINAL) WHERE {where} {tail}")
        return sql.strip(), params


def parse_segment(text: str) -> tuple[str, str]:
    """``ATTR=VALUE`` of ``--segment`` -> (attr, value)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError("--segment", f"{text!r} is not ATTR=VALUE")
    return key.strip(), value.strip()


def parse_time(text: str, flag: str, now_ms: int | None = None) -> int:
    """``--since``/``--until`` -> epoch ms: a look-back (``30m``, ``7d``: that long before
    now) or an ISO date or time (UTC unless it names a zone).

    >>> parse_time("1h", "--since", now_ms=10_000_000)
    6400000
    >>> parse_time("2026-01-02", "--until")
    1767312000000
    """
    text = text.strip()
    found = _DURATION.match(text.lower())
    if found:
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return now_ms - int(found.group(1)) * _UNITS[found.group(2) or "s"] * 1000
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(flag, f"{text!r} is neither a look-back like 7d nor an ISO "
                                "date/time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)
