"""What installing and importing pulls in: ``pip install .`` without extras gives a working
producer library (and CLI) without numpy, scikit-learn or matplotlib, and the CLI imports
a benchmark only when ``shadowpipe bench NAME`` is run."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shadowpipe.cli import BENCHES
from shadowpipe.config import Settings

REPO = Path(__file__).resolve().parents[1]
# What the base install must never import, and the benchmarks' own package.
HEAVY = ("numpy", "sklearn", "scipy", "matplotlib", "joblib")
BENCH = "shadowpipe.bench"
# Printed by the child once the code under test has run: the HEAVY and bench modules loaded.
LOADED = (f"import sys, json; print(json.dumps(sorted(m for m in sys.modules "
          f"if m.split('.')[0] in {HEAVY!r} or m == {BENCH!r} or m.startswith({BENCH!r} + '.'))))")


def _heavy_after(python: Path | str, code: str, env: dict[str, str] | None = None) -> list[str]:
    """HEAVY and bench modules loaded once ``code`` has run in a fresh ``python``; isolated
    (-I): the checkout's own ``shadowpipe/`` in the working directory would shadow the
    installed package."""
    out = subprocess.run([str(python), "-I", "-c", f"{code}\n{LOADED}"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@pytest.fixture(scope="session")
def base_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding ``pip install .`` (no extras), built once per session from a
    copy of the sources (pip builds in the source folder; others may be editing it)."""
    root = tmp_path_factory.mktemp("base-install")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build")
    for folder in ("shadowpipe", "producers", "processors", "schemas"):
        shutil.copytree(REPO / folder, src / folder, ignore=skip)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    python = root / "venv" / "bin" / "python"
    # The configured index and pip's wheel cache make a second session's install quick.
    out = subprocess.run([str(python), "-m", "pip", "install", "-q", str(src)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    return python


def test_base_install_brings_no_numpy_sklearn_or_matplotlib(base_python: Path) -> None:
    code = ("import importlib.util as u; "
            "print([m for m in ('numpy', 'sklearn', 'scipy', 'matplotlib', 'joblib') "
            "if u.find_spec(m)])")
    out = subprocess.run([str(base_python), "-I", "-c", code], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_base_install_emits_without_importing_heavy_modules(
    base_python: Path, settings: Settings
) -> None:
    """The public emit API end to end against the broker: both events delivered, and
    neither importing the library nor emitting loads numpy, scikit-learn or matplotlib."""
    code = textwrap.dedent("""
        import shadowpipe.producers
        from shadowpipe.producers import Emitter, current_request_id

        emitter = Emitter()

        @emitter.track(model="m", version="1")
        def predict(features):
            return "ok"

        predict({"amount": 12.5, "country": "DE"})
        emitter.emit_feedback(current_request_id(), "ok")
        assert emitter.close(60) == 0, "events left undelivered"
        stats = emitter.stats()
        assert (stats.sent, stats.delivered) == (2, 2), stats
    """)
    assert _heavy_after(base_python, code, {**os.environ, **settings.to_env()}) == []


def test_base_install_cli_help_lists_the_benchmarks(base_python: Path) -> None:
    """The CLI of the base install starts, and ``bench --help`` names every benchmark
    without importing one (their modules would need the ``bench`` extra to run)."""
    code = textwrap.dedent("""
        import contextlib, io
        from shadowpipe import cli
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            cli.main(["bench", "--help"])
        assert all(name in out.getvalue() for name in cli.BENCHES), out.getvalue()
    """)
    assert _heavy_after(base_python, code) == []


def test_a_benchmark_without_the_bench_extra_says_so_in_one_line(base_python: Path) -> None:
    out = subprocess.run([str(base_python), "-I", "-m", "shadowpipe.cli", "bench", "emit",
                          "--requests", "10"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert "shadowpipe bench emit: needs numpy," in out.stderr
    assert "pip install 'shadowpipe[bench]'" in out.stderr


def test_cli_imports_no_benchmark_until_one_is_run() -> None:
    """Building the whole parser (what ``--help`` and every command do) loads no bench
    module; parsing ``bench join`` loads that one only, with its flags."""
    assert _heavy_after(sys.executable, "import shadowpipe.cli") == []
    assert _heavy_after(sys.executable, "from shadowpipe import cli; cli.build_parser()") == []
    code = textwrap.dedent("""
        from shadowpipe import cli
        args = cli.build_parser().parse_args(["bench", "join", "--requests", "5"])
        assert (args.requests, args.func.__module__) == (5, "shadowpipe.bench.join"), args
    """)
    assert _heavy_after(sys.executable, code) == ["shadowpipe.bench", "shadowpipe.bench.join"]


@pytest.mark.parametrize("name", sorted(BENCHES))
def test_every_benchmark_module_gives_its_flags_and_command(name: str) -> None:
    from shadowpipe import cli

    args = cli.build_parser().parse_args(["bench", name, "--json"])
    assert args.json is True
    assert args.func.__module__ == BENCHES[name][0]


def test_no_product_module_imports_the_bench_package() -> None:
    """Read from the sources, lazy imports included: only ``shadowpipe/bench/`` itself
    imports ``shadowpipe.bench`` (the CLI names its modules as strings)."""
    found = []
    for folder in ("producers", "processors", "schemas", "shadowpipe"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if (REPO / "shadowpipe" / "bench") in path.parents:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                         else [a.name for a in node.names] if isinstance(node, ast.Import)
                         else [])
                found += [f"{path.relative_to(REPO)}:{node.lineno}" for name in names
                          if name == BENCH or name.startswith(BENCH + ".")]
    assert found == []


def test_every_package_folder_is_installed() -> None:
    """pyproject lists the packages by hand (the folder mapping hides them from setuptools'
    finder): a new sub-package left out installs nowhere but an editable checkout."""
    import tomllib

    root = Path(__file__).parents[1]
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {folder: name for name, folder in tool["package-dir"].items()}
    found = set()
    for folder, name in folders.items():
        for init in (root / folder).rglob("__init__.py"):
            inner = init.parent.relative_to(root / folder).parts
            found.add(".".join((name, *inner)))
    assert found <= set(tool["packages"]), sorted(found - set(tool["packages"]))
