"""``shadowpipe replay`` on a demo run's stored traffic (the real embedded stack): the
replay reproduces the live arms exactly, leaves the live results alone, survives kill -9,
reads the inference topic too, and the verdict judges a replay run."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shadowpipe.config import Settings
from tests.conftest import chdb_rows, free_port
from tests.test_demo import _run_demo

REPO = Path(__file__).resolve().parents[1]
SLOW = """[[challengers]]
name = "slow-threshold"
version = "1"
kind = "callable"
location = "tests.replay_challengers:slow_threshold"
timeout_ms = 60000
"""
# Per arm: rows, distinct requests, labelled, correct (challenger), correct (primary), and a
# checksum of every request's challenger label.
ARMS = ("SELECT count(), uniqExact(request_id), countIf(label IS NOT NULL), "
        "countIf(shadow_label = label), countIf(primary_label = label), "
        "groupBitXor(cityHash64(request_id, ifNull(shadow_label, ''))) "
        "FROM {db}.joined_records FINAL WHERE challenger = '{challenger}'")


@pytest.fixture(scope="module")
def demo(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_demo(stack_settings, tmp_path_factory.mktemp("replay"), 3000, 11, 8)


def _run_info(demo: Path) -> dict[str, str]:
    return json.loads((demo / "summary.json").read_text())["run"]


def _env(stack: Settings, demo: Path, challengers: Path | None = None) -> dict[str, str]:
    run = _run_info(demo)
    return {**os.environ, **stack.to_env(),
            "SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{demo.parent / 'clickhouse'}",
            "SHADOWPIPE_CLICKHOUSE_DATABASE": run["database"],
            "SHADOWPIPE_TOPIC_PREFIX": run["topic_prefix"],
            "SHADOWPIPE_CHALLENGERS": str(challengers or demo / "challengers.toml"),
            "SHADOWPIPE_WEB_PORT": str(free_port()), "PYTHONPATH": str(REPO)}


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shadowpipe.cli", *args], env=env,
                          capture_output=True, text=True, timeout=600)


def _rows(demo: Path, sql: str) -> list[list[Any]]:
    return chdb_rows(demo.parent / "clickhouse", sql)


def _arms(demo: Path, db: str, challenger: str) -> list[Any]:
    return _rows(demo, ARMS.format(db=db, challenger=challenger))[0]


def _live_snapshot(demo: Path, db: str) -> list[list[Any]]:
    """Every live row (not deduplicated) summed up, and the live tables."""
    rows = _rows(demo, f"SELECT count(), groupBitXor(cityHash64(challenger, request_id, "
                       f"version, ifNull(shadow_label, ''), ifNull(label, ''))) "
                       f"FROM {db}.joined_records")
    return rows + _rows(demo, f"SELECT name FROM system.tables WHERE database = '{db}' "
                              "ORDER BY name")


def test_replay_reproduces_the_live_arms_and_leaves_live_alone(
    demo: Path, stack_settings: Settings
) -> None:
    db = _run_info(demo)["database"]
    env = _env(stack_settings, demo)
    before = _live_snapshot(demo, db)
    proc = _cli(env, "replay", "--challenger", "gbm-v2", "--run", "r1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"into {db}_replay_r1" in proc.stdout
    live, replayed = _arms(demo, db, "gbm-v2"), _arms(demo, f"{db}_replay_r1", "gbm-v2")
    assert live[0] == 3000 and live[2] > 0  # the demo's requests, some labelled
    assert replayed == live
    assert _live_snapshot(demo, db) == before
    # A finished run is not scored again.
    rows = _rows(demo, f"SELECT count() FROM {db}_replay_r1.joined_records")
    again = _cli(env, "replay", "--challenger", "gbm-v2", "--run", "r1")
    assert again.returncode == 0, again.stderr[-3000:]
    assert _rows(demo, f"SELECT count() FROM {db}_replay_r1.joined_records") == rows

    judged = {}
    for run in ("r1", ""):  # the replay run, then the live results
        verdict = _cli(env, "verdict", "--run", run, "--challenger", "gbm-v2", "--format",
                       "json", "--policy", str(demo / "policy.toml"), "--segments",
                       "clinic,device")
        assert verdict.returncode in (0, 3, 4, 5), verdict.stderr[-3000:]
        judged[run] = json.loads(verdict.stdout)
    replay_doc, live_doc = judged["r1"], judged[""]
    assert replay_doc["challenger"] == "gbm-v2"
    assert {c["name"]: c["pairs"] for c in replay_doc["criteria"]}["error_rate"] == 3000
    # Judged on the replay database: it holds no control, so no noise-floor criterion.
    assert "excess_disagreement" in [c["name"] for c in live_doc["criteria"]]
    assert "excess_disagreement" not in [c["name"] for c in replay_doc["criteria"]]


def test_kill_mid_replay_then_restart_scores_every_request_once(
    demo: Path, stack_settings: Settings, tmp_path: Path
) -> None:
    db = _run_info(demo)["database"]
    slow = tmp_path / "challengers.toml"
    slow.write_text(SLOW)
    env = _env(stack_settings, demo, slow)
    args = ["replay", "--challenger", "slow-threshold", "--page-rows", "200"]
    child = subprocess.Popen([sys.executable, "-m", "shadowpipe.cli", *args, "--run", "killed"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    seen = []
    for line in child.stderr:  # waits for the child's progress lines
        seen.append(line)
        if (m := re.search(r"(\d+)/(\d+) requests", line)) and 0 < int(m[1]) < int(m[2]):
            child.send_signal(signal.SIGKILL)
            break
    assert child.wait(60) == -signal.SIGKILL, "".join(seen)[-3000:]
    total = int(m[2])
    resumed = _cli(env, *args, "--run", "killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first = re.search(r"(\d+)/\d+ requests", resumed.stderr)
    assert first and int(first[1]) >= int(m[1])  # continued after the last page written
    whole = _cli(env, *args, "--run", "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed = _arms(demo, f"{db}_replay_killed", "slow-threshold")
    assert killed[1] == total == 3000 and killed[0] == total  # each request once after FINAL
    assert killed == _arms(demo, f"{db}_replay_whole", "slow-threshold")


def test_replay_from_the_inference_topic_reproduces_the_live_arms(
    demo: Path, stack_settings: Settings
) -> None:
    db = _run_info(demo)["database"]
    proc = _cli(_env(stack_settings, demo), "replay", "--challenger", "gbm-v2", "--from-topic",
                "--run", "t1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _arms(demo, f"{db}_replay_t1", "gbm-v2") == _arms(demo, db, "gbm-v2")


@pytest.mark.parametrize(("flags", "named"), [
    (["--challenger", "nope"], "--challenger"),
    (["--challenger", "lr", "--since", "3x"], "--since"),
    (["--challenger", "lr", "--run", "a-b"], "SHADOWPIPE_RUN"),
    (["--challenger", "lr", "--page-rows", "0"], "--page-rows"),
])
def test_bad_flags_are_one_line_naming_the_flag(
    flags: list[str], named: str, tmp_path: Path
) -> None:
    path = tmp_path / "challengers.toml"
    path.write_text('[[challengers]]\nname = "lr"\nversion = "1"\nkind = "callable"\n'
                    'location = "shadowpipe.processors.shadow.challengers:echo_label"\n')
    env = {**os.environ, "SHADOWPIPE_CHALLENGERS": str(path),
           "SHADOWPIPE_CLICKHOUSE_URL": f"chdb://{tmp_path / 'ch'}"}
    proc = _cli(env, "replay", *flags)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"shadowpipe: error: {named}"), proc.stderr


def test_bench_replay_scores_every_stored_request(settings: Settings, tmp_path: Path) -> None:
    env = {**os.environ, **settings.to_env(), "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "shadowpipe.cli", "bench", "replay",
                           "--requests", "3000", "--live-events", "2000", "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert {"requests", "requests_per_s", "live_requests_per_s", "ratio"} <= set(out)
    assert out["requests"] == out["source_requests"] == out["scored"] == 3000
    assert out["stored_scored_requests"] == 3000
    assert out["ratio"] == pytest.approx(out["requests_per_s"] / out["live_requests_per_s"],
                                         rel=0.01)


@pytest.mark.parametrize("nums", [
    [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}, {"a": 5.0, "b": 6.0}],  # same keys: NumPy cut
    [{"a": 1.0, "b": 2.0}, {"b": 4.0, "a": 3.0}, {}],  # other order, missing: per row
    [{"a": 1.0}, {"a": 2.0, "b": 3.0}, {"a": 4.0}],
])
def test_inputs_give_the_challenger_the_stored_feature_maps(nums: list[dict]) -> None:
    from shadowpipe.processors.replay.records import inputs, table

    cats = [{"c": "x"}, {}, {"c": "y", "d": "z"}]
    page = table({"request_id": ["r0", "r1", "r2"], "event_time": [5, 6, 7],
                  "num_features": nums, "cat_features": cats,
                  "null_features": [[], ["n"], []]})
    got = inputs(page)
    assert [r["num_features"] for r in got] == nums
    assert [list(r["num_features"]) for r in got] == [list(n) for n in nums]  # key order kept
    assert [r["cat_features"] for r in got] == cats
    assert [(r["request_id"], r["event_time"], r["null_features"]) for r in got] == [
        ("r0", 5, []), ("r1", 6, ["n"]), ("r2", 7, [])]


def test_rows_copy_the_picked_requests_and_store_errors_as_the_worker() -> None:
    from shadowpipe.processors.replay.records import Who, rows, table
    from shadowpipe.processors.shadow.runner import Result

    page = table({"request_id": ["r0", "r1", "r2"], "event_time": [5, 6, 7],
                  "label": ["a", None, "b"], "context": [{"k": "v"}, {}, {}]})
    results = [Result({"label": "b", "probabilities": {"a": 0.25, "b": 0.75}, "value": None}),
               Result(None, "ValueError: bad", "exception")]
    out = rows(page, [0, 2], results, [0.5, 0.5], Who("lr", "2", True)).to_pydict()
    assert out["request_id"] == ["r0", "r2"] and out["label"] == ["a", "b"]
    assert out["context"] == [[("k", "v")], []]
    assert out["shadow_label"] == ["b", None]
    assert out["shadow_probabilities"] == [[("a", 0.25), ("b", 0.75)], []]
    assert out["shadow_error"] == [None, "ValueError: bad"]
    assert out["shadow_error_kind"] == [None, "exception"]
    assert out["challenger"] == ["lr", "lr"] and out["is_control"] == [True, True]
    assert out["model_time_ms"] == [0.5, 0.5] and out["queue_lag_ms"] == [None, None]
