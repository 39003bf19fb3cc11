"""``shadowpipe bench join --redis-cluster 3`` and ``shadowpipe bench pipeline`` on short runs:
the JSON keys, and that what was fed in is accounted for. Timings are not judged here."""

from __future__ import annotations

from pathlib import Path

from shadowpipe.config import Settings
from tests.test_bench_runs import _bench


def test_bench_join_on_a_local_cluster_joins_every_pair(
    settings: Settings, tmp_path: Path
) -> None:
    out = _bench(settings, tmp_path, "join", "--requests", "1000", "--worker-requests", "300",
                 "--redis-cluster", "3")
    cluster = out["cluster"]
    assert cluster["masters"] == 3
    assert cluster["requests"] == out["requests"] == 1000
    # Same seed, same workload: the cluster joins exactly what the single Redis joined.
    assert cluster["joined_records"] == out["joined_records"] > 0
    assert cluster["pending_requests"] == 1000
    assert cluster["worker"]["complete"] is True
    assert cluster["worker"]["joined_pairs"] == 300 * out["challengers"]
    assert out["cluster_vs_single"] > 0
