"""What scraping ``/metrics`` costs the shadow worker (``bench shadow --scrape S``): passes
with a scraper fetching the worker's ``/metrics`` every ``S`` seconds, beside passes
without one in the same run, on the same events.

>>> out = summary([{"worker": 1000.0}, {"worker": 1100.0}],
...               [{"worker": 1089.0, "scrapes": 40, "scrape_failures": 0, "scrape_s": 0.1}],
...               0.1)
>>> out["scrape_ratio"], out["scrapes"], out["scrape_ms_mean"]
(0.99, 40, 2.5)
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


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
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=10) as resp:
                    resp.read()
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
    """Best scraped pass against the best unscraped one (the same rule for both sides)."""
    best = max(r["worker"] for r in scraped)
    return {"scrape_interval_s": interval_s, "scrape_events_per_s": round(best, 1),
            "scrape_ratio": round(best / max(r["worker"] for r in runs), 3),
            "scrapes": sum(r["scrapes"] for r in scraped),
            "scrape_failures": sum(r["scrape_failures"] for r in scraped),
            "scrape_ms_mean": round(1000 * sum(r["scrape_s"] for r in scraped)
                                    / max(sum(r["scrapes"] for r in scraped), 1), 2)}
