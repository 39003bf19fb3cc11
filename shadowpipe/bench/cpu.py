"""CPU time of the processes a benchmark runs, by role, from ``/proc`` (Linux).

A role is a list of session leaders: every worker and service is started in a session of
its own, so a role's CPU time is that of every live process in those sessions (a standby
monitor's child included); ``here`` names the role of this process alone (the benchmark's
own emitter). Processes that exited between two readings lose their time, so read around
a stretch in which none exits.

>>> meter = CpuMeter({}, here="me")
>>> before = meter.read()
>>> _ = sum(i * i for i in range(300_000))
>>> spent = meter.spent(before, meter.read())
>>> spent["me"] > 0 and spent["total"] == spent["me"]
True
"""

from __future__ import annotations

import os
from pathlib import Path

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat(pid: str) -> tuple[int, float] | None:
    """(session id, user + system CPU seconds) of a process, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[3]), (int(fields[11]) + int(fields[12])) * TICK_S


class CpuMeter:
    """CPU seconds per role (``{"monitor": [session ids], ...}``) between two readings."""

    def __init__(self, roles: dict[str, list[int]], here: str | None = None) -> None:
        self.role_of = {sid: role for role, sids in roles.items() for sid in sids}
        self.here = here
        self.roles = [*roles, *([here] if here else [])]

    def read(self) -> dict[str, float]:
        """CPU seconds used so far by each role's live processes."""
        used = dict.fromkeys(self.roles, 0.0)
        me = str(os.getpid())
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or (stat := _stat(entry)) is None:
                continue
            if entry == me and self.here:
                used[self.here] += stat[1]
            elif stat[0] in self.role_of and entry != me:
                used[self.role_of[stat[0]]] += stat[1]
        return used

    def spent(self, before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        """Seconds per role between two readings, and their ``total``."""
        out = {role: max(0.0, after[role] - before[role]) for role in self.roles}
        return {**out, "total": sum(out.values())}
