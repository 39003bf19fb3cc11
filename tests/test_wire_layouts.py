"""A schema change that the hand-written fast paths do not follow is refused: by
``shadowpipe schemas check`` and, at import, by every fast path (one line naming the schema
file and the field). Each case edits a scratch copy of the schemas."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import shadowpipe.schemas as schemas_pkg
from shadowpipe import cli
from shadowpipe.config import ConfigError
from shadowpipe.schemas import wire

Doc = dict


def _scratch(tmp_path: Path, name: str, edit: Callable[[Doc], None]) -> Path:
    copy = tmp_path / "schemas"
    shutil.copytree(schemas_pkg.HERE, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py",
                                                                         "*.h"))
    path = copy / f"{name}.avsc"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    return copy


def _field(doc: Doc, name: str) -> dict:
    return next(f for f in doc["fields"] if f["name"] == name)


def _retype(doc: Doc) -> None:
    _field(doc, "model_time_ms")["type"] = "float"


def _add_with_default(doc: Doc) -> None:
    doc["fields"].append({"name": "note", "type": ["null", "string"], "default": None})


def _rename(doc: Doc) -> None:
    _field(doc, "challenger_version")["name"] = "challenger_release"


def _remove(doc: Doc) -> None:
    doc["fields"] = [f for f in doc["fields"] if f["name"] != "error_kind"]


@pytest.mark.parametrize(("edit", "field", "what"), [
    (_retype, "model_time_ms", "is float, the hand layout has double"),
    (_add_with_default, "note", "is not in the hand layout"),
    (_rename, "challenger_release", "is not in the hand layout"),
    (_remove, "error_kind", "is gone from the schema"),
])
def test_layout_problems_name_schema_and_field(tmp_path, edit, field, what) -> None:
    problems = wire.layout_problems(_scratch(tmp_path, "ShadowPrediction", edit))
    assert len(problems) == 1
    line = problems[0]
    assert line.startswith(f"schemas/ShadowPrediction.avsc: field {field!r} {what}")
    assert "\n" not in line
    assert "processors/shadow/encode.py" in line  # who must follow


def test_schemas_check_fails_on_a_compatible_change_the_fast_path_ignores(
        tmp_path, monkeypatch, capsys) -> None:
    # A field with a default is a compatible evolution: only the layout check can catch it.
    copy = _scratch(tmp_path, "InferenceEvent", _add_with_default)
    cli.build_parser()  # the fast paths imported (checked) under the real schemas first
    monkeypatch.setattr(schemas_pkg, "HERE", copy)
    schemas_pkg.schema.cache_clear()
    try:
        code = cli.main(["schemas", "check"])
    finally:
        schemas_pkg.schema.cache_clear()
    err = capsys.readouterr().err
    print(err)  # the failure message, for the record (pytest -s shows it)
    assert code == 1
    assert "schemas/InferenceEvent.avsc: field 'note' is not in the hand layout" in err
    assert "not backward compatible" not in err and "not forward compatible" not in err


def test_fast_paths_refuse_to_start_on_a_retyped_field(tmp_path, monkeypatch) -> None:
    def retype(doc: Doc) -> None:
        _field(doc, "event_time")["type"] = "int"

    monkeypatch.setattr(schemas_pkg, "HERE", _scratch(tmp_path, "InferenceEvent", retype))
    schemas_pkg.schema.cache_clear()
    try:
        with pytest.raises(wire.LayoutMismatch) as caught:
            wire.require_layout("InferenceEvent")
    finally:
        schemas_pkg.schema.cache_clear()
    # A ConfigError: the CLI prints it as one line and exits 2.
    assert isinstance(caught.value, ConfigError)
    assert str(caught.value).startswith(
        "schemas/InferenceEvent.avsc: field 'event_time' is int, the hand layout has long")


def test_current_schemas_match_every_layout() -> None:
    assert wire.layout_problems() == []
    assert set(wire.LAYOUTS) <= set(schemas_pkg.NAMES)


# A process whose schemas changed under its fast paths (``schemas.HERE`` points at the
# scratch copy before anything else is imported): it imports one module and prints the
# ConfigError that module raised, or runs the CLI.
_RUN = """
import sys
from pathlib import Path
import shadowpipe.schemas
shadowpipe.schemas.HERE = Path(sys.argv[1])
from shadowpipe.config import ConfigError
if sys.argv[2] == "cli":
    from shadowpipe import cli
    sys.exit(cli.main(sys.argv[3:]))
try:
    __import__(sys.argv[2])
except ConfigError as exc:
    print(exc)
    sys.exit(2)
"""
FEEDBACK_WEIGHT = ("schemas/Feedback.avsc: field 'weight' is float, the hand layout has double:"
                   " update producers/events.py and LAYOUTS in schemas/wire.py")


def _run(copy: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _RUN, str(copy), *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def feedback_weight_float(tmp_path_factory) -> Path:
    def retype(doc: Doc) -> None:
        _field(doc, "weight")["type"] = "float"

    return _scratch(tmp_path_factory.mktemp("weight"), "Feedback", retype)


def test_producer_refuses_to_import_with_one_line(feedback_weight_float) -> None:
    proc = _run(feedback_weight_float, "shadowpipe.producers")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.splitlines() == [FEEDBACK_WEIGHT]


@pytest.mark.parametrize("module", ["shadowpipe.processors.shadow.encode",
                                    "shadowpipe.processors.join.fastpath"])
def test_workers_refuse_to_import_with_one_line(tmp_path, module) -> None:
    proc = _run(_scratch(tmp_path, "ShadowPrediction", _retype), module)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith("schemas/ShadowPrediction.avsc: field 'model_time_ms' is float")


def test_schemas_check_command_names_the_field(feedback_weight_float) -> None:
    proc = _run(feedback_weight_float, "cli", "schemas", "check")
    print(proc.stderr)  # the failure message, for the record (pytest -s shows it)
    assert proc.returncode == 1
    assert FEEDBACK_WEIGHT in proc.stderr.splitlines()
