"""Training on Vertex AI: a job is a CustomJob named (display name) after the job id, labelled with the model
and the timestamp, running the staged sdist with `python_package_spec`. `base_output_directory` is the train
path, so Vertex AI sets AIP_MODEL_DIR=<train path>/model/ (and AIP_CHECKPOINT_DIR, AIP_TENSORBOARD_LOG_DIR).

Creating a job is idempotent across retries: before a retry, the job the lost attempt made is looked up by
its display name.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from urllib.parse import quote

from google.api_core import exceptions as gexc
from google.cloud import aiplatform_v1 as aip

from model_registry.adapters.backends.base import JobStatus, TrainingSpec
from model_registry.adapters.backends.vertex.clients import REGION, VertexApi, labels
from model_registry.adapters.backends.vertex.errors import VertexNotFound
from model_registry.adapters.backends.vertex.pools import worker_pools
from model_registry.adapters.records import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from model_registry.domain.errors import BackendError, InvalidInput, StarchartError

DEFAULT_EXECUTOR_IMAGE = "us-docker.pkg.dev/vertex-ai/training/tf-cpu.2-17.py310:latest"
DEFAULT_GPU_EXECUTOR_IMAGE = "us-docker.pkg.dev/vertex-ai/training/tf-gpu.2-17.py310:latest"

STATES = {
    "JOB_STATE_UNSPECIFIED": QUEUED, "JOB_STATE_QUEUED": QUEUED, "JOB_STATE_PENDING": QUEUED,
    "JOB_STATE_RUNNING": RUNNING, "JOB_STATE_UPDATING": RUNNING, "JOB_STATE_PAUSED": RUNNING,
    "JOB_STATE_SUCCEEDED": SUCCEEDED, "JOB_STATE_PARTIALLY_SUCCEEDED": SUCCEEDED,
    "JOB_STATE_FAILED": FAILED, "JOB_STATE_EXPIRED": FAILED,
    "JOB_STATE_CANCELLING": CANCELLED, "JOB_STATE_CANCELLED": CANCELLED,
}


def naive_utc(value: datetime | None) -> datetime | None:
    """A time as the records keep it: naive UTC, a plain datetime rather than proto's subclass."""
    if value is None:
        return None
    v = value.astimezone(timezone.utc) if value.tzinfo else value
    return datetime(v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond)


def region_of(name: str) -> str | None:
    """The region of a resource name (projects/P/locations/REGION/...)."""
    m = re.match(r"^projects/[^/]+/locations/([^/]+)/", name)
    return m.group(1) if m else None


class Training:
    """CustomJobs: build, submit, state, cancel, and where the logs are."""

    def __init__(self, api: VertexApi, executor_image: str = DEFAULT_EXECUTOR_IMAGE,
                 gpu_executor_image: str = DEFAULT_GPU_EXECUTOR_IMAGE) -> None:
        self.api = api
        self.executor_image, self.gpu_executor_image = executor_image, gpu_executor_image

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
                # proto-plus enums are looked up by name; their stubs do not say so
                machine.accelerator_type = aip.AcceleratorType[pool.accelerator]  # type: ignore[misc]
                machine.accelerator_count = pool.accelerator_count
            worker_specs.append(aip.WorkerPoolSpec(machine_spec=machine, replica_count=pool.replicas,
                                                   python_package_spec=package))
        return aip.CustomJob(
            display_name=spec.job_id,
            labels=labels({"model": spec.model, "ts": spec.ts, **spec.labels}),
            job_spec=aip.CustomJobSpec(
                worker_pool_specs=worker_specs,
                base_output_directory=aip.GcsDestination(output_uri_prefix=spec.train_path.rstrip("/")),
            ),
        )

    def submit(self, spec: TrainingSpec) -> str:
        api = self.api
        region = spec.region or api.region
        if not REGION.match(region):
            raise InvalidInput(f"{region!r} is not a region", "use a Vertex AI region such as us-central1")
        job = self.custom_job(spec)
        client, parent = api.jobs(region), api.parent(region)

        def create() -> aip.CustomJob:
            return client.create_custom_job(parent=parent, custom_job=job, retry=None, timeout=api.rpc_timeout)

        with api.errors(f"start training job {spec.job_id}", f"project {api.project} in region {region}", region):
            return api.idempotent(create, lambda: self._find_job(spec.job_id, region)).name

    def _find_job(self, job_id: str, region: str | None = None) -> aip.CustomJob | None:
        """The CustomJob displayed as `job_id` (after a lost reply, or when no reference was kept)."""
        api = self.api
        request = aip.ListCustomJobsRequest(parent=api.parent(region), filter=f'display_name="{job_id}"',
                                            page_size=10)
        for page in api.jobs(region).list_custom_jobs(request=request, retry=api.retry,
                                                      timeout=api.rpc_timeout).pages:
            for job in page.custom_jobs:
                if job.display_name == job_id:
                    return job
        return None

    def _job_name(self, job_id: str, ref: str | None) -> str | None:
        if ref:
            return ref
        with self.api.errors(f"look up job {job_id}", f"project {self.api.project} in region {self.api.region}"):
            found = self._find_job(job_id)
        return found.name if found else None

    def _get_job(self, job_id: str, name: str) -> aip.CustomJob:
        region = region_of(name)
        with self.api.errors(f"get the state of {job_id}", f"job {name}", region):
            return self.api.jobs(region).get_custom_job(name=name, retry=self.api.retry, timeout=self.api.rpc_timeout)

    def status(self, job_id: str, ref: str | None) -> JobStatus:
        name = self._job_name(job_id, ref)
        if name is None:
            return JobStatus(FAILED, error=f"Vertex AI has no job {job_id} in {self.api.parent()}")
        try:
            job = self._get_job(job_id, name)
        except VertexNotFound as exc:  # deleted in the console: it will never finish
            return JobStatus(FAILED, error=exc.message)
        state = STATES.get(aip.JobState(job.state).name, QUEUED)
        error = None
        if state == FAILED:
            error = job.error.message or ("the job expired" if job.state == aip.JobState.JOB_STATE_EXPIRED
                                          else "the job failed")
        ended = naive_utc(job.end_time) if state in (SUCCEEDED, FAILED, CANCELLED) else None
        return JobStatus(state, naive_utc(job.start_time), ended, error)

    def _log_tail(self, numeric: str, tail: int) -> list[str]:
        """The newest `tail` entries of the job's log, oldest first; a failure to read them is said, not raised."""
        from google.cloud.logging import DESCENDING

        query = f'resource.type="ml_job" AND resource.labels.job_id="{numeric}"'
        try:
            with self.api.errors("read the job's logs from Cloud Logging", f"logs of job {numeric}"):
                entries = list(self.api.logging().list_entries(
                    resource_names=[f"projects/{self.api.project}"], filter_=query, order_by=DESCENDING,
                    max_results=tail, page_size=min(tail, 1000)))
        except StarchartError as exc:
            return [f"log tail unavailable: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""),
                    "reading it needs roles/logging.viewer on the project"]
        if not entries:
            return ["log tail: Cloud Logging has no entries for this job yet"]
        out = [f"--- last {len(entries)} log lines (Cloud Logging) ---"]
        for entry in reversed(entries):
            payload = entry.payload
            if isinstance(payload, dict):
                payload = payload.get("message") or json.dumps(payload, sort_keys=True)
            stamp = entry.timestamp.strftime("%H:%M:%S") if entry.timestamp else "--:--:--"
            out.append(f"{stamp} {entry.severity or 'DEFAULT'} {str(payload).rstrip()}")
        return out

    def cancel(self, job_id: str, ref: str | None) -> None:
        name = self._job_name(job_id, ref)
        if name is None:
            raise VertexNotFound(f"Vertex AI has no job {job_id} in {self.api.parent()}", "nothing to cancel")
        region = region_of(name)
        try:
            with self.api.errors(f"cancel {job_id}", f"job {name}", region):
                self.api.jobs(region).cancel_custom_job(name=name, retry=self.api.retry, timeout=self.api.rpc_timeout)
        except BackendError as exc:
            if isinstance(exc.__cause__, gexc.BadRequest):  # FAILED_PRECONDITION: it ended meanwhile
                st = self.status(job_id, name)
                if st.state in (SUCCEEDED, FAILED, CANCELLED):
                    raise BackendError(f"{job_id} already ended on Vertex AI ({st.state})",
                                       "see its state with `state`") from exc
            raise

    def logs(self, job_id: str, ref: str | None, tail: int = 40) -> str:
        """The job's state and error, the last `tail` lines Cloud Logging holds of it, and where to see more."""
        name = self._job_name(job_id, ref)
        if name is None:
            return f"Vertex AI has no job {job_id} in {self.api.parent()}"
        project = self.api.project
        numeric, region = name.rsplit("/", 1)[-1], region_of(name) or self.api.region
        lines = [f"Vertex AI job {job_id} ({name})"]
        try:
            job = self._get_job(job_id, name)
            lines.append(f"state: {aip.JobState(job.state).name}")
            if job.error.message:
                lines.append(f"error: {job.error.message}")
        except StarchartError as exc:
            lines.append(f"state unavailable: {exc.message}")
        if tail:
            lines += self._log_tail(numeric, tail)
        query = quote(f'resource.type="ml_job"\nresource.labels.job_id="{numeric}"', safe="")
        lines.append(f"logs: https://console.cloud.google.com/logs/query;query={query}?project={project}")
        lines.append(f"job: https://console.cloud.google.com/vertex-ai/locations/{region}/training/{numeric}/cpu"
                     f"?project={project}")
        return "\n".join(lines)
