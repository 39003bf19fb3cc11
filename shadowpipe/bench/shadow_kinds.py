"""``bench shadow --kind onnx|oip``: the same logistic regression as another challenger kind.

* ``onnx``: the model converted with skl2onnx (float input, skl2onnx's default ZipMap
  output); each pass runs the worker with the scikit-learn challenger and then with the
  ONNX one, on fresh topics with the same events.
* ``oip``: the model served by MLServer's scikit-learn runtime; after each worker pass the
  same events, in batches of the worker's mean batch size, are scored by the kind as the
  worker calls it and posted raw (pre-built bodies, same client), in turn batch by batch:
  :func:`kind_vs_raw`. The worker's own ``model_time_ms`` per event is reported too.

>>> print(challengers_toml("onnx", Path("/w"), ("a", "b"), None).splitlines()[3])
kind = "onnx"
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

CLASSES = ("no", "yes")
BLOCK = 20  # batches per turn of each way in kind_vs_raw


def prepare(kind: str, work: Path, model: Any, features: tuple[str, ...],
            stack: ExitStack) -> Path:
    """The challengers file of ``kind`` for ``model`` (saved in ``work`` as lr.joblib),
    with what it needs (the ONNX file, a running MLServer until ``stack`` closes)."""
    url = None
    if kind == "onnx":
        import numpy as np
        from skl2onnx import to_onnx

        sample = np.zeros((1, len(features)), dtype=np.float32)
        (work / "lr.onnx").write_bytes(to_onnx(model, sample).SerializeToString())
    elif kind == "oip":
        from shadowpipe.bench import mlserver

        folder = work / "mlserver"
        folder.mkdir()
        server = mlserver.start(folder, {"lr": mlserver.sklearn_model("lr", work / "lr.joblib")})
        stack.callback(server.stop)
        url = server.url("lr")
    path = work / f"challengers-{kind}.toml"
    path.write_text(challengers_toml(kind, work, features, url))
    return path


def challengers_toml(kind: str, work: Path, features: tuple[str, ...], url: str | None) -> str:
    """One challenger named ``lr`` of ``kind``."""
    location = {"onnx": work / "lr.onnx", "oip": url}.get(kind, work / "lr.joblib")
    text = (f'[[challengers]]\nname = "lr"\nversion = "1"\nkind = "{kind}"\n'
            f'location = "{location}"\nfeatures = {json.dumps(list(features))}\n')
    if kind == "oip":
        text += f'outputs = ["predict_proba"]\nclasses = {json.dumps(list(CLASSES))}\n'
    return text


def kind_vs_raw(challengers: Path, features: tuple[str, ...], rows: list[list[float]],
                events: int, batch: int) -> tuple[float, float, float]:
    """Seconds per event of the oip kind over a stream of batches, of the raw round trip,
    and of raw posts two in flight, block by block in turn (so all meet the same load
    on a shared machine).

    The kind's stream goes through the worker's :class:`Runner` (its threads and
    deadlines) from decoded-record dicts to ``Output`` dicts, as the worker calls it: the
    next batch is submitted before the current one is collected. The raw round trip posts
    each batch's pre-built request body on a client of the same kind, one at a time, and
    only reads the reply; the pipelined raw posts keep two such requests in flight (the
    server's own limit). The process's collector is tuned as in the worker.
    """
    import gc
    from concurrent.futures import ThreadPoolExecutor

    from shadowpipe.processors.shadow.challengers import load, parse_specs, read_file
    from shadowpipe.processors.shadow.runner import Runner
    from shadowpipe.processors.shadow.service import tune_gc

    (spec,) = parse_specs(read_file(str(challengers)), 5000)
    kind, raw = load(spec), load(spec)
    runner = Runner(spec.name, kind, spec.timeout_ms)
    posts = ThreadPoolExecutor(2)
    records = [{"request_id": str(i), "num_features": dict(zip(features, rows[i % len(rows)],
                                                               strict=True)),
                "cat_features": {}, "null_features": []} for i in range(events)]
    batches = [records[i:i + batch] for i in range(0, events, batch)]
    bodies = [raw.body([tuple(r["num_features"].values()) for r in b]) for b in batches]

    def post(body: bytes) -> bytes:
        return raw.request("POST", raw.infer_path, body)

    def kind_stream(span: range) -> None:
        pending = runner.submit(batches[span[0]])
        for i in span:
            ahead = runner.submit(batches[i + 1]) if i + 1 in span else None
            results = runner.collect(pending)
            if any(r.error for r in results):
                raise RuntimeError(f"oip challenger failed: {results[0].error}")
            pending = ahead

    def raw_serial(span: range) -> None:
        for i in span:
            post(bodies[i])

    def raw_pipelined(span: range) -> None:
        call = posts.submit(post, bodies[span[0]])
        for i in span:
            ahead = posts.submit(post, bodies[i + 1]) if i + 1 in span else None
            call.result()
            call = ahead

    ways = [kind_stream, raw_serial, raw_pipelined]
    spent = dict.fromkeys(ways, 0.0)
    tune_gc()
    try:
        for way in ways:  # connected and warm
            way(range(min(2, len(batches))))
        for n, start in enumerate(range(0, len(batches), BLOCK)):
            span = range(start, min(start + BLOCK, len(batches)))
            for way in ways[n % 3:] + ways[:n % 3]:
                began = time.perf_counter()
                way(span)
                spent[way] += time.perf_counter() - began
        return tuple(spent[w] / events for w in ways)  # type: ignore[return-value]
    finally:
        gc.unfreeze()
        posts.shutdown()
        runner.close()
        raw.close()


def summary(kind: str, base: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The kind's figures for the JSON result (``base``: the scikit-learn passes)."""
    best = max(r["worker"] for r in runs)
    out: dict[str, Any] = {
        f"{kind}_worker_events_per_s": round(best, 1),
        f"{kind}_runs_events_per_s": [round(r["worker"]) for r in runs],
        f"{kind}_predictions": sum(r["predictions"] for r in runs),
        f"{kind}_worker_errors": sum(c["errors"] + c["timeouts"]
                                     for r in runs for c in r["stats"]["challengers"].values()),
    }
    if kind == "onnx":
        out["onnx_vs_sklearn"] = round(best / max(r["worker"] for r in base), 3)
        # pass by pass (the two sides of a pass ran one right after the other)
        out["onnx_vs_sklearn_runs"] = [round(k["worker"] / b["worker"], 3)
                                       for b, k in zip(base, runs, strict=True)]
    if kind == "oip":
        # Pass by pass; the best pass counts, like the throughputs.
        trios = [(r["kind_s_per_event"], r["raw_s_per_event"], r["raw_pipelined_s_per_event"])
                 for r in runs]
        kind_s, raw_s, piped_s = min(trios, key=lambda p: p[0] / p[1])
        out.update({
            "oip_kind_us_per_event": round(kind_s * 1e6, 2),
            "oip_raw_us_per_event": round(raw_s * 1e6, 2),
            "oip_overhead": round(kind_s / raw_s - 1, 3),
            "oip_overhead_runs": [round(k / r - 1, 3) for k, r, _p in trios],
            # against raw posts kept two in flight as the kind does (the server's own pace)
            "oip_raw_pipelined_us_per_event": round(piped_s * 1e6, 2),
            "oip_overhead_vs_pipelined_raw": round(kind_s / piped_s - 1, 3),
            # inside the worker, under its consuming and publishing (the server shares
            # the machine with it and the broker)
            "oip_worker_model_us_per_event": [round(r["model_s_per_event"] * 1e6, 2)
                                              for r in runs],
        })
    return out
