"""``shadowpipe compare --by ATTR`` on the real embedded stack: the overall row with the
segment rows, the paired challenger-minus-primary difference with its anytime-valid
interval, and AUC / log-loss / Brier per arm, each checked against a direct computation
from the records that went in."""

from __future__ import annotations

import io
import math
import time
import uuid

import numpy as np
from rich.console import Console
from sklearn.metrics import roc_auc_score

from shadowpipe.bench import synthetic
from shadowpipe.config import Settings
from shadowpipe.processors import read
from shadowpipe.processors.monitor import compare
from shadowpipe.processors.monitor.pipeline import Message, Pipeline
from shadowpipe.processors.verdict.stats import asymptotic_cs
from shadowpipe.schemas.codec import Codec

CODEC = Codec()
# Recent event times: older rows would fall to the joined records' TTL on insert.
RECENT_MS = (int(time.time()) // 3600 - 2) * 3_600_000


def _load(settings: Settings, records: list[dict]) -> None:
    pipeline = Pipeline(settings)
    pipeline.migrate()
    messages = [Message(CODEC.encode("JoinedRecord", r), r["request_id"].encode(), "joined", 0, i)
                for i, r in enumerate(records)]
    for i in range(0, len(messages), 2000):
        pipeline.process(messages[i:i + 2000])
        pipeline.checkpoint()


def _expected_scores(pairs: list[tuple[dict, str]]) -> tuple[float, float, float]:
    """AUC (one-vs-rest macro), log-loss (p clipped at 1e-4) and Brier of (output, truth)."""
    classes = synthetic.CLASSES
    probs = np.array([[out["probabilities"].get(c, 0.0) for c in classes] for out, _ in pairs])
    truth = [y for _, y in pairs]
    onehot = np.array([[float(y == c) for c in classes] for y in truth])
    auc = roc_auc_score(truth, probs, multi_class="ovr", average="macro", labels=list(classes))
    p_true = (probs * onehot).sum(axis=1)
    log_loss = float(np.mean(-np.log(np.maximum(p_true, 1e-4))))
    brier = float(np.mean(((probs - onehot) ** 2).sum(axis=1)))
    return auc, log_loss, brier


def test_compare_by_attribute_shows_overall_row_difference_and_scores(settings: Settings) -> None:
    s = settings.replace(clickhouse_database=f"c{uuid.uuid4().hex[:10]}", segments=("region",))
    # A challenger 15 points worse than the primary; a twentieth of it times out (no pair).
    records = synthetic.stream(synthetic.Spec(
        requests=3000, challengers=("c1",), start_ms=RECENT_MS, seed=21,
        primary_accuracy=0.85, challenger_accuracy=0.70, timeout_rate=0.05))
    _load(s, records)

    data = read.gather(s, "c1", 86_400, "region")
    rows = data["arms"]
    assert [r["segment"] for r in rows] == ["", "apac", "eu", "us"]
    overall = rows[0]
    predicted = {r["request_id"]: r for r in records if r["state"] == "predicted"}
    labels = {r["request_id"]: r["label"] for r in records if r["state"] == "labelled"}
    assert overall["coverage"]["published"] == len(predicted)
    assert sum(r["coverage"]["published"] for r in rows[1:]) == len(predicted)

    # The paired difference over requests both arms answered and that got a label.
    paired = [(p, labels[rid]) for rid, p in predicted.items()
              if rid in labels and p["shadow_output"] is not None]
    losses = sum(p["primary_output"]["label"] == y != p["shadow_output"]["label"]
                 for p, y in paired)
    wins = sum(p["shadow_output"]["label"] == y != p["primary_output"]["label"]
               for p, y in paired)
    cs = asymptotic_cs(len(paired), losses - wins, losses + wins, read.ALPHA)
    diff = overall["difference"]
    assert diff["metric"] == "accuracy" and diff["pairs"] == len(paired)
    assert diff["anytime_valid"] and diff["reliable"]
    assert math.isclose(diff["estimate"], (wins - losses) / len(paired))
    assert diff["interval"] == [round(-cs.hi, 4), round(-cs.lo, 4)]
    assert diff["interval"][1] < 0  # 15 points worse, 2,800 pairs: clearly excluded
    assert all(r["difference"]["pairs"] < len(paired) for r in rows[1:])

    for arm, key in (("primary", "primary_output"), ("challenger_arm", "shadow_output")):
        scored = [(p[key], labels[rid]) for rid, p in predicted.items()
                  if rid in labels and p[key] is not None]
        auc, log_loss, brier = _expected_scores(scored)
        got = overall[arm]
        assert got["scored"] == len(scored)
        assert math.isclose(got["auc"], auc, rel_tol=1e-9), (got["auc"], auc)
        assert math.isclose(got["log_loss"], log_loss, rel_tol=1e-9)
        assert math.isclose(got["brier"], brier, rel_tol=1e-9)
    assert overall["primary"]["auc"] > overall["challenger_arm"]["auc"]

    out = io.StringIO()
    compare.print_table(data, Console(file=out, width=400), with_events=False)
    lines = out.getvalue().splitlines()
    row_lines = [next(i for i, line in enumerate(lines) if f" {seg} " in line)
                 for seg in ("(all)", "apac", "eu", "us")]
    assert row_lines == sorted(row_lines)
    text = out.getvalue()
    assert "anytime-valid" in text
    low, high = diff["interval"]
    assert f"{diff['estimate']:+.3f} [{low:+.3f}, {high:+.3f}]" in text
    primary = overall["primary"]
    assert f"{primary['auc']:.3f}/{primary['log_loss']:.3f}/{primary['brier']:.3f}" in text
