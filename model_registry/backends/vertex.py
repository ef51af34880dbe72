"""The Vertex AI backend: CustomJobs through JobService, model versions through ModelService, files on GCS.

Training. A job is a CustomJob named (display name) after the job id, labelled with the model and the
timestamp, running the staged sdist with `python_package_spec`; `base_output_directory` is the train
path, so Vertex AI sets AIP_MODEL_DIR=<train path>/model/ (and AIP_CHECKPOINT_DIR, AIP_TENSORBOARD_LOG_DIR).

Scale tiers, as Cloud ML Engine named them, become worker pools (pool 0 = chief, pool 1 = workers):

    BASIC       chief n1-standard-4
    STANDARD_1  chief n1-highcpu-8 + 4 workers n1-highcpu-8
    PREMIUM_1   chief n1-highcpu-16 + 19 workers n1-highcpu-16
    BASIC_GPU   chief n1-standard-8 with 1 NVIDIA_TESLA_T4
    CUSTOM      chief --machine-type (default n1-standard-4)

Cloud ML Engine's STANDARD_1/PREMIUM_1 also had parameter servers (3 and 11). They are not mapped to
Vertex AI's pool 2: our trainers use MultiWorkerMirroredStrategy (all-reduce between chief and
workers), which has no use for parameter servers and would run the trainer on them as extra,
unexpected tasks; a Reduction Server pool only helps NCCL all-reduce on GPUs. `--workers N` means N
machines in all (chief + N-1 workers), as the local backend runs N processes; `--machine-type M`
and `--accelerator TYPE:COUNT` apply to every pool.

Versions. A model is one Vertex AI Model (model_id = the model name); each exposed version is a
model version carrying its version name (v<TS>) as a version alias. The default version is the
`default` alias, moved with merge_version_aliases; `current_default` reads the alias.

Endpoints (optional per model, off by default: a deployed model bills per node hour). With
`endpoint: {enabled: true, machine_type: n1-standard-2, min_replicas: 1, max_replicas: 1}` in the
model's policy, `set_default` also serves the new default from an endpoint (display name = the
model, label model=<model>), in an order where the `default` alias is the commit point:

    1. find or create the endpoint                       (an empty endpoint costs nothing)
    2. deploy the version with no traffic                (or all of it, if the endpoint serves nothing)
    3. move all the traffic to it                        (one UpdateEndpoint: atomic, undoable)
    4. move the `default` alias                          <- commit
    5. undeploy the other deployments (none has traffic) (clean-up: a failure is logged, not raised)

A failure in 1-2 changes nothing that serves; a failure in 3-4 puts the previous traffic split back
and undeploys the new deployment; so a failed promotion leaves the alias, the traffic and the
deployments as they were, and Retry starts over. A deployment of the version that is already there
(an earlier attempt that timed out) is used rather than deployed again, and step 5 also removes
deployments left behind by earlier failures.

Failures. 429 (rate limits) and 503 are retried with exponential backoff; creating a job or a model
version is made idempotent across those retries by looking for what the previous attempt made.
Everything else becomes a BackendError that says what is missing.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping, NoReturn, TypeVar
from urllib.parse import quote

import google.auth
import requests
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
from google.protobuf import field_mask_pb2, json_format, struct_pb2

from model_registry.backends.base import JobStatus, TrainingSpec
from model_registry.errors import BackendError, InvalidInput, NotFound, Refused, StarchartError
from model_registry.gcs import CREDENTIALS_HINT, GcsStorage, NoCredentials
from model_registry.packaging import Package
from model_registry.records import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED

Clients = tuple[aip.JobServiceClient, aip.ModelServiceClient, aip.EndpointServiceClient, aip.PredictionServiceClient]
T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_EXECUTOR_IMAGE = "us-docker.pkg.dev/vertex-ai/training/tf-cpu.2-17.py310:latest"
DEFAULT_GPU_EXECUTOR_IMAGE = "us-docker.pkg.dev/vertex-ai/training/tf-gpu.2-17.py310:latest"
DEFAULT_SERVING_IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
DEFAULT_ALIAS = "default"
VERSION_ALIAS = re.compile(r"^v\d{14}$")
PROJECT_ID = re.compile(r"^([a-z0-9.-]+:)?[a-z][a-z0-9-]{4,28}[a-z0-9]$")
REGION = re.compile(r"^[a-z]+-[a-z]+\d+$")
MACHINE_TYPE = re.compile(r"^[a-z][a-z0-9]*-[a-z0-9-]+$")
VERSION_REF = re.compile(r"^projects/[^/]+/locations/[^/]+/models/[^/@]+@\d+$")
ACCELERATORS = tuple(a.name for a in aip.AcceleratorType if a.value)

_STATES = {
    "JOB_STATE_UNSPECIFIED": QUEUED, "JOB_STATE_QUEUED": QUEUED, "JOB_STATE_PENDING": QUEUED,
    "JOB_STATE_RUNNING": RUNNING, "JOB_STATE_UPDATING": RUNNING, "JOB_STATE_PAUSED": RUNNING,
    "JOB_STATE_SUCCEEDED": SUCCEEDED, "JOB_STATE_PARTIALLY_SUCCEEDED": SUCCEEDED,
    "JOB_STATE_FAILED": FAILED, "JOB_STATE_EXPIRED": FAILED,
    "JOB_STATE_CANCELLING": CANCELLED, "JOB_STATE_CANCELLED": CANCELLED,
}


class VertexNotFound(BackendError):
    """Vertex AI has no such project, region, job or model."""


class VertexPermissionDenied(BackendError):
    """The credentials lack a role, or the Vertex AI API is not enabled."""


class QuotaExhausted(BackendError):
    """A Vertex AI quota is used up (CPUs, GPUs, or requests)."""


class VertexUnavailable(BackendError):
    """Vertex AI could not be reached, or stayed unavailable through the retries."""


# ---------------------------------------------------------------- worker pools


@dataclass(frozen=True)
class Pool:
    machine_type: str
    replicas: int
    accelerator: str | None = None
    accelerator_count: int = 0


SCALE_TIERS: dict[str, tuple[Pool, ...]] = {
    "BASIC": (Pool("n1-standard-4", 1),),
    "STANDARD_1": (Pool("n1-highcpu-8", 1), Pool("n1-highcpu-8", 4)),
    "PREMIUM_1": (Pool("n1-highcpu-16", 1), Pool("n1-highcpu-16", 19)),
    "BASIC_GPU": (Pool("n1-standard-8", 1, "NVIDIA_TESLA_T4", 1),),
}


def parse_accelerator(text: str) -> tuple[str, int]:
    """'nvidia-tesla-t4:2' -> ('NVIDIA_TESLA_T4', 2); the count defaults to 1."""
    kind, _, count = text.strip().partition(":")
    kind = kind.strip().upper().replace("-", "_")
    if kind not in ACCELERATORS:
        close = [a for a in ACCELERATORS if kind and (kind in a or a.endswith(kind.split("_")[-1]))]
        raise InvalidInput(f"unknown accelerator {text!r}",
                           f"use TYPE:COUNT with TYPE one of {', '.join(close or ACCELERATORS)}")
    try:
        n = int(count) if count.strip() else 1
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidInput(f"invalid accelerator count in {text!r}", "use TYPE:COUNT with COUNT 1, 2, 4 or 8")
    return kind, n


def worker_pools(spec: TrainingSpec) -> list[Pool]:
    """The worker pools of a job: the scale tier's, then --workers, --machine-type, --accelerator on top."""
    tier = (spec.scale_tier or "BASIC").upper()
    if tier == "CUSTOM":
        pools = [Pool(spec.machine_type or "n1-standard-4", 1)]
    elif tier in SCALE_TIERS:
        pools = list(SCALE_TIERS[tier])
    else:
        raise InvalidInput(f"unknown scale tier {spec.scale_tier!r}",
                           f"use one of {', '.join([*SCALE_TIERS, 'CUSTOM'])} (BASIC_TPU is not supported)")
    if spec.workers > 1:
        pools = [pools[0], replace(pools[1] if len(pools) > 1 else pools[0], replicas=spec.workers - 1)]
    if spec.machine_type:
        pools = [replace(p, machine_type=spec.machine_type) for p in pools]
    if spec.accelerator:
        kind, count = parse_accelerator(spec.accelerator)
        pools = [replace(p, accelerator=kind, accelerator_count=count) for p in pools]
    return pools


# ---------------------------------------------------------------- endpoint settings

ENDPOINT_KEYS = ("enabled", "machine_type", "min_replicas", "max_replicas", "accelerator")
ENDPOINT_EXAMPLE = "endpoint: {enabled: true, machine_type: n1-standard-2, min_replicas: 1, max_replicas: 1}"


@dataclass(frozen=True)
class EndpointSettings:
    """How a model's default is served: dedicated machines on a Vertex AI endpoint."""

    machine_type: str = "n1-standard-2"
    min_replicas: int = 1
    max_replicas: int = 1
    accelerator: str | None = None  # TYPE:COUNT, e.g. NVIDIA_TESLA_T4:1


def endpoint_settings(model: str, raw: Any) -> EndpointSettings | None:
    """A model's `endpoint` policy: None unless it says `enabled: true` (deployments cost money)."""
    where = f"models.{model}.endpoint"
    if raw is None or raw is False:
        return None
    if raw is True:
        return EndpointSettings()
    if not isinstance(raw, Mapping):
        raise InvalidInput(f"{where} must be a mapping", f"e.g. {ENDPOINT_EXAMPLE}")
    unknown = sorted(set(raw) - set(ENDPOINT_KEYS))
    if unknown:
        raise InvalidInput(f"unknown key(s) {unknown} in {where}", f"known keys: {', '.join(ENDPOINT_KEYS)}")
    enabled = raw.get("enabled", False)
    if not isinstance(enabled, bool):
        raise InvalidInput(f"{where}.enabled must be true or false, not {enabled!r}", f"e.g. {ENDPOINT_EXAMPLE}")
    if not enabled:
        return None
    machine_type = str(raw.get("machine_type") or EndpointSettings.machine_type)
    if not MACHINE_TYPE.match(machine_type):
        raise InvalidInput(f"{where}.machine_type {machine_type!r} is not a machine type",
                           "use a Vertex AI prediction machine type such as n1-standard-2")
    try:
        low = int(raw.get("min_replicas", 1))
        high = int(raw.get("max_replicas", low))
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{where}: min_replicas and max_replicas must be whole numbers",
                           f"e.g. {ENDPOINT_EXAMPLE}") from exc
    if low < 1 or high < low:
        raise InvalidInput(f"{where}: need 1 <= min_replicas <= max_replicas (got {low} and {high})",
                           "min_replicas machines run (and bill) all the time")
    accelerator = raw.get("accelerator")
    if accelerator:
        kind, count = parse_accelerator(str(accelerator))
        accelerator = f"{kind}:{count}"
    return EndpointSettings(machine_type, low, high, accelerator or None)


def _split(endpoint: aip.Endpoint) -> dict[str, int]:
    """An endpoint's traffic split without the deployments that get nothing."""
    return {k: int(v) for k, v in endpoint.traffic_split.items() if int(v)}


def _deployment_of(endpoint: aip.Endpoint, model: str, version_id: str) -> aip.DeployedModel | None:
    """A deployment of models/<model>@<version_id> on the endpoint, the one with the most traffic first."""
    split = _split(endpoint)
    found = [d for d in endpoint.deployed_models
             if d.model.rsplit("/", 1)[-1].split("@")[0] == model and d.model_version_id == version_id]
    return max(found, key=lambda d: split.get(d.id, 0), default=None)


def label_value(value: str) -> str:
    """A Vertex AI label value: lowercase letters, digits, '_' and '-', at most 63 characters."""
    return re.sub(r"[^a-z0-9_-]", "_", str(value).lower())[:63]


def _labels(raw: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for key, value in raw.items():
        key = label_value(key)
        if key and key[0].isalpha():
            out[key] = label_value(value)
    return out


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    v = value.astimezone(timezone.utc) if value.tzinfo else value
    return datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond)  # plain, not proto's


def _region_of(name: str) -> str | None:
    m = re.match(r"^projects/[^/]+/locations/([^/]+)/", name)
    return m.group(1) if m else None


def _server_message(exc: BaseException) -> str:
    """The server's words, without the 'POST http://host/path:' prefix the REST transport adds."""
    text = str(getattr(exc, "message", "") or exc)
    if re.match(r"^(GET|POST|PUT|PATCH|DELETE) \S+: ", text):
        text = text.split(": ", 1)[1]
    return text


def _is_resource_quota(exc: BaseException) -> bool:
    """A used-up resource quota (CPUs, GPUs) does not come back in seconds; request rate limits do."""
    if getattr(exc, "reason", None) == "RESOURCE_QUOTA_EXCEEDED":
        return True
    text = _server_message(exc).lower()
    return "quota" in text and "per minute" not in text and "rate" not in text


def retryable(exc: BaseException) -> bool:
    """429 rate limits and 503: retried with backoff."""
    if isinstance(exc, gexc.ServiceUnavailable):
        return True
    return isinstance(exc, gexc.TooManyRequests) and not _is_resource_quota(exc)


# ---------------------------------------------------------------- the backend


class VertexBackend:
    name = "vertex"

    def __init__(
        self,
        project: str,
        region: str,
        bucket: str,
        *,
        api_endpoint: str | None = None,
        storage: GcsStorage | None = None,
        credentials: Credentials | None = None,
        executor_image: str = DEFAULT_EXECUTOR_IMAGE,
        gpu_executor_image: str = DEFAULT_GPU_EXECUTOR_IMAGE,
        serving_image: str = DEFAULT_SERVING_IMAGE,
        poll_interval: tuple[float, float] = (2.0, 30.0),
        retry_delays: tuple[float, float] = (1.0, 30.0),
        retry_deadline: float = 120.0,
        rpc_timeout: float = 60.0,
        operation_poll: tuple[float, float] = (1.0, 20.0),
        operation_timeout: float = 1800.0,
        page_size: int = 100,
        endpoints: Mapping[str, Any] | Callable[[str], Any] | None = None,
    ) -> None:
        self.project, self.region, self.bucket = project, region, bucket.rstrip("/")
        self.api_endpoint = api_endpoint or None
        self.storage = storage or GcsStorage(project=project)
        self.executor_image, self.gpu_executor_image = executor_image, gpu_executor_image
        self.serving_image = serving_image
        self.poll_interval = poll_interval
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
        self._lock = threading.Lock()
        if endpoints is None or callable(endpoints):
            self._endpoint_policy: Callable[[str], Any] = endpoints or (lambda model: None)
        else:  # a mapping is checked now, so a typo in starchart.yaml is found at start, not at a promotion
            settings = {str(m): endpoint_settings(str(m), raw) for m, raw in endpoints.items()}
            self._endpoint_policy = settings.get

    def endpoint_settings(self, model: str) -> EndpointSettings | None:
        """How `model`'s default is served from an endpoint; None (the default) when it is not."""
        raw = self._endpoint_policy(model)
        return raw if isinstance(raw, EndpointSettings) or raw is None else endpoint_settings(model, raw)

    @classmethod
    def from_settings(cls, settings: Any, env: Mapping[str, str] | None = None, **kwargs: Any) -> "VertexBackend":
        """Validate GCP_PROJECT_ID, GCP_REGION and STARCHART_BUCKET; nothing is contacted yet.

        `endpoints=` (model -> the `endpoint` policy, or a callable that gives it) is passed on."""
        env = os.environ if env is None else env
        project, region, bucket = settings.gcp_project, settings.gcp_region, settings.bucket
        if not project:
            raise InvalidInput("GCP_PROJECT_ID is not set", "set it to the Google Cloud project that runs Vertex AI "
                               "(STARCHART_BACKEND=vertex needs a project)")
        if not PROJECT_ID.match(project):
            raise InvalidInput(f"GCP_PROJECT_ID {project!r} is not a project id",
                               "use the project id (e.g. my-ml-project), not its name or number")
        if not region:
            raise InvalidInput("GCP_REGION is not set", "set it to a Vertex AI region such as us-central1")
        if not REGION.match(region):
            raise InvalidInput(f"GCP_REGION {region!r} is not a region", "use a Vertex AI region such as us-central1")
        if not bucket:
            raise InvalidInput("STARCHART_BUCKET is not set", f"set it to a gs:// bucket, e.g. gs://{project}-ml")
        if not bucket.startswith("gs://") or len(bucket.rstrip("/")) <= len("gs://"):
            raise InvalidInput(f"STARCHART_BUCKET {bucket!r} is not a gs:// bucket",
                               f"the vertex backend keeps its files on Cloud Storage: "
                               f"STARCHART_BUCKET=gs://{bucket.removeprefix('gs://').strip('/') or project + '-ml'}")
        for key, env_name in (("serving_image", "STARCHART_SERVING_IMAGE"),
                              ("executor_image", "STARCHART_EXECUTOR_IMAGE")):
            if env.get(env_name):
                kwargs.setdefault(key, env[env_name])
        return cls(project, region, bucket, api_endpoint=env.get("VERTEX_API_ENDPOINT") or None, **kwargs)

    # ---------------------------------------------------------------- clients and errors

    def _parent(self, region: str | None = None) -> str:
        return f"projects/{self.project}/locations/{region or self.region}"

    def _model_path(self, model: str) -> str:
        return f"{self._parent()}/models/{model}"

    def _endpoint(self, region: str) -> str:
        return self.api_endpoint or f"{region}-aiplatform.googleapis.com"

    def _clients_for(self, region: str | None) -> Clients:
        region = region or self.region
        with self._lock:
            if region not in self._clients:
                self._clients[region] = self._make_clients(region)
            return self._clients[region]

    def _make_clients(self, region: str) -> Clients:
        endpoint = self._endpoint(region)
        if endpoint.startswith("http://"):  # a local fake: REST without TLS, no credentials
            host = endpoint.removeprefix("http://").rstrip("/")
            creds = AnonymousCredentials()
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

    def _jobs(self, region: str | None = None) -> aip.JobServiceClient:
        return self._clients_for(region)[0]

    def _models(self) -> aip.ModelServiceClient:
        return self._clients_for(self.region)[1]

    def _endpoints(self) -> aip.EndpointServiceClient:
        return self._clients_for(self.region)[2]

    def _predictions(self) -> aip.PredictionServiceClient:
        return self._clients_for(self.region)[3]

    @contextmanager
    def _errors(self, action: str, missing: str, region: str | None = None) -> Iterator[None]:
        """Turn whatever the client libraries raise into a StarchartError that says what to do."""
        try:
            yield
        except StarchartError:
            raise
        except gexc.RetryError as exc:
            self._raise(exc.cause or exc, action, missing, region, retried=True)
        except (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, requests.exceptions.RequestException) as exc:
            self._raise(exc, action, missing, region)

    def _raise(self, exc: BaseException, action: str, missing: str, region: str | None,
               retried: bool = False) -> NoReturn:
        raise self._translate(exc, action, missing, region or self.region, retried) from exc

    def _translate(self, exc: BaseException, action: str, missing: str, region: str,
                   retried: bool) -> StarchartError:
        p, msg = self.project, _server_message(exc)
        if isinstance(exc, gexc.NotFound):
            return VertexNotFound(f"could not {action}: Vertex AI has no {missing} ({msg})",
                                  f"check GCP_PROJECT_ID={p} and GCP_REGION={region}")
        if isinstance(exc, gexc.Forbidden):
            if getattr(exc, "reason", None) == "SERVICE_DISABLED" or "has not been used" in msg or "disabled" in msg:
                return VertexPermissionDenied(f"could not {action}: the Vertex AI API is not enabled in project {p}",
                                              f"enable it: gcloud services enable aiplatform.googleapis.com "
                                              f"--project={p}")
            return VertexPermissionDenied(
                f"could not {action}: permission denied in project {p} ({msg})",
                f"grant roles/aiplatform.user on project {p} to the account in use, and roles/storage.objectAdmin "
                f"on {self.bucket} to it and to the Vertex AI service agent")
        if isinstance(exc, (gexc.Unauthorized, auth_exc.RefreshError, auth_exc.DefaultCredentialsError)):
            return NoCredentials(f"could not {action}: Vertex AI rejected the credentials ({msg})", CREDENTIALS_HINT)
        if isinstance(exc, gexc.TooManyRequests):
            again = " (still, after retrying)" if retried else ""
            return QuotaExhausted(
                f"could not {action}: quota exhausted in project {p}, region {region}{again} ({msg})",
                f"request more at https://console.cloud.google.com/iam-admin/quotas?project={p}, "
                "use fewer or smaller machines, or retry later")
        if isinstance(exc, gexc.ServiceUnavailable):
            return VertexUnavailable(f"could not {action}: Vertex AI is unavailable"
                                     f"{' after retrying' if retried else ''} ({msg})", "retry in a few minutes")
        if isinstance(exc, gexc.BadRequest):
            return BackendError(f"Vertex AI refused to {action}: {msg}",
                                f"check the machine type, accelerator, scale tier and images for region {region}")
        if isinstance(exc, (requests.exceptions.RequestException, auth_exc.TransportError)):
            return VertexUnavailable(f"could not {action}: cannot reach Vertex AI at {self._endpoint(region)} "
                                     f"({type(exc).__name__})", "check the network or VERTEX_API_ENDPOINT")
        return BackendError(f"could not {action}: {msg}", "retry later; if it persists, check the Vertex AI console")

    def _idempotent(self, create: Callable[[], T], find: Callable[[], T | None]) -> T:
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

    # ---------------------------------------------------------------- training

    def stage_package(self, package: Package, train_path: str) -> str:
        uri = self.storage.join(train_path, "packages", package.path.name)
        self.storage.upload_file(package.path, uri)
        return uri

    def custom_job(self, spec: TrainingSpec) -> aip.CustomJob:
        """The CustomJob that runs a training spec (no call is made)."""
        pools = worker_pools(spec)
        gpu = any(p.accelerator and p.accelerator.startswith("NVIDIA") for p in pools)
        image = spec.executor_image or (self.gpu_executor_image if gpu else self.executor_image)
        package = aip.PythonPackageSpec(
            executor_image_uri=image, package_uris=[spec.package_uri], python_module=spec.module,
            args=list(spec.args), env=[aip.EnvVar(name="STARCHART_JOB_ID", value=spec.job_id)],
        )
        worker_specs = []
        for pool in pools:
            machine = aip.MachineSpec(machine_type=pool.machine_type)
            if pool.accelerator:
                machine.accelerator_type = aip.AcceleratorType[pool.accelerator]
                machine.accelerator_count = pool.accelerator_count
            worker_specs.append(aip.WorkerPoolSpec(machine_spec=machine, replica_count=pool.replicas,
                                                   python_package_spec=package))
        return aip.CustomJob(
            display_name=spec.job_id,
            labels=_labels({"model": spec.model, "ts": spec.ts, **spec.labels}),
            job_spec=aip.CustomJobSpec(
                worker_pool_specs=worker_specs,
                base_output_directory=aip.GcsDestination(output_uri_prefix=spec.train_path.rstrip("/")),
            ),
        )

    def submit(self, spec: TrainingSpec) -> str:
        region = spec.region or self.region
        if not REGION.match(region):
            raise InvalidInput(f"{region!r} is not a region", "use a Vertex AI region such as us-central1")
        job = self.custom_job(spec)
        client, parent = self._jobs(region), self._parent(region)

        def create() -> aip.CustomJob:
            return client.create_custom_job(parent=parent, custom_job=job, retry=None, timeout=self.rpc_timeout)

        with self._errors(f"start training job {spec.job_id}", f"project {self.project} in region {region}", region):
            return self._idempotent(create, lambda: self._find_job(spec.job_id, region)).name

    def _find_job(self, job_id: str, region: str | None = None) -> aip.CustomJob | None:
        """The CustomJob displayed as `job_id` (after a lost reply, or when no reference was kept)."""
        request = aip.ListCustomJobsRequest(parent=self._parent(region), filter=f'display_name="{job_id}"',
                                            page_size=10)
        for page in self._jobs(region).list_custom_jobs(request=request, retry=self.retry,
                                                        timeout=self.rpc_timeout).pages:
            for job in page.custom_jobs:
                if job.display_name == job_id:
                    return job
        return None

    def _job_name(self, job_id: str, ref: str | None) -> str | None:
        if ref:
            return ref
        with self._errors(f"look up job {job_id}", f"project {self.project} in region {self.region}"):
            found = self._find_job(job_id)
        return found.name if found else None

    def _get_job(self, job_id: str, name: str) -> aip.CustomJob:
        region = _region_of(name)
        with self._errors(f"get the state of {job_id}", f"job {name}", region):
            return self._jobs(region).get_custom_job(name=name, retry=self.retry, timeout=self.rpc_timeout)

    def wait_for_change(self, job_id: str, seconds: float) -> None:
        time.sleep(seconds)  # Vertex AI has no push for a job's end that reaches this process: poll

    def status(self, job_id: str, ref: str | None) -> JobStatus:
        name = self._job_name(job_id, ref)
        if name is None:
            return JobStatus(FAILED, error=f"Vertex AI has no job {job_id} in {self._parent()}")
        try:
            job = self._get_job(job_id, name)
        except VertexNotFound as exc:  # deleted in the console: it will never finish
            return JobStatus(FAILED, error=exc.message)
        state = _STATES.get(aip.JobState(job.state).name, QUEUED)
        error = None
        if state == FAILED:
            error = job.error.message or ("the job expired" if job.state == aip.JobState.JOB_STATE_EXPIRED
                                          else "the job failed")
        ended = _naive_utc(job.end_time) if state in (SUCCEEDED, FAILED, CANCELLED) else None
        return JobStatus(state, _naive_utc(job.start_time), ended, error)

    def cancel(self, job_id: str, ref: str | None) -> None:
        name = self._job_name(job_id, ref)
        if name is None:
            raise VertexNotFound(f"Vertex AI has no job {job_id} in {self._parent()}", "nothing to cancel")
        region = _region_of(name)
        try:
            with self._errors(f"cancel {job_id}", f"job {name}", region):
                self._jobs(region).cancel_custom_job(name=name, retry=self.retry, timeout=self.rpc_timeout)
        except BackendError as exc:
            if isinstance(exc.__cause__, gexc.BadRequest):  # FAILED_PRECONDITION: it ended meanwhile
                st = self.status(job_id, name)
                if st.state in (SUCCEEDED, FAILED, CANCELLED):
                    raise BackendError(f"{job_id} already ended on Vertex AI ({st.state})",
                                       "see its state with `state`") from exc
            raise

    def logs(self, job_id: str, ref: str | None, tail: int = 40) -> str:
        """Where the job's logs are (Cloud Logging has them; there is no log API here), its state and error."""
        name = self._job_name(job_id, ref)
        if name is None:
            return f"Vertex AI has no job {job_id} in {self._parent()}"
        numeric, region = name.rsplit("/", 1)[-1], _region_of(name) or self.region
        lines = [f"Vertex AI job {job_id} ({name})"]
        try:
            job = self._get_job(job_id, name)
            lines.append(f"state: {aip.JobState(job.state).name}")
            if job.error.message:
                lines.append(f"error: {job.error.message}")
        except StarchartError as exc:
            lines.append(f"state unavailable: {exc.message}")
        query = quote(f'resource.type="ml_job"\nresource.labels.job_id="{numeric}"', safe="")
        lines.append(f"logs: https://console.cloud.google.com/logs/query;query={query}?project={self.project}")
        lines.append(f"job: https://console.cloud.google.com/vertex-ai/locations/{region}/training/{numeric}/cpu"
                     f"?project={self.project}")
        return "\n".join(lines)

    def list_jobs(self, model: str, region: str | None = None) -> list[dict[str, Any]]:
        """A model's jobs, newest first, fetched page by page (one request per page, not per job)."""
        request = aip.ListCustomJobsRequest(parent=self._parent(region), filter=f'labels.model="{label_value(model)}"',
                                            page_size=self.page_size)
        out = []
        with self._errors(f"list the jobs of {model}", f"project {self.project} in region {region or self.region}",
                          region):
            for page in self._jobs(region).list_custom_jobs(request=request, retry=self.retry,
                                                            timeout=self.rpc_timeout).pages:
                for job in page.custom_jobs:
                    state = aip.JobState(job.state).name
                    out.append({"job_id": job.display_name, "ref": job.name, "state": _STATES.get(state, QUEUED),
                                "vertex_state": state, "created_at": _naive_utc(job.create_time),
                                "started_at": _naive_utc(job.start_time), "ended_at": _naive_utc(job.end_time),
                                "error": job.error.message or None})
        return out

    # ---------------------------------------------------------------- versions

    def _get_model(self, name: str) -> aip.Model | None:
        """The model version `name` (models/<model>@<alias or id>), None when there is none."""
        try:
            return self._models().get_model(name=name, retry=self.retry, timeout=self.rpc_timeout)
        except gexc.NotFound:
            return None

    def register_version(self, model: str, version: dict[str, Any], first: bool) -> str | None:
        """Upload the version (model_id for a new model, parent_model after) and await the operation."""
        name, model_path = version["name"], self._model_path(model)
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in sorted((version.get("metrics") or {}).items()))
        text = (f"{model} {name}: job {version.get('job_id')}, trained by {version.get('trained_by')}"
                + (f"; {metrics}" if metrics else "") + f"; digest {str(version.get('digest'))[:12]}")
        body = aip.Model(
            display_name=model, description=text, version_description=text,
            artifact_uri=version["deployment_uri"],
            container_spec=aip.ModelContainerSpec(image_uri=self.serving_image),
            labels=_labels({"model": model, "version": name, "job": str(version.get("job_id") or "")}),
            version_aliases=[name],
        )
        client = self._models()

        def upload(as_new_model: bool) -> Any:
            target = {"model_id": model} if as_new_model else {"parent_model": model_path}
            request = aip.UploadModelRequest(parent=self._parent(), model=body, **target)
            return client.upload_model(request=request, retry=None, timeout=self.rpc_timeout)

        def create() -> Any:
            try:
                return upload(first)
            except (gexc.Conflict, gexc.NotFound) as exc:
                # the model exists after all (409 on model_id), or not yet (404 on parent_model)
                if isinstance(exc, gexc.Conflict if first else gexc.NotFound):
                    return upload(not first)
                raise

        action = f"register {model} {name}"
        with self._errors(action, f"model {model_path} (or project {self.project} in region {self.region})"):
            existing = self._get_model(f"{model_path}@{name}")  # an earlier, interrupted expose registered it
            if existing is not None:
                return f"{existing.name}@{existing.version_id}"
            started = self._idempotent(create, lambda: self._get_model(f"{model_path}@{name}"))
            if isinstance(started, aip.Model):
                return f"{started.name}@{started.version_id}"
        try:
            result = started.result(timeout=self.operation_timeout, polling=self.polling, retry=self.retry)
        except concurrent.futures.TimeoutError as exc:
            raise BackendError(f"Vertex AI is still registering {model} {name} after {self.operation_timeout:.0f}s",
                               f"run `expose {model}` again later; it finds the version once it is ready") from exc
        except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
            op = started.operation
            if op.done and op.HasField("error"):  # the operation itself failed, not a call to follow it
                raise BackendError(
                    f"Vertex AI could not register {model} {name}: {op.error.message}",
                    f"check that {version['deployment_uri']} holds a SavedModel and that the Vertex AI service "
                    f"agent may read {self.bucket}") from exc
            with self._errors(f"follow the registration of {model} {name}", "operation"):
                raise
        return f"{result.model}@{result.model_version_id}"

    def set_default(self, model: str, version: str, ref: str | None) -> None:
        """Move the `default` alias to the version (Vertex AI takes it from the previous default); with an
        endpoint enabled for the model, serve the version from it first (see the module's docstring)."""
        settings = self.endpoint_settings(model)
        if settings is None:
            self._move_alias(model, version, ref)
            return
        self._serve_and_move_alias(model, version, ref, settings)

    def apply_timeout(self, model: str) -> float:
        """An upper bound, in seconds, on how long set_default(model, ...) runs: with an endpoint it awaits
        deployments (minutes each on Vertex AI), so an apply younger than this is not an interrupted one."""
        call = self.retry_deadline + self.rpc_timeout
        if self.endpoint_settings(model) is None:
            return 2 * call
        return 4 * self.operation_timeout + 12 * call  # create, deploy, undo or clean-up; lookups and traffic

    def _move_alias(self, model: str, version: str, ref: str | None) -> None:
        name = ref or f"{self._model_path(model)}@{version}"
        with self._errors(f"make {version} the default of {model}", f"version {name}"):
            updated = self._models().merge_version_aliases(name=name, version_aliases=[DEFAULT_ALIAS],
                                                           retry=self.retry, timeout=self.rpc_timeout)
        if DEFAULT_ALIAS not in updated.version_aliases:
            raise BackendError(f"Vertex AI did not move the default alias of {model} to {version}",
                               "check the model's versions in the Vertex AI console")

    # ---------------------------------------------------------------- endpoints

    def _serve_and_move_alias(self, model: str, version: str, ref: str | None, settings: EndpointSettings) -> None:
        version_name = self._version_name(model, version, ref)
        endpoint = self.find_endpoint(model) or self._create_endpoint(model)
        before = _split(endpoint)
        deployed = self._deploy(model, version, version_name, endpoint, settings)
        try:
            with self._errors(f"read endpoint {endpoint.name}", f"endpoint {endpoint.name}"):
                current = self._endpoints().get_endpoint(name=endpoint.name, retry=self.retry,
                                                         timeout=self.rpc_timeout)
            if _split(current) != {deployed: 100}:
                self._set_traffic(endpoint.name, {deployed: 100}, f"move the traffic of endpoint {endpoint.name} "
                                                                  f"to {model} {version}")
            self._move_alias(model, version, ref)
        except StarchartError as exc:
            undo = self._undo_deploy(endpoint.name, deployed, before)
            if undo:
                raise type(exc)(f"{exc.message}; {undo}", exc.hint) from exc
            raise
        for other in current.deployed_models:  # after the commit: clean-up, not part of the promotion
            if other.id != deployed:
                try:
                    self._undeploy(endpoint.name, other.id, f"undeploy {other.display_name or other.id} from "
                                                            f"endpoint {endpoint.name}")
                except StarchartError as exc:
                    log.warning("%s is the default of %s, served by endpoint %s, but %s; that deployment has no "
                                "traffic and is billed until the next promotion of %s removes it",
                                version, model, endpoint.name, exc.message, model)

    def _version_name(self, model: str, version: str, ref: str | None) -> str:
        """models/<model>@<version id>: a deployment names a version by its id."""
        if ref and VERSION_REF.match(ref):
            return ref
        with self._errors(f"look up {model} {version}", f"model {self._model_path(model)}"):
            found = self._get_model(f"{self._model_path(model)}@{version}")
        if found is None:
            raise VertexNotFound(f"Vertex AI has no version {version} of {model}",
                                 f"expose it first: `expose {model}`")
        return f"{found.name}@{found.version_id}"

    def predict(self, model: str, version: str | None, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Predictions from the endpoint that serves `model`'s default (see `endpoint` in the module's docstring).

        Vertex AI answers with the deployment its traffic split picks; a named version is accepted when it is
        the one the endpoint serves (any other version: pull it and load it locally)."""
        if "instances" not in body:
            raise InvalidInput("Vertex AI endpoints take a list of instances, not TF Serving's columnar inputs",
                               'send {"instances": [{INPUT: VALUE, ...}, ...]}')
        if self.endpoint_settings(model) is None:
            raise Refused(f"{model} is not served from a Vertex AI endpoint",
                          f"enable one in starchart.yaml (models.{model}.{ENDPOINT_EXAMPLE}) and apply a version; "
                          f"or `pull {model}` and load the SavedModel locally")
        endpoint = self.find_endpoint(model)
        serving = {d.id: d.display_name for d in endpoint.deployed_models} if endpoint else {}
        live = [serving.get(i, i) for i in _split(endpoint)] if endpoint else []
        if not live:
            raise NotFound(f"no endpoint serves {model} yet", f"apply a version of {model}: it deploys the default")
        if version is not None and version not in live:
            raise Refused(f"the endpoint of {model} serves {', '.join(live)}, not {version}",
                          f"`pull {model} {version}` and load it locally, or promote it")
        instances = [json_format.ParseDict(i, struct_pb2.Value()) for i in body["instances"]]
        with self._errors(f"predict with {model}", f"endpoint {endpoint.name}"):
            try:
                answer = self._predictions().predict(endpoint=endpoint.name, instances=instances, retry=self.retry,
                                                     timeout=self.rpc_timeout)
            except gexc.BadRequest as exc:
                raise InvalidInput(f"the endpoint of {model} refused the instances: {_server_message(exc)}",
                                   f"`diff {model}` shows the signature's inputs") from exc
        response = json_format.MessageToDict(type(answer).pb(answer))
        return (serving.get(answer.deployed_model_id) or version or live[0],
                {"predictions": response.get("predictions", [])})

    def find_endpoint(self, model: str) -> aip.Endpoint | None:
        """The endpoint that serves `model` (labelled model=<model>, displayed as the model), oldest first."""
        request = aip.ListEndpointsRequest(parent=self._parent(), filter=f'labels.model="{label_value(model)}"',
                                           order_by="create_time", page_size=self.page_size)
        with self._errors(f"look up the endpoint of {model}", f"project {self.project} in region {self.region}"):
            for page in self._endpoints().list_endpoints(request=request, retry=self.retry,
                                                         timeout=self.rpc_timeout).pages:
                for endpoint in page.endpoints:
                    if endpoint.display_name == model:
                        return endpoint
        return None

    def _create_endpoint(self, model: str) -> aip.Endpoint:
        body = aip.Endpoint(display_name=model, labels=_labels({"model": model}),
                            description=f"StarChart: serves the default version of {model}")
        client = self._endpoints()

        def create() -> Any:
            return client.create_endpoint(parent=self._parent(), endpoint=body, retry=None, timeout=self.rpc_timeout)

        action = f"create the endpoint of {model}"
        with self._errors(action, f"project {self.project} in region {self.region}"):
            started = self._idempotent(create, lambda: self.find_endpoint(model))
        if isinstance(started, aip.Endpoint):
            return started
        return self._await(started, action, "retry the request; the default did not move")

    def _deploy(self, model: str, version: str, version_name: str, endpoint: aip.Endpoint,
                settings: EndpointSettings) -> str:
        """Deploy the version to the endpoint without taking traffic from what it serves; its deployed id."""
        version_id = version_name.rsplit("@", 1)[1]
        existing = _deployment_of(endpoint, model, version_id)
        if existing is not None:  # an earlier attempt deployed it (and timed out, or failed later)
            return existing.id
        machine = aip.MachineSpec(machine_type=settings.machine_type)
        if settings.accelerator:
            kind, count = parse_accelerator(settings.accelerator)
            machine.accelerator_type, machine.accelerator_count = aip.AcceleratorType[kind], count
        before = _split(endpoint)
        request = aip.DeployModelRequest(
            endpoint=endpoint.name,
            deployed_model=aip.DeployedModel(
                model=version_name, display_name=version,
                dedicated_resources=aip.DedicatedResources(machine_spec=machine,
                                                           min_replica_count=settings.min_replicas,
                                                           max_replica_count=settings.max_replicas)),
            # "0" is the new deployment: no traffic while the endpoint serves something, else all of it
            traffic_split={**before, "0": 0} if before else {"0": 100},
        )
        client = self._endpoints()

        def create() -> Any:
            return client.deploy_model(request=request, retry=None, timeout=self.rpc_timeout)

        def find() -> aip.DeployedModel | None:
            current = client.get_endpoint(name=endpoint.name, retry=None, timeout=self.rpc_timeout)
            return _deployment_of(current, model, version_id)

        action = f"deploy {model} {version} to endpoint {endpoint.name}"
        with self._errors(action, f"endpoint {endpoint.name} or version {version_name}"):
            started = self._idempotent(create, find)
        if isinstance(started, aip.DeployedModel):
            return started.id
        result = self._await(started, action,
                             f"check {settings.machine_type} and the serving image in region {self.region}, and the "
                             f"serving quota; the default did not move, retry the request")
        return result.deployed_model.id

    def _set_traffic(self, endpoint_name: str, split: dict[str, int], action: str) -> None:
        with self._errors(action, f"endpoint {endpoint_name}"):
            self._endpoints().update_endpoint(endpoint=aip.Endpoint(name=endpoint_name, traffic_split=split),
                                              update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
                                              retry=self.retry, timeout=self.rpc_timeout)

    def _undeploy(self, endpoint_name: str, deployed_id: str, action: str) -> None:
        request = aip.UndeployModelRequest(endpoint=endpoint_name, deployed_model_id=deployed_id)
        client = self._endpoints()
        with self._errors(action, f"endpoint {endpoint_name}"):
            try:
                started = client.undeploy_model(request=request, retry=self.retry, timeout=self.rpc_timeout)
            except gexc.NotFound:  # already gone (an earlier attempt's reply was lost)
                return
        self._await(started, action, f"undeploy it in the Vertex AI console (endpoint {endpoint_name})")

    def _undo_deploy(self, endpoint_name: str, deployed: str, before: dict[str, int]) -> str:
        """Put the endpoint back as it was before `_deploy`; '' when done, else what is left (best effort)."""
        try:
            with self._errors(f"read endpoint {endpoint_name}", f"endpoint {endpoint_name}"):
                current = self._endpoints().get_endpoint(name=endpoint_name, retry=self.retry,
                                                         timeout=self.rpc_timeout)
            last = [d.id for d in current.deployed_models] == [deployed]
            if _split(current) != before and not (last and not before):  # undeploying the last one empties it
                self._set_traffic(endpoint_name, before, f"put back the traffic split of endpoint {endpoint_name}")
            if before.get(deployed, 0) == 0 and any(d.id == deployed for d in current.deployed_models):
                self._undeploy(endpoint_name, deployed, f"undeploy the new deployment {deployed} from "
                                                        f"endpoint {endpoint_name}")
        except StarchartError as exc:
            return (f"and putting endpoint {endpoint_name} back failed too ({exc.message}): check its traffic "
                    f"split in the Vertex AI console (it was {before or 'empty'}) before you retry")
        return ""

    def _await(self, started: Any, action: str, hint: str) -> Any:
        """The result of a long-running operation; a BackendError that says what failed if it did not end well."""
        try:
            return started.result(timeout=self.operation_timeout, polling=self.polling, retry=self.retry)
        except concurrent.futures.TimeoutError as exc:
            raise BackendError(f"Vertex AI took longer than {self.operation_timeout:.0f}s to {action} (it may still "
                               "be at it)", f"retry later; {hint}") from exc
        except (gexc.GoogleAPICallError, gexc.RetryError) as exc:
            op = started.operation
            if op.done and op.HasField("error"):  # the operation itself failed, not a call to follow it
                raise BackendError(f"Vertex AI could not {action}: {op.error.message}", hint) from exc
            with self._errors(f"follow the operation to {action}", "operation"):
                raise

    def current_default(self, model: str) -> str | None:
        with self._errors(f"read the default of {model}", f"model {model}"):
            found = self._get_model(f"{self._model_path(model)}@{DEFAULT_ALIAS}")
        if found is None:
            return None
        return next((a for a in found.version_aliases if VERSION_ALIAS.match(a)), None)

    def list_versions(self, model: str) -> list[dict[str, Any]]:
        """The model's versions on Vertex AI (page by page): id, aliases, artifact URI, creation time."""
        out = []
        request = aip.ListModelVersionsRequest(name=self._model_path(model), page_size=self.page_size)
        with self._errors(f"list the versions of {model}", f"model {model}"):
            try:
                pages = self._models().list_model_versions(request=request, retry=self.retry,
                                                           timeout=self.rpc_timeout).pages
                for page in pages:
                    for m in page.models:
                        out.append({"version_id": m.version_id, "aliases": list(m.version_aliases),
                                    "name": next((a for a in m.version_aliases if VERSION_ALIAS.match(a)), None),
                                    "artifact_uri": m.artifact_uri,
                                    "created_at": _naive_utc(m.version_create_time)})
            except gexc.NotFound:
                return []
        return out

    def preflight(self) -> None:
        """Check credentials, the bucket and Vertex AI access once (a live deployment's smoke check)."""
        if not self.storage.bucket_exists(self.bucket):
            raise BackendError(f"bucket {self.bucket} does not exist",
                               f"create it: gcloud storage buckets create {self.bucket} --location={self.region} "
                               f"--project={self.project}")
        request = aip.ListCustomJobsRequest(parent=self._parent(), page_size=1)
        with self._errors("list training jobs", f"project {self.project} in region {self.region}"):
            next(iter(self._jobs().list_custom_jobs(request=request, retry=self.retry,
                                                    timeout=self.rpc_timeout).pages), None)
