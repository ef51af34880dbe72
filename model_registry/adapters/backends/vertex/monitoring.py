"""A canary's figures from Cloud Monitoring, as Vertex AI publishes them per deployed model of an endpoint.

Vertex AI writes, on the monitored resource `aiplatform.googleapis.com/Endpoint` (resource label `endpoint_id`), the
DELTA metrics `prediction/online/prediction_count` and `prediction/online/error_count` and the DISTRIBUTION
`prediction/online/prediction_latencies` (milliseconds; metric label `latency_type`, "total" always written), each
with the metric label `deployed_model_id`. The figures of a canary are those sums over the window since the
candidate was deployed, per side; p50 and p99 come from the merged distribution's bucket counts. Monitoring shows
a sample a minute or more after it is taken, so the figures lag the traffic by that much.

google-cloud-monitoring's client speaks gRPC only; its messages (request, time series, distribution) are used here
over Monitoring's v3 REST API, flattened and parsed as the GAPIC REST transports do, through google-auth's
AuthorizedSession, so that a local fake can answer and the failures are google.api_core's exceptions.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Iterator, NoReturn

import requests
from google.api_core import exceptions as gexc
from google.api_core import rest_helpers
from google.auth import exceptions as auth_exc
from google.auth.transport.requests import AuthorizedSession
from google.cloud import monitoring_v3
from google.protobuf import json_format

from model_registry.adapters.backends.vertex.clients import VertexApi
from model_registry.adapters.backends.vertex.errors import (
    CALL_ERRORS,
    VertexPermissionDenied,
    VertexUnavailable,
    server_message,
)
from model_registry.domain.errors import BackendError, StarchartError

METRICS = "aiplatform.googleapis.com/prediction/online/"
RESOURCE = "aiplatform.googleapis.com/Endpoint"
MONITORING_HOST = "monitoring.googleapis.com"
MIN_ALIGNMENT = 60  # seconds: Monitoring's shortest alignment period
PAGE_SIZE = 1000


@dataclass(frozen=True)
class CanarySides:
    """A running canary on an endpoint: its deployed models by side, and since when the candidate is deployed."""

    endpoint_id: str
    candidate_version: str
    candidate_id: str
    base_id: str
    since: datetime


def percentile(buckets: list[tuple[float, float, int]], q: float) -> float | None:
    """The q-th percentile (0-100) of (lower, upper, count) buckets: the nearest rank's bucket, interpolated
    linearly within it (an open-ended bucket gives its finite bound); None when the buckets hold nothing."""
    kept = sorted((b for b in buckets if b[2] > 0), key=lambda b: (b[0], b[1]))
    total = sum(count for _, _, count in kept)
    if not total:
        return None
    rank = max(1, min(total, math.ceil(q * total / 100)))
    seen = 0
    for lower, upper, count in kept:
        if seen + count >= rank:
            if math.isinf(lower):
                return upper
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return kept[-1][1]  # not reached: the ranks add up to the total


def buckets_of(dist: Any) -> list[tuple[float, float, int]]:
    """A Distribution's bucket counts as (lower, upper, count), for linear, exponential or explicit buckets
    (bucket 0 is the underflow, the last one the overflow; trailing empty buckets may be left out)."""
    options = dist.bucket_options
    counts = list(dist.bucket_counts)
    kind = options.WhichOneof("options")  # a google.api Distribution: a protobuf message, not proto-plus
    if kind == "linear_buckets":
        lin = options.linear_buckets
        bounds = [lin.offset + lin.width * i for i in range(lin.num_finite_buckets + 1)]
    elif kind == "exponential_buckets":
        exp = options.exponential_buckets
        bounds = [exp.scale * exp.growth_factor ** i for i in range(exp.num_finite_buckets + 1)]
    elif kind == "explicit_buckets":
        bounds = list(options.explicit_buckets.bounds)
    else:
        raise BackendError("Cloud Monitoring answered a latency distribution without bucket options",
                           "this is Vertex AI's metric: report it; the canary is judged again at the next pass")
    if len(counts) > len(bounds) + 1:
        raise BackendError(f"Cloud Monitoring answered {len(counts)} bucket counts for {len(bounds) + 1} buckets",
                           "this is Vertex AI's metric: report it; the canary is judged again at the next pass")
    edges = [-math.inf, *bounds, math.inf]
    return [(edges[i], edges[i + 1], int(count)) for i, count in enumerate(counts)]


class Monitoring:
    """Cloud Monitoring's timeSeries.list for one project, with the Vertex AI calls' retries and deadlines.

    `api_endpoint`: an `http://` URL (a local fake) is spoken to without TLS and with anonymous credentials;
    by default an `http://` VERTEX_API_ENDPOINT serves Monitoring too, else monitoring.googleapis.com."""

    def __init__(self, api: VertexApi, api_endpoint: str | None = None) -> None:
        self.api = api
        vertex = api.api_endpoint or ""
        self.host = (api_endpoint or (vertex if vertex.startswith("http://") else MONITORING_HOST)).rstrip("/")
        self._session: AuthorizedSession | None = None

    @property
    def base_url(self) -> str:
        return self.host if self.host.startswith(("http://", "https://")) else f"https://{self.host}"

    def session(self) -> AuthorizedSession:
        if self._session is None:
            from google.auth.credentials import AnonymousCredentials

            local = self.host.startswith("http://")
            self._session = AuthorizedSession(AnonymousCredentials() if local else self.api._adc())
        return self._session

    # ---------------------------------------------------------------- the figures

    def figures(self, sides: CanarySides, now: datetime) -> dict[str, Any]:
        """Both sides' requests, errors and latency p50/p99 since the candidate was deployed (Figures.as_dict's
        shape; nothing is mirrored on Vertex AI, so `mirrored` and `agreed` are 0)."""
        start = min(sides.since, now - timedelta(seconds=1))
        period = max(MIN_ALIGNMENT, math.ceil((now - start).total_seconds()))
        by_side = {sides.candidate_id: "candidate", sides.base_id: "base"}
        requests_ = self._sums("prediction_count", sides.endpoint_id, start, now, period)
        errors = self._sums("error_count", sides.endpoint_id, start, now, period)
        latencies = self._latency_buckets(sides.endpoint_id, start, now, period)
        out: dict[str, Any] = {"candidate_version": sides.candidate_version, "mirrored": 0, "agreed": 0,
                               "source": "cloud monitoring", "since": start.isoformat(), "until": now.isoformat()}
        for deployed_id, side in by_side.items():
            kept = latencies.get(deployed_id, [])
            p50, p99 = percentile(kept, 50), percentile(kept, 99)
            out[side] = {"requests": requests_.get(deployed_id, 0), "errors": errors.get(deployed_id, 0),
                         "p50_ms": None if p50 is None else round(p50, 3),
                         "p99_ms": None if p99 is None else round(p99, 3)}
        return out

    def _sums(self, metric: str, endpoint_id: str, start: datetime, end: datetime, period: int) -> dict[str, int]:
        sums: dict[str, int] = {}
        for series in self._series(metric, endpoint_id, start, end, period):
            deployed = series.metric.labels.get("deployed_model_id", "")
            sums[deployed] = sums.get(deployed, 0) + sum(int(p.value.int64_value) for p in series.points)
        return sums

    def _latency_buckets(self, endpoint_id: str, start: datetime, end: datetime,
                         period: int) -> dict[str, list[tuple[float, float, int]]]:
        merged: dict[str, list[tuple[float, float, int]]] = {}
        for series in self._series("prediction_latencies", endpoint_id, start, end, period, 'metric.labels.'
                                   'latency_type="total"'):
            deployed = series.metric.labels.get("deployed_model_id", "")
            for point in series.points:
                merged.setdefault(deployed, []).extend(buckets_of(point.value.distribution_value))
        return merged

    # ---------------------------------------------------------------- timeSeries.list over REST

    def _series(self, metric: str, endpoint_id: str, start: datetime, end: datetime, period: int,
                extra: str = "") -> Iterator[Any]:
        """Every time series of the endpoint's metric in [start, end], summed per deployed model and period."""
        agg = monitoring_v3.Aggregation
        flt = (f'metric.type="{METRICS}{metric}" AND resource.type="{RESOURCE}" '
               f'AND resource.labels.endpoint_id="{endpoint_id}"' + (f" AND {extra}" if extra else ""))
        request = monitoring_v3.ListTimeSeriesRequest(
            name=f"projects/{self.api.project}", filter=flt,
            interval=monitoring_v3.TimeInterval(start_time=start, end_time=end),
            aggregation=agg(alignment_period=timedelta(seconds=period),
                            per_series_aligner=agg.Aligner.ALIGN_DELTA,
                            cross_series_reducer=agg.Reducer.REDUCE_SUM,
                            group_by_fields=["metric.label.deployed_model_id"]),
            view=monitoring_v3.ListTimeSeriesRequest.TimeSeriesView.FULL, page_size=PAGE_SIZE)
        token = ""
        while True:
            if token:
                request.page_token = token
            page = self._list(request, metric)
            yield from page.time_series
            token = page.next_page_token
            if not token:
                return

    def _list(self, request: Any, metric: str) -> Any:
        params = json_format.MessageToDict(type(request).pb(request), use_integers_for_enums=True)
        name = params.pop("name")
        query = rest_helpers.flatten_query_params(params, strict=True)
        query.append(("$alt", "json;enum-encoding=int"))
        url = f"{self.base_url}/v3/{name}/timeSeries"
        api = self.api

        def call() -> Any:
            response = self.session().get(url, params=query, timeout=api.rpc_timeout)
            if response.status_code >= 400:
                raise gexc.from_http_response(response)
            return response

        with self.errors(metric):
            response = api.retry(call)()
        page = monitoring_v3.ListTimeSeriesResponse()
        json_format.Parse(response.text, monitoring_v3.ListTimeSeriesResponse.pb(page), ignore_unknown_fields=True)
        return page

    @contextmanager
    def errors(self, metric: str) -> Iterator[None]:
        """What a failed timeSeries.list raises: a StarchartError that names Cloud Monitoring and the role it needs."""
        try:
            yield
        except StarchartError:
            raise
        except gexc.RetryError as exc:
            self._raise(exc.cause or exc, metric, exc, retried=True)
        except CALL_ERRORS as exc:
            self._raise(exc, metric, exc)

    def _raise(self, cause: BaseException, metric: str, exc: BaseException, retried: bool = False) -> NoReturn:
        project, host = self.api.project, self.host
        action = f"read {METRICS}{metric} from Cloud Monitoring"
        msg = server_message(cause)
        if isinstance(cause, gexc.Forbidden):
            raise VertexPermissionDenied(
                f"could not {action}: permission denied in project {project} ({msg})",
                f"grant roles/monitoring.viewer on project {project} to the account in use (and enable the API: "
                f"gcloud services enable monitoring.googleapis.com --project={project})") from exc
        if isinstance(cause, (requests.exceptions.RequestException, auth_exc.TransportError)):
            raise VertexUnavailable(f"could not {action}: cannot reach Cloud Monitoring at {host} "
                                    f"({type(cause).__name__})", "check the network; the worker tries again at its "
                                                                 "next pass") from exc
        if isinstance(cause, (gexc.ServiceUnavailable, gexc.TooManyRequests)):
            raise VertexUnavailable(f"could not {action}: Cloud Monitoring is unavailable"
                                    f"{' after retrying' if retried else ''} ({msg})",
                                    "the worker tries again at its next pass") from exc
        raise BackendError(f"could not {action}: {msg}", "the worker tries again at its next pass") from exc
