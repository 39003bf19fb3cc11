"""Named read queries: what ``shadowpipe compare`` and the monitor's query endpoint run.

The same SQL is documented in ``docs/monitor.md`` so users can run it in ClickHouse
directly; ``{db}`` is the database, ``{name:Type}`` are server-side parameters:
``since_ms`` (epoch ms), ``challenger`` ('' = all) and ``by`` (a context attribute, '' =
overall).

>>> sorted(QUERIES)
['alerts', 'arms', 'orphans', 'windows']
>>> "FINAL" in render("arms", "shadowpipe")
True
"""

from __future__ import annotations

import math
from typing import Any

_FILTER = ("({challenger:String} = '' OR challenger = {challenger:String})")

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
SELECT
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
GROUP BY challenger, segment
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
}
PARAMETERS = ("since_ms", "challenger", "by")


def render(name: str, db: str) -> str:
    """The SQL of query ``name`` for database ``db``; KeyError for unknown names."""
    return QUERIES[name].replace("{db}", db)


def parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """Typed parameters with defaults (everything since the epoch, all challengers).

    >>> parameters({"since_ms": "5"})
    {'since_ms': 5, 'challenger': '', 'by': ''}
    """
    return {"since_ms": int(raw.get("since_ms") or 0),
            "challenger": str(raw.get("challenger") or ""), "by": str(raw.get("by") or "")}


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
        columns, rows = sink_or_client.query(sql, params)
    else:
        result = sink_or_client.query(sql, parameters=params)
        columns, rows = list(result.column_names), result.result_rows
    return {"columns": columns, "rows": [jsonable(list(r)) for r in rows]}
