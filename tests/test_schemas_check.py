import json
import shutil
import subprocess
import sys
from pathlib import Path

import shadowpipe.schemas as schemas_pkg
from shadowpipe.schemas import evolution

REPO = Path(__file__).resolve().parents[1]


def test_schemas_check_command_passes() -> None:
    proc = subprocess.run([sys.executable, "-m", "shadowpipe.cli", "schemas", "check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "compatible" in proc.stdout


def _with_edit(tmp_path: Path, monkeypatch, name: str, edit) -> list[str]:
    """Run the check with ``edit`` applied to a copy of the current schema ``name``."""
    copy = tmp_path / "schemas"
    shutil.copytree(schemas_pkg.HERE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / f"{name}.avsc"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))
    monkeypatch.setattr(schemas_pkg, "HERE", copy)
    schemas_pkg.schema.cache_clear()
    try:
        return evolution.check(REPO / "tests" / "fixtures" / "schemas")
    finally:
        schemas_pkg.schema.cache_clear()


def test_removing_required_field_breaks(tmp_path, monkeypatch) -> None:
    def drop_model(doc):
        doc["fields"] = [f for f in doc["fields"] if f["name"] != "model"]

    problems = _with_edit(tmp_path, monkeypatch, "InferenceEvent", drop_model)
    assert any("InferenceEvent" in p and "forward" in p for p in problems)


def test_adding_field_without_default_breaks(tmp_path, monkeypatch) -> None:
    def add(doc):
        doc["fields"].append({"name": "new_required", "type": "string"})

    problems = _with_edit(tmp_path, monkeypatch, "Feedback", add)
    assert any("Feedback" in p and "backward" in p for p in problems)


def test_adding_field_with_default_is_compatible(tmp_path, monkeypatch) -> None:
    def add(doc):
        doc["fields"].append({"name": "note", "type": ["null", "string"], "default": None})

    # Alert has no hand-written fast path; on one that has, see tests/test_wire_layouts.py.
    assert _with_edit(tmp_path, monkeypatch, "Alert", add) == []


def test_fixtures_exist_for_every_release() -> None:
    for version in schemas_pkg.released_versions():
        for name in schemas_pkg.NAMES:
            if schemas_pkg.released(version, name) is None:
                continue  # a message kind added after that release (e.g. Verdict)
            assert (REPO / "tests" / "fixtures" / "schemas" / version / f"{name}.avro").exists()
