"""Cloud Monitoring's timeSeries.list (v3 REST) over what a Vertex AI fake's deployments served.

    GET /v3/projects/{project}/timeSeries?filter=...&interval.startTime=...&interval.endTime=...
        &aggregation.alignmentPeriod=3600s&aggregation.perSeriesAligner=...&aggregation.crossSeriesReducer=...
        &aggregation.groupByFields=metric.label.deployed_model_id&pageSize=...&pageToken=...

Metrics, on the monitored resource aiplatform.googleapis.com/Endpoint (resource labels resource_container,
location, endpoint_id), each with the metric label deployed_model_id:
    prediction/online/prediction_count      DELTA INT64         every predict a deployment answered or failed
    prediction/online/error_count           DELTA INT64         of which failed
    prediction/online/prediction_latencies  DELTA DISTRIBUTION  ms; latency_type "total" (the answer's latency)
                                                                and "overhead" (1 ms), as for custom models
Raw points are one a minute per series (Vertex AI writes a sample a minute); an aligner (ALIGN_DELTA, ALIGN_SUM)
sums them per alignment period counted back from endTime, a reducer (REDUCE_SUM) across series per
groupByFields. The filter takes `KEY = "VALUE"` terms joined by AND on metric.type (required), resource.type and
the labels above; anything else is a 400, as Monitoring answers an unknown filter; an unknown metric type a 404.
The answer goes through monitoring_v3's ListTimeSeriesResponse: int64 values as strings, enums as asked.
"""

from __future__ import annotations

import base64
import bisect
import math
import re
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Protocol

from google.cloud import monitoring_v3
from google.protobuf import json_format, timestamp_pb2

METRICS = "aiplatform.googleapis.com/prediction/online/"
RESOURCE = "aiplatform.googleapis.com/Endpoint"
KINDS = {"prediction_count": "INT64", "error_count": "INT64", "prediction_latencies": "DISTRIBUTION"}
LATENCY_BUCKETS = {"exponentialBuckets": {"numFiniteBuckets": 60, "growthFactor": 1.25, "scale": 1.0}}
OVERHEAD_MS = 1.0
SAMPLE = timedelta(seconds=60)
FILTER_KEYS = {"metric.type", "resource.type", "resource.labels.endpoint_id", "resource.labels.location",
               "resource.labels.resource_container", "metric.labels.deployed_model_id", "metric.labels.latency_type"}
ALIGNERS = {"ALIGN_NONE", "ALIGN_DELTA", "ALIGN_SUM"}
REDUCERS = {"REDUCE_NONE", "REDUCE_SUM"}
MAX_PAGE = 100000


class Served(Protocol):
    endpoint_id: str
    deployed_model_id: str
    at: datetime
    latency_ms: float
    error: bool


def _error(code: int, message: str) -> Exception:
    from .vertex_fake import ApiError  # one error body for the whole fake

    return ApiError(code, message)


def _time(text: str | None, what: str) -> datetime:
    if not text:
        raise _error(400, f"Field {what} is required.")
    stamp = timestamp_pb2.Timestamp()
    try:
        stamp.FromJsonString(text)
    except ValueError as exc:
        raise _error(400, f"Invalid value at '{what}' (type.googleapis.com/google.protobuf.Timestamp), "
                          f"Field '{what}', Invalid time format: {text}") from exc
    return stamp.ToDatetime(tzinfo=timezone.utc)


def _stamp(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _enum(raw: str | None, cls: Any, allowed: set[str], what: str) -> str:
    if raw is None or raw == "":
        return next(a for a in allowed if a.endswith("_NONE"))
    try:
        name = cls(int(raw)).name if raw.lstrip("-").isdigit() else cls[raw].name
    except (KeyError, ValueError) as exc:
        raise _error(400, f"Invalid value at '{what}': {raw}") from exc
    if name not in allowed:
        raise _error(400, f"The aggregation {what} {name} is not supported by this fake (supported: "
                          f"{', '.join(sorted(allowed))}).")
    return name


def parse_filter(text: str) -> dict[str, str]:
    """`KEY = "VALUE" AND ...` as {KEY: VALUE}; label keys as `labels.` (Monitoring takes `label.` too)."""
    if not text.strip():
        raise _error(400, "Field filter is required.")
    terms: dict[str, str] = {}
    for term in re.split(r"\s+AND\s+", text.strip()):
        m = re.fullmatch(r'\s*([a-z_.]+)\s*=\s*"([^"]*)"\s*', term)
        key = re.sub(r"\.label\.", ".labels.", m.group(1)) if m else ""
        if not m or key not in FILTER_KEYS or key in terms:
            raise _error(400, f"The provided filter doesn't refer to any known metric or resource label: {term!r}.")
        terms[key] = m.group(2)
    if "metric.type" not in terms:
        raise _error(400, "The filter must name a metric.type.")
    return terms


def _bucket(value: float, options: dict[str, Any]) -> tuple[int, int]:
    """(the bucket of `value`, the number of buckets) under Distribution.BucketOptions in wire format."""
    if "exponentialBuckets" in options:
        exp = options["exponentialBuckets"]
        n, g, scale = int(exp["numFiniteBuckets"]), float(exp["growthFactor"]), float(exp["scale"])
        index = 0 if value < scale else min(n + 1, int(math.floor(math.log(value / scale) / math.log(g))) + 1)
        return index, n + 2
    if "linearBuckets" in options:
        lin = options["linearBuckets"]
        n, width, offset = int(lin["numFiniteBuckets"]), float(lin["width"]), float(lin["offset"])
        index = 0 if value < offset else min(n + 1, int((value - offset) // width) + 1)
        return index, n + 2
    bounds = [float(b) for b in options["explicitBuckets"]["bounds"]]
    return bisect.bisect_right(bounds, value), len(bounds) + 1


def _distribution(values: list[float], options: dict[str, Any]) -> dict[str, Any]:
    counts: list[int] = []
    for value in values:
        index, size = _bucket(value, options)
        counts = counts or [0] * size
        counts[index] += 1
    while counts and counts[-1] == 0:  # Monitoring leaves out the trailing empty buckets
        counts.pop()
    mean = sum(values) / len(values) if values else 0.0
    return {"count": str(len(values)), "mean": mean, "sumOfSquaredDeviation": sum((v - mean) ** 2 for v in values),
            "bucketOptions": options, "bucketCounts": [str(c) for c in counts]}


def _raw_series(served: list[Served], project_number: str, metric: str, start: datetime,
                end: datetime) -> dict[tuple[tuple[str, str], ...], list[tuple[datetime, float, bool]]]:
    """(labels) -> samples (when, value, errored): one series per endpoint, deployed model (and latency type)."""
    out: dict[tuple[tuple[str, str], ...], list[tuple[datetime, float, bool]]] = {}
    for s in served:
        if not start <= s.at <= end:
            continue
        base = (("endpoint_id", s.endpoint_id), ("location", "us-central1"), ("resource_container", project_number),
                ("deployed_model_id", s.deployed_model_id))
        if metric == "prediction_latencies":
            out.setdefault(base + (("latency_type", "total"),), []).append((s.at, s.latency_ms, s.error))
            out.setdefault(base + (("latency_type", "overhead"),), []).append((s.at, OVERHEAD_MS, s.error))
        elif metric == "prediction_count" or s.error:
            out.setdefault(base, []).append((s.at, 1.0, s.error))
    return out


def _periods(samples: list[tuple[datetime, float, bool]], start: datetime, end: datetime,
             period: timedelta | None) -> list[tuple[datetime, datetime, list[float]]]:
    """Samples gathered per interval: the minute they fell in (raw points), or alignment periods back from end."""
    buckets: dict[tuple[datetime, datetime], list[float]] = {}
    for at, value, _ in samples:
        if period is None:
            low = at.replace(second=0, microsecond=0)
            key = (low, low + SAMPLE)
        else:
            k = max(0, math.ceil((end - at) / period) - 1)
            key = (end - (k + 1) * period, end - k * period)
        buckets.setdefault(key, []).append(value)
    return [(low, high, values) for (low, high), values in sorted(buckets.items(), reverse=True)]


def time_series_list(served: list[Served], project_number: str, options: dict[str, Any], q: dict[str, str],
                     ints: bool) -> dict[str, Any]:
    """timeSeries.list's answer (see the module's docstring)."""
    terms = parse_filter(q.get("filter", ""))
    metric_type = terms.pop("metric.type")
    metric = metric_type.removeprefix(METRICS)
    if not metric_type.startswith(METRICS) or metric not in KINDS:
        raise _error(404, f'Cannot find metric(s) that match type = "{metric_type}".')
    end = _time(q.get("interval.endTime"), "interval.end_time")
    start = _time(q.get("interval.startTime"), "interval.start_time") if q.get("interval.startTime") else end
    if start > end:
        raise _error(400, "The start time must be before the end time (or equal to it).")
    agg = monitoring_v3.Aggregation
    aligner = _enum(q.get("aggregation.perSeriesAligner"), agg.Aligner, ALIGNERS, "per_series_aligner")
    reducer = _enum(q.get("aggregation.crossSeriesReducer"), agg.Reducer, REDUCERS, "cross_series_reducer")
    groups = [g for g in (q.get("aggregation.groupByFields") or "").split(",") if g]
    period: timedelta | None = None
    if aligner != "ALIGN_NONE":
        m = re.fullmatch(r"(\d+)(?:\.\d+)?s", q.get("aggregation.alignmentPeriod") or "")
        if not m or int(m.group(1)) < 60:
            raise _error(400, "The alignment period must be at least 60s when a per-series aligner is set.")
        period = timedelta(seconds=int(m.group(1)))
    if reducer != "REDUCE_NONE" and period is None:
        raise _error(400, "A cross-series reducer needs a per-series aligner and an alignment period.")
    for field in groups:
        if re.sub(r"\.label\.", ".labels.", field) not in FILTER_KEYS:
            raise _error(400, f"Unknown group_by field {field!r}.")
    resource_keys = {"endpoint_id", "location", "resource_container"}
    wanted: list[Callable[[dict[str, str]], bool]] = [
        lambda labels, k=k, v=v: labels.get(k.rsplit(".", 1)[1]) == v
        for k, v in terms.items() if k != "resource.type"]
    series = {} if terms.get("resource.type", RESOURCE) != RESOURCE else _raw_series(
        served, project_number, metric, start, end)
    kept = {labels: samples for labels, samples in series.items() if all(w(dict(labels)) for w in wanted)}
    if reducer == "REDUCE_SUM":
        names = [re.sub(r"^(metric|resource)\.labels?\.", "", g) for g in groups]
        merged: dict[tuple[tuple[str, str], ...], list[tuple[datetime, float, bool]]] = {}
        for labels, samples in kept.items():
            merged.setdefault(tuple((k, v) for k, v in labels if k in names), []).extend(samples)
        kept = merged
    kind = KINDS[metric]
    out = []
    for labels, samples in sorted(kept.items()):
        points = []
        for low, high, values in _periods(samples, start, end, period):
            value = ({"int64Value": str(int(sum(values)))} if kind == "INT64"
                     else {"distributionValue": _distribution(values, options)})
            points.append({"interval": {"startTime": _stamp(low), "endTime": _stamp(high)}, "value": value})
        out.append({"metric": {"type": metric_type, "labels": {k: v for k, v in labels if k not in resource_keys}},
                    "resource": {"type": RESOURCE, "labels": {k: v for k, v in labels if k in resource_keys}},
                    "metricKind": "DELTA", "valueType": kind, "unit": "ms" if kind == "DISTRIBUTION" else "1",
                    "points": points})
    try:
        size = max(1, min(int(q.get("pageSize") or MAX_PAGE), MAX_PAGE))
        offset = int(base64.urlsafe_b64decode(q["pageToken"]).decode()) if q.get("pageToken") else 0
    except (ValueError, UnicodeDecodeError) as exc:
        raise _error(400, "Invalid page token or page size.") from exc
    answer: dict[str, Any] = {"timeSeries": out[offset:offset + size]}
    if offset + size < len(out):
        answer["nextPageToken"] = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
    pb = monitoring_v3.ListTimeSeriesResponse.pb(monitoring_v3.ListTimeSeriesResponse())
    json_format.ParseDict(answer, pb)  # only what Monitoring's messages hold
    return json_format.MessageToDict(pb, use_integers_for_enums=ints)
