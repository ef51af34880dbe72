"""The Vertex AI clients and how every call is made: regional clients, credentials, retries, timeouts,
errors, idempotent creates and the wait for a long-running operation.

Each region gets its own JobService, ModelService, EndpointService and PredictionService clients, made on
first use, on the REST transport; Cloud Logging's client (a job's output) on its JSON API. VERTEX_API_ENDPOINT overrides `<region>-aiplatform.googleapis.com`;
an `http://` endpoint (a local fake) is spoken to without TLS and with anonymous credentials.
"""

from __future__ import annotations

import concurrent.futures
import re
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, NoReturn, TypeVar

import google.auth
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.api_core.future import polling
from google.api_core.retry import Retry
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import aiplatform_v1 as aip
from google.cloud.aiplatform_v1.services.endpoint_service.transports.rest import EndpointServiceRestTransport
from google.cloud.aiplatform_v1.services.job_service.transports.rest import JobServiceRestTransport
from google.cloud.aiplatform_v1.services.model_service.transports.rest import ModelServiceRestTransport
from google.cloud.aiplatform_v1.services.prediction_service.transports.rest import PredictionServiceRestTransport

from model_registry.adapters.backends.vertex.errors import CALL_ERRORS, retryable, translate
from model_registry.adapters.gcs import CREDENTIALS_HINT, NoCredentials
from model_registry.domain.errors import BackendError, StarchartError

Clients = tuple[aip.JobServiceClient, aip.ModelServiceClient, aip.EndpointServiceClient, aip.PredictionServiceClient]
T = TypeVar("T")
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
PROJECT_ID = re.compile(r"^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
REGION = re.compile(r"^[a-z]+-[a-z]+\d+$")


def label_value(value: str) -> str:
    """A Vertex AI label value: lowercase letters, digits, '_' and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "_", str(value).lower())[:63]


def labels(raw: Mapping[str, str]) -> dict[str, str]:
    """Vertex AI labels from any mapping: values made valid, keys that cannot start a label dropped."""
    out = {}
    for key, value in raw.items():
        key = label_value(key)
        if key and key[0].isalpha():
            out[key] = label_value(value)
    return out


class VertexApi:
    """One project and region of Vertex AI: its clients and the way each call is retried, timed and explained."""

    def __init__(
        self,
        project: str,
        region: str,
        bucket: str,
        *,
        api_endpoint: str | None = None,
        credentials: Credentials | None = None,
        retry_delays: tuple[float, float] = (1.0, 30.0),
        retry_deadline: float = 120.0,
        rpc_timeout: float = 60.0,
        operation_poll: tuple[float, float] = (1.0, 20.0),
        operation_timeout: float = 1800.0,
        page_size: int = 100,
    ) -> None:
        self.project, self.region, self.bucket = project, region, bucket
        self.api_endpoint = api_endpoint or None
        self.rpc_timeout = rpc_timeout
        self.retry_deadline = retry_deadline
        self.operation_timeout = operation_timeout
        self.page_size = page_size
        self.retry = Retry(predicate=retryable, initial=retry_delays[0], maximum=retry_delays[1], multiplier=2.0,
                           timeout=retry_deadline)
        self.polling = polling.DEFAULT_POLLING.with_delay(initial=operation_poll[0], maximum=operation_poll[1])
        self.polling = self.polling.with_timeout(operation_timeout)
        self._credentials = credentials
        self._clients: dict[str, Clients] = {}
        self._logging: Any = None
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- names

    def parent(self, region: str | None = None) -> str:
        return f"projects/{self.project}/locations/{region or self.region}"

    def model_path(self, model: str) -> str:
        return f"{self.parent()}/models/{model}"

    def host(self, region: str) -> str:
        return self.api_endpoint or f"{region}-aiplatform.googleapis.com"

    # ---------------------------------------------------------------- clients

    def jobs(self, region: str | None = None) -> aip.JobServiceClient:
        return self._clients_for(region)[0]

    def models(self) -> aip.ModelServiceClient:
        return self._clients_for(self.region)[1]

    def endpoints(self) -> aip.EndpointServiceClient:
        return self._clients_for(self.region)[2]

    def predictions(self) -> aip.PredictionServiceClient:
        return self._clients_for(self.region)[3]

    def logging(self) -> Any:
        """Cloud Logging (where Vertex AI writes a job's output), on its JSON API; an `http://` VERTEX_API_ENDPOINT
        (a local fake) serves it too, other overrides (regional, Private Service Connect) are Vertex AI's only."""
        with self._lock:
            if self._logging is None:
                from google.cloud import logging as cloud_logging  # only when logs are asked for

                endpoint = self.api_endpoint or ""
                if endpoint.startswith("http://"):
                    self._logging = cloud_logging.Client(
                        project=self.project, credentials=AnonymousCredentials(), _use_grpc=False,
                        client_options={"api_endpoint": endpoint.rstrip("/")})
                else:
                    self._logging = cloud_logging.Client(project=self.project, credentials=self._adc(),
                                                         _use_grpc=False)
            return self._logging

    def _clients_for(self, region: str | None) -> Clients:
        region = region or self.region
        with self._lock:
            if region not in self._clients:
                self._clients[region] = self._make_clients(region)
            return self._clients[region]

    def _make_clients(self, region: str) -> Clients:
        endpoint = self.host(region)
        if endpoint.startswith("http://"):  # a local fake: REST without TLS, no credentials
            host = endpoint.removeprefix("http://").rstrip("/")
            creds: Credentials = AnonymousCredentials()
            return (aip.JobServiceClient(transport=JobServiceRestTransport(host=host, credentials=creds,
                                                                           url_scheme="http")),
                    aip.ModelServiceClient(transport=ModelServiceRestTransport(host=host, credentials=creds,
                                                                               url_scheme="http")),
                    aip.EndpointServiceClient(transport=EndpointServiceRestTransport(host=host, credentials=creds,
                                                                                     url_scheme="http")),
                    aip.PredictionServiceClient(transport=PredictionServiceRestTransport(
                        host=host, credentials=creds, url_scheme="http")))
        options = ClientOptions(api_endpoint=endpoint.removeprefix("https://").rstrip("/"))
        creds = self._adc()
        return (aip.JobServiceClient(credentials=creds, transport="rest", client_options=options),
                aip.ModelServiceClient(credentials=creds, transport="rest", client_options=options),
                aip.EndpointServiceClient(credentials=creds, transport="rest", client_options=options),
                aip.PredictionServiceClient(credentials=creds, transport="rest", client_options=options))

    def _adc(self) -> Credentials:
        if self._credentials is None:
            try:
                self._credentials, _ = google.auth.default(scopes=list(SCOPES))
            except auth_exc.DefaultCredentialsError as exc:
                raise NoCredentials("no Google Cloud credentials found for Vertex AI", CREDENTIALS_HINT) from exc
        return self._credentials

    # ---------------------------------------------------------------- calls

    @contextmanager
    def errors(self, action: str, missing: str, region: str | None = None) -> Iterator[None]:
        """Turn whatever the client libraries raise into a StarchartError that says what to do."""
        try:
            yield
        except StarchartError:
            raise
        except gexc.RetryError as exc:
            self._raise(exc.cause or exc, action, missing, region, retried=True)
        except CALL_ERRORS as exc:
            self._raise(exc, action, missing, region)

    def _raise(self, exc: BaseException, action: str, missing: str, region: str | None,
               retried: bool = False) -> NoReturn:
        region = region or self.region
        raise translate(exc, action, missing, project=self.project, region=region, bucket=self.bucket,
                        api_endpoint=self.host(region), retried=retried) from exc

    def idempotent(self, create: Callable[[], T], find: Callable[[], T | None]) -> T:
        """Retry `create` on 429/503; before each retry, look for what an earlier attempt may have made."""
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                found = find()
                if found is not None:
                    return found
            return create()

        return self.retry(attempt)()

    def wait(self, started: Any, action: str, hint: str, late: StarchartError | None = None) -> Any:
        """The result of a long-running operation; a BackendError that says what failed if it did not end well.

        `late` is raised when the operation outlives operation_timeout (by default: it took longer, retry)."""
        try:
            return started.result(timeout=self.operation_timeout, polling=self.polling, retry=self.retry)
        except concurrent.futures.TimeoutError as exc:
            raise late or BackendError(f"Vertex AI took longer than {self.operation_timeout:.0f}s to {action} (it "
                                       "may still be at it)", f"retry later; {hint}") from exc
        except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
            op = started.operation
            if op.done and op.HasField("error"):  # the operation itself failed, not a call to follow it
                raise BackendError(f"Vertex AI could not {action}: {op.error.message}", hint) from exc
            with self.errors(f"follow the operation to {action}", "operation"):
                raise
