"""The ``shadowpipe`` command.

Each command group lives with the code it drives and registers itself here through a
``register(subparsers, common)`` function; ``common`` carries the configuration flags so
every command accepts them. Command modules import their heavy dependencies lazily, so the
base install (the producer library) keeps a working CLI. Benchmarks (``shadowpipe.bench``)
are named here with their help and imported only when ``shadowpipe bench NAME`` is parsed.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from shadowpipe import config
from shadowpipe.config import ConfigError, Settings

# Modules with a ``register(subparsers, common)`` function, in help order.
COMMAND_MODULES = [
    "shadowpipe.commands",
    "shadowpipe.processors.worker",
    "shadowpipe.processors.monitor.commands",
    "shadowpipe.processors.verdict.commands",
    "shadowpipe.processors.report.commands",
    "shadowpipe.processors.replay.commands",
    "shadowpipe.processors.records_commands",
    "shadowpipe.demo.run",
]
# ``shadowpipe bench NAME``: the module (with ``add_arguments(parser)``) and the help line.
# Written out so that ``--help`` and the other commands import no benchmark.
BENCHES: dict[str, tuple[str, str]] = {
    "emit": ("shadowpipe.bench.emit", "cost of emitting to a service's request handler"),
    "join": ("shadowpipe.bench.join", "joiner throughput, latency, memory"),
    "monitor": ("shadowpipe.bench.monitor", "monitor JoinedRecords/s"),
    "pipeline": ("shadowpipe.bench.pipeline",
                 "the whole pipeline end to end: highest sustainable requests/s, latency, "
                 "drift-to-alert"),
    "export": ("shadowpipe.bench.export",
               "export of joined records to Parquet vs a plain read into Arrow"),
    "replay": ("shadowpipe.bench.replay",
               "replay of stored requests vs the live shadow worker's rate"),
    "shadow": ("shadowpipe.bench.shadow", "shadow worker vs plain-loop ceiling"),
    "verdict": ("shadowpipe.bench.verdict",
                "verdict evaluation time vs a plain scan over N records"),
}


class _BenchParser(argparse.ArgumentParser):
    """One benchmark's parser: imports its module and adds its flags when first parsed."""

    def __init__(self, *args: Any, module: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._module = module

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        if self._module:
            importlib.import_module(self._module).add_arguments(self)
            self.set_defaults(func=_needs_bench_extra(self.prog, self.get_default("func")))
            self._module = ""
        return super().parse_known_args(args, namespace)


def _needs_bench_extra(prog: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func``, with a third-party module missing at run time (numpy, scikit-learn...: the
    benchmarks import them when they start) said in one line, exit 2."""

    @functools.wraps(func)
    def run(args: argparse.Namespace, settings: Settings) -> Any:
        try:
            return func(args, settings)
        except ModuleNotFoundError as exc:
            if (exc.name or "shadowpipe").split(".")[0] == "shadowpipe":
                raise  # our own module missing is a bug, not an install choice
            raise ConfigError(prog, f"needs {exc.name}, which the bench extra installs: "
                                    "pip install 'shadowpipe[bench]'") from exc

    return run


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    config.add_arguments(common)
    parser = argparse.ArgumentParser(
        prog="shadowpipe",
        description="Shadow-mode evaluation of ML models on Kafka.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, common)
    bench = sub.add_parser("bench", help="benchmarks that print JSON (ratios within one run)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK",
                                     parser_class=_BenchParser)
    for name, (module, help_line) in BENCHES.items():
        bench_sub.add_parser(name, parents=[common], help=help_line, module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse, load settings, run; configuration errors are one line, exit 2."""
    try:  # building the parser imports the fast paths, which check their schema layouts
        args = build_parser().parse_args(argv)
        settings = Settings.load(args)
        logging.basicConfig(
            level=settings.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        return int(args.func(args, settings) or 0)
    except ConfigError as exc:
        print(f"shadowpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
