"""The read side: the named queries over the pipeline's ClickHouse tables, where their rows
come from, and the comparison built from them. ``shadowpipe compare``, ``shadowpipe report``
(:mod:`shadowpipe.processors.report`), the demo's summary and the monitor's query endpoint
(``/shadowpipe/query/``) all read through here.

Queries: the same SQL is documented in ``docs/monitor.md`` so users can run it in ClickHouse
directly; ``{db}`` is the database, ``{name:Type}`` are server-side parameters: ``since_ms``
(epoch ms), ``challenger`` ('' = all), ``by`` (a context attribute, '' = overall) and
``mature_ms`` (the latest mature event time, epoch ms; the funnel's last stage).

Where the rows come from (:func:`fetch`): with a ClickHouse server, straight from it. With
the embedded engine only one process may open the data directory; while a monitor runs, that
is the monitor, so a reader asks its web endpoint and opens the directory itself (one
:func:`client` per URL) only when no monitor answers.

The comparison (:func:`report`): per-arm accuracy or MAE with 95 % intervals, AUC, log-loss
and Brier where the arms give probabilities, the paired challenger-minus-primary difference
with its anytime-valid interval, agreement, coverage, latency percentiles and recent drift
events. With ``by`` each challenger's overall row comes first, then one row per value. The
difference is paired (the same labelled requests scored by both arms) and its interval is the
verdict engine's confidence sequence (``asymptotic_cs`` of
:mod:`shadowpipe.processors.verdict.stats`): it stays valid however often compare is re-run,
unlike a fixed-n interval. It is flagged as not yet reliable until the engine's guard holds
(1,000 pairs, 10 discordant).

>>> sorted(QUERIES)  # doctest: +NORMALIZE_WHITESPACE
['alert_timeline', 'alerts', 'arm_counts', 'arms', 'challengers', 'disagreements',
 'funnel', 'label_delays', 'latency', 'orphans', 'over_time', 'windows']
>>> "FINAL" in render("arms", "shadowpipe")
True
>>> parse_duration("90m"), parse_duration("2d"), parse_duration("45")
(5400, 172800, 45)
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors.monitor.stats import mean_ci, wilson
from shadowpipe.processors.verdict.stats import asymptotic_cs, guard_met, sample_variance
from shadowpipe.tables import database

_FILTER = ("({challenger:String} = '' OR challenger = {challenger:String})")

# Per challenger and segment value: the counts, sums and probability arrays of "arms" and
# "arm_counts" (the SQL below is spliced into both).
_ARM_COUNTS = """SELECT
    challenger,
    arrayJoin(if({by:String} = '', [''],
                 ['', if(context[{by:String}] = '', '(none)', context[{by:String}])])) AS segment,
    count() AS published,
    countIf(shadow_error_kind IS NULL AND shadow_error IS NULL) AS joined,
    countIf(state = 'labelled') AS labelled,
    countIf(shadow_error_kind = 'exception'
            OR (shadow_error IS NOT NULL AND shadow_error_kind IS NULL)) AS errors,
    countIf(shadow_error_kind = 'timeout') AS timeouts,
    countIf(primary_label IS NOT NULL AND shadow_label IS NOT NULL) AS compared,
    countIf(primary_label = shadow_label) AS agreed,
    countIf(label IS NOT NULL AND primary_label IS NOT NULL) AS primary_labelled,
    countIf(label IS NOT NULL AND primary_label = label) AS primary_correct,
    countIf(label IS NOT NULL AND shadow_label IS NOT NULL) AS challenger_labelled,
    countIf(label IS NOT NULL AND shadow_label = label) AS challenger_correct,
    countIf(label IS NOT NULL AND primary_label IS NOT NULL AND shadow_label IS NOT NULL)
        AS paired,
    countIf(label IS NOT NULL AND primary_label = label AND shadow_label != label)
        AS paired_losses,
    countIf(label IS NOT NULL AND primary_label != label AND shadow_label = label)
        AS paired_wins,
    countIf(label_value IS NOT NULL AND primary_value IS NOT NULL) AS primary_regressed,
    avgIf(abs(primary_value - label_value),
          label_value IS NOT NULL AND primary_value IS NOT NULL) AS primary_mae,
    stddevSampIf(abs(primary_value - label_value),
                 label_value IS NOT NULL AND primary_value IS NOT NULL) AS primary_mae_sd,
    countIf(label_value IS NOT NULL AND shadow_value IS NOT NULL) AS challenger_regressed,
    avgIf(abs(shadow_value - label_value),
          label_value IS NOT NULL AND shadow_value IS NOT NULL) AS challenger_mae,
    stddevSampIf(abs(shadow_value - label_value),
                 label_value IS NOT NULL AND shadow_value IS NOT NULL) AS challenger_mae_sd,
    countIf(label_value IS NOT NULL AND primary_value IS NOT NULL AND shadow_value IS NOT NULL)
        AS paired_regressed,
    sumIf(abs(shadow_value - label_value) - abs(primary_value - label_value),
          label_value IS NOT NULL AND primary_value IS NOT NULL AND shadow_value IS NOT NULL)
        AS paired_ae_sum,
    sumIf(pow(abs(shadow_value - label_value) - abs(primary_value - label_value), 2),
          label_value IS NOT NULL AND primary_value IS NOT NULL AND shadow_value IS NOT NULL)
        AS paired_ae_sumsq,
    countIf(label IS NOT NULL AND notEmpty(primary_probabilities)) AS primary_scored,
    avgIf(-log(greatest(primary_probabilities[assumeNotNull(label)], 1e-4)),
          label IS NOT NULL AND notEmpty(primary_probabilities)) AS primary_log_loss,
    avgIf(arraySum(x -> x * x, mapValues(primary_probabilities))
          - 2 * primary_probabilities[assumeNotNull(label)] + 1,
          label IS NOT NULL AND notEmpty(primary_probabilities)) AS primary_brier,
    groupArrayIf(primary_probabilities, label IS NOT NULL AND notEmpty(primary_probabilities))
        AS primary_p,
    groupArrayIf(assumeNotNull(label), label IS NOT NULL AND notEmpty(primary_probabilities))
        AS primary_y,
    countIf(label IS NOT NULL AND notEmpty(shadow_probabilities)) AS challenger_scored,
    avgIf(-log(greatest(shadow_probabilities[assumeNotNull(label)], 1e-4)),
          label IS NOT NULL AND notEmpty(shadow_probabilities)) AS challenger_log_loss,
    avgIf(arraySum(x -> x * x, mapValues(shadow_probabilities))
          - 2 * shadow_probabilities[assumeNotNull(label)] + 1,
          label IS NOT NULL AND notEmpty(shadow_probabilities)) AS challenger_brier,
    groupArrayIf(shadow_probabilities, label IS NOT NULL AND notEmpty(shadow_probabilities))
        AS challenger_p,
    groupArrayIf(assumeNotNull(label), label IS NOT NULL AND notEmpty(shadow_probabilities))
        AS challenger_y,
    quantiles(0.5, 0.95, 0.99)(primary_latency_ms) AS primary_latency_ms,
    quantiles(0.5, 0.95, 0.99)(model_time_ms) AS model_time_ms,
    quantiles(0.5, 0.95, 0.99)(queue_lag_ms) AS queue_lag_ms
FROM {db}.joined_records FINAL
WHERE event_time >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
GROUP BY challenger, segment"""

QUERIES: dict[str, str] = {
    # Per challenger: the overall row (segment '') and, with ``by``, one row per value of
    # that context attribute ('(none)' where a record lacks it or it is empty). Coverage, agreement,
    # per-arm accuracy and MAE inputs (compare derives 95 % intervals), the paired
    # challenger-minus-primary counts and sums (compare derives the anytime-valid interval),
    # log-loss (p clipped at 1e-4), Brier and one-vs-rest macro AUC per arm where
    # probabilities exist, error/timeout counts and latency percentiles. The inner query
    # gathers each arm's probabilities for the AUC; only the AUC leaves the server.
    "arms": """
SELECT * EXCEPT (primary_p, challenger_p, primary_y, challenger_y),
    arrayAvg(arrayFilter(x -> NOT isNaN(x), arrayMap(
        c -> arrayAUC(arrayMap(p -> p[c], primary_p), arrayMap(y -> y = c, primary_y)),
        arrayDistinct(arrayFlatten(arrayMap(p -> mapKeys(p), primary_p)))))) AS primary_auc,
    arrayAvg(arrayFilter(x -> NOT isNaN(x), arrayMap(
        c -> arrayAUC(arrayMap(p -> p[c], challenger_p), arrayMap(y -> y = c, challenger_y)),
        arrayDistinct(arrayFlatten(arrayMap(p -> mapKeys(p), challenger_p))))))
        AS challenger_auc
FROM (
""" + _ARM_COUNTS + """
)
ORDER BY challenger, segment""",
    # The same without the AUC: ClickHouse then drops the probability arrays the AUC needs,
    # which dominate the memory of "arms" (1.3 GB against 0.4 GB at 1M records).
    "arm_counts": """
SELECT * EXCEPT (primary_p, challenger_p, primary_y, challenger_y)
FROM (
""" + _ARM_COUNTS + """
)
ORDER BY challenger, segment""",
    # Orphans per challenger ('' = feedback whose request never came).
    "orphans": """
SELECT challenger, state, count() AS orphans
FROM {db}.orphans FINAL
WHERE joined_at >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
GROUP BY challenger, state
ORDER BY challenger, state""",
    # Recent drift events and rule alerts, newest first.
    "alerts": """
SELECT alert_id, status, kind, detector, metric, challenger, arm, segment,
       toUnixTimestamp64Milli(window_start) AS window_start_ms, value, threshold, severity,
       toUnixTimestamp64Milli(time) AS time_ms, details
FROM {db}.alerts FINAL
WHERE time >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
ORDER BY time DESC, alert_id
LIMIT 50""",
    # Closed windows (one row per challenger, segment and window start).
    "windows": """
SELECT * EXCEPT (window_start, window_end, version),
       toUnixTimestamp64Milli(window_start) AS window_start_ms,
       toUnixTimestamp64Milli(window_end) AS window_end_ms
FROM {db}.windows FINAL
WHERE window_start >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
ORDER BY challenger, segment, window_start""",
    # -- what ``shadowpipe report`` draws (processors/report/) --------------------------
    # Every challenger with stored records and the event times they span (all time).
    "challengers": """
SELECT challenger, toUnixTimestamp64Milli(min(event_time)) AS first_ms,
       toUnixTimestamp64Milli(max(event_time)) AS last_ms
FROM {db}.joined_records
GROUP BY challenger
ORDER BY challenger""",
    # Per challenger and event-time bucket (about 40 buckets over the selection, whole
    # minutes): agreement and each arm's accuracy / MAE inputs, for intervals per bucket.
    # Buckets are event-time cohorts: recent ones have fewer labels yet.
    "over_time": """
WITH (SELECT greatest(1, intDiv(toUnixTimestamp64Milli(max(event_time))
                                - toUnixTimestamp64Milli(min(event_time)), 40 * 60000) + 1)
             * 60000
      FROM {db}.joined_records
      WHERE event_time >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """)
    AS step_ms
SELECT challenger,
    intDiv(toUnixTimestamp64Milli(event_time), step_ms) * step_ms AS bucket_ms,
    any(step_ms) AS width_ms,
    count() AS published,
    countIf(primary_label IS NOT NULL AND shadow_label IS NOT NULL) AS compared,
    countIf(primary_label = shadow_label) AS agreed,
    countIf(label IS NOT NULL AND primary_label IS NOT NULL) AS primary_labelled,
    countIf(label IS NOT NULL AND primary_label = label) AS primary_correct,
    countIf(label IS NOT NULL AND shadow_label IS NOT NULL) AS challenger_labelled,
    countIf(label IS NOT NULL AND shadow_label = label) AS challenger_correct,
    countIf(label_value IS NOT NULL AND primary_value IS NOT NULL) AS primary_regressed,
    avgIf(abs(primary_value - label_value),
          label_value IS NOT NULL AND primary_value IS NOT NULL) AS primary_mae,
    stddevSampIf(abs(primary_value - label_value),
                 label_value IS NOT NULL AND primary_value IS NOT NULL) AS primary_mae_sd,
    countIf(label_value IS NOT NULL AND shadow_value IS NOT NULL) AS challenger_regressed,
    avgIf(abs(shadow_value - label_value),
          label_value IS NOT NULL AND shadow_value IS NOT NULL) AS challenger_mae,
    stddevSampIf(abs(shadow_value - label_value),
                 label_value IS NOT NULL AND shadow_value IS NOT NULL) AS challenger_mae_sd
FROM {db}.joined_records FINAL
WHERE event_time >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
GROUP BY challenger, bucket_ms
ORDER BY challenger, bucket_ms""",
    # The coverage funnel per challenger, each stage within the previous one: published
    # (requests sampled for the challenger), scored (it answered, no error), joined (with
    # the primary's output), labelled, mature (event time at or before ``mature_ms``, the
    # verdict's cutoff). Errors and timeouts, every label and the human review labels.
    "funnel": """
SELECT challenger,
    count() AS published,
    countIf(x_scored) AS scored,
    countIf(x_joined) AS joined,
    countIf(x_joined AND x_labelled) AS labelled,
    countIf(x_joined AND x_labelled
            AND toUnixTimestamp64Milli(event_time) <= {mature_ms:Int64}) AS mature,
    countIf(shadow_error_kind = 'exception'
            OR (shadow_error IS NOT NULL AND shadow_error_kind IS NULL)) AS errors,
    countIf(shadow_error_kind = 'timeout') AS timeouts,
    countIf(x_labelled) AS labels,
    countIf(x_labelled AND feedback_source = 'human') AS human_labels
FROM (
    SELECT challenger, event_time, shadow_error, shadow_error_kind, feedback_source,
        shadow_error_kind IS NULL AND shadow_error IS NULL
            AND (shadow_label IS NOT NULL OR shadow_value IS NOT NULL) AS x_scored,
        x_scored AND (primary_label IS NOT NULL OR primary_value IS NOT NULL) AS x_joined,
        label IS NOT NULL OR label_value IS NOT NULL AS x_labelled
    FROM {db}.joined_records FINAL
    WHERE event_time >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
)
GROUP BY challenger
ORDER BY challenger""",
    # Label delays per challenger in quarter-octave bins: bin k holds delays in
    # [2^(k/4), 2^((k+1)/4)) ms (bin 0: under 1.19 ms).
    "label_delays": """
SELECT challenger,
    toUInt32(greatest(0, floor(4 * log2(greatest(toFloat64(label_delay_ms), 1.))))) AS bin,
    count() AS labels
FROM {db}.joined_records FINAL
WHERE event_time >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
  AND label_delay_ms IS NOT NULL AND (label IS NOT NULL OR label_value IS NOT NULL)
GROUP BY challenger, bin
ORDER BY challenger, bin""",
    # Latency per challenger and arm in quarter-octave bins: bin k holds [2^(k/4),
    # 2^((k+1)/4)) ms, k >= -40; the primary's latency in the service and the
    # challenger's model time per record.
    "latency": """
SELECT challenger, arm,
    toInt32(greatest(-40, floor(4 * log2(greatest(ms, 1e-3))))) AS bin,
    count() AS records
FROM (
    SELECT challenger,
        arrayJoin([('primary', primary_latency_ms), ('challenger', model_time_ms)]) AS pair,
        pair.1 AS arm, pair.2 AS ms
    FROM {db}.joined_records FINAL
    WHERE event_time >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
)
WHERE ms IS NOT NULL
GROUP BY challenger, arm, bin
ORDER BY challenger, arm, bin""",
    # The 20 most informative disagreements per challenger: labelled ones first (they
    # decide the paired difference), then the largest distance between the arms (total
    # variation of the probabilities, 1 for labels without them, |difference| for values).
    "disagreements": """
SELECT challenger, request_id, toUnixTimestamp64Milli(event_time) AS event_time_ms,
    context, num_features, cat_features, null_features,
    primary_label, if(empty(primary_probabilities), NULL,
                      arrayMax(mapValues(primary_probabilities))) AS primary_top_p,
    shadow_label, if(empty(shadow_probabilities), NULL,
                     arrayMax(mapValues(shadow_probabilities))) AS shadow_top_p,
    primary_value, shadow_value, label, label_value, feedback_source,
    multiIf(label IS NULL AND label_value IS NULL, '',
            label IS NOT NULL AND primary_label = label, 'primary',
            label IS NOT NULL AND shadow_label = label, 'challenger',
            label IS NOT NULL, 'neither',
            abs(primary_value - label_value) < abs(shadow_value - label_value), 'primary',
            abs(shadow_value - label_value) < abs(primary_value - label_value), 'challenger',
            'neither') AS right_arm,
    if(primary_label IS NOT NULL,
       if(empty(primary_probabilities) OR empty(shadow_probabilities), 1.,
          arraySum(k -> abs(primary_probabilities[k] - shadow_probabilities[k]),
                   arrayDistinct(arrayConcat(mapKeys(primary_probabilities),
                                             mapKeys(shadow_probabilities)))) / 2),
       abs(primary_value - shadow_value)) AS distance
FROM {db}.joined_records FINAL
WHERE event_time >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
  AND ((primary_label IS NOT NULL AND shadow_label IS NOT NULL AND primary_label != shadow_label)
       OR (primary_value IS NOT NULL AND shadow_value IS NOT NULL
           AND primary_value != shadow_value))
ORDER BY challenger, label IS NULL AND label_value IS NULL, distance DESC, request_id
LIMIT 20 BY challenger""",
    # Every drift event and alert of the selection, oldest first (up to 2,000).
    "alert_timeline": """
SELECT alert_id, status, kind, detector, metric, challenger, arm, segment, severity,
       toUnixTimestamp64Milli(coalesce(window_start, time)) AS at_ms, value, threshold
FROM {db}.alerts FINAL
WHERE time >= fromUnixTimestamp64Milli({since_ms:Int64}) AND """ + _FILTER + """
ORDER BY at_ms, alert_id
LIMIT 2000""",
}
PARAMETERS = ("since_ms", "challenger", "by", "mature_ms")


def render(name: str, db: str) -> str:
    """The SQL of query ``name`` for database ``db``; KeyError for unknown names."""
    return QUERIES[name].replace("{db}", db)


def parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Typed parameters with defaults (everything since the epoch, all challengers).

    >>> parameters({"since_ms": "5"})
    {'since_ms': 5, 'challenger': '', 'by': '', 'mature_ms': 0}
    """
    return {"since_ms": int(raw.get("since_ms") or 0),
            "challenger": str(raw.get("challenger") or ""), "by": str(raw.get("by") or ""),
            "mature_ms": int(raw.get("mature_ms") or 0)}


def jsonable(value: Any) -> Any:
    """Query values as JSON: NaN (empty aggregates) becomes null.

    >>> jsonable([1.0, float("nan")])
    [1.0, None]
    """
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def run(sink_or_client: Any, name: str, db: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Run query ``name``; ``{"columns": [...], "rows": [[...], ...]}`` as JSON values."""
    sql, params = render(name, db), parameters(raw)
    if hasattr(sink_or_client, "query") and hasattr(sink_or_client, "write"):
        columns, found = sink_or_client.query(sql, params)
    else:
        result = sink_or_client.query(sql, parameters=params)
        columns, found = list(result.column_names), result.result_rows
    return {"columns": columns, "rows": [jsonable(list(r)) for r in found]}


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
ALPHA = 0.05


def parse_duration(text: str) -> int:
    """``30s``, ``15m``, ``1h``, ``7d``, ``2w`` or plain seconds -> seconds."""
    text = text.strip().lower()
    unit = _UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    if not number.isdigit():
        raise ConfigError("--since", f"{text!r} is not a duration like 30m, 1h or 7d")
    return int(number) * (unit or 1)


def fetch(settings: Settings, name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Rows of query ``name``: through the monitor's endpoint, or ClickHouse directly, in
    :func:`shadowpipe.tables.database` (a replay run's database with ``--run``)."""
    if settings.clickhouse.startswith("chdb:"):
        reply = from_monitor(settings, name, {**params, "run": settings.run})
        if reply is not None:
            return reply
    return run(client(settings), name, database(settings), params)


_clients: dict[str, Any] = {}


def client(settings: Settings) -> Any:
    """The reader's ClickHouse client: one per URL, checked on first use (a process may read
    more than one, as the tests do); :class:`ConfigError` naming the URL when unusable."""
    if settings.clickhouse not in _clients:
        from shadowpipe.stores import check_clickhouse

        _clients[settings.clickhouse] = check_clickhouse(settings, "compare")
    return _clients[settings.clickhouse]


def ask_monitor(settings: Settings, path: str, params: dict[str, Any], *, method: str = "GET",
                body: Any = None, timeout_s: float = 30) -> dict[str, Any] | None:
    """The JSON answer of the running monitor's endpoint ``path`` on the web port (``body``:
    sent as JSON), or None when nothing listens there; an HTTP error status raises
    ``urllib.error.HTTPError`` for the caller to read (a 404 may be a worker without the
    monitor)."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    url = f"http://{settings.web_host}:{settings.web_port}{path}{query}"
    data = None if body is None else json.dumps(body).encode()
    headers = {} if body is None else {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method),
                                    timeout=timeout_s) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError:
        raise
    except OSError:
        return None


def from_monitor(settings: Settings, name: str, params: dict[str, Any],
                 timeout_s: float = 30) -> dict | None:
    """The running monitor's answer to query ``name`` (its ``/shadowpipe/query/`` endpoint),
    or None when nothing, or a worker without the monitor, listens on the web port; any
    other HTTP error is a :class:`ConfigError` naming the ClickHouse URL."""
    try:
        return ask_monitor(settings, "/shadowpipe/query/", {"name": name, **params},
                           timeout_s=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and b"unknown query" not in exc.read():
            return None  # a worker without the monitor answers on that port
        raise ConfigError("clickhouse_url", f"monitor query {name} failed: {exc}") from None


def rows(reply: dict[str, Any]) -> list[dict[str, Any]]:
    """A :func:`run` or :func:`fetch` reply as one dict per row.

    >>> rows({"columns": ["a", "b"], "rows": [[1, 2]]})
    [{'a': 1, 'b': 2}]
    """
    return [dict(zip(reply["columns"], row, strict=True)) for row in reply["rows"]]


def _interval(pair: tuple[float, float] | None) -> list[float] | None:
    return [round(pair[0], 4), round(pair[1], 4)] if pair else None


def _arm(row: dict[str, Any], arm: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    n, correct = row[f"{arm}_labelled"], row[f"{arm}_correct"]
    if n:
        out.update(accuracy=correct / n, accuracy_ci95=_interval(wilson(correct, n)), labelled=n)
    m = row[f"{arm}_regressed"]
    if m:
        mae, sd = row[f"{arm}_mae"], row[f"{arm}_mae_sd"]
        out.update(mae=mae, mae_ci95=_interval(mean_ci(mae, sd, m)), regressed=m)
    if row.get(f"{arm}_scored"):
        out.update(auc=row.get(f"{arm}_auc"), log_loss=row[f"{arm}_log_loss"],
                   brier=row[f"{arm}_brier"], scored=row[f"{arm}_scored"])
    return out


def difference(row: dict[str, Any], alpha: float = ALPHA) -> dict[str, Any] | None:
    """Challenger minus primary over the same labelled requests, with its anytime-valid CS.

    Accuracy for labels (a positive difference: the challenger is right more often), MAE
    for values (positive: the challenger errs more); None without a labelled pair.

    >>> d = difference({"paired": 4000, "paired_losses": 90, "paired_wins": 130})
    >>> d["metric"], d["estimate"], d["reliable"], d["interval"][0] < 0.01 < d["interval"][1]
    ('accuracy', 0.01, True, True)
    """
    if row.get("paired"):
        n, losses, wins = row["paired"], row["paired_losses"], row["paired_wins"]
        # d = loss(challenger) - loss(primary) per pair; accuracy difference is -mean(d).
        cs = asymptotic_cs(n, losses - wins, losses + wins, alpha)
        variance = sample_variance(n, losses - wins, losses + wins)
        return {"metric": "accuracy", "estimate": -cs.estimate,
                "interval": _interval((-cs.hi, -cs.lo)), "pairs": n,
                "discordant": losses + wins, "anytime_valid": True,
                "reliable": guard_met(n, losses + wins, variance)}
    if row.get("paired_regressed"):
        n, s1, s2 = row["paired_regressed"], row["paired_ae_sum"], row["paired_ae_sumsq"]
        cs = asymptotic_cs(n, s1, s2, alpha)
        variance = sample_variance(n, s1, s2)
        return {"metric": "mae", "estimate": cs.estimate, "interval": _interval((cs.lo, cs.hi)),
                "pairs": n, "discordant": None, "anytime_valid": True,
                "reliable": guard_met(n, n, variance)}
    return None


def _percentiles(values: list[float | None] | None) -> dict[str, float | None]:
    values = values or [None, None, None]
    return {f"p{q}": v for q, v in zip((50, 95, 99), values, strict=True)}


def report(arms: list[dict], orphans: list[dict], alerts: list[dict]) -> dict[str, Any]:
    """The comparison as one JSON-able dict (pure: the tests and the CLI both use it)."""
    orphan_counts: dict[str, int] = {}
    for row in orphans:
        orphan_counts[row["challenger"]] = orphan_counts.get(row["challenger"], 0) + row["orphans"]
    rows = []
    for row in arms:
        agreement = row["agreed"] / row["compared"] if row["compared"] else None
        rows.append({
            "challenger": row["challenger"], "segment": row["segment"],
            "coverage": {"published": row["published"], "joined": row["joined"],
                         "labelled": row["labelled"], "errors": row["errors"],
                         "timeouts": row["timeouts"],
                         "orphaned": orphan_counts.get(row["challenger"], 0)},
            "agreement": agreement,
            "agreement_ci95": _interval(wilson(row["agreed"], row["compared"])),
            "primary": _arm(row, "primary"), "challenger_arm": _arm(row, "challenger"),
            "difference": difference(row),
            "latency_ms": {name: _percentiles(row[f"{name}_ms"])
                           for name in ("primary_latency", "model_time", "queue_lag")},
        })
    return {"arms": rows, "orphan_feedback": orphan_counts.get("", 0), "drift_events": alerts}


def gather(settings: Settings, challenger: str, since_s: int, by: str) -> dict[str, Any]:
    """:func:`report` over the last ``since_s`` seconds: what ``shadowpipe compare`` shows."""
    params = {"since_ms": int(time.time() * 1000) - since_s * 1000,
              "challenger": challenger, "by": by}
    return report(rows(fetch(settings, "arms", params)),
                  rows(fetch(settings, "orphans", params)),
                  rows(fetch(settings, "alerts", params)))
