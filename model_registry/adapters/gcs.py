"""Google Cloud Storage behind the Storage protocol: gs://bucket/path URIs through google-cloud-storage.

Credentials are Application Default Credentials, except with an emulator (STORAGE_EMULATOR_HOST, passed in
as `emulator_host`): then the client talks to it anonymously, as google-cloud-storage itself does.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import google.cloud.storage as storage
import requests
from google.api_core import exceptions as gexc
from google.auth import exceptions as auth_exc
from google.auth.credentials import AnonymousCredentials, Signing

from model_registry.domain.errors import ArtifactError, BackendError

CREDENTIALS_HINT = (
    "run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service "
    "account key file (STORAGE_EMULATOR_HOST selects a local emulator instead)"
)


class BucketNotFound(BackendError):
    """The bucket of a gs:// URI does not exist."""


class ObjectNotFound(ArtifactError):
    """An object that should be in the bucket is not."""


class StoragePermissionDenied(BackendError):
    """The credentials in use may not read or write the bucket."""


class PreconditionFailed(ArtifactError):
    """A conditional write found the object already there (or changed)."""


class NoCredentials(BackendError):
    """No usable Google Cloud credentials were found, or they were rejected."""


class StorageUnavailable(BackendError):
    """Cloud Storage (or its emulator) could not be reached."""


class CannotSign(NoCredentials):
    """The credentials in use cannot sign a URL (no private key, and no IAM signing)."""


SIGNING_HINT = (
    "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or grant your account "
    "roles/iam.serviceAccountTokenCreator on a service account and sign as it "
    "(`gcloud auth application-default login --impersonate-service-account SA_EMAIL`)"
)


def split_uri(uri: str) -> tuple[str, str]:
    """'gs://bucket/a/b' -> ('bucket', 'a/b')."""
    if not uri.startswith("gs://"):
        raise ArtifactError(f"{uri!r} is not a gs:// URI", "the vertex backend keeps its files in gs://BUCKET/...")
    bucket, _, name = uri[len("gs://"):].partition("/")
    if not bucket:
        raise ArtifactError(f"{uri!r} names no bucket", "use gs://BUCKET/PATH")
    return bucket, name


def _content_type(uri: str) -> str:
    if uri.endswith(".json"):
        return "application/json"
    if uri.endswith((".tar.gz", ".tgz")):
        return "application/gzip"
    return "application/octet-stream"


class GcsStorage:
    """Storage over Cloud Storage; the client is created on first use (and its credentials looked up then)."""

    def __init__(self, project: str | None = None, client: storage.Client | None = None, timeout: float = 60.0,
                 emulator_host: str | None = None, signing_credentials: Signing | None = None) -> None:
        self.project = project or None
        self.signing_credentials = signing_credentials  # signs URLs; None: the client's own credentials
        self.timeout = timeout
        self.emulator_host = emulator_host or None
        self._client = client
        self._lock = threading.Lock()

    @property
    def client(self) -> storage.Client:
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> storage.Client:
        try:
            if self.emulator_host:
                return storage.Client(project=self.project or "starchart-emulator", credentials=AnonymousCredentials(),
                                      client_options={"api_endpoint": self.emulator_host})
            return storage.Client(project=self.project)
        except auth_exc.DefaultCredentialsError as exc:
            raise NoCredentials("no Google Cloud credentials found for Cloud Storage", CREDENTIALS_HINT) from exc

    # ---------------------------------------------------------------- Storage protocol

    def read_bytes(self, uri: str) -> bytes:
        bucket, name = split_uri(uri)
        try:
            return self.client.bucket(bucket).blob(name).download_as_bytes(timeout=self.timeout)
        except Exception as exc:  # translated into a StarchartError
            self._fail(exc, uri, "read")

    def write_bytes(self, uri: str, data: bytes, if_generation_match: int | None = None) -> None:
        bucket, name = split_uri(uri)
        blob = self.client.bucket(bucket).blob(name)
        try:
            blob.upload_from_string(data, content_type=_content_type(uri), if_generation_match=if_generation_match,
                                    timeout=self.timeout)
        except Exception as exc:
            self._fail(exc, uri, "write", if_generation_match)

    def exists(self, uri: str) -> bool:
        bucket, name = split_uri(uri)
        try:
            return self.client.bucket(bucket).blob(name).exists(timeout=self.timeout)
        except Exception as exc:
            self._fail(exc, uri, "look up")

    def upload_file(self, local_path: Path, uri: str) -> None:
        bucket, name = split_uri(uri)
        blob = self.client.bucket(bucket).blob(name)
        try:
            blob.upload_from_filename(str(local_path), content_type=_content_type(uri), timeout=self.timeout)
        except Exception as exc:
            self._fail(exc, uri, "upload")

    def join(self, base: str, *parts: str) -> str:
        out = base.rstrip("/")
        for part in parts:
            part = part.strip("/")
            if part:
                out = f"{out}/{part}"
        return out

    def list_files(self, prefix: str) -> list[str]:
        bucket, name = split_uri(prefix)
        folder = name.rstrip("/") + "/" if name.strip("/") else ""
        try:
            blobs = self.client.list_blobs(bucket, prefix=folder, timeout=self.timeout)
            return sorted(b.name[len(folder):] for b in blobs if not b.name.endswith("/"))
        except Exception as exc:
            self._fail(exc, prefix, "list")

    def download_file(self, uri: str, local_path: Path) -> None:
        bucket, name = split_uri(uri)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.client.bucket(bucket).blob(name).download_to_filename(str(local_path), timeout=self.timeout)
        except Exception as exc:
            self._fail(exc, uri, "download")

    # ---------------------------------------------------------------- extras

    def bucket_exists(self, bucket: str) -> bool:
        """Whether gs://<bucket> exists (a bucket-level read; False when it does not)."""
        try:
            return self.client.lookup_bucket(bucket.removeprefix("gs://").strip("/"), timeout=self.timeout) is not None
        except Exception as exc:
            self._fail(exc, bucket if bucket.startswith("gs://") else f"gs://{bucket}", "look up")

    def signed_url(self, uri: str, expiration: timedelta, filename: str | None = None) -> str:
        """A V4 signed URL that lets anyone holding it GET `uri` until `expiration` has passed.

        Signed where the credentials are: locally with a service account key, through IAM for impersonated ones.
        """
        bucket, name = split_uri(uri)
        credentials = self.signing_credentials or self.client._credentials  # what the client was made with
        if not isinstance(credentials, Signing):
            raise CannotSign(f"the Google Cloud credentials in use ({type(credentials).__module__}."
                             f"{type(credentials).__name__}) cannot sign a URL: they hold no private key", SIGNING_HINT)
        disposition = f'attachment; filename="{filename}"' if filename else None
        try:
            return str(self.client.bucket(bucket).blob(name).generate_signed_url(
                version="v4", expiration=expiration, method="GET", credentials=credentials,
                response_disposition=disposition))
        except (auth_exc.TransportError, auth_exc.RefreshError) as exc:  # IAM's signBlob refused or unreachable
            raise CannotSign(f"signing a URL for {uri} failed: {exc}", SIGNING_HINT) from exc

    def _fail(self, exc: Exception, uri: str, action: str, generation: int | None = None) -> NoReturn:
        raise self._translate(exc, uri, action, generation) from exc

    def _translate(self, exc: Exception, uri: str, action: str, generation: int | None) -> Exception:
        bucket, _ = split_uri(uri)
        if isinstance(exc, (BackendError, ArtifactError)):
            return exc
        if isinstance(exc, gexc.PreconditionFailed):
            if generation == 0:
                return PreconditionFailed(f"{uri} already exists", "a record is written once; use a new train path")
            return PreconditionFailed(f"{uri} changed since it was read (generation is no longer {generation})",
                                      "read it again and retry")
        if isinstance(exc, gexc.NotFound):
            if action in ("write", "upload") or not self._bucket_exists_quietly(bucket):
                return BucketNotFound(
                    f"bucket gs://{bucket} does not exist",
                    f"create it (`gcloud storage buckets create gs://{bucket} --location=REGION"
                    f"{' --project=' + self.project if self.project else ''}`) or set STARCHART_BUCKET",
                )
            return ObjectNotFound(f"{uri} does not exist", "check that the training job wrote it")
        if isinstance(exc, gexc.Forbidden):
            return StoragePermissionDenied(
                f"permission denied to {action} {uri}: {_server_message(exc)}",
                f"grant roles/storage.objectAdmin on gs://{bucket} to the account in use "
                "(and to the Vertex AI service agent that runs the training jobs)",
            )
        if isinstance(exc, auth_exc.DefaultCredentialsError):
            return NoCredentials("no Google Cloud credentials found for Cloud Storage", CREDENTIALS_HINT)
        if isinstance(exc, (gexc.Unauthorized, auth_exc.RefreshError)):
            return NoCredentials(f"Cloud Storage rejected the credentials: {exc}", CREDENTIALS_HINT)
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, auth_exc.TransportError)):
            where = self.emulator_host or "storage.googleapis.com"
            return StorageUnavailable(f"cannot reach Cloud Storage at {where} to {action} {uri}",
                                      "check the network (or that the emulator runs), then retry")
        if isinstance(exc, gexc.GoogleAPICallError):
            return BackendError(f"Cloud Storage could not {action} {uri}: {_server_message(exc)}", "retry later")
        return BackendError(f"could not {action} {uri}: {exc!r}", "retry later")

    def _bucket_exists_quietly(self, bucket: str) -> bool:
        try:
            return self.client.lookup_bucket(bucket, timeout=self.timeout) is not None
        except Exception:  # only refines the message: assume the bucket is there
            return True


def _server_message(exc: Any) -> str:
    message = getattr(exc, "message", None) or str(exc)
    return str(message).split(": ", 1)[-1] if str(message).startswith(("GET ", "POST ", "PUT ")) else str(message)
