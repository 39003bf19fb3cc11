"""Challengers: declared in a TOML or JSON file, loaded into models the worker can call.

Each ``[[challengers]]`` entry names a model, how to load it (``kind`` + ``location``)
and how to run it (``sample_rate``, ``timeout_ms``, ``max_batch``...). The full format is
in ``docs/challengers.md``. Modules (``module:attr``) and relative model files are found
next to the challengers file first, as Python finds a script's own modules. A challenger
that cannot be loaded stops start-up with one :class:`~shadowpipe.config.ConfigError` line
naming it.

>>> specs = parse_specs({"challengers": [
...     {"name": "echo", "version": "1", "kind": "callable",
...      "location": "shadowpipe.processors.shadow.challengers:echo_label"}]}, 1000)
>>> specs[0].sample_rate, specs[0].timeout_ms, specs[0].is_control
(1.0, 1000, False)
>>> load(specs[0]).predict_one({"label": "yes"})
'yes'
>>> to_output({"label": "spam", "probabilities": {"spam": 0.9, "ham": 0.1}})["label"]
'spam'
>>> to_output(3) == {"label": None, "probabilities": {}, "value": 3.0}
True
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from shadowpipe.config import ConfigError, Settings, env_name

SETTING = env_name("challengers")
KINDS = ("callable", "sklearn", "river", "http", "onnx", "mlflow", "oip")
# Kinds whose libraries come with an optional extra: kind -> (extra, its top-level modules).
EXTRAS = {"onnx": ("onnx", ("onnxruntime",)), "mlflow": ("mlflow", ("mlflow",)),
          "oip": ("oip", ("orjson",))}
Features = dict[str, Any]


class InvalidOutput(ValueError):
    """A challenger returned something that is not a prediction."""


@dataclass(frozen=True)
class ChallengerSpec:
    """One challenger as declared in the config file."""

    name: str
    version: str
    kind: str
    location: str
    sample_rate: float = 1.0
    timeout_ms: int = 1000
    is_control: bool = False
    vectorized: bool = False  # callable: fn(list[features]) -> list[output]
    max_batch: int = 0  # split micro-batches larger than this; 0 = no limit
    features: tuple[str, ...] = ()  # sklearn column order (default: feature_names_in_)
    max_concurrency: int = 8  # http: requests in flight
    headers: Mapping[str, str] = field(default_factory=dict)  # http, oip
    classes: tuple[str, ...] = ()  # onnx, mlflow, oip: names of probability columns
    outputs: tuple[str, ...] = ()  # oip: outputs to ask the server for
    tracking_uri: str = ""  # mlflow: resolves models:/ and runs:/ (else MLFLOW_TRACKING_URI)


def _fail(message: str, name: str | None = None) -> ConfigError:
    where = f"challenger {name!r}: " if name else ""
    return ConfigError(SETTING, where + message, "shadow")


def read_file(path: str) -> Any:
    """The parsed config file (``.json`` as JSON, anything else as TOML)."""
    file = Path(path).expanduser()
    try:
        text = file.read_text()
    except OSError as exc:
        raise _fail(f"cannot read {file}: {exc.strerror}") from None
    try:
        return json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise _fail(f"{file} is not valid {file.suffix.lstrip('.') or 'TOML'}: {exc}") from None


def parse_specs(data: Any, default_timeout_ms: int) -> list[ChallengerSpec]:
    """Validate the parsed file (``{"challengers": [...]}`` or a list) into specs."""
    entries = data.get("challengers") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise _fail("the file declares no [[challengers]]")
    specs = [_spec(entry, default_timeout_ms) for entry in entries]
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise _fail(f"duplicate challenger name(s): {', '.join(dupes)}")
    if sum(s.is_control for s in specs) > 1:
        raise _fail("at most one challenger may be the control (is_control = true)")
    return specs


def _spec(entry: Any, default_timeout_ms: int) -> ChallengerSpec:
    if not isinstance(entry, dict):
        raise _fail(f"an entry is a {type(entry).__name__}, not a table")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail("an entry has no name")
    known = {f.name for f in fields(ChallengerSpec)}
    unknown = sorted(set(entry) - known)
    if unknown:
        raise _fail(f"unknown key(s) {', '.join(unknown)}", name)
    for key in ("version", "kind", "location"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise _fail(f"{key} is required (a string)", name)
    if entry["kind"] not in KINDS:
        raise _fail(f"kind {entry['kind']!r} is not one of {', '.join(KINDS)}", name)
    values = {**entry, "timeout_ms": entry.get("timeout_ms", default_timeout_ms)}
    for key in ("features", "classes", "outputs"):
        values[key] = tuple(values.get(key, ()))
    spec = ChallengerSpec(**values)
    _check_ranges(spec)
    return spec


def _check_ranges(spec: ChallengerSpec) -> None:
    checks = [
        (isinstance(spec.sample_rate, int | float) and 0 <= spec.sample_rate <= 1,
         "sample_rate must be a number in [0, 1]"),
        (isinstance(spec.timeout_ms, int) and spec.timeout_ms > 0,
         "timeout_ms must be a positive integer"),
        (isinstance(spec.max_batch, int) and spec.max_batch >= 0,
         "max_batch must be an integer >= 0"),
        (isinstance(spec.max_concurrency, int) and spec.max_concurrency > 0,
         "max_concurrency must be a positive integer"),
        (all(isinstance(b, bool) for b in (spec.is_control, spec.vectorized)),
         "is_control and vectorized must be true or false"),
        (all(isinstance(f, str) for f in spec.features), "features must be a list of names"),
        (all(isinstance(c, str) for c in spec.classes), "classes must be a list of names"),
        (all(isinstance(o, str) for o in spec.outputs), "outputs must be a list of names"),
        (isinstance(spec.tracking_uri, str), "tracking_uri must be a string"),
    ]
    for ok, message in checks:
        if not ok:
            raise _fail(message, spec.name)


def load_specs(settings: Settings) -> list[ChallengerSpec]:
    """The challengers of ``settings.challengers``; ConfigError if unset or malformed."""
    if not settings.challengers:
        raise _fail("not set: the shadow worker needs a challengers file (docs/challengers.md)")
    specs = parse_specs(read_file(settings.challengers), settings.challenger_timeout_ms)
    folder = Path(settings.challengers).expanduser().resolve().parent
    return [beside(spec, folder) for spec in specs]


def beside(spec: ChallengerSpec, folder: Path) -> ChallengerSpec:
    """``spec`` with its location looked up next to the challengers file in ``folder``.

    A ``module:attr`` location puts ``folder`` first on ``sys.path`` (so ``my_models.py``
    beside the file imports without PYTHONPATH); a relative model file that exists in
    ``folder`` becomes that absolute path (otherwise it stays relative to the working
    directory).

    >>> s = beside(ChallengerSpec("c", "1", "sklearn", "m.joblib"), Path("/nowhere"))
    >>> s.location
    'm.joblib'
    """
    if spec.kind in ("http", "oip") or (spec.kind == "mlflow" and _is_uri(spec.location)):
        return spec
    if _is_module(spec.location):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        return spec
    relative = Path(spec.location).expanduser()
    if not relative.is_absolute() and (folder / relative).exists():
        return replace(spec, location=str(folder / relative))
    return spec


def _is_uri(location: str) -> bool:
    """An MLflow URI (``models:/``, ``runs:/``, ``s3://``...) rather than a local folder."""
    return "://" in location or location.startswith(("models:", "runs:"))


def _is_module(location: str) -> bool:
    return ":" in location and not Path(location).expanduser().exists()


# -- outputs ---------------------------------------------------------------------------


def to_output(raw: Any) -> dict[str, Any]:
    """Normalise what a model returned into an ``Output`` record.

    A mapping with ``label`` / ``probabilities`` / ``value``; a string or bool (a label);
    a number (a regression value). Anything else, or a non-finite number, is invalid.
    """
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"label", "probabilities", "value"}
        if unknown or not raw:
            raise InvalidOutput(f"output keys must be label/probabilities/value, got {sorted(raw)}")
        label, probs, value = raw.get("label"), raw.get("probabilities") or {}, raw.get("value")
    elif isinstance(raw, str | bool):
        label, probs, value = raw, {}, None
    elif _is_number(raw):
        label, probs, value = None, {}, raw
    else:
        raise InvalidOutput(f"a {type(raw).__name__} is not a prediction")
    return {
        "label": None if label is None else str(label),
        "probabilities": {str(k): _finite(v, "probability") for k, v in dict(probs).items()},
        "value": None if value is None else _finite(value, "value"),
    }


def _is_number(x: Any) -> bool:
    try:
        float(x)
    except (TypeError, ValueError):
        return False
    return not isinstance(x, str | bytes)


def _finite(x: Any, what: str) -> float:
    if not _is_number(x) or not math.isfinite(float(x)):
        raise InvalidOutput(f"{what} {x!r} is not a finite number")
    return float(x)


# -- models ----------------------------------------------------------------------------


def import_object(path: str) -> Any:
    """``pkg.module:attr.sub`` -> the object (ImportError/AttributeError if missing)."""
    module_name, sep, attr = path.partition(":")
    if not sep or not attr:
        raise ImportError(f"{path!r} is not module:attribute")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def echo_label(features: Features) -> Any:
    """A trivial challenger for examples: returns the feature ``label``."""
    return features.get("label")


class Model:
    """A loaded challenger. ``predict_batch`` returns one raw output (or exception) per input.

    Records are decoded InferenceEvent dicts; :func:`features` merges their feature maps.
    """

    vectorized = False

    def predict_batch(self, records: Sequence[dict[str, Any]]) -> list[Any]:
        return [self.predict_one(features(r)) for r in records]

    def predict_one(self, feats: Features) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources (threads, sessions)."""


def features(record: dict[str, Any]) -> Features:
    """Numeric, categorical and null features of an InferenceEvent in one dict."""
    merged: Features = dict(record["num_features"])
    merged.update(record["cat_features"])
    for name in record["null_features"]:
        merged[name] = None
    return merged


class CallableModel(Model):
    """``fn(features) -> output``, or ``fn(list[features]) -> list[output]`` if vectorized."""

    def __init__(self, fn: Any, vectorized: bool) -> None:
        self.fn = fn
        self.vectorized = vectorized

    def predict_batch(self, records: Sequence[dict[str, Any]]) -> list[Any]:
        if not self.vectorized:
            return super().predict_batch(records)
        return list(self.fn([features(r) for r in records]))

    def predict_one(self, feats: Features) -> Any:
        return self.fn([feats])[0] if self.vectorized else self.fn(feats)


class NotAModelFile(ValueError):
    """A file that is not a joblib/pickle dump of a model (a CSV, a JSON file...)."""


def _load_object(location: str) -> Any:
    """A model object from a joblib/pickle file, or ``module:attr`` (called if a factory)."""
    if _is_module(location):
        obj = import_object(location)
        return obj() if inspect.isfunction(obj) else obj
    import joblib

    file = Path(location).expanduser()
    try:
        return joblib.load(file)
    except OSError:
        raise
    except Exception as exc:  # unpickling garbage raises anything (KeyError: 109 for a CSV)
        raise NotAModelFile(
            f"{file} is not a model saved with joblib.dump() or pickle{_looks_like(file)} "
            f"(unpickling failed with {type(exc).__name__}: {exc})") from None


def _looks_like(file: Path) -> str:
    """`` (it is text: CSV or JSON data?)`` when the file starts with printable text."""
    with open(file, "rb") as f:
        head = f.read(256)
    try:
        text = head.decode()
    except UnicodeDecodeError:
        return ""
    printable = all(c.isprintable() or c.isspace() for c in text)
    return " (it is text: CSV or JSON data?)" if text and printable else ""


def _missing_module(exc: ModuleNotFoundError, spec: ChallengerSpec) -> str:
    """Where a ``module:attr`` location's module was looked for, or the extra to install."""
    if spec.kind in EXTRAS and str(exc.name).split(".")[0] in EXTRAS[spec.kind][1]:
        extra = EXTRAS[spec.kind][0]
        return (f"no module named {exc.name!r}: install the {extra} extra "
                f"(pip install 'shadowpipe[{extra}]')")
    return (f"no module named {exc.name!r} beside the challengers file or on the Python path "
            f"(location {spec.location!r}; see docs/challengers.md)")


def _load_extra_kind(spec: ChallengerSpec) -> Model:
    """An ``onnx``, ``mlflow`` or ``oip`` challenger (their libraries are optional)."""
    if spec.kind == "oip":
        from shadowpipe.processors.shadow.oip_model import OipModel

        return OipModel(spec)
    if spec.kind == "mlflow":
        from shadowpipe.processors.shadow.mlflow_model import MlflowModel

        return MlflowModel(spec.location, spec.features, spec.classes, spec.tracking_uri)
    from shadowpipe.processors.shadow.onnx_model import OnnxModel

    file = Path(spec.location).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"no ONNX model file {str(file)!r}")
    return OnnxModel(str(file), spec.features, spec.classes)


def load(spec: ChallengerSpec) -> Model:
    """Load ``spec`` into a :class:`Model`; ConfigError naming it if that fails."""
    from shadowpipe.processors.shadow import models

    try:
        if spec.kind == "callable":
            fn = import_object(spec.location)
            if not callable(fn):
                raise TypeError(f"{spec.location} is not callable")
            return CallableModel(fn, spec.vectorized)
        if spec.kind == "http":
            return models.HttpModel(spec)
        if spec.kind in EXTRAS:
            return _load_extra_kind(spec)
        obj = _load_object(spec.location)
        if spec.kind == "sklearn":
            return models.SklearnModel(obj, spec.features)
        return models.RiverModel(obj)
    except Exception as exc:  # any load failure is a configuration problem, said in one line
        detail = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            detail = _missing_module(exc, spec)
        raise _fail(
            f"cannot load {spec.kind} from {spec.location!r}: {type(exc).__name__}: {detail}",
            spec.name,
        ) from None
