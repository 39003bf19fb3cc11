"""The package layering of docs/architecture.md, read from the code's own imports: producers
and processors meet only in ``schemas/`` and ``shadowpipe/``, the base commands do not load
the monitor, no private name crosses a package, and the sampling rule is written once."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Folder -> installed package name (pyproject's package-dir mapping).
PACKAGES = {"shadowpipe": "shadowpipe", "producers": "shadowpipe.producers",
            "processors": "shadowpipe.processors", "schemas": "shadowpipe.schemas"}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) of every import, lazy ones in functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.lineno, node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, a.name, []) for a in node.names)
    return found


def _sources(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _crossing(folder: str, forbidden: str) -> list[str]:
    return [f"{p.relative_to(ROOT)}:{line}: {module}"
            for p in _sources(folder) for line, module, _ in _imports(p)
            if module == forbidden or module.startswith(forbidden + ".")]


def test_producers_and_processors_import_nothing_of_each_other() -> None:
    assert _crossing("producers", "shadowpipe.processors") == []
    assert _crossing("processors", "shadowpipe.producers") == []


def test_base_commands_do_not_load_the_monitor() -> None:
    path = ROOT / "shadowpipe" / "commands.py"
    assert [m for _, m, _ in _imports(path) if m.startswith("shadowpipe.processors.monitor")] == []


def test_no_private_name_is_imported_across_packages() -> None:
    crossings = []
    for folder in PACKAGES:
        for path in _sources(folder):
            package = _module(path).rsplit(".", 1)[0]
            for line, module, names in _imports(path):
                if module.startswith(package):
                    continue  # the package's own private helpers (its compiled halves)
                crossings += [f"{path.relative_to(ROOT)}:{line}: {module}.{n}" for n in names
                              if n.startswith("_") and not n.startswith("__")]
    assert crossings == []


def test_the_sampling_hash_is_written_once() -> None:
    rule = "sha256(request_id"
    holders = [str(p.relative_to(ROOT)) for folder in PACKAGES for p in _sources(folder)
               if "digest()[:8]" in p.read_text() and "bench" not in p.parts]
    assert holders == ["shadowpipe/sampling.py"], holders
    assert rule in (ROOT / "shadowpipe" / "sampling.py").read_text()
