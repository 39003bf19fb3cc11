"""The verdict policy: which criteria judge a challenger, with what margins, gates and limits.

A TOML file (``SHADOWPIPE_POLICY``; empty = the built-in defaults, which work without a
file) with a ``[defaults]`` table for every challenger and ``[challenger."name"]`` tables
that override it key by key::

    [defaults]
    alpha = 0.05
    labels = "all"                         # or "human": count only human reviewers' labels
    success = "error"                      # optional: must show an improvement to PROMOTE
    [defaults.guardrails]
    error = {margin = 0.01}                # 0/1 loss: 0.01 = one accuracy point
    abs_error = {margin = 0.05, relative = true, cap = 50.0}
    [defaults.gates]
    min_duration = "1d"
    [defaults.limits]
    allowed_labels = ["yes", "no"]
    [defaults.cost]                        # cost of predicting x when the truth is y
    matrix = {yes = {no = 5.0}, no = {yes = 50.0}}
    [challenger."gbm-v2".guardrails]
    error = {margin = 0.02}

Criteria (losses, lower is better; each judged on the paired difference
challenger - primary): ``error`` (0/1), ``brier``, ``log_loss`` (clipped), ``abs_error``
(capped) and ``cost`` (from the cost matrix). Without a ``guardrails`` table every criterion
the data allow is a guardrail with its default margin; a declared one is required, so a
declared criterion without data holds the verdict back.

Unknown keys and bad values raise :class:`ConfigError` naming the setting and the key.

>>> p = Policy.parse('[challenger."b".guardrails]\\nerror = {margin = 0.02}')
>>> p.for_challenger("a").guardrail("error").margin, p.for_challenger("b").guardrail("error").margin
(0.01, 0.02)
>>> Policy.parse("[defaults.gates]\\nmin_pairs = -3")
Traceback (most recent call last):
...
shadowpipe.config.ConfigError: SHADOWPIPE_POLICY: [defaults.gates] min_pairs: -3 is below 0
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shadowpipe.config import ConfigError, Settings, env_name

CRITERIA = ("error", "brier", "log_loss", "abs_error", "cost")
LABELS = ("all", "human")  # which labels count: every one, or human reviewers' only
LABEL_CRITERIA = CRITERIA
# Default non-inferiority margins, in loss units (absolute unless relative).
DEFAULT_MARGINS = {"error": 0.01, "brier": 0.01, "log_loss": 0.02, "abs_error": 0.05,
                   "cost": 0.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_UNIT_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
SETTING = env_name("policy")


@dataclass(frozen=True)
class Guardrail:
    """A criterion that must not be worse than the primary by more than ``margin``.

    ``relative``: the margin is a fraction of the primary's mean loss (abs_error: its MAE).
    """

    name: str
    margin: float
    relative: bool = False


@dataclass(frozen=True)
class Success:
    """The criterion must improve: its upper bound below ``-min_improvement``."""

    criterion: str
    min_improvement: float = 0.0


@dataclass(frozen=True)
class Gates:
    completeness: float = 0.99
    min_pairs: int = 1000
    min_discordant: int = 10
    min_duration_s: float = 86400.0
    maturity_quantile: float = 0.99


@dataclass(frozen=True)
class Limits:
    """Critical limits: crossing one REJECTs without regard to labels."""

    error_rate: float = 0.05
    latency_slo_ms: float = 250.0
    latency_share: float = 0.05
    allowed_labels: tuple[str, ...] | None = None
    value_range: tuple[float, float] | None = None
    max_violations: int = 0


@dataclass(frozen=True)
class ChallengerPolicy:
    """The effective policy of one challenger (defaults merged with its overrides)."""

    alpha: float = 0.05
    n_tune: int = 10_000
    guardrails: tuple[Guardrail, ...] = tuple(
        Guardrail(name, DEFAULT_MARGINS[name], relative=name == "abs_error")
        for name in CRITERIA)
    declared: bool = False  # guardrails come from the file: each one is required
    success: Success | None = None
    gates: Gates = field(default_factory=Gates)
    limits: Limits = field(default_factory=Limits)
    cost_matrix: tuple[tuple[str, str, float], ...] = ()  # (predicted, truth, cost)
    cost_default: float = 1.0  # a wrong prediction the matrix does not list
    log_loss_clip: float = 1e-4
    abs_error_cap: float | None = None  # None: 2 x the primary's p99 absolute error
    bins: int = 2000  # histogram bins of bounded differences
    labels: str = "all"  # "human": only labels from human review (Feedback source "human")

    def guardrail(self, name: str) -> Guardrail | None:
        return next((g for g in self.guardrails if g.name == name), None)

    @property
    def hash(self) -> str:
        """Stable hash of the effective policy: a change un-latches a REJECT."""
        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def cost_range(self) -> tuple[float, float]:
        """Bounds of one request's cost, for the bounded difference of two arms."""
        costs = [c for _p, _t, c in self.cost_matrix] + [self.cost_default, 0.0]
        return min(costs), max(costs)


class Policy:
    """Defaults plus per-challenger overrides, as read from a file (or built in)."""

    def __init__(self, raw: dict[str, Any], source: str = "") -> None:
        self.source = source
        self.raw = raw
        _check_keys(raw, {"defaults", "challenger"}, "")
        defaults = raw.get("defaults", {})
        _is_table(defaults, "[defaults]")
        self.defaults = _build(defaults, "defaults")
        overrides = raw.get("challenger", {})
        _is_table(overrides, "[challenger]")
        self.overrides = {}
        for name, table in overrides.items():
            _is_table(table, f'[challenger."{name}"]')
            self.overrides[name] = _build(_merge(defaults, table), f'challenger."{name}"')

    @classmethod
    def parse(cls, text: str, source: str = "") -> Policy:
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(SETTING, f"{source or 'policy'}: not valid TOML: {exc}") from None
        return cls(raw, source)

    @classmethod
    def load(cls, path: str | Path | None) -> Policy:
        """The policy in ``path``; the built-in defaults when ``path`` is empty."""
        if not path:
            return cls({})
        p = Path(path).expanduser()
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(SETTING, f"cannot read {p}: {exc.strerror}") from None
        return cls.parse(text, str(p))

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls.load(settings.policy)

    def for_challenger(self, name: str) -> ChallengerPolicy:
        return self.overrides.get(name, self.defaults)

    @property
    def hash(self) -> str:
        text = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_duration(value: Any, where: str) -> float:
    """Seconds of ``"1d"``, ``"12h"``, ``"90m"``, ``"30s"`` or a number of seconds.

    >>> parse_duration("1.5h", "x"), parse_duration(60, "x")
    (5400.0, 60.0)
    """
    if isinstance(value, bool):
        raise _bad(where, value, "is not a duration such as '1d' or '12h'")
    if isinstance(value, int | float):
        if value < 0:
            raise _bad(where, value, "is below 0")
        return float(value)
    m = _DURATION.match(str(value))
    if not m:
        raise _bad(where, value, "is not a duration such as '1d' or '12h'")
    return float(m.group(1)) * _UNIT_S[m.group(2)]


# -- building and checking ------------------------------------------------------------------

def _bad(where: str, value: Any, message: str) -> ConfigError:
    table, _, key = where.rpartition(".")
    return ConfigError(SETTING, f"[{table}] {key}: {value!r} {message}")


def _is_table(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise ConfigError(SETTING, f"{where} must be a table")


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            place = f"[{where}] " if where else ""
            raise ConfigError(SETTING, f"{place}unknown key {key!r}")


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _number(table: dict[str, Any], key: str, where: str, default: float, *,
            lo: float | None = None, hi: float | None = None, integer: bool = False,
            open_lo: bool = False) -> Any:
    if key not in table:
        return default
    value = table[key]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise _bad(f"{where}.{key}", value, "is not " + ("an integer" if integer else "a number"))
    if lo is not None and (value < lo or (open_lo and value == lo)):
        raise _bad(f"{where}.{key}", value, f"is below {'or at ' if open_lo else ''}{lo}")
    if hi is not None and value > hi:
        raise _bad(f"{where}.{key}", value, f"is above {hi}")
    return value if integer else float(value)


def _build(raw: dict[str, Any], where: str) -> ChallengerPolicy:
    _check_keys(raw, {"alpha", "n_tune", "success", "guardrails", "gates", "limits", "cost",
                      "bins", "labels"}, where)
    guardrails, declared, clip, cap = _guardrails(raw, where)
    matrix, default_cost = _cost(raw.get("cost", {}), f"{where}.cost")
    policy = ChallengerPolicy(
        alpha=_number(raw, "alpha", where, 0.05, lo=0.0, hi=0.5, open_lo=True),
        n_tune=_number(raw, "n_tune", where, 10_000, lo=1, integer=True),
        guardrails=guardrails, declared=declared,
        success=_success(raw.get("success"), where),
        gates=_gates(raw.get("gates", {}), f"{where}.gates"),
        limits=_limits(raw.get("limits", {}), f"{where}.limits"),
        cost_matrix=matrix, cost_default=default_cost, log_loss_clip=clip, abs_error_cap=cap,
        bins=_number(raw, "bins", where, 2000, lo=16, hi=100_000, integer=True),
        labels=_choice(raw, "labels", where, LABELS),
    )
    if any(g.name == "cost" for g in guardrails) and declared and not matrix:
        raise ConfigError(SETTING, f"[{where}.guardrails] cost needs a [{where}.cost] matrix")
    return policy


def _choice(table: dict[str, Any], key: str, where: str, choices: tuple[str, ...]) -> str:
    value = table.get(key, choices[0])
    if value not in choices:
        raise _bad(f"{where}.{key}", value, f"is not one of {', '.join(choices)}")
    return value


def _guardrails(raw: dict[str, Any], where: str
                ) -> tuple[tuple[Guardrail, ...], bool, float, float | None]:
    table = raw.get("guardrails")
    declared = table is not None
    table = table if declared else {}
    _is_table(table, f"[{where}.guardrails]")
    _check_keys(table, set(CRITERIA), f"{where}.guardrails")
    names = [n for n in CRITERIA if n in table] if declared else list(CRITERIA)
    out, clip, cap = [], 1e-4, None
    for name in names:
        spec = table.get(name, {})
        here = f"{where}.guardrails.{name}"
        _is_table(spec, f"[{here}]")
        allowed = {"margin", "relative", "enabled"} | (
            {"clip"} if name == "log_loss" else {"cap"} if name == "abs_error" else set())
        _check_keys(spec, allowed, here)
        enabled = spec.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _bad(f"{here}.enabled", enabled, "is not true or false")
        relative = spec.get("relative", name == "abs_error")
        if not isinstance(relative, bool):
            raise _bad(f"{here}.relative", relative, "is not true or false")
        margin = _number(spec, "margin", here, DEFAULT_MARGINS[name], lo=0.0)
        if name == "log_loss":
            clip = _number(spec, "clip", here, 1e-4, lo=0.0, hi=0.1, open_lo=True)
        if name == "abs_error" and "cap" in spec:
            cap = _number(spec, "cap", here, 0.0, lo=0.0, open_lo=True)
        if enabled:
            out.append(Guardrail(name, margin, relative))
    return tuple(out), declared, clip, cap


def _success(value: Any, where: str) -> Success | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"criterion": value}
    _is_table(value, f"[{where}] success")
    _check_keys(value, {"criterion", "min_improvement"}, f"{where}.success")
    criterion = value.get("criterion")
    if criterion not in CRITERIA:
        raise _bad(f"{where}.success", criterion, f"is not one of {', '.join(CRITERIA)}")
    return Success(criterion, _number(value, "min_improvement", f"{where}.success", 0.0, lo=0.0))


def _gates(table: dict[str, Any], where: str) -> Gates:
    _is_table(table, f"[{where}]")
    _check_keys(table, {"completeness", "min_pairs", "min_discordant", "min_duration",
                        "maturity_quantile"}, where)
    return Gates(
        completeness=_number(table, "completeness", where, 0.99, lo=0.0, hi=1.0),
        min_pairs=_number(table, "min_pairs", where, 1000, lo=0, integer=True),
        min_discordant=_number(table, "min_discordant", where, 10, lo=0, integer=True),
        min_duration_s=parse_duration(table.get("min_duration", "1d"), f"{where}.min_duration"),
        maturity_quantile=_number(table, "maturity_quantile", where, 0.99, lo=0.5, hi=0.9999),
    )


def _limits(table: dict[str, Any], where: str) -> Limits:
    _is_table(table, f"[{where}]")
    _check_keys(table, {"error_rate", "latency_slo_ms", "latency_share", "allowed_labels",
                        "value_range", "max_violations"}, where)
    labels = table.get("allowed_labels")
    if labels is not None and (not isinstance(labels, list) or not labels
                               or not all(isinstance(x, str) for x in labels)):
        raise _bad(f"{where}.allowed_labels", labels, "is not a non-empty list of strings")
    bounds = table.get("value_range")
    if bounds is not None:
        ok = (isinstance(bounds, list) and len(bounds) == 2
              and all(isinstance(x, int | float) and not isinstance(x, bool) for x in bounds)
              and bounds[0] <= bounds[1])
        if not ok:
            raise _bad(f"{where}.value_range", bounds, "is not [low, high] with low <= high")
    return Limits(
        error_rate=_number(table, "error_rate", where, 0.05, lo=0.0, hi=1.0),
        latency_slo_ms=_number(table, "latency_slo_ms", where, 250.0, lo=0.0, open_lo=True),
        latency_share=_number(table, "latency_share", where, 0.05, lo=0.0, hi=1.0),
        allowed_labels=tuple(labels) if labels is not None else None,
        value_range=(float(bounds[0]), float(bounds[1])) if bounds is not None else None,
        max_violations=_number(table, "max_violations", where, 0, lo=0, integer=True),
    )


def _cost(table: dict[str, Any], where: str) -> tuple[tuple[tuple[str, str, float], ...], float]:
    _is_table(table, f"[{where}]")
    _check_keys(table, {"matrix", "default"}, where)
    default = _number(table, "default", where, 1.0)
    matrix = table.get("matrix", {})
    _is_table(matrix, f"[{where}.matrix]")
    out = []
    for predicted, row in sorted(matrix.items()):
        _is_table(row, f"[{where}.matrix.{predicted}]")
        for truth in sorted(row):
            out.append((predicted, truth, _number(row, truth, f"{where}.matrix.{predicted}", 0.0)))
    return tuple(out), default
