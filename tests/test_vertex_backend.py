"""The vertex backend through the real GAPIC clients (REST transport) against a local Vertex AI fake,
and GcsStorage through google-cloud-storage against fake-gcs-server. Offline; no sleeps beyond
millisecond backoffs. STARCHART_UPDATE_GOLDEN=1 rewrites tests/golden/vertex/*.json.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import ROOT, replay_args
from fakes.gcs_emulator import new_bucket, shared_gcs_emulator, storage_client
from fakes.vertex_fake import VertexFake, fast_backend, replay_runner, vertex_env

from model_registry.adapters.backends.base import TrainingSpec
from model_registry.adapters.backends.vertex import (
    NoCredentials,
    QuotaExhausted,
    VertexBackend,
    VertexNotFound,
    VertexPermissionDenied,
    VertexUnavailable,
    worker_pools,
)
from model_registry.adapters.gcs import BucketNotFound, GcsStorage, ObjectNotFound, PreconditionFailed
from model_registry.config import Settings
from model_registry.domain.errors import ArtifactError, BackendError, InvalidInput, NotFound, Refused

GOLDEN = ROOT / "tests" / "golden" / "vertex"
TS = "20261127064910"
TRAIN_PATH = f"gs://starchart-test-ml/iris/{TS}"


@pytest.fixture
def gcs(monkeypatch: pytest.MonkeyPatch) -> str:
    url = shared_gcs_emulator()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    return url


@pytest.fixture
def bucket(gcs: str) -> str:
    return new_bucket(gcs)


@pytest.fixture
def fake() -> Iterator[VertexFake]:
    with VertexFake() as f:
        yield f


@pytest.fixture
def backend(fake: VertexFake) -> VertexBackend:
    return fast_backend(fake, "gs://starchart-test-ml")


def spec(**overrides: Any) -> TrainingSpec:
    values: dict[str, Any] = dict(
        job_id=f"iris_{TS}", model="iris", ts=TS, module="trainer.task",
        args=("--epochs=5", f"--job-dir={TRAIN_PATH}"), package_uri=f"{TRAIN_PATH}/packages/iris_trainer-0.1.tar.gz",
        train_path=TRAIN_PATH, labels={"model": "iris", "ts": TS},
    )
    values.update(overrides)
    return TrainingSpec(**values)


def version_view(name: str, job_ts: str = TS) -> dict[str, Any]:
    return {"model": "iris", "name": name, "job_id": f"iris_{job_ts}", "trained_by": "U_TRAINER",
            "deployment_uri": f"gs://starchart-test-ml/iris/{job_ts}/model/", "metrics": {"accuracy": 0.9666667,
                                                                                       "loss": 0.1234},
            "digest": "0123456789abcdef" * 4}


def check_golden(name: str, request: Any) -> None:
    """Compare a recorded request (method, path, query, body) with tests/golden/vertex/<name>.json."""
    actual = {"method": request.method, "path": request.path, "query": request.query, "body": request.body}
    path = GOLDEN / f"{name}.json"
    if os.environ.get("STARCHART_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(actual, indent=2, sort_keys=True) + "\n")
    assert path.exists(), f"missing golden file {path}; run with STARCHART_UPDATE_GOLDEN=1 and review it"
    assert actual == json.loads(path.read_text()), f"request differs from {path}"


# ---------------------------------------------------------------- request bodies (golden files)


@pytest.mark.parametrize("golden, overrides", [
    ("custom_job_basic", {}),
    ("custom_job_standard_1", {"scale_tier": "STANDARD_1"}),
    ("custom_job_basic_gpu", {"scale_tier": "BASIC_GPU"}),
    ("custom_job_override", {"workers": 3, "machine_type": "n1-highmem-8", "accelerator": "nvidia-tesla-t4:2",
                             "executor_image": "europe-docker.pkg.dev/acme/train/tf:2.21"}),
])
def test_custom_job_request_bodies(backend: VertexBackend, fake: VertexFake, golden: str,
                                   overrides: dict[str, Any]) -> None:
    ref = backend.submit(spec(**overrides))
    assert ref.startswith("projects/123456789012/locations/us-central1/customJobs/"), "the server's name is kept"
    [create] = fake.calls("customJobs.create")
    check_golden(golden, create)
    body = create.body
    assert body["displayName"] == f"iris_{TS}" and body["labels"] == {"model": "iris", "ts": TS}
    assert body["jobSpec"]["baseOutputDirectory"] == {"outputUriPrefix": TRAIN_PATH}


def test_scale_tiers_map_to_worker_pools() -> None:
    pools = {t: [(p.machine_type, p.replicas, p.accelerator) for p in worker_pools(spec(scale_tier=t))]
             for t in ("BASIC", "STANDARD_1", "PREMIUM_1", "BASIC_GPU")}
    assert pools["BASIC"] == [("n1-standard-4", 1, None)]
    assert pools["STANDARD_1"] == [("n1-highcpu-8", 1, None), ("n1-highcpu-8", 4, None)]
    assert pools["PREMIUM_1"] == [("n1-highcpu-16", 1, None), ("n1-highcpu-16", 19, None)]
    assert pools["BASIC_GPU"] == [("n1-standard-8", 1, "NVIDIA_TESLA_T4")]
    assert [p.replicas for p in worker_pools(spec(scale_tier="STANDARD_1", workers=2))] == [1, 1]
    assert [p.machine_type for p in worker_pools(spec(scale_tier="custom", machine_type="e2-standard-8"))] == [
        "e2-standard-8"]
    with pytest.raises(InvalidInput, match="unknown scale tier 'BASIC_TPU'.*BASIC, STANDARD_1"):
        worker_pools(spec(scale_tier="BASIC_TPU"))
    with pytest.raises(InvalidInput, match="unknown accelerator 'tesla-t5:1'"):
        worker_pools(spec(accelerator="tesla-t5:1"))
    with pytest.raises(InvalidInput, match="invalid accelerator count"):
        worker_pools(spec(accelerator="NVIDIA_L4:0"))


def test_accelerator_names_are_the_client_librarys() -> None:
    """The configuration checks accelerators without importing Google's libraries: its list must be theirs."""
    from google.cloud import aiplatform_v1 as aip

    from model_registry.adapters.backends.vertex_settings import ACCELERATORS

    assert ACCELERATORS == tuple(a.name for a in aip.AcceleratorType if a.value)


def test_version_request_bodies(backend: VertexBackend, fake: VertexFake) -> None:
    first = backend.register_version("iris", version_view(f"v{TS}"), first=True)
    assert first == "projects/123456789012/locations/us-central1/models/iris@1"
    second = backend.register_version("iris", version_view("v20261128000000", "20261128000000"), first=False)
    assert second.endswith("/models/iris@2")
    backend.set_default("iris", "v20261128000000", second)
    uploads = fake.calls("models.upload")
    check_golden("upload_model_first", uploads[0])
    check_golden("upload_model_version", uploads[1])
    check_golden("merge_version_aliases", fake.calls("models.mergeVersionAliases")[0])
    assert fake.count("operations.get") == 2, "each upload's operation was awaited"


# ---------------------------------------------------------------- Vertex AI's rules, kept by the fake


def test_versions_numbered_per_model_and_default_alias_moves_but_never_disappears(backend: VertexBackend,
                                                                                  fake: VertexFake) -> None:
    refs = [backend.register_version("iris", version_view(f"v2026112700000{i}", f"2026112700000{i}"), first=i == 1)
            for i in (1, 2, 3)]
    other = backend.register_version("other", {**version_view("v20261127000009"), "model": "other"}, first=True)
    assert [r.rsplit("@", 1)[1] for r in refs] == ["1", "2", "3"] and other.endswith("/models/other@1")
    assert fake.versions("iris") == {"1": ["default", "v20261127000001"], "2": ["v20261127000002"],
                                     "3": ["v20261127000003"]}
    assert backend.current_default("iris") == "v20261127000001"
    backend.set_default("iris", "v20261127000003", refs[2])
    assert fake.versions("iris")["1"] == ["v20261127000001"], "an alias names one version: it moved"
    assert backend.current_default("iris") == "v20261127000003"
    backend.set_default("iris", "v20261127000003", None)  # no reference kept: the alias names it too
    assert backend.current_default("iris") == "v20261127000003"
    client = backend.api.models()
    from google.api_core import exceptions as gexc

    with pytest.raises(gexc.BadRequest, match="default version alias cannot be removed"):
        client.merge_version_aliases(name=refs[2], version_aliases=["-default"])
    with pytest.raises(gexc.BadRequest, match="Invalid version alias"):
        client.merge_version_aliases(name=refs[1], version_aliases=["42"])
    assert fake.versions("iris")["3"] == ["default", "v20261127000003"], "a refused merge changed nothing"
    assert fake.version_names("iris") == [f"v2026112700000{i}" for i in (1, 2, 3)]
    assert fake.version_names("nomodel") == [] and backend.current_default("nomodel") is None


def test_register_version_is_idempotent_and_heals_the_first_flag(backend: VertexBackend, fake: VertexFake) -> None:
    view = version_view(f"v{TS}")
    ref = backend.register_version("iris", view, first=False)  # no such model yet: created with model_id
    assert ref.endswith("/models/iris@1")
    assert backend.register_version("iris", view, first=True) == ref, "an interrupted expose finds its version"
    assert fake.count("models.upload") == 2 and len(fake.versions("iris")) == 1
    again = backend.register_version("iris", version_view("v20261128000000", "20261128000000"), first=True)
    assert again.endswith("/models/iris@2"), "the model exists after all: uploaded as a new version"


def test_an_upload_operation_that_fails_raises_and_registers_nothing(backend: VertexBackend,
                                                                    fake: VertexFake) -> None:
    fake.fail_next_operation("Model artifact validation failed: no saved_model.pb under the artifact URI.")
    with pytest.raises(BackendError) as err:
        backend.register_version("iris", version_view(f"v{TS}"), first=True)
    assert "could not register iris v20261127064910: Model artifact validation failed" in err.value.message
    assert "holds a SavedModel" in err.value.hint
    assert ("us-central1", "iris") not in fake.models and backend.current_default("iris") is None


# ---------------------------------------------------------------- jobs


@pytest.mark.parametrize("vertex_state, state", [
    ("JOB_STATE_QUEUED", "QUEUED"), ("JOB_STATE_PENDING", "QUEUED"), ("JOB_STATE_RUNNING", "RUNNING"),
    ("JOB_STATE_SUCCEEDED", "SUCCEEDED"), ("JOB_STATE_FAILED", "FAILED"), ("JOB_STATE_CANCELLING", "CANCELLED"),
    ("JOB_STATE_CANCELLED", "CANCELLED"), ("JOB_STATE_EXPIRED", "FAILED"), ("JOB_STATE_PAUSED", "RUNNING"),
])
def test_job_states_map_to_starchart_states(backend: VertexBackend, fake: VertexFake, vertex_state: str,
                                            state: str) -> None:
    ref = backend.submit(spec())
    fake.set_job_state(ref, vertex_state, error="OOM in workerpool0-0" if vertex_state.endswith("FAILED") else None)
    st = backend.status(f"iris_{TS}", ref)
    assert st.state == state
    if state in ("RUNNING", "SUCCEEDED", "FAILED") and vertex_state != "JOB_STATE_PAUSED":
        assert st.started_at is not None and st.started_at.tzinfo is None, "naive UTC"
    if vertex_state == "JOB_STATE_FAILED":
        assert st.error == "OOM in workerpool0-0" and st.ended_at is not None and st.ended_at.tzinfo is None
    if vertex_state == "JOB_STATE_EXPIRED":
        assert st.error == "the job expired"


def test_status_without_a_reference_finds_the_job_by_display_name(backend: VertexBackend, fake: VertexFake) -> None:
    ref = backend.submit(spec())
    fake.set_job_state(ref, "JOB_STATE_RUNNING")
    assert backend.status(f"iris_{TS}", None).state == "RUNNING"
    assert backend.status("iris_20000101000000", None).state == "FAILED"
    fake.jobs.clear()  # deleted in the console: never finishes, so it is failed, not queued forever
    assert "no job" in backend.status(f"iris_{TS}", ref).error


def test_cancel_logs_and_lost_reply_on_create(backend: VertexBackend, fake: VertexFake) -> None:
    fake.fail_next("customJobs.create", 503, after=True)  # created, but the reply was lost
    ref = backend.submit(spec())
    assert len(fake.jobs) == 1, "the retry found the job the first attempt made"
    backend.cancel(f"iris_{TS}", ref)
    assert fake.jobs[ref]["state"] == "JOB_STATE_CANCELLING"
    assert backend.status(f"iris_{TS}", ref).state == "CANCELLED"
    with pytest.raises(BackendError, match="already ended on Vertex AI"):
        backend.cancel(f"iris_{TS}", ref)
    fake.set_job_state(ref, "JOB_STATE_FAILED", error="The replica workerpool0-0 exited with status 1")
    text = backend.logs(f"iris_{TS}", ref)
    job_number = ref.rsplit("/", 1)[1]
    assert "https://console.cloud.google.com/logs/query;query=resource.type%3D%22ml_job%22" in text
    assert f"resource.labels.job_id%3D%22{job_number}%22" in text and "project=starchart-test" in text
    assert "error: The replica workerpool0-0 exited with status 1" in text


def test_a_failed_jobs_log_tail_comes_from_cloud_logging(make_registry: Any, sqlite_url: str, fake: VertexFake,
                                                         bucket: str, gcs: str) -> None:
    fake.runner = replay_runner(gcs)
    reg = make_registry(sqlite_url, backend=fast_backend(fake, bucket), env=vertex_env(bucket))
    job = reg.jobs.train("iris", "U_TRAINER", args=["--crash"])
    [name] = fake.jobs
    for line in ["Epoch 1/5", "Traceback (most recent call last):", "ValueError: the labels column is missing"]:
        fake.add_log(name, line, severity="ERROR" if "Error" in line else "INFO")
    fake.add_log(name.replace(name.rsplit("/", 1)[1], "999"), "another job's line")
    reg.jobs.refresh("iris")
    reg.jobs.refresh("iris")
    failed = reg.jobs.get(job["job_id"])
    assert failed["state"] == "FAILED"
    tail = failed["error"].split("--- log tail ---", 1)[1]
    assert "INFO Epoch 1/5" in tail and "ERROR ValueError: the labels column is missing" in tail
    assert tail.index("Epoch 1/5") < tail.index("Traceback") < tail.index("Job failed.")  # oldest first
    assert "another job's line" not in tail
    [listed, *_] = fake.calls("entries.list")
    assert listed.body["resourceNames"] == ["projects/starchart-test"] and listed.body["orderBy"] == "timestamp desc"
    assert f'resource.labels.job_id="{name.rsplit("/", 1)[1]}"' in listed.body["filter"]
    newest = reg.jobs.logs(job["job_id"], tail=3)  # the error, then the service's "running" and "failed" lines
    assert "last 3 log lines" in newest and "ValueError: the labels column is missing" in newest
    assert "Epoch 1/5" not in newest and "Traceback" not in newest, "only the newest lines"

    fake.fail_next("entries.list", 403, message="Permission 'logging.logEntries.list' denied on resource")
    denied = reg.jobs.logs(job["job_id"])
    assert "log tail unavailable" in denied and "roles/logging.viewer" in denied
    assert "https://console.cloud.google.com/logs/query" in denied, "the link is still given"


def test_finding_a_job_among_500_costs_one_list_not_one_per_job(backend: VertexBackend, fake: VertexFake) -> None:
    fake.add_jobs(500, "iris")
    ref = backend.submit(spec())
    fake.add_jobs(30, "other")
    fake.set_job_state(ref, "JOB_STATE_SUCCEEDED")
    fake.reset_requests()
    assert backend.status(f"iris_{TS}", None).state == "SUCCEEDED"  # no reference kept: found by display name
    assert fake.count("customJobs.list") == 1 and fake.count() == 2, "one filtered list, then the job itself"
    [found] = fake.calls("customJobs.list")
    assert found.query["filter"] == f'display_name="iris_{TS}"', "the server filters, not this process"


# ---------------------------------------------------------------- failures


def test_429_and_503_are_retried_with_backoff(backend: VertexBackend, fake: VertexFake) -> None:
    fake.fail_next("customJobs.create", 429, reason="RATE_LIMIT_EXCEEDED")
    fake.fail_next("customJobs.create", 503)
    ref = backend.submit(spec())
    assert fake.count("customJobs.create") == 3 and len(fake.jobs) == 1
    fake.fail_next("customJobs.get", 503, times=2)
    assert backend.status(f"iris_{TS}", ref).state == "QUEUED"
    assert fake.count("customJobs.get") == 3
    backend.register_version("iris", version_view(f"v{TS}"), first=True)
    fake.fail_next("models.mergeVersionAliases", 429, times=3)
    backend.set_default("iris", f"v{TS}", None)
    assert fake.count("models.mergeVersionAliases") == 4


def test_unavailable_for_too_long_gives_a_clear_error(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", retry_deadline=0.05)
    fake.fail_next("customJobs.create", 503, times=1000)
    with pytest.raises(VertexUnavailable, match="Vertex AI is unavailable after retrying"):
        backend.submit(spec())
    assert fake.jobs == {}


def test_quota_exhausted_is_not_retried(backend: VertexBackend, fake: VertexFake) -> None:
    fake.fail_next("customJobs.create", 429, reason="RESOURCE_QUOTA_EXCEEDED",
                   message="Quota exceeded for aiplatform.googleapis.com/custom_model_training_cpus (n1) in "
                           "region us-central1.")
    with pytest.raises(QuotaExhausted) as err:
        backend.submit(spec(scale_tier="PREMIUM_1"))
    assert fake.count("customJobs.create") == 1
    assert "quota exhausted in project starchart-test, region us-central1" in err.value.message
    assert "custom_model_training_cpus" in err.value.message
    assert "iam-admin/quotas?project=starchart-test" in err.value.hint


@pytest.mark.parametrize("status, reason, error, words", [
    (404, None, VertexNotFound, ["GCP_PROJECT_ID=starchart-test", "GCP_REGION=us-central1"]),
    (403, None, VertexPermissionDenied, ["roles/aiplatform.user", "project starchart-test",
                                         "roles/storage.objectAdmin on gs://starchart-test-ml"]),
    (403, "SERVICE_DISABLED", VertexPermissionDenied, ["gcloud services enable aiplatform.googleapis.com "
                                                       "--project=starchart-test"]),
])
def test_not_found_and_permission_denied_say_what_is_missing(backend: VertexBackend, fake: VertexFake, status: int,
                                                             reason: str | None, error: type,
                                                             words: list[str]) -> None:
    fake.fail_next("customJobs.create", status, reason=reason)
    with pytest.raises(error) as err:
        backend.submit(spec())
    text = str(err.value)
    assert "could not start training job iris_20261127064910" in text
    assert all(w in text for w in words), text
    assert fake.count("customJobs.create") == 1, "not retried"


def test_a_bad_request_names_the_server_reason(backend: VertexBackend, fake: VertexFake) -> None:
    with pytest.raises(BackendError, match="worker_pool_specs.0..machine_spec.machine_type is required"):
        backend.submit(spec(scale_tier="CUSTOM", machine_type="--bogus"))


# ---------------------------------------------------------------- configuration and credentials


def _settings(**env: str) -> Settings:
    return Settings.from_env({"STARCHART_BACKEND": "vertex", "STARCHART_HOME": "/tmp/starchart-t", **env})


@pytest.mark.parametrize("env, words", [
    ({}, "GCP_PROJECT_ID is not set"),
    ({"GCP_PROJECT_ID": "My Project"}, "is not a project id"),
    ({"GCP_PROJECT_ID": "acme-ml", "GCP_REGION": "us central"}, "GCP_REGION 'us central' is not a region"),
    ({"GCP_PROJECT_ID": "acme-ml", "STARCHART_BUCKET": "acme-bucket"}, "STARCHART_BUCKET=gs://acme-bucket"),
])
def test_missing_or_malformed_configuration_is_refused_clearly(env: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        VertexBackend.from_settings(_settings(**env))
    assert words in str(err.value)


def test_from_settings_defaults_and_endpoint_override(fake: VertexFake) -> None:
    b = VertexBackend.from_settings(_settings(GCP_PROJECT_ID="acme-ml", GCP_REGION="europe-west4"))
    assert (b.project, b.region, b.bucket, b.api.api_endpoint) == ("acme-ml", "europe-west4", "gs://acme-ml-ml", None)
    assert b.name == "vertex" and isinstance(b.storage, GcsStorage) and b.poll_interval == (2.0, 30.0)
    from google.auth.credentials import AnonymousCredentials

    regional = VertexBackend("acme-ml", "europe-west4", "gs://b", credentials=AnonymousCredentials())
    assert regional.api.jobs()._transport._host == "https://europe-west4-aiplatform.googleapis.com"
    assert regional.api.models()._transport._host == "https://europe-west4-aiplatform.googleapis.com"
    local = VertexBackend.from_settings(_settings(GCP_PROJECT_ID="starchart-test", VERTEX_API_ENDPOINT=fake.url,
                                                  STARCHART_SERVING_IMAGE="europe-docker.pkg.dev/acme/serve:1"))
    assert local.api.jobs()._transport._host == fake.url and local.versions.serving_image.endswith("serve:1")
    assert local.current_default("iris") is None and fake.count("models.get") == 1


def test_settings_reach_the_backend_and_its_storage_without_the_environment(
        monkeypatch: pytest.MonkeyPatch, fake: VertexFake, bucket: str, gcs: str) -> None:
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")  # only Settings.from_env reads it; what it read is passed in
    settings = _settings(GCP_PROJECT_ID="starchart-test", STARCHART_BUCKET=bucket, VERTEX_API_ENDPOINT=fake.url,
                         STORAGE_EMULATOR_HOST=gcs, STARCHART_EXECUTOR_IMAGE="europe-docker.pkg.dev/acme/train:2")
    assert (settings.vertex_api_endpoint, settings.storage_emulator_host) == (fake.url, gcs)
    b = VertexBackend.from_settings(settings)
    assert isinstance(b.storage, GcsStorage) and b.storage.emulator_host == gcs
    record = b.storage.join(bucket, "iris", TS, "starchart.json")
    b.storage.write_bytes(record, b"{}")
    assert b.storage.read_bytes(record) == b"{}" and storage_client(gcs).bucket(bucket[5:]).get_blob(
        f"iris/{TS}/starchart.json") is not None, "written to the emulator the settings named"
    b.submit(spec())
    [create] = fake.calls("customJobs.create")
    assert create.body["jobSpec"]["workerPoolSpecs"][0]["pythonPackageSpec"]["executorImageUri"] == \
        "europe-docker.pkg.dev/acme/train:2"


def test_no_credentials_says_how_to_get_them(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST", "VERTEX_API_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))  # no gcloud ADC file
    monkeypatch.setenv("NO_GCE_CHECK", "True")  # and no metadata server
    backend = VertexBackend("acme-ml", "us-central1", "gs://acme-ml-ml")
    with pytest.raises(NoCredentials) as err:
        backend.status(f"iris_{TS}", "projects/acme-ml/locations/us-central1/customJobs/1")
    assert "no Google Cloud credentials" in err.value.message
    assert "gcloud auth application-default login" in err.value.hint
    assert "GOOGLE_APPLICATION_CREDENTIALS" in err.value.hint
    with pytest.raises(NoCredentials):
        GcsStorage(project="acme-ml").read_bytes("gs://acme-ml-ml/iris/x/metrics.json")


# ---------------------------------------------------------------- Cloud Storage (fake-gcs-server)


def test_gcs_storage_round_trip_precondition_and_errors(bucket: str, gcs: str, tmp_path: Path) -> None:
    store = GcsStorage(project="starchart-test", emulator_host=gcs)
    record = store.join(bucket, "iris", TS, "starchart.json")
    assert record == f"{bucket}/iris/{TS}/starchart.json" and store.join(bucket + "/", "/model/") == f"{bucket}/model"
    assert not store.exists(record)
    store.write_bytes(record, b'{"v": 1}', if_generation_match=0)
    assert store.read_bytes(record) == b'{"v": 1}' and store.exists(record)
    with pytest.raises(PreconditionFailed, match="already exists"):
        store.write_bytes(record, b'{"v": 2}', if_generation_match=0)
    assert store.read_bytes(record) == b'{"v": 1}', "the refused write changed nothing"
    store.write_bytes(record, b'{"v": 3}')  # unconditional writes replace
    sdist = tmp_path / "iris_trainer-0.1.tar.gz"
    sdist.write_bytes(b"\x1f\x8b fake sdist")
    store.upload_file(sdist, store.join(bucket, "iris", TS, "packages", sdist.name))
    blob = storage_client(gcs).bucket(bucket[5:]).get_blob(f"iris/{TS}/packages/{sdist.name}")
    assert blob.size == sdist.stat().st_size and blob.content_type == "application/gzip"
    with pytest.raises(ObjectNotFound) as missing:
        store.read_bytes(store.join(bucket, "iris", TS, "metrics.json"))
    assert isinstance(missing.value, ArtifactError) and "does not exist" in missing.value.message
    with pytest.raises(BucketNotFound) as no_bucket:
        store.read_bytes("gs://starchart-no-such-bucket/iris/x")
    assert "gcloud storage buckets create gs://starchart-no-such-bucket" in no_bucket.value.hint
    with pytest.raises(BucketNotFound):
        store.upload_file(sdist, "gs://starchart-no-such-bucket/p/x.tar.gz")
    assert store.bucket_exists(bucket) and not store.bucket_exists("gs://starchart-no-such-bucket")
    with pytest.raises(ArtifactError, match="not a gs:// URI"):
        store.read_bytes("/tmp/x")


def test_gcs_storage_lists_and_downloads_a_folder(bucket: str, gcs: str, tmp_path: Path) -> None:
    """What `pull` uses on Vertex AI: the files of a SavedModel folder, relative to it, then each downloaded."""
    store = GcsStorage(project="starchart-test", emulator_host=gcs)
    model = store.join(bucket, "iris", TS, "model")
    for name, data in (("saved_model.pb", b"pb"), ("variables/variables.index", b"ix"),
                       ("variables/variables.data-00000-of-00001", b"data")):
        store.write_bytes(store.join(model, name), data)
    store.write_bytes(store.join(bucket, "iris", TS, "model-other", "x"), b"not in the folder")
    files = store.list_files(model + "/")
    assert files == ["saved_model.pb", "variables/variables.data-00000-of-00001", "variables/variables.index"]
    for name in files:
        store.download_file(store.join(model, name), tmp_path / name)
    assert (tmp_path / "variables" / "variables.index").read_bytes() == b"ix"
    assert store.list_files(store.join(bucket, "nothing-here")) == []
    with pytest.raises(ObjectNotFound):
        store.download_file(store.join(model, "missing.pb"), tmp_path / "missing.pb")


def test_storage_permission_denied_and_unreachable_say_what_to_do() -> None:
    from google.api_core import exceptions as gexc

    class Blob:
        def __init__(self, error: Exception) -> None:
            self.error = error

        def download_as_bytes(self, **_: Any) -> bytes:
            raise self.error

    class Client:  # IAM is what fake-gcs-server does not emulate: a client that answers 403 / cannot connect
        def __init__(self, error: Exception) -> None:
            self.error = error

        def bucket(self, name: str) -> Any:
            return type("Bucket", (), {"blob": lambda _self, n: Blob(self.error)})()

    denied = GcsStorage(client=Client(gexc.Forbidden("GET http://x/o: caller does not have storage.objects.get")))
    with pytest.raises(BackendError) as err:
        denied.read_bytes("gs://acme-ml/iris/1/metrics.json")
    assert type(err.value).__name__ == "StoragePermissionDenied"
    assert "permission denied to read gs://acme-ml/iris/1/metrics.json: caller does not have" in err.value.message
    assert "roles/storage.objectAdmin on gs://acme-ml" in err.value.hint
    import requests

    offline = GcsStorage(client=Client(requests.exceptions.ConnectionError("refused")))
    with pytest.raises(BackendError, match="cannot reach Cloud Storage"):
        offline.read_bytes("gs://acme-ml/iris/1/metrics.json")


# ---------------------------------------------------------------- through the Registry


def test_failed_alias_merge_during_a_promotion_leaves_it_failed_and_nothing_half_applied(
        make_registry: Any, db_url: str, fake: VertexFake, bucket: str, gcs: str, trained: dict) -> None:
    fake.runner = replay_runner(gcs)
    reg = make_registry(db_url, backend=fast_backend(fake, bucket), env=vertex_env(bucket))
    for source in (trained["iris_a"], trained["iris_b"]):
        job = reg.jobs.train("iris", "U_TRAINER", args=replay_args(source))
        assert job["train_path"].startswith(f"{bucket}/iris/")
        assert job["package_uris"][0].startswith(f"{job['train_path']}/packages/")
        assert reg.jobs.wait(job["job_id"], timeout=20)["state"] == "SUCCEEDED"
    exposed = reg.versions.expose("iris", "U_TRAINER")
    assert len(exposed["exposed"]) == 2 and not exposed["errors"], exposed
    base, cand = sorted(v["name"] for v in exposed["exposed"])
    assert reg.versions.default("iris") == base and reg.backend.current_default("iris") == base
    store, newest = reg.backend.storage, exposed["exposed"][1]
    record = json.loads(store.read_bytes(store.join(reg.jobs.get(newest["job_id"])["train_path"], "starchart.json")))
    assert record["name"] == newest["name"] and record["deployment_uri"].startswith(f"{bucket}/iris/")
    assert set(record["signature"]["inputs"]) == {"sepal_length", "sepal_width", "petal_length", "petal_width"}

    req = reg.promotions.promote("iris", cand, "U_REQ")
    reg.promotions.decide(req["id"], "U_OK", True)
    fake.fail_next("models.mergeVersionAliases", 403,
                   message="Permission 'aiplatform.models.update' denied on resource.")
    failed = reg.promotions.apply_request(req["id"], actor="U_OK")
    assert failed["state"] == "failed"
    assert "permission denied in project starchart-test" in failed["error"]
    assert "aiplatform.models.update" in failed["error"]
    assert reg.versions.default("iris") == base and reg.backend.current_default("iris") == base
    assert fake.versions("iris")["1"][0] == "default", "Vertex AI's default did not move"
    actions = [e["action"] for e in reg.audit.events(model="iris", limit=100)]
    assert "promotion.failed" in actions and "promotion.applied" not in actions

    applied = reg.promotions.retry(req["id"], "U_OK")
    assert applied["state"] == "applied" and reg.versions.default("iris") == cand
    assert reg.backend.current_default("iris") == cand
    assert fake.version_names("iris") == [base, cand]


def test_registry_train_sends_the_job_it_describes(make_registry: Any, sqlite_url: str, fake: VertexFake,
                                                  bucket: str) -> None:
    reg = make_registry(sqlite_url, backend=fast_backend(fake, bucket), env=vertex_env(bucket))
    job = reg.jobs.train("iris", "U_TRAINER", args=["--epochs=5", "--job-dir=TRAIN_PATH"], scale_tier="STANDARD_1")
    ts = job["job_id"].rsplit("_", 1)[1]
    [create] = fake.calls("customJobs.create")
    text = json.dumps(create.body).replace(ts, "TS").replace(bucket, "gs://BUCKET")  # volatile: time, bucket
    check_golden("custom_job_from_registry", type(create)(create.method, create.path, create.query,
                                                          json.loads(text), create.route))
    assert reg.backend.storage.exists(job["package_uris"][0]), "the sdist was staged before the job was sent"


def test_gs_paths_in_trainer_args_must_lie_under_the_data_roots(make_registry: Any, sqlite_url: str,
                                                                 fake: VertexFake, bucket: str) -> None:
    reg = make_registry(sqlite_url, backend=fast_backend(fake, bucket), env=vertex_env(bucket),
                        defaults={"data_roots": ["gs://my-ml-data/"]})
    for arg, why in [("--train_data=gs://other-bucket/iris.csv", "outside the data roots"),
                     ("--train_data=gs://my-ml-data-copy/iris.csv", "outside the data roots"),
                     ("--train_data=gs://my-ml-data/../secrets/x.csv", "`..` is not allowed"),
                     ("--job-dir=TRAIN_PATH/../../elsewhere", "`..` is not allowed")]:
        with pytest.raises(InvalidInput, match=re.escape(why)):
            reg.jobs.train("iris", "U_TRAINER", args=[arg])
    assert fake.count() == 0 and reg.jobs.state("iris") == [], "nothing was staged, sent or recorded"
    job = reg.jobs.train("iris", "U_TRAINER", args=["--train_data=gs://my-ml-data/iris/train.csv",
                                                    "--job-dir=TRAIN_PATH/out"])
    [create] = fake.calls("customJobs.create")
    [pool] = create.body["jobSpec"]["workerPoolSpecs"]
    assert "--train_data=gs://my-ml-data/iris/train.csv" in pool["pythonPackageSpec"]["args"]
    assert f"--job-dir={job['train_path']}/out" in pool["pythonPackageSpec"]["args"]


def test_registry_from_env_selects_and_configures_the_vertex_backend(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, replay_trainers: Path, fake: VertexFake, bucket: str,
        gcs: str, trained: dict) -> None:
    from conftest import write_config

    from model_registry.bootstrap import Core

    home = tmp_path / "envhome"
    home.mkdir()
    for key, value in {"STARCHART_BACKEND": "vertex", "GCP_PROJECT_ID": "starchart-test", "GCP_REGION": "us-central1",
                       "STARCHART_BUCKET": bucket, "VERTEX_API_ENDPOINT": fake.url, "STARCHART_HOME": str(home),
                       "DATABASE_URL": f"sqlite:///{home / 'db.sqlite'}",
                       "STARCHART_CONFIG": str(write_config(home, replay_trainers))}.items():
        monkeypatch.setenv(key, value)
    fake.runner = replay_runner(gcs)
    reg = Core.from_env()
    try:
        assert isinstance(reg.backend, VertexBackend) and reg.backend.bucket == bucket
        job = reg.jobs.train("iris", "U_TRAINER", args=replay_args(trained["iris_a"]))
        assert job["train_path"].startswith(f"{bucket}/iris/") and fake.count("customJobs.create") == 1
        reg.jobs.refresh("iris")  # the fake runs the job as it is polled: RUNNING, then SUCCEEDED
        reg.jobs.refresh("iris")
        assert reg.jobs.get(job["job_id"])["state"] == "SUCCEEDED"
        assert [v["name"] for v in reg.versions.expose("iris", "U_TRAINER")["exposed"]] == [reg.backend.current_default("iris")]
    finally:
        reg.db.engine.dispose()


def test_training_into_a_missing_bucket_fails_before_any_job_is_sent(make_registry: Any, sqlite_url: str,
                                                                    fake: VertexFake, gcs: str) -> None:
    absent = "gs://starchart-absent-bucket"
    reg = make_registry(sqlite_url, backend=fast_backend(fake, absent), env=vertex_env(absent))
    with pytest.raises(BucketNotFound) as err:
        reg.jobs.train("iris", "U_TRAINER", args=["--epochs=1"])
    assert "bucket gs://starchart-absent-bucket does not exist" in err.value.message
    assert "gcloud storage buckets create gs://starchart-absent-bucket" in err.value.hint
    [job] = reg.jobs.state("iris")
    assert job["state"] == "FAILED" and "does not exist" in job["error"]
    assert fake.count() == 0


@pytest.mark.skipif(not (os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") and
                         os.environ.get("STARCHART_LIVE_GCP_PROJECT")),
                    reason="live smoke test: set GOOGLE_APPLICATION_CREDENTIALS and STARCHART_LIVE_GCP_PROJECT")
def test_live_smoke() -> None:  # pragma: no cover - needs a real project
    project = os.environ["STARCHART_LIVE_GCP_PROJECT"]
    settings = Settings.from_env({"STARCHART_BACKEND": "vertex", "GCP_PROJECT_ID": project,
                                  "GCP_REGION": os.environ.get("GCP_REGION", "us-central1"),
                                  "STARCHART_BUCKET": os.environ.get("STARCHART_BUCKET", "")})
    backend = VertexBackend.from_settings(settings)
    backend.preflight()  # credentials, bucket, Vertex AI API and role, without starting anything billable
    assert backend.status("starchart_smoke_20000101000000", None).state == "FAILED"  # listed by name: none
    assert backend.current_default("starchart_smoke_no_such_model") is None
    probe = backend.storage.join(backend.bucket, "starchart-smoke", "probe.json")
    backend.storage.write_bytes(probe, b"{}")
    assert backend.storage.read_bytes(probe) == b"{}"


# ---------------------------------------------------------------- endpoints (optional per model, off by default)


ENDPOINT = {"enabled": True, "machine_type": "n1-standard-2", "min_replicas": 1, "max_replicas": 1}
V1, V2, V3 = "v20261127000001", "v20261127000002", "v20261127000003"


def endpoint_calls(fake: VertexFake) -> list[Any]:
    return [r for r in fake.requests if "/endpoints" in r.path]


def serving(fake: VertexFake, model: str = "iris") -> list[tuple[str, int]]:
    """(model@version id, traffic %) of every deployment on the model's endpoint."""
    return sorted((version, traffic) for version, _, traffic in fake.deployments(model))


def versions_of(backend: VertexBackend, *names: str) -> list[str]:
    return [backend.register_version("iris", version_view(n, n[1:]), first=i == 0) for i, n in enumerate(names)]


@pytest.mark.parametrize("endpoints", [None, {"iris": {"enabled": False, "machine_type": "n1-standard-2"}},
                                       {"iris": None, "other": ENDPOINT}, lambda model: None])
def test_endpoints_are_off_by_default_and_cost_no_call(fake: VertexFake, endpoints: Any) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints=endpoints)
    assert backend.endpoints.settings("iris") is None
    refs = versions_of(backend, V1, V2)
    backend.set_default("iris", V2, refs[1])
    assert backend.current_default("iris") == V2
    assert endpoint_calls(fake) == [] and fake.endpoints == {}, "no endpoint was looked up, created or deployed"


def test_endpoint_settings_are_checked_when_the_backend_is_made(fake: VertexFake) -> None:
    from model_registry.adapters.backends.vertex import EndpointSettings, endpoint_settings

    assert endpoint_settings("iris", None) is None and endpoint_settings("iris", {"machine_type": "n1-standard-4"}) \
        is None, "a mapping without enabled: true deploys nothing"
    assert endpoint_settings("iris", True) == EndpointSettings("n1-standard-2", 1, 1, None)
    assert endpoint_settings("iris", {"enabled": True, "min_replicas": 2, "accelerator": "nvidia-tesla-t4"}) == \
        EndpointSettings("n1-standard-2", 2, 2, "NVIDIA_TESLA_T4:1")
    for raw, words in [({"enabled": True, "replicas": 2}, "unknown key(s) ['replicas'] in models.iris.endpoint"),
                       ({"enabled": "yes"}, "enabled must be true or false"),
                       ({"enabled": True, "min_replicas": 2, "max_replicas": 1}, "need 1 <= min_replicas"),
                       ({"enabled": True, "min_replicas": 0}, "need 1 <= min_replicas"),
                       ({"enabled": True, "machine_type": "big one"}, "is not a machine type"),
                       ("on", "must be a mapping")]:
        with pytest.raises(InvalidInput) as err:
            fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": raw})
        assert words in err.value.message
    settings = _settings(GCP_PROJECT_ID="starchart-test", VERTEX_API_ENDPOINT=fake.url)
    b = VertexBackend.from_settings(settings, endpoints={"iris": ENDPOINT})
    assert b.endpoints.settings("iris") == EndpointSettings() and b.endpoints.settings("other") is None
    assert b.apply_timeout("iris") > 4 * b.api.operation_timeout > b.apply_timeout("other"), "deploys take minutes"
    lazy = VertexBackend.from_settings(settings, endpoints=lambda m: {"enabled": True, "bogus": 1})
    with pytest.raises(InvalidInput, match="bogus"):  # a callable is read (and checked) at each apply
        lazy.set_default("iris", V1, None)


def test_a_bad_endpoint_block_is_refused_when_the_configuration_loads(tmp_path: Path, fake: VertexFake) -> None:
    from model_registry.adapters.backends.vertex import EndpointSettings
    from model_registry.config import ProjectConfig

    path = tmp_path / "starchart.yaml"
    for block, words, hint in [("{enabled: true, min_replicas: 0}", "models.iris.endpoint: need 1 <= min_replicas",
                                "bill"),
                               ("{enabled: true, accelerator: tesla-t5}", "unknown accelerator 'tesla-t5'", "TYPE:COUNT"),
                               ("{enabled: 'yes'}", "models.iris.endpoint.enabled must be true or false", "enabled: true"),
                               ("{enabled: true, replica: 2}", "unknown key(s) ['replica']", "known keys")]:
        path.write_text(f"models:\n  iris:\n    endpoint: {block}\n")
        with pytest.raises(InvalidInput) as err:
            ProjectConfig.load(path)
        assert words in err.value.message and hint in err.value.hint, (block, err.value)
    path.write_text("models:\n  iris:\n    endpoint: {enabled: true, machine_type: n1-standard-4}\n  other: {}\n")
    config = ProjectConfig.load(path)
    assert config.policy("iris").endpoint == EndpointSettings("n1-standard-4", 1, 1, None)
    assert config.policy("other").endpoint is None
    backend = fast_backend(fake, "gs://starchart-test-ml",
                           endpoints={m: config.policy(m).endpoint for m in config.models})
    assert backend.endpoints.settings("iris") == EndpointSettings("n1-standard-4", 1, 1, None)


def test_first_apply_creates_the_endpoint_and_deploys_with_all_the_traffic(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    [ref] = versions_of(backend, V1)
    fake.reset_requests()
    backend.set_default("iris", V1, ref)
    [endpoint] = fake.endpoints_of("iris")
    assert endpoint["displayName"] == "iris" and endpoint["labels"] == {"model": "iris"}
    assert serving(fake) == [("iris@1", 100)]
    check_golden("create_endpoint", fake.calls("endpoints.create")[0])
    [deploy] = fake.calls("endpoints.deployModel")
    check_golden("deploy_model_first", deploy)
    assert deploy.body["trafficSplit"] == {"0": 100}, "the endpoint served nothing: the new deployment takes all"
    assert deploy.body["deployedModel"]["model"] == ref == "projects/123456789012/locations/us-central1/models/iris@1"
    assert fake.count("endpoints.patch") == 0 and fake.count("endpoints.undeployModel") == 0
    assert fake.count("operations.get") == 2, "the create and deploy operations were awaited"
    assert backend.current_default("iris") == V1

    fake.reset_requests()
    backend.set_default("iris", V1, None)  # again (e.g. a reconcile): nothing to deploy, found by its alias
    assert fake.count("endpoints.deployModel") == 0 and fake.count("endpoints.create") == 0
    assert serving(fake) == [("iris@1", 100)]


def test_predictions_go_to_the_endpoint_that_serves_the_default(fake: VertexFake) -> None:
    """PredictionService over REST: the instances reach the endpoint as Vertex AI's wire format has them, and
    the deployment that answered is named by its version."""
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    refs = versions_of(backend, V1, V2)
    flower = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    with pytest.raises(NotFound, match="no endpoint serves iris yet"):
        backend.predict("iris", None, {"instances": [flower]})
    backend.set_default("iris", V1, refs[0])
    fake.reset_requests()
    version, answer = backend.predict("iris", None, {"instances": [flower, {**flower, "petal_width": 2}]})
    [call] = fake.calls("endpoints.predict")
    assert call.body == {"instances": [flower, {**flower, "petal_width": 2}]}
    [(_, deployed_id, _)] = fake.deployments("iris")
    assert version == V1 and answer["predictions"][1] == {"deployedModelId": deployed_id,
                                                           "instance": {**flower, "petal_width": 2}}
    assert backend.predict("iris", V1, {"instances": [flower]})[0] == V1
    with pytest.raises(Refused, match=f"serves {V1}, not {V2}"):
        backend.predict("iris", V2, {"instances": [flower]})
    with pytest.raises(InvalidInput, match="columnar"):
        backend.predict("iris", None, {"inputs": {"sepal_length": [1.0]}})
    fake.fail_next("endpoints.predict", 400, message="Expected a float for sepal_length.")
    with pytest.raises(InvalidInput, match="Expected a float"):
        backend.predict("iris", None, {"instances": [flower]})
    fake.fail_next("endpoints.predict", 503, times=2)  # retried like every other call
    assert backend.predict("iris", None, {"instances": [flower]})[0] == V1
    off = fast_backend(fake, "gs://starchart-test-ml")
    with pytest.raises(Refused, match="not served from a Vertex AI endpoint") as refused:
        off.predict("iris", None, {"instances": [flower]})
    assert "enabled: true" in refused.value.hint and "pull iris" in refused.value.hint


def test_next_apply_deploys_moves_the_traffic_then_undeploys_the_old_one(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    refs = versions_of(backend, V1, V2, V3)
    backend.set_default("iris", V1, refs[0])
    [(_, old_id, _)] = fake.deployments("iris")
    fake.reset_requests()
    backend.set_default("iris", V2, refs[1])
    assert serving(fake) == [("iris@2", 100)], "exactly one deployment: the new default, with all the traffic"
    assert fake.versions("iris")["2"] == ["default", V2]
    [deploy] = fake.calls("endpoints.deployModel")
    check_golden("deploy_model_next", deploy)
    assert deploy.body["trafficSplit"] == {old_id: 100, "0": 0}, "deployed without taking traffic"
    [patch] = fake.calls("endpoints.patch")
    check_golden("update_endpoint_traffic", patch)
    [undeploy] = fake.calls("endpoints.undeployModel")
    check_golden("undeploy_model", undeploy)
    assert undeploy.body == {"deployedModelId": old_id}
    order = [r.route for r in fake.requests if r.route != "operations.get"]
    assert order.index("endpoints.deployModel") < order.index("endpoints.patch") \
        < order.index("models.mergeVersionAliases") < order.index("endpoints.undeployModel")

    backend.set_default("iris", V3, None)  # no reference kept: the version is found by its alias
    assert serving(fake) == [("iris@3", 100)] and backend.current_default("iris") == V3
    assert len(fake.endpoints) == 1, "one endpoint per model, found again by its label"


def test_a_deploy_that_outlives_its_wait_is_used_by_the_retry(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT}, operation_timeout=0.05)
    refs = versions_of(backend, V1, V2)
    backend.set_default("iris", V1, refs[0])
    fake.operation_polls = 10**6
    with pytest.raises(BackendError, match="took longer than 0s to deploy iris v20261127000002 to endpoint"):
        backend.set_default("iris", V2, refs[1])
    assert fake.finish_operations() == 1  # Vertex AI finishes it later: with no traffic, so nothing moved
    fake.operation_polls = 1
    assert serving(fake) == [("iris@1", 100), ("iris@2", 0)] and backend.current_default("iris") == V1
    fake.reset_requests()
    backend.set_default("iris", V2, refs[1])
    assert fake.count("endpoints.deployModel") == 0, "the late deployment was used, not deployed again"
    assert serving(fake) == [("iris@2", 100)] and backend.current_default("iris") == V2


def test_a_failed_alias_move_puts_the_traffic_back_and_undeploys_the_new_one(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    refs = versions_of(backend, V1, V2)
    backend.set_default("iris", V1, refs[0])
    before = fake.deployments("iris")
    fake.fail_next("models.mergeVersionAliases", 403, message="Permission 'aiplatform.models.update' denied.")
    with pytest.raises(VertexPermissionDenied, match="could not make v20261127000002 the default of iris"):
        backend.set_default("iris", V2, refs[1])
    assert fake.deployments("iris") == before, "traffic back on the old deployment, the new one undeployed"
    assert backend.current_default("iris") == V1 and fake.count("endpoints.patch") == 2
    backend.set_default("iris", V2, refs[1])
    assert serving(fake) == [("iris@2", 100)] and backend.current_default("iris") == V2


@pytest.mark.parametrize("endpoints", [None, {"iris": ENDPOINT}])
def test_an_alias_move_whose_replies_were_all_lost_is_read_back_as_done(fake: VertexFake, endpoints: Any) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints=endpoints, retry_deadline=0.2)
    refs = versions_of(backend, V1, V2)
    backend.set_default("iris", V1, refs[0])
    fake.fail_next("models.mergeVersionAliases", 503, times=1000, after=True)  # made each time, never answered
    backend.set_default("iris", V2, refs[1])
    assert backend.current_default("iris") == V2 and fake.count("models.mergeVersionAliases") > 1
    if endpoints:
        assert serving(fake) == [("iris@2", 100)], "committed: the switch was not undone"
    fake.clear_faults()
    fake.fail_next("models.mergeVersionAliases", 503, times=1000)  # refused each time: an error still
    with pytest.raises(VertexUnavailable):
        backend.set_default("iris", V1, refs[0])
    assert backend.current_default("iris") == V2
    if endpoints:
        assert serving(fake) == [("iris@2", 100)], "the new deployment was undone, the traffic put back"


def test_a_failed_undeploy_of_the_old_one_does_not_fail_the_promotion(fake: VertexFake,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    refs = versions_of(backend, V1, V2, V3)
    backend.set_default("iris", V1, refs[0])
    fake.fail_next_operation("Internal error while undeploying.", code=13, route="endpoints.undeployModel")
    backend.set_default("iris", V2, refs[1])  # committed when the alias moved; the clean-up is logged
    assert backend.current_default("iris") == V2 and serving(fake) == [("iris@1", 0), ("iris@2", 100)]
    assert "billed until the next promotion of iris removes it" in caplog.text
    backend.set_default("iris", V3, refs[2])
    assert serving(fake) == [("iris@3", 100)], "the next promotion removed the leftover too"


def test_lost_replies_on_endpoint_create_and_deploy_make_one_of_each(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    [ref] = versions_of(backend, V1)
    fake.fail_next("endpoints.create", 503, after=True)
    fake.fail_next("endpoints.deployModel", 503, after=True)
    fake.fail_next("endpoints.list", 429, reason="RATE_LIMIT_EXCEEDED")
    backend.set_default("iris", V1, ref)
    assert len(fake.endpoints) == 1 and serving(fake) == [("iris@1", 100)]
    assert fake.count("endpoints.create") == 1, "the retry found the endpoint the first attempt made"


def test_the_fake_keeps_vertex_endpoint_rules(fake: VertexFake) -> None:
    from google.api_core import exceptions as gexc
    from google.cloud import aiplatform_v1 as aip
    from google.protobuf import field_mask_pb2

    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    refs = versions_of(backend, V1, V2)
    backend.set_default("iris", V1, refs[0])
    client, endpoint = backend.api.endpoints(), backend.endpoints.find("iris")
    [(_, old_id, _)] = fake.deployments("iris")
    resources = aip.DedicatedResources(machine_spec=aip.MachineSpec(machine_type="n1-standard-2"),
                                       min_replica_count=1, max_replica_count=1)

    def deploy(split: dict[str, int], model: str = refs[1], res: Any = resources) -> Any:
        return client.deploy_model(endpoint=endpoint.name, traffic_split=split, deployed_model=aip.DeployedModel(
            model=model, dedicated_resources=res)).result(timeout=5)

    with pytest.raises(gexc.BadRequest, match="must add up to 100, not 90"):
        deploy({old_id: 40, "0": 50})
    with pytest.raises(gexc.BadRequest, match="refers to DeployedModel '42'"):
        deploy({"42": 100})
    with pytest.raises(gexc.NotFound, match="iris@7 does not exist"):
        deploy({}, model=refs[1].replace("@2", "@7"))
    with pytest.raises(gexc.BadRequest, match="min_replica_count must be at least 1"):
        deploy({}, res=aip.DedicatedResources(machine_spec=aip.MachineSpec(machine_type="n1-standard-2")))
    fake.fail_next_operation("Machine type n1-standard-2 is not available.", code=9, route="endpoints.deployModel")
    with pytest.raises(gexc.GoogleAPICallError, match="not available"):
        deploy({"0": 100, old_id: 0})
    assert fake.deployments("iris") == [("iris@1", old_id, 100)], "refused and failed deploys changed nothing"
    new_id = deploy({}).deployed_model.id  # an empty split leaves the endpoint's alone
    assert serving(fake) == [("iris@1", 100), ("iris@2", 0)]
    with pytest.raises(gexc.BadRequest, match=f"{old_id} has 100% of the traffic"):
        client.undeploy_model(endpoint=endpoint.name, deployed_model_id=old_id)
    with pytest.raises(gexc.BadRequest, match="update_mask is required"):
        client.update_endpoint(endpoint=aip.Endpoint(name=endpoint.name, traffic_split={new_id: 100}))
    with pytest.raises(gexc.NotFound, match="'7' is not deployed"):
        client.undeploy_model(endpoint=endpoint.name, deployed_model_id="7")
    client.update_endpoint(endpoint=aip.Endpoint(name=endpoint.name, traffic_split={new_id: 60, old_id: 40}),
                           update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]))
    client.undeploy_model(endpoint=endpoint.name, deployed_model_id=old_id,
                          traffic_split={new_id: 100}).result(timeout=5)  # takes the traffic away as it goes
    assert serving(fake) == [("iris@2", 100)]
    client.undeploy_model(endpoint=endpoint.name, deployed_model_id=new_id).result(timeout=5)  # the last one
    assert client.get_endpoint(name=endpoint.name).traffic_split == {} and fake.deployments("iris") == []
    found = client.list_endpoints(request=aip.ListEndpointsRequest(parent=backend.api.parent(),
                                                                   filter='displayName="iris"'))
    assert [e.name for e in found] == [endpoint.name]


def test_a_failed_deploy_leaves_the_request_failed_and_nothing_moved_then_retry_succeeds(
        make_registry: Any, sqlite_url: str, fake: VertexFake, bucket: str, gcs: str, trained: dict) -> None:
    fake.runner = replay_runner(gcs)
    backend = fast_backend(fake, bucket, endpoints={"iris": ENDPOINT}, retry_deadline=0.2)
    reg = make_registry(sqlite_url, backend=backend, env=vertex_env(bucket))
    for source in (trained["iris_a"], trained["iris_b"]):
        job = reg.jobs.train("iris", "U_TRAINER", args=replay_args(source))
        assert reg.jobs.wait(job["job_id"], timeout=20)["state"] == "SUCCEEDED"
    exposed = reg.versions.expose("iris", "U_TRAINER")
    assert len(exposed["exposed"]) == 2 and not exposed["errors"], exposed
    base, cand = sorted(v["name"] for v in exposed["exposed"])
    before = fake.deployments("iris")
    assert serving(fake) == [("iris@1", 100)], "the first default was deployed when it was initialised"

    req = reg.promotions.promote("iris", cand, "U_REQ")
    reg.promotions.decide(req["id"], "U_OK", True)
    failures = [
        (lambda: fake.fail_next("endpoints.deployModel", 503, times=1000), "Vertex AI is unavailable after retrying"),
        (lambda: fake.fail_next("endpoints.deployModel", 403, message="Permission 'aiplatform.endpoints.deploy' "
                                "denied on resource."), "permission denied in project starchart-test"),
        (lambda: fake.fail_next_operation("Deploying the model failed: the serving container did not start.",
                                          route="endpoints.deployModel"),
         "Vertex AI could not deploy iris " + cand),
    ]
    for attempt, (inject, words) in enumerate(failures):
        fake.clear_faults()
        inject()
        result = (reg.promotions.apply_request(req["id"], actor="U_OK") if attempt == 0 else reg.promotions.retry(req["id"], "U_OK"))
        assert result["state"] == "failed", result
        assert words in result["error"] and f"deploy iris {cand} to endpoint" in result["error"], result["error"]
        assert reg.versions.default("iris") == base and backend.current_default("iris") == base
        assert fake.deployments("iris") == before, "deployments and traffic unchanged"
    fake.clear_faults()
    actions = [e["action"] for e in reg.audit.events(model="iris", limit=100)]
    assert actions.count("promotion.failed") == 3 and "promotion.applied" not in actions

    applied = reg.promotions.retry(req["id"], "U_OK")
    assert applied["state"] == "applied" and reg.versions.default("iris") == cand
    assert backend.current_default("iris") == cand and serving(fake) == [("iris@2", 100)]
