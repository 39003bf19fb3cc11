"""What scraping ``/metrics`` costs the shadow worker (``bench shadow --scrape S``), two ways:

* **CPU** (``scrape_cost``, the figure to read): once a scraped pass's worker has consumed
  everything (its stats full: 20,000 queue lags, every timing window), :func:`cpu_per_scrape`
  scrapes it back to back and takes the worker process's CPU time per scrape, its idle CPU
  over as long subtracted. The worker's scoring loop holds one CPU, and a scrape's work
  (the collector under the GIL) comes out of it: ``scrape_cost`` = CPU per scrape /
  ``S`` is the share of the loop a scrape every ``S`` seconds takes;
* **throughput** (``scrape_ratio``): passes with a scraper fetching ``/metrics`` every ``S``
  seconds while the worker consumes, beside passes without one on the same events. A pass
  lasts a second or two, so at ``S`` = 1 it meets one or two scrapes and the ratio is
  mostly the machine's pass-to-pass noise (a few percent on a shared machine).

>>> out = summary([{"worker": 1000.0}, {"worker": 1100.0}],
...               [{"worker": 1089.0, "scrapes": 40, "scrape_failures": 0, "scrape_s": 0.1,
...                 "scrape_cpu_s": 0.002}], 0.1)
>>> out["scrape_ratio"], out["scrapes"], out["scrape_ms_mean"], out["scrape_cost"]
(0.99, 40, 2.5, 0.02)
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BACK_TO_BACK = 200  # scrapes cpu_per_scrape times (the CPU clock ticks in 10 ms)


def fetch(port: int) -> None:
    """One scrape of the worker's ``/metrics`` on ``port``, read to the end."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        resp.read()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used, all its threads (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_scrape(pid: int, port: int, scrapes: int = BACK_TO_BACK) -> float:
    """CPU seconds the worker ``pid`` spends per scrape: ``scrapes`` back to back, less
    what it uses idle over as long (its consumer's polls, its event loop's timers)."""
    before, began = cpu_seconds(pid), time.perf_counter()
    for _ in range(scrapes):
        fetch(port)
    wall, busy = time.perf_counter() - began, cpu_seconds(pid) - before
    before = cpu_seconds(pid)
    time.sleep(wall)  # the idle baseline: as long as the scrapes took
    return max(busy - (cpu_seconds(pid) - before), 0.0) / scrapes


@contextmanager
def scraper(port: int, interval_s: float) -> Iterator[dict[str, Any]]:
    """Fetch ``/metrics`` on ``port`` every ``interval_s`` while the block runs; yields the
    counts (``scrapes``, ``scrape_failures``, ``scrape_s``: the successful ones' round
    trips), final once the block is left."""
    counts: dict[str, Any] = {"scrapes": 0, "scrape_failures": 0, "scrape_s": 0.0}
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(interval_s):
            started = time.perf_counter()
            try:
                fetch(port)
                counts["scrapes"] += 1
                counts["scrape_s"] += time.perf_counter() - started
            except OSError:  # once the port answered, a failed scrape counts
                if counts["scrapes"]:
                    counts["scrape_failures"] += 1

    thread = threading.Thread(target=run, name="bench-scraper", daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        stop.set()
        thread.join()


def summary(runs: list[dict[str, Any]], scraped: list[dict[str, Any]], interval_s: float
            ) -> dict[str, Any]:
    """Best scraped pass against the best unscraped one (the same rule for both sides);
    the CPU per scrape of the scraped passes' workers (their median)."""
    best = max(r["worker"] for r in scraped)
    cpu = sorted(r["scrape_cpu_s"] for r in scraped)[len(scraped) // 2]
    return {"scrape_cpu_ms": round(cpu * 1000, 3), "scrape_cost": round(cpu / interval_s, 4),
            "scrape_interval_s": interval_s, "scrape_events_per_s": round(best, 1),
            "scrape_ratio": round(best / max(r["worker"] for r in runs), 3),
            "scrapes": sum(r["scrapes"] for r in scraped),
            "scrape_failures": sum(r["scrape_failures"] for r in scraped),
            "scrape_ms_mean": round(1000 * sum(r["scrape_s"] for r in scraped)
                                    / max(sum(r["scrapes"] for r in scraped), 1), 2)}
