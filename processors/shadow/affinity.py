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
loop's busy CPU. Where pinning is unsupported or refused, everything is left as it was.

>>> pin = LoopPin()
>>> pin.pin()  # pinned to the CPU it runs on (where supported)
>>> pin.cpu in (-1, *sorted(pin.allowed))
True
>>> pin.release()
"""

from __future__ import annotations

import os
from collections.abc import Callable


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


class LoopPin:
    """Pin the calling thread to the CPU it is running on, until :meth:`release`."""

    def __init__(self) -> None:
        supported = current_cpu is not None
        self.allowed: set[int] = os.sched_getaffinity(0) if supported else set()
        self.cpu = -1  # where the thread is pinned; -1: not pinned

    def pin(self) -> None:
        if current_cpu is None or len(self.allowed) < 2:
            return
        cpu = current_cpu()
        if pin_thread(0, cpu):
            self.cpu = cpu

    def release(self) -> None:
        """Let the scheduler place the thread anywhere it was allowed before."""
        if self.cpu >= 0:
            os.sched_setaffinity(0, self.allowed)
            self.cpu = -1
