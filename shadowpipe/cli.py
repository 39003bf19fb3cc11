"""The ``shadowpipe`` command.

Each command group lives with the code it drives and registers itself here through a
``register(subparsers, common)`` function; ``common`` carries the configuration flags so
every command accepts them. Command modules import their heavy dependencies lazily, so the
base install (the producer library) keeps a working CLI.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from shadowpipe import config
from shadowpipe.config import ConfigError, Settings

# Modules with a ``register(subparsers, common)`` function, in help order.
COMMAND_MODULES = [
    "shadowpipe.commands",
    "shadowpipe.processors.worker",
    "shadowpipe.processors.monitor.commands",
    "shadowpipe.processors.verdict.commands",
    "shadowpipe.demo.run",
]
# Modules with a ``register(bench_subparsers, common)`` function: ``shadowpipe bench NAME``.
BENCH_MODULES: list[str] = [
    "shadowpipe.producers.bench",
    "shadowpipe.processors.join.bench",
    "shadowpipe.processors.monitor.bench",
    "shadowpipe.processors.shadow.bench",
    "shadowpipe.processors.verdict.bench",
]


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
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench_sub, common)
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
