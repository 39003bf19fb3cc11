"""Keep the scoring loop, its Kafka clients and its challenger threads on one CPU (Linux).

The loop thread and a challenger's thread take turns (the GIL; the loop waits while the
challenger scores), and librdkafka's threads hand every consumed and produced message
to and from the loop. When these run on different CPUs, the records' reference counts,
the allocator's memory and the message buffers bounce between the CPUs' caches: on the
2-core benchmark machine decoding, scoring and encoding all ran ~1.6x slower per event
than with everything on one CPU (figures in ``docs/challengers.md``). So the loop pins
itself to the CPU it is on *before* creating its Kafka clients (their threads inherit
the mask), and challenger threads follow it. Nothing else is pinned: the broker, Faust's
event loop and other processes are placed by the scheduler, which moves them off the
loop's busy CPU; when the loop itself keeps waiting for its CPU (another process got
there), the loop and its threads move to the CPU that was idle the longest. Where pinning
is unsupported or refused, or ``SHADOWPIPE_SHADOW_CPU_PINNING=off``, everything is left
as it was.

>>> pin = LoopPin()
>>> pin.pin()  # pinned to the CPU it runs on (where supported)
>>> pin.cpu in (-1, *sorted(pin.allowed))
True
>>> pin.release()
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable

log = logging.getLogger("shadowpipe.shadow")


def _cpu_getter() -> Callable[[], int] | None:
    """libc's ``sched_getcpu`` where threads can be pinned (Linux), else None."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        import ctypes

        getcpu = ctypes.CDLL(None).sched_getcpu
    except (OSError, AttributeError):
        return None
    getcpu.argtypes, getcpu.restype = (), ctypes.c_int
    return getcpu


current_cpu = _cpu_getter()


def pin_thread(tid: int, cpu: int) -> bool:
    """Restrict native thread ``tid`` to ``cpu``; False where that is not allowed."""
    try:
        os.sched_setaffinity(tid, {cpu})
    except OSError:
        return False
    return True


def _runqueue_wait_s() -> float:
    """How long the calling thread has waited for a CPU while runnable (schedstat)."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def _idle_ticks() -> dict[int, int]:
    """Idle + iowait clock ticks of each CPU since boot."""
    idle = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                idle[int(name[3:])] = int(fields[3]) + int(fields[4])
    return idle


def choose_cpu(current: int, allowed: set[int], waited: float, idle: dict[int, int],
               max_wait: float) -> int:
    """Where the loop should run: ``current`` unless it waited for it more than
    ``max_wait`` of the time (``waited``), then the allowed CPU that was idle the longest
    (``idle``: ticks per CPU over the same period), if any was idle at all.

    >>> choose_cpu(1, {0, 1}, waited=0.05, idle={0: 90, 1: 0}, max_wait=0.2)
    1
    >>> choose_cpu(1, {0, 1}, waited=0.5, idle={0: 90, 1: 0}, max_wait=0.2)
    0
    >>> choose_cpu(1, {0, 1}, waited=0.5, idle={0: 0, 1: 0}, max_wait=0.2)
    1
    """
    if waited <= max_wait:
        return current
    others = [c for c in allowed if c != current and idle.get(c, 0) > 0]
    return max(others, key=idle.__getitem__, default=current)


class LoopPin:
    """Pin the calling thread (and the threads it :meth:`adopt` s) to the CPU it runs on.

    :meth:`tick` (once per batch) checks every ``check_s`` how long the loop waited for
    its CPU while runnable; above ``max_wait`` of the time, something else runs there,
    and the group moves to the allowed CPU that was idle the longest meanwhile.
    """

    def __init__(self, check_s: float = 1.0, max_wait: float = 0.2, enabled: bool = True) -> None:
        supported = enabled and current_cpu is not None
        self.allowed: set[int] = os.sched_getaffinity(0) if supported else set()
        self.cpu = -1  # where the thread is pinned; -1: not pinned
        self.moves = 0
        self.check_s, self.max_wait = check_s, max_wait
        self._group: list[int] = []
        self._seen: tuple[float, float, dict[int, int]] | None = None

    def pin(self) -> None:
        if current_cpu is None or len(self.allowed) < 2:  # also when disabled: none allowed
            return
        cpu = current_cpu()
        if pin_thread(0, cpu):
            self.cpu = cpu

    def adopt(self, tids: Iterable[int]) -> None:
        """Threads created while pinned (they inherited the CPU): they move with the loop."""
        self._group += tids

    def tick(self) -> None:
        if self.cpu < 0:
            return
        now = time.monotonic()
        if self._seen is not None and now - self._seen[0] < self.check_s:
            return
        seen = (now, _runqueue_wait_s(), _idle_ticks())
        if self._seen is not None:
            then, waited, idle = self._seen
            cpu = choose_cpu(self.cpu, self.allowed, (seen[1] - waited) / (now - then),
                             {c: seen[2][c] - idle[c] for c in idle if c in seen[2]},
                             self.max_wait)
            if cpu != self.cpu:
                self._move(cpu)
        self._seen = seen

    def _move(self, cpu: int) -> None:
        pin_thread(0, cpu)
        for tid in self._group:
            pin_thread(tid, cpu)  # an exited thread: nothing to move
        log.info("shadow loop: moved to CPU %d (waited for CPU %d)", cpu, self.cpu)
        self.cpu = cpu
        self.moves += 1

    def release(self) -> None:
        """Let the scheduler place the threads anywhere they were allowed before."""
        if self.cpu >= 0:
            for tid in (0, *self._group):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, self.allowed)
            self.cpu = -1


def thread_ids() -> set[int]:
    """Native ids of this process's threads."""
    try:
        return {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return set()
