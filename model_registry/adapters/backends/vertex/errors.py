"""What the Vertex AI client libraries raise, as StarchartErrors that say what is missing and what to do."""

from __future__ import annotations

import re

import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc

from model_registry.adapters.gcs import CREDENTIALS_HINT, NoCredentials
from model_registry.domain.errors import BackendError, StarchartError


class VertexNotFound(BackendError):
    """Vertex AI has no such project, region, job or model."""


class VertexPermissionDenied(BackendError):
    """The credentials lack a role, or the Vertex AI API is not enabled."""


class QuotaExhausted(BackendError):
    """A Vertex AI quota is used up (CPUs, GPUs, or requests)."""


class VertexUnavailable(BackendError):
    """Vertex AI could not be reached, or stayed unavailable through the retries."""


# what the libraries raise for a failed call (anything else is a bug, not Vertex AI's answer)
CALL_ERRORS = (gexc.GoogleAPICallError, auth_exc.GoogleAuthError, requests.exceptions.RequestException)


def server_message(exc: BaseException) -> str:
    """The server's words, without the 'POST http://host/path:' prefix the REST transport adds."""
    text = str(getattr(exc, "message", "") or exc)
    if re.match(r"^(GET|POST|PUT|PATCH|DELETE) \S+: ", text):
        text = text.split(": ", 1)[1]
    return text


def _is_resource_quota(exc: BaseException) -> bool:
    """A used-up resource quota (CPUs, GPUs) does not come back in seconds; request rate limits do."""
    if getattr(exc, "reason", None) == "RESOURCE_QUOTA_EXCEEDED":
        return True
    text = server_message(exc).lower()
    return "quota" in text and "per minute" not in text and "rate" not in text


def retryable(exc: BaseException) -> bool:
    """429 rate limits and 503: retried with backoff."""
    if isinstance(exc, gexc.ServiceUnavailable):
        return True
    return isinstance(exc, gexc.TooManyRequests) and not _is_resource_quota(exc)


def translate(exc: BaseException, action: str, missing: str, *, project: str, region: str, bucket: str,
              api_endpoint: str, retried: bool = False) -> StarchartError:
    """The StarchartError for `exc`, raised while trying to `action`; `missing` names what a 404 lacks."""
    p, msg = project, server_message(exc)
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
            f"on {bucket} to it and to the Vertex AI service agent")
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
        return VertexUnavailable(f"could not {action}: cannot reach Vertex AI at {api_endpoint} "
                                 f"({type(exc).__name__})", "check the network or VERTEX_API_ENDPOINT")
    return BackendError(f"could not {action}: {msg}", "retry later; if it persists, check the Vertex AI console")
