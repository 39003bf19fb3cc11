"""``shadowpipe verdict``: is this challenger safe to promote? An exit code a CI/CD step can
branch on, the reasons, each criterion's interval and the ETA of a decision.

Exit codes (``EXIT_CODES``): 0 PROMOTE, 3 HOLD, 4 INCONCLUSIVE, 5 REJECT, 1 runtime error,
2 configuration error. Without ``--challenger`` the code is that of the worst verdict
(REJECT, then INCONCLUSIVE, then HOLD), so 0 means every challenger may be promoted.

Where the verdict comes from: with the embedded engine only one process may open the data
directory; while a monitor runs, that is the monitor, so the command asks its endpoint
(``/shadowpipe/verdict/``) and evaluates on ClickHouse itself only when no monitor answers.

>>> exit_code([{"verdict": "HOLD"}, {"verdict": "REJECT"}])
5
>>> exit_code([])
4
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
from typing import Any

from shadowpipe.config import ConfigError, Settings

EXIT_CODES = {"PROMOTE": 0, "HOLD": 3, "INCONCLUSIVE": 4, "REJECT": 5}
ERROR_EXIT = 1
# Worst first: the code of a multi-challenger answer.
SEVERITY = ("REJECT", "INCONCLUSIVE", "HOLD", "PROMOTE")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    verdict = sub.add_parser(
        "verdict", parents=[common],
        help="PROMOTE / HOLD / INCONCLUSIVE / REJECT per challenger (exit 0/3/4/5)",
        description="Evaluate the verdict of each challenger (policy: --policy). "
                    "Exit codes: 0 PROMOTE, 3 HOLD, 4 INCONCLUSIVE, 5 REJECT, "
                    "1 runtime error, 2 configuration error. "
                    "'reset' lifts a latched REJECT of --challenger.")
    verdict.add_argument("action", nargs="?", choices=("reset",),
                         help="reset: clear the latched decision of --challenger")
    verdict.add_argument("--challenger", default="", help="only this challenger")
    verdict.add_argument("--format", choices=("table", "json"), default="table")
    verdict.set_defaults(func=verdict_cmd)


def exit_code(verdicts: list[dict[str, Any]]) -> int:
    """The exit code of the worst verdict; no verdict at all is INCONCLUSIVE."""
    seen = {v["verdict"] for v in verdicts}
    worst = next((name for name in SEVERITY if name in seen), "INCONCLUSIVE")
    return EXIT_CODES[worst]


def verdict_cmd(args: argparse.Namespace, settings: Settings) -> int:
    if args.action == "reset" and not args.challenger:
        raise ConfigError("--challenger", "'verdict reset' needs the challenger to reset")
    from shadowpipe.processors.verdict.policy import Policy

    Policy.from_settings(settings)  # a bad policy is a configuration error: exit 2 here
    try:
        if args.action == "reset":
            reply = request(settings, "reset", args.challenger)
            print(json.dumps(reply) if args.format == "json" else
                  f"{args.challenger}: reset recorded; next verdict "
                  f"{reply['verdict']['verdict']}")
            return 0
        reply = request(settings, "verdict", args.challenger)
    except ConfigError:
        raise
    except Exception as exc:  # one line and exit 1: CI tells it apart from any verdict
        print(f"shadowpipe: verdict failed: {str(exc).splitlines()[0] if str(exc) else exc!r}",
              file=sys.stderr)
        return ERROR_EXIT
    verdicts = [reply] if args.challenger else reply["verdicts"]
    if args.format == "json":
        print(json.dumps(reply, indent=2))
    else:
        from shadowpipe.processors.verdict.render import print_verdicts

        print_verdicts(verdicts)
    return exit_code(verdicts)


def request(settings: Settings, action: str, challenger: str) -> dict[str, Any]:
    """The endpoint's answer while a monitor owns the embedded engine, else evaluated here."""
    if settings.clickhouse.startswith("chdb:"):
        reply = _from_monitor(settings, action, challenger)
        if reply is not None:
            return reply
    from shadowpipe.processors.verdict import service

    return service.direct(settings, action, challenger)


def _from_monitor(settings: Settings, action: str, challenger: str) -> dict[str, Any] | None:
    """The monitor's answer, or None when no monitor listens on the web port."""
    from shadowpipe.processors.read import ask_monitor
    from shadowpipe.processors.verdict.agent import RESET_PATH, VERDICT_PATH

    path = RESET_PATH if action == "reset" else VERDICT_PATH
    params = {"challenger": challenger, "policy": settings.policy, "run": settings.run}
    try:
        return ask_monitor(settings, path, params, timeout_s=120,
                           method="POST" if action == "reset" else "GET")
    except urllib.error.HTTPError as exc:
        body = exc.read()
        if exc.code == 404 and b"verdict" not in body:
            return None  # a worker without the monitor answers on that port
        doc = json.loads(body) if body.startswith(b"{") else {"error": body[:200].decode()}
        setting, error = doc.get("setting"), str(doc.get("error", ""))
        if exc.code == 400 and setting:  # the monitor could not read the policy file
            raise ConfigError(setting, error.removeprefix(f"{setting}: ")) from None
        raise RuntimeError(f"monitor {path}: HTTP {exc.code}: {error}") from None
