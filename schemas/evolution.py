"""Schema evolution check: every current schema must be FULL_TRANSITIVE compatible.

* **Backward**: the current schema reads data written with every released version, both
  the encoded fixtures kept per version (``tests/fixtures/schemas/<version>/<Name>.avro``,
  Avro container files carrying their writer schema) and generated samples.
* **Forward**: every released schema reads data written with the current one, so consumers
  that have not been upgraded keep working while producers roll forward.

A field added or removed without a default, a changed type, a removed enum symbol without
an enum default or a renamed record all fail.

* **Hand layouts**: every schema with a hand-written fast path must still have the layout
  that fast path writes and reads (:data:`~shadowpipe.schemas.wire.LAYOUTS`): any field
  added (even with a default), removed, renamed, moved or retyped fails until the fast
  paths follow.

>>> problems = check()
>>> problems
[]
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import fastavro

from shadowpipe.schemas import NAMES, released, released_versions, schema
from shadowpipe.schemas.wire import layout_problems

DEFAULT_FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "schemas"
SAMPLES = 25


def sample(avro_type: Any, rng: random.Random, named: dict[str, Any] | None = None) -> Any:
    """A random datum of a parsed Avro type (unions pick a random branch)."""
    if named is None:
        named = {}
        _collect_named(avro_type, named)
    if isinstance(avro_type, list):
        return sample(rng.choice(avro_type), rng, named)
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if kind == "record":
            return {f["name"]: sample(f["type"], rng, named) for f in avro_type["fields"]}
        if kind == "enum":
            return rng.choice(avro_type["symbols"])
        if kind == "array":
            return [sample(avro_type["items"], rng, named) for _ in range(rng.randint(0, 3))]
        if kind == "map":
            n = rng.randint(0, 3)
            return {f"k{i}": sample(avro_type["values"], rng, named) for i in range(n)}
        if kind == "fixed":
            return rng.randbytes(avro_type["size"])
        return sample(kind, rng, named)
    if avro_type in named:
        return sample(named[avro_type], rng, named)
    return {
        "null": lambda: None,
        "boolean": lambda: rng.random() < 0.5,
        "int": lambda: rng.randint(-(2**31), 2**31 - 1),
        "long": lambda: rng.randint(-(2**63), 2**63 - 1),
        "float": lambda: rng.uniform(-1e6, 1e6),
        "double": lambda: rng.uniform(-1e6, 1e6),
        "bytes": lambda: rng.randbytes(rng.randint(0, 8)),
        "string": lambda: "".join(rng.choices("abcxyz-_0189é", k=rng.randint(0, 8))),
    }[avro_type]()


def _collect_named(avro_type: Any, named: dict[str, Any]) -> None:
    if isinstance(avro_type, list):
        for branch in avro_type:
            _collect_named(branch, named)
    elif isinstance(avro_type, dict):
        if avro_type["type"] in ("record", "enum", "fixed"):
            named[avro_type["name"]] = avro_type
        for f in avro_type.get("fields", ()):
            _collect_named(f["type"], named)
        for key in ("items", "values"):
            if key in avro_type:
                _collect_named(avro_type[key], named)


def _roundtrip(writer: dict[str, Any], reader: dict[str, Any], records: list[Any]) -> None:
    for record in records:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, writer, record)
        buf.seek(0)
        fastavro.schemaless_reader(buf, writer, reader)


def _fixture_problems(name: str, version: str, fixtures: Path) -> list[str]:
    path = fixtures / version / f"{name}.avro"
    if not path.exists():
        return [f"{name}: no encoded fixture for released version {version} ({path})"]
    try:
        with path.open("rb") as fo:
            count = sum(1 for _ in fastavro.reader(fo, reader_schema=schema(name)))
    except Exception as exc:  # schema resolution raises several types
        return [f"{name}: cannot read version {version} fixtures with the current schema: {exc}"]
    return [] if count else [f"{name}: fixture for version {version} holds no records"]


def check(fixtures: Path | None = DEFAULT_FIXTURES, seed: int = 0) -> list[str]:
    """Every compatibility problem found, as one line each (empty when compatible)."""
    rng = random.Random(seed)
    problems: list[str] = []
    for version in released_versions():
        for name in NAMES:
            old = released(version, name)
            if old is None:
                continue
            new = schema(name)
            if fixtures is not None and fixtures.exists():
                problems += _fixture_problems(name, version, fixtures)
            for direction, writer, reader in (("backward", old, new), ("forward", new, old)):
                try:
                    _roundtrip(writer, reader, [sample(writer, rng) for _ in range(SAMPLES)])
                except Exception as exc:
                    problems.append(
                        f"{name}: not {direction} compatible with version {version}: {exc}"
                    )
    return problems + layout_problems()

