"""The Vertex AI backend: CustomJobs through JobService, model versions through ModelService, files on GCS.

    pools.py      scale tiers -> worker pools
    errors.py     what the client libraries raise -> StarchartErrors; which failures are retried
    clients.py    regional clients, credentials, REST transport; retries, idempotent creates, operation waits
    training.py   CustomJobs: build, submit, state, cancel, logs
    versions.py   the Model Registry: register a version, the `default` alias
    endpoints.py  optional per model: deploy, traffic split, the switch (commit point: the alias), predict
    monitoring.py a canary's figures per deployed model, from Cloud Monitoring's time series
    backend.py    VertexBackend: the Backend protocol over the parts above

and, beside the package, ../vertex_settings.py: the `endpoint:` policy and accelerator names, without any
Google import, so the configuration checks them when it loads.

Failures. 429 (rate limits) and 503 are retried with exponential backoff; creating a job, a model
version, an endpoint or a deployment is made idempotent across those retries by looking for what the
previous attempt made. Everything else becomes a BackendError that says what is missing.
"""

from model_registry.adapters.backends.vertex.backend import VertexBackend
from model_registry.adapters.backends.vertex.errors import (
    QuotaExhausted,
    VertexNotFound,
    VertexPermissionDenied,
    VertexUnavailable,
)
from model_registry.adapters.backends.vertex.pools import worker_pools
from model_registry.adapters.backends.vertex_settings import EndpointSettings, endpoint_settings
from model_registry.adapters.gcs import NoCredentials

__all__ = [
    "EndpointSettings", "NoCredentials", "QuotaExhausted", "VertexBackend", "VertexNotFound", "VertexPermissionDenied",
    "VertexUnavailable", "endpoint_settings", "worker_pools",
]
