"""The Vertex AI backend: the Backend protocol over training, versions and endpoints, files on GCS."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any, Mapping

from google.auth.credentials import Credentials
from google.cloud import aiplatform_v1 as aip

from model_registry.adapters.backends.base import JobStatus, TrainingSpec
from model_registry.adapters.backends.vertex.clients import PROJECT_ID, REGION, VertexApi
from model_registry.adapters.backends.vertex.endpoints import EndpointPolicy, Endpoints
from model_registry.adapters.backends.vertex.monitoring import Monitoring
from model_registry.adapters.backends.vertex.training import (
    DEFAULT_EXECUTOR_IMAGE,
    DEFAULT_GPU_EXECUTOR_IMAGE,
    Training,
)
from model_registry.adapters.backends.vertex.versions import DEFAULT_SERVING_IMAGE, Versions
from model_registry.adapters.gcs import GcsStorage
from model_registry.adapters.packaging import Package
from model_registry.config import Settings
from model_registry.domain.errors import BackendError, InvalidInput, Refused


class VertexBackend:
    """Jobs as CustomJobs, versions in the Model Registry, the default as the `default` alias (and, per model,
    served from an endpoint); the train path on Cloud Storage. Nothing is contacted until a call needs it."""

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
        endpoints: EndpointPolicy = None,
        monitoring_endpoint: str | None = None,
    ) -> None:
        self.project, self.region, self.bucket = project, region, bucket.rstrip("/")
        self.storage = storage or GcsStorage(project=project)
        self.poll_interval = poll_interval
        self.api = VertexApi(project, region, self.bucket, api_endpoint=api_endpoint, credentials=credentials,
                             retry_delays=retry_delays, retry_deadline=retry_deadline, rpc_timeout=rpc_timeout,
                             operation_poll=operation_poll, operation_timeout=operation_timeout, page_size=page_size)
        self.training = Training(self.api, executor_image, gpu_executor_image)
        self.versions = Versions(self.api, serving_image)
        self.endpoints = Endpoints(self.api, self.versions, endpoints)
        self.monitoring = Monitoring(self.api, monitoring_endpoint)

    @classmethod
    def from_settings(cls, settings: Settings, **kwargs: Any) -> "VertexBackend":
        """Validate GCP_PROJECT_ID, GCP_REGION and STARCHART_BUCKET; nothing is contacted yet.

        The API endpoint, images and Cloud Storage emulator come from `settings` too; `endpoints=` (model -> the
        `endpoint` policy, or a callable that gives it) and other keyword arguments are passed on."""
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
        for key, value in (("serving_image", settings.serving_image), ("executor_image", settings.executor_image)):
            if value:
                kwargs.setdefault(key, value)
        kwargs.setdefault("storage", GcsStorage(project=project, emulator_host=settings.storage_emulator_host))
        return cls(project, region, bucket, api_endpoint=settings.vertex_api_endpoint, **kwargs)

    # ---------------------------------------------------------------- training

    def stage_package(self, package: Package, train_path: str) -> str:
        uri = self.storage.join(train_path, "packages", package.path.name)
        self.storage.upload_file(package.path, uri)
        return uri

    def submit(self, spec: TrainingSpec) -> str:
        return self.training.submit(spec)

    def status(self, job_id: str, ref: str | None) -> JobStatus:
        return self.training.status(job_id, ref)

    def wait_for_change(self, job_id: str, seconds: float) -> None:
        time.sleep(seconds)  # Vertex AI has no push for a job's end that reaches this process: poll

    def cancel(self, job_id: str, ref: str | None) -> None:
        self.training.cancel(job_id, ref)

    def logs(self, job_id: str, ref: str | None, tail: int = 40) -> str:
        return self.training.logs(job_id, ref, tail)

    # ---------------------------------------------------------------- versions and the default

    def register_version(self, model: str, version: Mapping[str, Any], first: bool) -> str | None:
        return self.versions.register_version(model, version, first)

    def current_default(self, model: str) -> str | None:
        return self.versions.current_default(model)

    def set_default(self, model: str, version: str, ref: str | None) -> None:
        """Move the `default` alias to the version (Vertex AI takes it from the previous default); with an
        endpoint enabled for the model, serve the version from it first (see endpoints.py)."""
        settings = self.endpoints.settings(model)
        if settings is None:
            self.versions.move_alias(model, version, ref)
            return
        self.endpoints.serve_and_move_alias(model, version, ref, settings)

    # ---------------------------------------------------------------- canaries

    def _endpoint_for_canary(self, model: str) -> Any:
        settings = self.endpoints.settings(model)
        if settings is None:
            raise Refused(f"a canary on Vertex AI splits an endpoint's traffic_split, and {model} is not served "
                          "from an endpoint", f"enable one in starchart.yaml (models.{model}.endpoint: "
                          "{enabled: true, ...}) and apply a version, or promote without --canary")
        return settings

    def start_canary(self, model: str, version: str, ref: str | None, percent: int, mirror: float) -> None:
        """The candidate deployed beside the default with `percent` of the endpoint's traffic (nothing is
        mirrored: Vertex AI answers each request from one deployment, and its Predict cannot be sent to a chosen
        one; only Explain can, for models deployed with an explanation spec)."""
        self.endpoints.start_canary(model, version, ref, percent, self._endpoint_for_canary(model))

    def end_canary(self, model: str) -> None:
        if self.endpoints.settings(model) is None:
            return
        self.endpoints.end_canary(model, self.versions.current_default(model))

    def canary_split(self, model: str) -> dict[str, int]:
        if self.endpoints.settings(model) is None:
            default = self.versions.current_default(model)
            return {default: 100} if default else {}
        return self.endpoints.split(model)

    def canary_figures(self, model: str) -> dict[str, Any] | None:
        """Both deployments' requests, errors and latency since the candidate was deployed, from Cloud Monitoring
        (see monitoring.py; they lag the traffic by Monitoring's sampling delay); no agreement: Vertex AI answers
        each request from one deployment and mirrors none. None when no canary splits the endpoint; a
        StarchartError when Monitoring cannot be read (the canary is then left as it is)."""
        if self.endpoints.settings(model) is None:
            return None
        sides = self.endpoints.canary_sides(model, self.versions.current_default(model))
        if sides is None:
            return None
        return self.monitoring.figures(sides, datetime.now(timezone.utc))

    def apply_timeout(self, model: str) -> float:
        """An upper bound, in seconds, on how long set_default(model, ...) runs: with an endpoint it awaits
        deployments (minutes each on Vertex AI); the apply's lease is renewed that long at most."""
        call = self.api.retry_deadline + self.api.rpc_timeout
        if self.endpoints.settings(model) is None:
            return 2 * call
        return 4 * self.api.operation_timeout + 12 * call  # create, deploy, undo or clean-up; lookups and traffic

    def predict(self, model: str, version: str | None, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return self.endpoints.predict(model, version, body)

    def relay(self, model: str, version: str | None, body: dict[str, Any]) -> None:
        return None  # predictions go through the endpoint's client, which blocks: `predict`

    # ---------------------------------------------------------------- checks

    def preflight(self) -> None:
        """Check credentials, the bucket and Vertex AI access once (a live deployment's smoke check)."""
        api = self.api
        if not self.storage.bucket_exists(self.bucket):
            raise BackendError(f"bucket {self.bucket} does not exist",
                               f"create it: gcloud storage buckets create {self.bucket} --location={self.region} "
                               f"--project={self.project}")
        request = aip.ListCustomJobsRequest(parent=api.parent(), page_size=1)
        with api.errors("list training jobs", f"project {self.project} in region {self.region}"):
            next(iter(api.jobs().list_custom_jobs(request=request, retry=api.retry,
                                                  timeout=api.rpc_timeout).pages), None)
