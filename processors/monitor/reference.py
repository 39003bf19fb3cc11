"""Reference profiles: the distribution covariate drift is measured against.

A profile is built from a file of reference data (typically the training set, CSV or
Parquet) and stored in ClickHouse (``reference_profiles``), one row per feature: decile bin
edges and the count of reference values per bin for a numeric column, the most frequent
categories and their counts (plus one ``(other)`` bucket) for any other column. The monitor
measures PSI of each window against the profile of the primary model (or the profile set
for every model, ``model = ''``); without one it falls back to the first
``PSI_REFERENCE`` values of the stream. Setting a profile again replaces it (the newest
``version`` of a model wins; older ones stay in the table as history).

>>> p = build_profile({"amount": [str(v) for v in range(10)], "région": ["a", "a", "b", ""]})
>>> p["amount"].kind, p["amount"].edges[:3], p["amount"].counts
('numeric', (1.0, 2.0, 3.0), (1, 1, 1, 1, 1, 1, 1, 1, 1, 1))
>>> p["région"].kind, p["région"].categories, p["région"].counts
('categorical', ('a', 'b'), (2, 1, 0))
>>> p["région"].bin("zz"), p["amount"].bin(2.5)   # unknown categories: the (other) bin
(2, 2)
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors.monitor.stats import quantile_edges

MAX_CATEGORIES = 100  # rarer categories share the (other) bucket
REFERENCE_BINS = 10
PROFILE_COLUMNS = ["model", "feature", "kind", "edges", "categories", "counts", "total",
                   "source", "version"]


@dataclass(frozen=True)
class FeatureProfile:
    """One feature's reference histogram: ``counts`` per bin of ``edges`` (numeric, one
    more bin than inner edges) or per category of ``categories`` plus ``(other)``."""

    kind: str  # "numeric" | "categorical"
    counts: tuple[int, ...]
    edges: tuple[float, ...] = ()
    categories: tuple[str, ...] = ()
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.categories)})

    def bin(self, x: Any) -> int | None:
        """The bin of a stream value, or None when it cannot be placed (missing, NaN)."""
        if self.kind == "numeric":
            if not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x):
                return None
            return bisect.bisect_right(self.edges, x)
        if x is None:
            return None
        return self._index.get(str(x), len(self.categories))


@dataclass(frozen=True)
class Profile:
    """Every feature's reference of one model (``''``: any model) and where it came from."""

    model: str
    version: int
    source: str
    features: dict[str, FeatureProfile]

    @property
    def tag(self) -> str:
        return f"profile:{self.version}"


def _number(x: Any) -> float | None:
    """``x`` as a finite float, None when it is missing; raises ValueError otherwise."""
    if x is None or x == "":
        return None
    if isinstance(x, bool):
        raise ValueError(x)
    value = float(x)
    if not math.isfinite(value):
        return None
    return value


def _numeric(values: Sequence[Any]) -> list[float] | None:
    """The column's finite numbers, or None when some value is not a number."""
    out = []
    try:
        for x in values:
            value = _number(x)
            if value is not None:
                out.append(value)
    except (TypeError, ValueError):
        return None
    return out


def feature_profile(values: Sequence[Any]) -> FeatureProfile | None:
    """The profile of one column (None when it holds no value at all)."""
    numbers = _numeric(values)
    if numbers is not None:
        if not numbers:
            return None
        edges = quantile_edges(numbers, REFERENCE_BINS)
        counts = [0] * (len(edges) + 1)
        for x in numbers:
            counts[bisect.bisect_right(edges, x)] += 1
        return FeatureProfile("numeric", tuple(counts), edges=tuple(edges))
    freq = Counter(str(x) for x in values if x is not None and x != "")
    if not freq:
        return None
    top = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_CATEGORIES]
    other = sum(freq.values()) - sum(n for _, n in top)
    return FeatureProfile("categorical", (*(n for _, n in top), other),
                          categories=tuple(c for c, _ in top))


def build_profile(columns: dict[str, Sequence[Any]]) -> dict[str, FeatureProfile]:
    """Profiles of every column that holds values (numeric when every value is a number)."""
    out = {}
    for name, values in columns.items():
        profile = feature_profile(values)
        if profile is not None:
            out[name] = profile
    return out


def read_columns(path: Path, features: Iterable[str] = ()) -> dict[str, list[Any]]:
    """The columns of a CSV (header row, UTF-8) or Parquet file, optionally only some."""
    wanted = list(features)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        columns = _read_csv(path)
    elif suffix in (".parquet", ".pq"):
        columns = _read_parquet(path, wanted)
    else:
        raise ConfigError("--from", f"{path}: expected a .csv or .parquet file")
    if wanted:
        missing = [name for name in wanted if name not in columns]
        if missing:
            raise ConfigError("--features", f"{path} has no column {', '.join(missing)}")
        columns = {name: columns[name] for name in wanted}
    return columns


def _read_csv(path: Path) -> dict[str, list[Any]]:
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise ConfigError("--from", f"{path}: empty CSV (a header row is needed)")
            columns: dict[str, list[Any]] = {name: [] for name in header}
            cols = list(columns.values())
            for row in reader:
                for col, value in zip(cols, row, strict=False):
                    col.append(value)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError("--from", f"cannot read {path}: {exc}") from None
    return columns


def _read_parquet(path: Path, wanted: list[str]) -> dict[str, list[Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("--from", "reading Parquet needs pyarrow: pip install pyarrow "
                          "(or shadowpipe[embedded], which brings it)") from None
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[n for n in wanted if n in names] or None)
    except (OSError, ValueError) as exc:
        raise ConfigError("--from", f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    return {name: table.column(name).to_pylist() for name in table.column_names}


def profile_rows(model: str, profile: dict[str, FeatureProfile], source: str,
                 version: int | None = None) -> list[dict[str, Any]]:
    """The ``reference_profiles`` rows of a profile (one per feature)."""
    version = version if version is not None else int(time.time() * 1000)
    return [{"model": model, "feature": name, "kind": fp.kind, "edges": list(fp.edges),
             "categories": list(fp.categories), "counts": list(fp.counts),
             "total": sum(fp.counts), "source": source, "version": version}
            for name, fp in sorted(profile.items())]


def profiles_from_rows(rows: Iterable[dict[str, Any]]) -> dict[str, Profile]:
    """Profiles by model from ``reference_profiles`` rows (the newest version of each)."""
    newest: dict[str, int] = {}
    rows = list(rows)
    for row in rows:
        newest[row["model"]] = max(newest.get(row["model"], 0), int(row["version"]))
    features: dict[str, dict[str, FeatureProfile]] = {model: {} for model in newest}
    sources: dict[str, str] = {}
    for row in rows:
        if int(row["version"]) != newest[row["model"]]:
            continue
        sources[row["model"]] = row["source"]
        features[row["model"]][row["feature"]] = FeatureProfile(
            row["kind"], tuple(int(n) for n in row["counts"]),
            edges=tuple(float(e) for e in row["edges"]),
            categories=tuple(row["categories"]))
    return {model: Profile(model, newest[model], sources.get(model, ""), feats)
            for model, feats in features.items()}


# -- storage -------------------------------------------------------------------------------

LOAD_SQL = ("SELECT model, feature, kind, edges, categories, counts, total, source, version "
            "FROM {db}.reference_profiles FINAL "
            "WHERE (model, version) IN (SELECT model, max(version) "
            "FROM {db}.reference_profiles GROUP BY model)")


def store(client: Any, db: str, rows: list[dict[str, Any]]) -> int:
    """Insert profile rows with a clickhouse-connect client; the number of rows."""
    if rows:
        client.insert("reference_profiles", [[row[c] for c in PROFILE_COLUMNS] for row in rows],
                      column_names=PROFILE_COLUMNS, database=db)
    return len(rows)


def load_rows(client: Any, db: str) -> list[dict[str, Any]]:
    """The rows of the newest profile of every model stored in ``db``."""
    result = client.query(LOAD_SQL.replace("{db}", db))
    names = list(result.column_names)
    return [dict(zip(names, row, strict=True)) for row in result.result_rows]


def load(client: Any, db: str) -> dict[str, Profile]:
    """The newest profile of every model stored in ``db``."""
    return profiles_from_rows(load_rows(client, db))


# -- sharing with the partitioned monitor's processes ---------------------------------------

def profiles_key(settings: Settings) -> str:
    """The Redis key through which the process that reads ClickHouse hands the profiles to
    every series stage (``monitor_mode=partitioned``: most processes cannot read it)."""
    return f"{settings.topic_prefix}monitor:profiles"


def publish(redis: Any, settings: Settings, rows: list[dict[str, Any]]) -> dict[str, Profile]:
    """Put the newest profile rows where every series stage finds them; their profiles."""
    redis.set(profiles_key(settings), json.dumps(rows, default=list))
    return profiles_from_rows(rows)


def fetch(redis: Any, settings: Settings) -> dict[str, Profile]:
    """The profiles :func:`publish` put in Redis (none yet: empty)."""
    raw = redis.get(profiles_key(settings))
    return profiles_from_rows(json.loads(raw)) if raw else {}


def set_reference(settings: Settings, path: str | Path, model: str = "",
                  features: Iterable[str] = ()) -> dict[str, Any]:
    """Build the profile of ``path`` and store it as ``model``'s reference ('' = every
    model); returns a summary. With the embedded engine and a monitor running, the monitor
    stores it (it alone may open the engine) and uses it from its next record on.

    >>> # set_reference(Settings.load(), "train.parquet", model="fraud-v3")
    """
    path = Path(path)
    profile = build_profile(read_columns(path, features))
    if not profile:
        raise ConfigError("--from", f"{path}: no column holds a value")
    rows = profile_rows(model, profile, path.name)
    via = "clickhouse"
    if settings.clickhouse.startswith("chdb:") and _post_to_monitor(settings, rows):
        via = "monitor"
    else:
        from shadowpipe.stores import check_clickhouse
        from shadowpipe.tables import database, migrate

        client = check_clickhouse(settings, "reference set")
        migrate(client, settings)
        store(client, database(settings), rows)
    return {"model": model, "version": rows[0]["version"], "source": path.name, "via": via,
            "features": {name: fp.kind for name, fp in sorted(profile.items())}}


REFERENCE_PATH = "/shadowpipe/reference/"


def _post_to_monitor(settings: Settings, rows: list[dict[str, Any]]) -> bool:
    """Hand the rows to the running monitor's endpoint; False when no monitor listens."""
    import urllib.error

    from shadowpipe.processors.read import ask_monitor

    try:
        return ask_monitor(settings, REFERENCE_PATH, {}, method="POST", body={"rows": rows},
                           timeout_s=60) is not None
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False  # a worker without the monitor answers on that port
        raise ConfigError("web_port", f"monitor refused the reference: {exc}") from None


def attach(app: Any, settings: Settings, sink: Any, executor: Any,
           use: Callable[[list[dict[str, Any]]], dict[str, Profile]],
           refresh_s: float = 30.0) -> None:
    """Monitor side: load the stored profiles now, accept new ones on ``REFERENCE_PATH``
    and reload them every ``refresh_s`` (profiles stored directly into a ClickHouse server
    by ``reference set``). ``use`` puts the newest rows to work (the single monitor's
    :meth:`~.core.Monitor.set_profiles`, or :func:`publish` to the series stages) and
    returns their profiles. Every step runs on the ClickHouse client's thread
    (``executor``)."""
    import asyncio

    in_use: dict[str, Profile] = {}

    def reload() -> None:
        found = use(load_rows(sink.connect(), sink.db))
        in_use.clear()
        in_use.update(found)

    def take(rows: list[dict[str, Any]]) -> None:
        store(sink.connect(), sink.db, rows)
        reload()

    reload()

    from faust.web import View

    @app.page(REFERENCE_PATH)
    class ReferenceView(View):  # POST stores a profile; GET lists the ones in use
        async def get(self, request: Any) -> Any:
            return self.json({"profiles": {m: p.version for m, p in in_use.items()}})

        async def post(self, request: Any) -> Any:
            rows = (await request.json())["rows"]
            try:
                await asyncio.get_running_loop().run_in_executor(executor, take, rows)
            except Exception as exc:  # report to the caller, keep serving
                return self.json({"error": str(exc).splitlines()[0]}, status=400)
            return self.json({"stored": len(rows)})

    @app.timer(interval=refresh_s)
    async def refresh() -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(executor, reload)
        except Exception as exc:  # the next tick retries; the current profiles stay
            import logging

            logging.getLogger(__name__).warning("reference profiles not reloaded: %s", exc)
