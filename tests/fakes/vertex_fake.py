"""A local Vertex AI: the v1 REST wire format the GAPIC REST transport speaks, with Vertex AI's rules.

    with VertexFake() as fake:          # http://127.0.0.1:<port>; set VERTEX_API_ENDPOINT to fake.url
        fake.fail_next("customJobs.create", 503, times=2)
        hold = fake.hold_next("models.mergeVersionAliases", after=True)  # made, then its reply lost
        ...
        ...
        fake.set_job_state(job_name, "JOB_STATE_SUCCEEDED")
        assert fake.count("customJobs.list") == 5

Wire format (read from google/cloud/aiplatform_v1/services/*/transports/rest*.py): JSON with camelCase
field names; the client sends enums as numbers and asks for `$alt=json;enum-encoding=int`, so enums
are answered as numbers when asked. Request bodies are parsed strictly against the v1 protos (an
unknown field is a 400, as on Vertex AI). Resource names come back with the project *number*.

Rules kept: CustomJob validation (display name, pool 0 has one replica, machine types, labels),
list filters (`labels.KEY="v"`, `display_name="v"`, `state=...`, joined by AND) with page tokens;
model versions numbered per model from 1; aliases unique per model (setting one moves it);
`default` is on the first version, moves, and can never be removed; uploads are long-running
operations that finish after `operation_polls` GETs.

Endpoints: created with a long-running operation (the endpoint exists at once, the operation is
done after `operation_polls` GETs); listed with the same filters as jobs (`displayName` too).
deployModel and undeployModel are long-running operations whose change lands when they finish (a
failed one changes nothing). Each DeployedModel gets a numeric id; `trafficSplit` maps ids to
percentages that add up to 100, "0" meaning the model being deployed; an empty split on deploy
leaves the endpoint's split alone. A model can be undeployed only when it has no traffic, when the
request's `trafficSplit` takes its traffic away, or when it is the last one (the split is then
emptied). PATCH (UpdateEndpoint) needs an updateMask and changes traffic at once.

Routes: customJobs.create/get/list/cancel, models.upload/get/listVersions/mergeVersionAliases,
endpoints.create/get/list/patch/deployModel/undeployModel/predict, operations.get, entries.list (Cloud
Logging), timeSeries.list (Cloud Monitoring).

endpoints.predict spreads the requests over the deployments by the traffic split, exactly over every 100
requests (smooth weighted round robin; Vertex AI draws at random) and, having no model to run, answers each
instance with {"deployedModelId": ID, "instance": INSTANCE}, so tests see which deployment answered and
that the instances crossed the wire intact; an endpoint that serves nothing answers FAILED_PRECONDITION.
`answer_as(version, latency_ms=, error=)` sets how a deployment answers (its latency, or an error).

Cloud Monitoring: timeSeries.list (v3) answers Vertex AI's prediction_count, error_count and
prediction_latencies per deployed model, built from every predict a deployment answered (`served`); see
monitoring_fake.py for the filters and aggregations it takes.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, unquote, urlsplit

from google.cloud import aiplatform_v1 as aip
from google.longrunning import operations_pb2
from google.protobuf import json_format

from .gcs_emulator import storage_client
from .monitoring_fake import LATENCY_BUCKETS, time_series_list

STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                409: "ALREADY_EXISTS", 412: "FAILED_PRECONDITION", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL",
                503: "UNAVAILABLE"}
DEFAULT_MESSAGES = {
    403: "Permission 'aiplatform.customJobs.create' denied on resource (or it may not exist).",
    404: "The requested resource was not found.",
    429: "Quota exceeded for aiplatform.googleapis.com/online_prediction_requests_per_base_model per minute.",
    503: "The service is currently unavailable.",
    500: "Internal error encountered.",
}
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED", "JOB_STATE_EXPIRED",
            "JOB_STATE_PARTIALLY_SUCCEEDED"}
LABEL_KEY = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
LABEL_VALUE = re.compile(r"^[a-z0-9_-]{0,63}$")
MODEL_ID = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
ALIAS = re.compile(r"^[a-z][a-zA-Z0-9-]{0,126}[a-z0-9]$")
MACHINE_TYPE = re.compile(r"^[a-z][a-z0-9]*-[a-z0-9-]+$")
MAX_PAGE = 100

_P = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(_P + r"/customJobs$"), "customJobs.create"),
    ("GET", re.compile(_P + r"/customJobs$"), "customJobs.list"),
    ("GET", re.compile(_P + r"/customJobs/(?P<job>[^/:]+)$"), "customJobs.get"),
    ("POST", re.compile(_P + r"/customJobs/(?P<job>[^/:]+):cancel$"), "customJobs.cancel"),
    ("POST", re.compile(_P + r"/models:upload$"), "models.upload"),
    ("GET", re.compile(_P + r"/models/(?P<model>[^/:]+)$"), "models.get"),
    ("GET", re.compile(_P + r"/models/(?P<model>[^/:]+):listVersions$"), "models.listVersions"),
    ("POST", re.compile(_P + r"/models/(?P<model>[^/:]+):mergeVersionAliases$"), "models.mergeVersionAliases"),
    ("POST", re.compile(_P + r"/endpoints$"), "endpoints.create"),
    ("GET", re.compile(_P + r"/endpoints$"), "endpoints.list"),
    ("GET", re.compile(_P + r"/endpoints/(?P<endpoint>[^/:]+)$"), "endpoints.get"),
    ("PATCH", re.compile(_P + r"/endpoints/(?P<endpoint>[^/:]+)$"), "endpoints.patch"),
    ("POST", re.compile(_P + r"/endpoints/(?P<endpoint>[^/:]+):deployModel$"), "endpoints.deployModel"),
    ("POST", re.compile(_P + r"/endpoints/(?P<endpoint>[^/:]+):undeployModel$"), "endpoints.undeployModel"),
    ("POST", re.compile(_P + r"/endpoints/(?P<endpoint>[^/:]+):predict$"), "endpoints.predict"),
    ("GET", re.compile(r"/(?:v1|ui)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
                       r"(?:/(?P<kind>models|endpoints)/(?P<parent>[^/]+))?/operations/(?P<op>[^/:]+)$"),
     "operations.get"),
    # Cloud Logging's v2 API (logging.googleapis.com), where Vertex AI writes a custom job's replica output
    ("POST", re.compile(r"/v2/entries:list$"), "entries.list"),
    # Cloud Monitoring's v3 API (monitoring.googleapis.com), where Vertex AI publishes what each deployment served
    ("GET", re.compile(r"/v3/projects/(?P<project>[^/]+)/timeSeries$"), "timeSeries.list"),
]
OPERATION_ROUTES = ("models.upload", "endpoints.create", "endpoints.deployModel", "endpoints.undeployModel")
OPERATION_CODES = {400: 3, 403: 7, 404: 5, 409: 6, 412: 9, 429: 8, 500: 13, 503: 14}
_MD = "type.googleapis.com/google.cloud.aiplatform.v1."


class ApiError(Exception):
    def __init__(self, code: int, message: str, reason: str | None = None, status: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason
        self.status = status or STATUS_NAMES.get(code, "UNKNOWN")  # e.g. FAILED_PRECONDITION is a 400 too

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message, "status": self.status}
        if self.reason:
            err["details"] = [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": self.reason,
                               "domain": "aiplatform.googleapis.com", "metadata": {"service": "aiplatform.googleapis.com"}}]
        return {"error": err}


@dataclass(frozen=True)
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    body: Any
    route: str


@dataclass
class Fault:
    status: int
    message: str
    reason: str | None = None
    after: bool = False  # apply the request first, then answer with the error (a lost reply)


@dataclass
class Hold:
    """A call kept waiting (after its change is made, when `after`) until `release()`; then its connection is
    closed with no answer: the reply is lost, as when the client's process dies or the network drops it."""

    after: bool
    arrived: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    def release(self) -> None:
        self.released.set()


@dataclass(frozen=True)
class Answer:
    """How a deployed model answers predict: the latency Monitoring reports, or an error (status, message)."""

    latency_ms: float = 10.0
    error: tuple[int, str] | None = None


@dataclass(frozen=True)
class Served:
    """One predict a deployed model answered (or failed), as Vertex AI counts it for Cloud Monitoring."""

    endpoint_id: str
    deployed_model_id: str
    at: datetime
    latency_ms: float
    error: bool


@dataclass
class _Model:
    model_id: str
    location: str
    create_time: str
    versions: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> version id
    next_version: int = 1


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _pb_dict(cls: Any, data: Any, what: str) -> dict[str, Any]:
    """Parse a JSON body strictly against a v1 message (unknown names are a 400); return it with enum names."""
    pb = cls.meta.pb() if hasattr(cls, "meta") else cls()
    try:
        json_format.ParseDict(data if data is not None else {}, pb, ignore_unknown_fields=False)
    except json_format.ParseError as exc:
        raise ApiError(400, f"Invalid JSON payload received for {what}. {exc}") from exc
    return json_format.MessageToDict(pb)


def _wire(cls: Any, data: dict[str, Any], ints: bool) -> dict[str, Any]:
    """A response as Vertex AI sends it: through the proto (so only real fields), enums as asked."""
    pb = cls.meta.pb() if hasattr(cls, "meta") else cls()
    json_format.ParseDict(data, pb)
    return json_format.MessageToDict(pb, use_integers_for_enums=ints)


def _check_labels(labels: dict[str, str], where: str) -> None:
    if len(labels) > 64:
        raise ApiError(400, f"{where}: at most 64 labels are allowed.")
    for key, value in labels.items():
        if not LABEL_KEY.match(key) or not LABEL_VALUE.match(value):
            raise ApiError(400, f"{where}: label {key!r}={value!r} is invalid: keys and values may contain only "
                                "lowercase letters, numeric characters, underscores and dashes (at most 63 "
                                "characters), and keys must start with a letter.")


def _page(items: list[Any], query: dict[str, str]) -> tuple[list[Any], str | None]:
    try:
        size = int(query.get("pageSize") or MAX_PAGE)
        offset = int(base64.urlsafe_b64decode(query["pageToken"]).decode()) if query.get("pageToken") else 0
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "Invalid page token or page size.") from exc
    size = max(1, min(size, MAX_PAGE))
    end = offset + size
    token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else None
    return items[offset:end], token


def _job_filter(text: str) -> Callable[[dict[str, Any]], bool]:
    terms = [t for t in re.split(r"\s+AND\s+", text.strip()) if t] if text.strip() else []
    checks: list[Callable[[dict[str, Any]], bool]] = []
    for term in terms:
        m = re.fullmatch(r'(labels\.[a-z][a-z0-9_-]*|display_name|displayName|state)\s*=\s*("([^"]*)"|(\S+))',
                         term.strip())
        if not m:
            raise ApiError(400, f"Unsupported filter: {term!r}. Filters support display_name, state and labels.")
        key, value = m.group(1), m.group(3) if m.group(3) is not None else m.group(4)
        if key in ("display_name", "displayName"):
            checks.append(lambda j, v=value: j.get("displayName") == v)
        elif key == "state":
            checks.append(lambda j, v=value: j.get("state") == v)
        else:
            label = key.removeprefix("labels.")
            checks.append(lambda j, k=label, v=value: j.get("labels", {}).get(k) == v)
    return lambda job: all(check(job) for check in checks)


class VertexFake:
    """The server and its state; every request is recorded in `requests`."""

    def __init__(self, project: str = "starchart-test", project_number: str = "123456789012",
                 operation_polls: int = 1) -> None:
        self.project, self.project_number = project, project_number
        self.operation_polls = operation_polls
        self.jobs: dict[str, dict[str, Any]] = {}
        self.models: dict[tuple[str, str], _Model] = {}
        self.operations: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}  # name -> Endpoint (wire format)
        self.requests: list[Recorded] = []
        self.runner: Callable[[dict[str, Any]], str | None] | None = None
        self.log_entries: list[dict[str, Any]] = []  # Cloud Logging entries (LogEntry, wire format)
        self.served: list[Served] = []  # every predict a deployment answered: Monitoring's time series
        self.latency_buckets: dict[str, Any] = dict(LATENCY_BUCKETS)  # Distribution.BucketOptions (wire format)
        self._answers: dict[str, Answer] = {}  # deployed model id or display name -> how it answers
        self._rotation: dict[str, dict[str, int]] = {}  # endpoint -> smooth weighted round robin's weights
        self._faults: dict[str, list[Fault]] = {}
        self._operation_faults: dict[str, list[dict[str, Any]]] = {}
        self._holds: dict[str, list[Hold]] = {}  # per route, the holds not yet reached
        self._all_holds: list[Hold] = []  # released when the fake stops, so no handler thread is left waiting
        self._ids = itertools.count(1000)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "VertexFake":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._handle(self)

            def do_POST(self) -> None:
                fake._handle(self)

            def do_PATCH(self) -> None:
                fake._handle(self)

            def log_message(self, *args: Any) -> None:
                """Quiet: the fake records requests itself (`fake.requests`)."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="vertex-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            for hold in self._all_holds:
                hold.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "VertexFake":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # ---------------------------------------------------------------- test controls

    def fail_next(self, route: str, status: int, times: int = 1, *, message: str | None = None,
                  reason: str | None = None, after: bool = False) -> None:
        """The next `times` calls of `route` answer `status` (after applying the request when `after`)."""
        if route not in {r for _, _, r in ROUTES}:
            raise ValueError(f"unknown route {route}")
        with self._lock:
            self._faults.setdefault(route, []).extend(
                Fault(status, message or DEFAULT_MESSAGES.get(status, "injected error"), reason, after)
                for _ in range(times))

    def fail_next_operation(self, message: str = "Model artifact validation failed.", code: int = 3,
                            route: str = "models.upload") -> None:
        """The long-running operation of the next `route` call ends with this error (and changes nothing)."""
        if route not in OPERATION_ROUTES:
            raise ValueError(f"{route} starts no long-running operation; use one of {', '.join(OPERATION_ROUTES)}")
        with self._lock:
            self._operation_faults.setdefault(route, []).append({"code": code, "message": message})

    def hold_next(self, route: str, *, after: bool) -> Hold:
        """Keep the next call of `route` waiting until the returned hold is released, then drop its connection
        unanswered; `after`: make the call's change first (the change is made, its reply lost), else never."""
        if route not in {r for _, _, r in ROUTES}:
            raise ValueError(f"unknown route {route}")
        hold = Hold(after)
        with self._lock:
            self._holds.setdefault(route, []).append(hold)
            self._all_holds.append(hold)
        return hold

    def answer_as(self, deployment: str, *, latency_ms: float = 10.0, error: tuple[int, str] | None = None) -> None:
        """How a deployed model (by id, or by display name: the version) answers predict from now on: the latency
        Monitoring reports for it, and an error (status, message) instead of predictions."""
        with self._lock:
            self._answers[deployment] = Answer(latency_ms, error)

    def clear_faults(self) -> None:
        """Forget the injected errors not yet used."""
        with self._lock:
            self._faults.clear()
            self._operation_faults.clear()

    def finish_operations(self) -> int:
        """Finish every pending long-running operation now (as Vertex AI would, later); how many there were."""
        with self._lock:
            pending = [op for op in self.operations.values() if not op["done"]]
            for op in pending:
                self._finish(op)
            return len(pending)

    def set_job_state(self, job: str, state: str, error: str | None = None) -> None:
        """Drive a job (by resource name, id or display name) to `state` (a JobState name)."""
        with self._lock:
            data = self._job_by_any(job)
            self._transition(data, state, error)

    def add_jobs(self, count: int, model: str, location: str = "us-central1",
                 state: str = "JOB_STATE_SUCCEEDED") -> list[str]:
        """Seed jobs directly (no requests recorded), e.g. to list many of them."""
        names = []
        with self._lock:
            for _ in range(count):
                job_id = f"{model}_seed{next(self._ids)}"
                data = {"displayName": job_id, "labels": {"model": model}, "jobSpec": {"workerPoolSpecs": [
                    {"machineSpec": {"machineType": "n1-standard-4"}, "replicaCount": "1"}]}}
                names.append(self._create_job(location, data, state)["name"])
        return names

    def count(self, route: str | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if route is None or r.route == route)

    def calls(self, route: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.route == route]

    def reset_requests(self) -> None:
        with self._lock:
            self.requests.clear()

    def versions(self, model: str, location: str = "us-central1") -> dict[str, list[str]]:
        """{version id: aliases} of a model, for assertions."""
        with self._lock:
            m = self.models[(location, model)]
            return {vid: self._aliases_of(m, vid) for vid in m.versions}

    def version_names(self, model: str, location: str = "us-central1") -> list[str]:
        """The version names (v<TS> aliases) of a model's versions in version-id order; [] for no such model."""
        with self._lock:
            m = self.models.get((location, model))
            if m is None:
                return []
            return [next((a for a in self._aliases_of(m, vid) if a != "default"), "")
                    for vid in sorted(m.versions, key=int)]

    def endpoints_of(self, model: str) -> list[dict[str, Any]]:
        """The endpoints labelled model=<model>, for assertions."""
        with self._lock:
            return [e for e in self.endpoints.values() if e.get("labels", {}).get("model") == model]

    def deployments(self, model: str) -> list[tuple[str, str, int]]:
        """(model id@version id, deployed model id, traffic %) on the endpoint(s) of a model, for assertions."""
        with self._lock:
            return [(f"{d['model'].rsplit('/', 1)[1]}@{d['modelVersionId']}", d["id"],
                     e.get("trafficSplit", {}).get(d["id"], 0))
                    for e in self.endpoints_of(model) for d in e.get("deployedModels", [])]

    # ---------------------------------------------------------------- HTTP plumbing

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        split = urlsplit(h.path)
        path = unquote(split.path)
        # a repeated key (Monitoring's aggregation.groupByFields) is kept whole, comma-joined
        query = {k: ",".join(v) if k.endswith("groupByFields") else v[-1] for k, v in parse_qs(split.query).items()}
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        route, params = "unknown", {}
        for method, pattern, name in ROUTES:
            m = pattern.match(path)
            if m and method == h.command:
                route, params = name, m.groupdict()
                break
        with self._lock:
            self.requests.append(Recorded(h.command, path, query, body, route))
            fault = self._faults.get(route, []).pop(0) if self._faults.get(route) else None
            hold = self._holds.get(route, []).pop(0) if self._holds.get(route) else None
        ints = "enum-encoding=int" in query.get("$alt", "")
        if hold is not None:
            self._hold(h, hold, route, params, query, body, ints)
            return
        try:
            if route == "unknown":
                raise ApiError(404, f"The URL {h.command} {path} is not a Vertex AI v1 method this fake knows.")
            if fault is not None and not fault.after:
                raise ApiError(fault.status, fault.message, fault.reason)
            if "project" in params:
                self._check_project(params["project"])
            with self._lock:
                status, answer = 200, getattr(self, "_" + route.replace(".", "_"))(params, query, body, ints)
            if fault is not None:
                raise ApiError(fault.status, fault.message, fault.reason)
        except ApiError as exc:
            status, answer = exc.code, exc.body()
        data = json.dumps(answer).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json; charset=UTF-8")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def _hold(self, h: BaseHTTPRequestHandler, hold: Hold, route: str, params: dict[str, str], query: dict[str, str],
              body: Any, ints: bool) -> None:
        if hold.after:
            self._check_project(params["project"])
            with self._lock:
                getattr(self, "_" + route.replace(".", "_"))(params, query, body, ints)
        hold.arrived.set()
        hold.released.wait()
        h.close_connection = True  # no status line, no body: the client never hears how its call ended

    def _check_project(self, project: str) -> None:
        if project not in (self.project, self.project_number):
            raise ApiError(403, f"Permission denied on resource project {project}.", "CONSUMER_INVALID")

    def _loc(self, location: str) -> str:
        return f"projects/{self.project_number}/locations/{location}"

    # ---------------------------------------------------------------- custom jobs

    def _customJobs_create(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        data = _pb_dict(aip.CustomJob, body, "CustomJob")
        for key in ("name", "state", "createTime", "startTime", "endTime", "updateTime", "error"):
            if key in data:
                raise ApiError(400, f"CustomJob.{key} is output only.")
        if not data.get("displayName"):
            raise ApiError(400, "CustomJob.display_name is required.")
        if len(data["displayName"]) > 128:
            raise ApiError(400, "CustomJob.display_name must be at most 128 characters.")
        _check_labels(data.get("labels", {}), "CustomJob.labels")
        spec = data.get("jobSpec", {})
        pools = spec.get("workerPoolSpecs", [])
        if not pools:
            raise ApiError(400, "CustomJob.job_spec.worker_pool_specs must not be empty.")
        for i, pool in enumerate(pools):
            if not pool:
                continue
            machine = pool.get("machineSpec", {})
            if not MACHINE_TYPE.match(machine.get("machineType", "")):
                raise ApiError(400, f"worker_pool_specs[{i}].machine_spec.machine_type is required.")
            if bool(machine.get("acceleratorCount")) != bool(machine.get("acceleratorType")):
                raise ApiError(400, f"worker_pool_specs[{i}]: accelerator_type and accelerator_count go together.")
            replicas = int(pool.get("replicaCount", "0"))
            if i == 0 and replicas != 1:
                raise ApiError(400, "worker_pool_specs[0].replica_count must be 1 (the chief).")
            if replicas < 1:
                raise ApiError(400, f"worker_pool_specs[{i}].replica_count must be positive.")
            pkg = pool.get("pythonPackageSpec")
            if pkg is not None:
                if not pkg.get("executorImageUri") or not pkg.get("pythonModule"):
                    raise ApiError(400, f"worker_pool_specs[{i}].python_package_spec needs executor_image_uri "
                                        "and python_module.")
                if not pkg.get("packageUris") or not all(u.startswith("gs://") for u in pkg["packageUris"]):
                    raise ApiError(400, f"worker_pool_specs[{i}].python_package_spec.package_uris must be gs:// URIs.")
            elif "containerSpec" not in pool:
                raise ApiError(400, f"worker_pool_specs[{i}] needs a container_spec or a python_package_spec.")
        out = spec.get("baseOutputDirectory", {}).get("outputUriPrefix")
        if out is not None and not out.startswith("gs://"):
            raise ApiError(400, "base_output_directory.output_uri_prefix must be a gs:// URI.")
        return _wire(aip.CustomJob, self._create_job(p["location"], data, "JOB_STATE_PENDING"), ints)

    def _create_job(self, location: str, data: dict[str, Any], state: str) -> dict[str, Any]:
        stamp = now()
        job = {**data, "name": f"{self._loc(location)}/customJobs/{next(self._ids)}", "state": state,
               "createTime": stamp, "updateTime": stamp}
        if state in TERMINAL:
            job.update(startTime=stamp, endTime=stamp)
        self.jobs[job["name"]] = job
        return job

    def _job(self, p: dict[str, str]) -> dict[str, Any]:
        name = f"{self._loc(p['location'])}/customJobs/{p['job']}"
        if name not in self.jobs:
            raise ApiError(404, f"The CustomJob does not exist: {name}")
        return self.jobs[name]

    def _job_by_any(self, key: str) -> dict[str, Any]:
        for name, job in self.jobs.items():
            if key.rsplit("/", 1)[-1] == name.rsplit("/", 1)[-1] or key == job.get("displayName"):
                return job
        raise KeyError(key)

    def _transition(self, job: dict[str, Any], state: str, error: str | None = None) -> None:
        stamp = now()
        job["state"], job["updateTime"] = state, stamp
        if state in ("JOB_STATE_RUNNING",) or state in TERMINAL:
            job.setdefault("startTime", stamp)
        if state in TERMINAL:
            job["endTime"] = stamp
        if error:
            job["error"] = {"code": 13, "message": error}
        self.add_log(job["name"], f"Job {state.removeprefix('JOB_STATE_').lower()}." + (f" {error}" if error else ""),
                     severity="ERROR" if error else "INFO", service=True)

    def _advance(self, job: dict[str, Any]) -> None:
        """A GET moves a cancelling job to cancelled and, when a runner is set, a job through its life."""
        state = job["state"]
        if state == "JOB_STATE_CANCELLING":
            self._transition(job, "JOB_STATE_CANCELLED")
        elif self.runner is not None and state in ("JOB_STATE_QUEUED", "JOB_STATE_PENDING"):
            self._transition(job, "JOB_STATE_RUNNING")
        elif self.runner is not None and state == "JOB_STATE_RUNNING":
            error = self.runner(job)
            self._transition(job, "JOB_STATE_FAILED" if error else "JOB_STATE_SUCCEEDED", error)

    # ---------------------------------------------------------------- Cloud Logging

    def add_log(self, job: str, text: str, *, severity: str = "INFO", service: bool = False) -> None:
        """An entry in the job's log: a replica's output (`workerpool0-0`), or the service's own line."""
        numeric = job.rsplit("/", 1)[-1]
        with self._lock:
            self.log_entries.append({
                "logName": f"projects/{self.project}/logs/" + ("ml.googleapis.com%2F" + numeric if service
                                                              else "workerpool0-0"),
                "resource": {"type": "ml_job", "labels": {"job_id": numeric, "project_id": self.project,
                                                          "task_name": "service" if service else "workerpool0-0"}},
                "timestamp": now(), "receiveTimestamp": now(), "severity": severity,
                "insertId": f"{len(self.log_entries):08x}", "textPayload": text})

    def _entries_list(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        """entries.list: resourceNames, a filter on resource.type and resource.labels.job_id, orderBy, pages."""
        names = body.get("resourceNames") or []
        if not names:
            raise ApiError(400, "resourceNames is required.")
        for name in names:
            self._check_project(name.removeprefix("projects/"))
        flt = body.get("filter", "")
        labels = dict(re.findall(r'resource\.labels\.([a-z_]+)\s*=\s*"([^"]*)"', flt))
        kind = re.search(r'resource\.type\s*=\s*"([^"]*)"', flt)
        found = [e for e in self.log_entries
                 if (kind is None or e["resource"]["type"] == kind[1])
                 and all(e["resource"]["labels"].get(k) == v for k, v in labels.items())]
        order = body.get("orderBy", "timestamp asc").replace(" ", "").lower()
        if order == "timestampdesc":
            found.reverse()
        elif order not in ("", "timestampasc"):
            raise ApiError(400, f"Invalid orderBy: {body.get('orderBy')}.")
        start = int(body.get("pageToken") or 0)
        size = int(body.get("pageSize") or 50)
        page = found[start:start + size]
        answer: dict[str, Any] = {"entries": page} if page else {}
        if start + size < len(found):
            answer["nextPageToken"] = str(start + size)
        return answer

    def _timeSeries_list(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        """Cloud Monitoring's timeSeries.list over what the endpoints' deployments served (monitoring_fake.py)."""
        return time_series_list(self.served, self.project_number, self.latency_buckets, q, ints)

    def _customJobs_get(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        job = self._job(p)
        self._advance(job)
        return _wire(aip.CustomJob, job, ints)

    def _customJobs_list(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        prefix = f"{self._loc(p['location'])}/customJobs/"
        keep = _job_filter(q.get("filter", ""))
        jobs = sorted((j for n, j in self.jobs.items() if n.startswith(prefix) and keep(j)),
                      key=lambda j: (j["createTime"], j["name"]), reverse=True)
        page, token = _page(jobs, q)
        answer: dict[str, Any] = {"customJobs": page}
        if token:
            answer["nextPageToken"] = token
        return _wire(aip.ListCustomJobsResponse, answer, ints)

    def _customJobs_cancel(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        _pb_dict(aip.CancelCustomJobRequest, body, "CancelCustomJobRequest")
        job = self._job(p)
        if job["state"] in TERMINAL:
            raise ApiError(400, f"Cannot cancel CustomJob {job['name']} in state {job['state']}.")
        self._transition(job, "JOB_STATE_CANCELLING")
        return {}

    # ---------------------------------------------------------------- models

    def _model(self, location: str, ref: str) -> tuple[_Model, str]:
        """(model, version id) for 'id', 'id@versionId' or 'id@alias'; the bare id means the default version."""
        model_id, _, version = ref.partition("@")
        m = self.models.get((location, model_id))
        if m is None:
            raise ApiError(404, f"Model {self._loc(location)}/models/{model_id} does not exist.")
        version = version or "default"
        vid = version if version in m.versions else m.aliases.get(version)
        if vid is None:
            raise ApiError(404, f"Model version {self._loc(location)}/models/{ref} does not exist.")
        return m, vid

    def _aliases_of(self, m: _Model, vid: str) -> list[str]:
        names = [a for a, v in m.aliases.items() if v == vid]
        return sorted(names, key=lambda a: (a != "default",))

    def _render(self, m: _Model, vid: str) -> dict[str, Any]:
        v = m.versions[vid]
        return {**v["fields"], "name": f"{self._loc(m.location)}/models/{m.model_id}", "versionId": vid,
                "versionAliases": self._aliases_of(m, vid), "createTime": m.create_time,
                "updateTime": v["updateTime"], "versionCreateTime": v["createTime"],
                "versionUpdateTime": v["updateTime"], "etag": f"etag-{m.model_id}-{vid}-{len(m.aliases)}"}

    def _check_aliases(self, aliases: list[str]) -> None:
        for alias in aliases:
            name = alias[1:] if alias.startswith("-") else alias
            if not ALIAS.match(name) or name.isdigit():
                raise ApiError(400, f"Invalid version alias {alias!r}: it must match "
                                    "[a-z][a-zA-Z0-9-]{0,126}[a-z0-9] and must not be a version id.")

    def _models_upload(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        req = _pb_dict(aip.UploadModelRequest, body, "UploadModelRequest")
        loc, fields = p["location"], dict(req.get("model", {}))
        if not fields.get("displayName"):
            raise ApiError(400, "Model.display_name is required.")
        if not fields.get("containerSpec", {}).get("imageUri"):
            raise ApiError(400, "Model.container_spec.image_uri is required for a custom-trained model.")
        if "artifactUri" in fields and not fields["artifactUri"].startswith("gs://"):
            raise ApiError(400, "Model.artifact_uri must be a gs:// URI.")
        for key in ("name", "versionId", "createTime", "updateTime", "versionCreateTime"):
            if key in fields:
                raise ApiError(400, f"Model.{key} is output only.")
        _check_labels(fields.get("labels", {}), "Model.labels")
        aliases = fields.pop("versionAliases", [])
        self._check_aliases(aliases)
        if any(a.startswith("-") for a in aliases):
            raise ApiError(400, "An upload cannot remove version aliases.")
        if req.get("modelId") and req.get("parentModel"):
            raise ApiError(400, "model_id and parent_model cannot both be set.")
        if req.get("parentModel"):
            m = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)/models/([^/@]+)", req["parentModel"])
            if not m or m.group(2) != loc:
                raise ApiError(400, f"parent_model {req['parentModel']!r} is not a model in {loc}.")
            self._check_project(m.group(1))
            if (loc, m.group(3)) not in self.models:
                raise ApiError(404, f"Parent model {req['parentModel']} does not exist.")
            model_id = m.group(3)
        elif req.get("modelId"):
            model_id = req["modelId"]
            if not MODEL_ID.match(model_id):
                raise ApiError(400, f"Invalid model_id {model_id!r}: use [a-z][a-z0-9_-]{{0,62}}.")
            if (loc, model_id) in self.models or any(o.get("model_id") == model_id
                                                     for o in self.operations.values() if not o.get("done")):
                raise ApiError(409, f"Model {self._loc(loc)}/models/{model_id} already exists.")
        else:
            model_id = str(next(self._ids))
        upload = {"location": loc, "model_id": model_id, "fields": fields, "aliases": aliases}
        return self._start_operation(f"{self._loc(loc)}/models/{model_id}", "models.upload",
                                     "UploadModelOperationMetadata", lambda: self._finish_upload(upload),
                                     model_id=model_id)

    def _start_operation(self, parent: str, route: str, metadata: str, finish: Callable[[], dict[str, Any]],
                         **extra: Any) -> dict[str, Any]:
        """A long-running operation under `parent`: done after `operation_polls` GETs, when `finish` runs
        (its answer is the response; an ApiError it raises, or an injected fault, is the error)."""
        name = f"{parent}/operations/{next(self._ids)}"
        faults = self._operation_faults.get(route)
        self.operations[name] = {
            **extra, "route": route, "metadata": metadata, "finish": finish, "done": False,
            "polls_left": self.operation_polls, "created": now(), "fault": faults.pop(0) if faults else None,
        }
        return self._operation(name)

    def _operation(self, name: str) -> dict[str, Any]:
        op = self.operations[name]
        answer: dict[str, Any] = {"name": name, "done": op["done"], "metadata": {
            "@type": _MD + op["metadata"], "genericMetadata": {"createTime": op["created"], "updateTime": now()}}}
        if op["done"] and op.get("error"):
            answer["error"] = op["error"]
        elif op["done"]:
            answer["response"] = op["response"]
        json_format.ParseDict(answer, operations_pb2.Operation())  # only what the client can parse
        return answer

    def _finish(self, op: dict[str, Any]) -> None:
        op["done"] = True
        if op["fault"]:
            op["error"] = op["fault"]
            return
        try:
            op["response"] = op["finish"]()
        except ApiError as exc:
            op["error"] = {"code": OPERATION_CODES.get(exc.code, 2), "message": exc.message}

    def _finish_upload(self, op: dict[str, Any]) -> dict[str, Any]:
        key = (op["location"], op["model_id"])
        stamp = now()
        m = self.models.get(key)
        if m is None:
            m = self.models[key] = _Model(op["model_id"], op["location"], stamp)
        vid = str(m.next_version)
        m.next_version += 1
        m.versions[vid] = {"fields": op["fields"], "createTime": stamp, "updateTime": stamp}
        if not m.aliases:
            m.aliases["default"] = vid
        for alias in op["aliases"]:
            m.aliases[alias] = vid  # an alias names one version: setting it moves it
        return {"@type": _MD + "UploadModelResponse", "model": f"{self._loc(op['location'])}/models/{op['model_id']}",
                "modelVersionId": vid}

    def _operations_get(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        name = f"{self._loc(p['location'])}" + (f"/{p['kind']}/{p['parent']}" if p.get("kind") else "") \
            + f"/operations/{p['op']}"
        op = self.operations.get(name)
        if op is None:
            raise ApiError(404, f"Operation {name} does not exist.")
        if not op["done"]:
            op["polls_left"] -= 1
            if op["polls_left"] <= 0:
                self._finish(op)
        return self._operation(name)

    def _models_get(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        m, vid = self._model(p["location"], p["model"])
        return _wire(aip.Model, self._render(m, vid), ints)

    def _models_listVersions(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        if "@" in p["model"]:
            raise ApiError(400, "listVersions takes a model name without a version.")
        m, _ = self._model(p["location"], p["model"])
        versions = [self._render(m, vid) for vid in sorted(m.versions, key=int)]
        page, token = _page(versions, q)
        answer: dict[str, Any] = {"models": page}
        if token:
            answer["nextPageToken"] = token
        return _wire(aip.ListModelVersionsResponse, answer, ints)

    def _models_mergeVersionAliases(self, p: dict[str, str], q: dict[str, str], body: Any,
                                    ints: bool) -> dict[str, Any]:
        req = _pb_dict(aip.MergeVersionAliasesRequest, body, "MergeVersionAliasesRequest")
        m, vid = self._model(p["location"], p["model"])
        aliases = req.get("versionAliases", [])
        if not aliases:
            raise ApiError(400, "version_aliases must not be empty.")
        self._check_aliases(aliases)
        for alias in aliases:  # all checked before any change: a refused merge changes nothing
            if alias == "-default":
                raise ApiError(400, "The default version alias cannot be removed; set it on another version.")
            if alias.startswith("-") and m.aliases.get(alias[1:]) != vid:
                raise ApiError(400, f"Version {vid} has no alias {alias[1:]!r}.")
        for alias in aliases:
            if alias.startswith("-"):
                del m.aliases[alias[1:]]
            else:
                m.aliases[alias] = vid
        stamp = now()
        m.versions[vid]["updateTime"] = stamp
        return _wire(aip.Model, self._render(m, vid), ints)


    # ---------------------------------------------------------------- endpoints

    def _endpoint(self, p: dict[str, str]) -> dict[str, Any]:
        name = f"{self._loc(p['location'])}/endpoints/{p['endpoint']}"
        if name not in self.endpoints:
            raise ApiError(404, f"Endpoint {name} does not exist.")
        return self.endpoints[name]

    @staticmethod
    def _check_split(split: dict[str, int], ids: set[str], where: str) -> None:
        """Keys name deployed models (or "0", when `ids` has it); percentages add up to 100."""
        for key, pct in split.items():
            if key not in ids:
                raise ApiError(400, f"{where}: traffic_split refers to DeployedModel {key!r}, which is not "
                                    "deployed on this endpoint.")
            if not 0 <= int(pct) <= 100:
                raise ApiError(400, f"{where}: traffic_split percentages must be between 0 and 100.")
        if split and sum(int(v) for v in split.values()) != 100:
            raise ApiError(400, f"{where}: traffic_split must add up to 100, not "
                                f"{sum(int(v) for v in split.values())}.")

    def _endpoints_create(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        data = _pb_dict(aip.Endpoint, body, "Endpoint")
        for key in ("name", "deployedModels", "createTime", "updateTime", "etag"):
            if key in data:
                raise ApiError(400, f"Endpoint.{key} is output only.")
        if not data.get("displayName") or len(data["displayName"]) > 128:
            raise ApiError(400, "Endpoint.display_name is required (at most 128 characters).")
        if data.get("trafficSplit"):
            raise ApiError(400, "Endpoint.traffic_split must be empty: no model is deployed yet.")
        _check_labels(data.get("labels", {}), "Endpoint.labels")
        endpoint_id = q.get("endpointId") or str(next(self._ids))
        if not re.fullmatch(r"[1-9][0-9]{0,18}|[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?", endpoint_id):
            raise ApiError(400, f"Invalid endpoint_id {endpoint_id!r}.")
        name = f"{self._loc(p['location'])}/endpoints/{endpoint_id}"
        if name in self.endpoints:
            raise ApiError(409, f"Endpoint {name} already exists.")
        stamp = now()
        endpoint = {**data, "name": name, "deployedModels": [], "trafficSplit": {}, "createTime": stamp,
                    "updateTime": stamp, "etag": f"etag-{endpoint_id}-0"}
        self.endpoints[name] = endpoint  # visible at once; the operation reports it when done

        def finish() -> dict[str, Any]:
            return {"@type": _MD + "Endpoint", **self._render_endpoint(endpoint)}

        answer = self._start_operation(name, "endpoints.create", "CreateEndpointOperationMetadata", finish)
        op = self.operations[answer["name"]]
        if op["fault"]:  # a failed creation leaves no endpoint behind
            op["finish"] = lambda: {}
            self.endpoints.pop(name)
        return answer

    def _render_endpoint(self, e: dict[str, Any]) -> dict[str, Any]:
        return json.loads(json.dumps(e))  # a copy: later changes do not leak into an answer

    def _endpoints_get(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        return _wire(aip.Endpoint, self._render_endpoint(self._endpoint(p)), ints)

    def _endpoints_predict(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        endpoint = self._endpoint(p)
        instances = (body or {}).get("instances") if isinstance(body, dict) else None
        if not isinstance(instances, list) or not instances:
            raise ApiError(400, "PredictRequest.instances is required: a non-empty list.")
        split = {k: int(v) for k, v in endpoint.get("trafficSplit", {}).items() if int(v)}
        if not split:
            raise ApiError(400, f"Endpoint {endpoint['name']} does not have any deployed model with traffic.",
                           status="FAILED_PRECONDITION")
        chosen = self._route(endpoint["name"], split)
        deployed = next(d for d in endpoint["deployedModels"] if d["id"] == chosen)
        answer = self._answers.get(chosen) or self._answers.get(deployed.get("displayName", "")) or Answer()
        self.served.append(Served(endpoint["name"].rsplit("/", 1)[1], chosen, datetime.now(timezone.utc),
                                  answer.latency_ms, answer.error is not None))
        if answer.error is not None:
            raise ApiError(*answer.error)
        return {"predictions": [{"deployedModelId": chosen, "instance": i} for i in instances],
                "deployedModelId": chosen, "model": deployed["model"], "modelVersionId": deployed["modelVersionId"],
                "modelDisplayName": deployed["model"].rsplit("/", 1)[1]}

    def _route(self, endpoint: str, split: dict[str, int]) -> str:
        """The deployment that answers the next request: the split kept exactly over every 100 requests (smooth
        weighted round robin), where Vertex AI draws at random; a deployment with all the traffic answers all."""
        weights = self._rotation.setdefault(endpoint, {})
        for gone in set(weights) - set(split):
            del weights[gone]
        for key, share in split.items():
            weights[key] = weights.get(key, 0) + share
        chosen = max(split, key=lambda k: (weights[k], k))
        weights[chosen] -= sum(split.values())
        return chosen

    def _endpoints_list(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        prefix = f"{self._loc(p['location'])}/endpoints/"
        keep = _job_filter(q.get("filter", ""))
        found = sorted((e for n, e in self.endpoints.items() if n.startswith(prefix) and keep(e)),
                       key=lambda e: (e["createTime"], e["name"]))
        page, token = _page(found, q)
        answer: dict[str, Any] = {"endpoints": [self._render_endpoint(e) for e in page]}
        if token:
            answer["nextPageToken"] = token
        return _wire(aip.ListEndpointsResponse, answer, ints)

    def _endpoints_patch(self, p: dict[str, str], q: dict[str, str], body: Any, ints: bool) -> dict[str, Any]:
        endpoint = self._endpoint(p)
        data = _pb_dict(aip.Endpoint, body, "Endpoint")
        fields = {"display_name": "displayName", "displayName": "displayName", "description": "description",
                  "labels": "labels", "traffic_split": "trafficSplit", "trafficSplit": "trafficSplit"}
        mask = [m for m in (q.get("updateMask") or "").split(",") if m]
        if not mask:
            raise ApiError(400, "update_mask is required.")
        for path in mask:
            if path not in fields:
                raise ApiError(400, f"update_mask path {path!r} cannot be updated.")
        changes = {fields[path]: data.get(fields[path], {} if fields[path] in ("labels", "trafficSplit") else "")
                   for path in mask}
        if "trafficSplit" in changes:
            self._check_split(changes["trafficSplit"], {d["id"] for d in endpoint["deployedModels"]},
                              "UpdateEndpoint")
        if "labels" in changes:
            _check_labels(changes["labels"], "Endpoint.labels")
        if "displayName" in changes and not changes["displayName"]:
            raise ApiError(400, "Endpoint.display_name is required.")
        endpoint.update(changes)
        self._touch(endpoint)
        return _wire(aip.Endpoint, self._render_endpoint(endpoint), ints)

    def _touch(self, endpoint: dict[str, Any]) -> None:
        endpoint["updateTime"] = now()
        serial = int(endpoint["etag"].rsplit("-", 1)[1]) + 1
        endpoint["etag"] = f"{endpoint['etag'].rsplit('-', 1)[0]}-{serial}"

    def _endpoints_deployModel(self, p: dict[str, str], q: dict[str, str], body: Any,
                               ints: bool) -> dict[str, Any]:
        req = _pb_dict(aip.DeployModelRequest, body, "DeployModelRequest")
        endpoint = self._endpoint(p)
        dm = dict(req.get("deployedModel") or {})
        for key in ("id", "createTime", "modelVersionId", "status", "privateEndpoints"):
            if key in dm:
                raise ApiError(400, f"DeployedModel.{key} is output only here.")
        m = re.fullmatch(r"projects/([^/]+)/locations/([^/]+)/models/([^/@]+(?:@[^/]+)?)", dm.get("model", ""))
        if not m:
            raise ApiError(400, "DeployedModel.model must be a model resource name "
                                "(projects/*/locations/*/models/*[@version]).")
        self._check_project(m.group(1))
        if m.group(2) != p["location"]:
            raise ApiError(400, f"Model {dm['model']} is not in the endpoint's location {p['location']}.")
        model, vid = self._model(m.group(2), m.group(3))
        if "automaticResources" in dm:
            raise ApiError(400, "This Model does not support automatic resources: use dedicated_resources.")
        res = dm.get("dedicatedResources")
        if not res:
            raise ApiError(400, "DeployedModel.dedicated_resources is required for a custom-trained model.")
        machine = res.get("machineSpec", {})
        if not MACHINE_TYPE.match(machine.get("machineType", "")):
            raise ApiError(400, "dedicated_resources.machine_spec.machine_type is required.")
        if bool(machine.get("acceleratorCount")) != bool(machine.get("acceleratorType")):
            raise ApiError(400, "dedicated_resources.machine_spec: accelerator_type and accelerator_count go together.")
        low, high = int(res.get("minReplicaCount", 0)), int(res.get("maxReplicaCount", 0))
        if low < 1:
            raise ApiError(400, "dedicated_resources.min_replica_count must be at least 1.")
        if high and high < low:
            raise ApiError(400, "dedicated_resources.max_replica_count must not be below min_replica_count.")
        split = {k: int(v) for k, v in (req.get("trafficSplit") or {}).items()}
        self._check_split(split, {d["id"] for d in endpoint["deployedModels"]} | {"0"}, "DeployModel")
        new_id = str(next(self._ids))
        deployed = {**dm, "id": new_id, "model": f"{self._loc(model.location)}/models/{model.model_id}",
                    "modelVersionId": vid, "displayName": dm.get("displayName") or model.versions[vid]["fields"].get(
                        "displayName", model.model_id)}

        def finish() -> dict[str, Any]:
            ids = {d["id"] for d in endpoint["deployedModels"]}
            if any(k != "0" and k not in ids for k in split):
                raise ApiError(412, "A DeployedModel in traffic_split was undeployed meanwhile.")
            deployed["createTime"] = now()
            endpoint["deployedModels"].append(deployed)
            if split:
                endpoint["trafficSplit"] = {(new_id if k == "0" else k): v for k, v in split.items()}
            self._touch(endpoint)
            return {"@type": _MD + "DeployModelResponse", "deployedModel": json.loads(json.dumps(deployed))}

        return self._start_operation(endpoint["name"], "endpoints.deployModel", "DeployModelOperationMetadata",
                                     finish)

    def _endpoints_undeployModel(self, p: dict[str, str], q: dict[str, str], body: Any,
                                 ints: bool) -> dict[str, Any]:
        req = _pb_dict(aip.UndeployModelRequest, body, "UndeployModelRequest")
        endpoint = self._endpoint(p)
        target = req.get("deployedModelId", "")
        ids = {d["id"] for d in endpoint["deployedModels"]}
        if target not in ids:
            raise ApiError(404, f"DeployedModel {target!r} is not deployed on Endpoint {endpoint['name']}.")
        split = {k: int(v) for k, v in (req.get("trafficSplit") or {}).items()}
        rest = ids - {target}
        if split:
            self._check_split(split, rest, "UndeployModel")
        elif rest and endpoint.get("trafficSplit", {}).get(target, 0) > 0:
            raise ApiError(400, f"DeployedModel {target} has {endpoint['trafficSplit'][target]}% of the traffic of "
                                f"Endpoint {endpoint['name']}: update the traffic split to take it away before "
                                "undeploying it.", status="FAILED_PRECONDITION")

        def finish() -> dict[str, Any]:
            endpoint["deployedModels"] = [d for d in endpoint["deployedModels"] if d["id"] != target]
            if not endpoint["deployedModels"]:
                endpoint["trafficSplit"] = {}
            elif split:
                endpoint["trafficSplit"] = split
            else:
                endpoint["trafficSplit"] = {k: v for k, v in endpoint.get("trafficSplit", {}).items() if k != target}
            self._touch(endpoint)
            return {"@type": _MD + "UndeployModelResponse"}

        return self._start_operation(endpoint["name"], "endpoints.undeployModel", "UndeployModelOperationMetadata",
                                     finish)


# ---------------------------------------------------------------- helpers for tests


def replay_runner(emulator_url: str) -> Callable[[dict[str, Any]], str | None]:
    """A job runner that does what the replay trainer does, on the GCS emulator.

    It reads the job's python_package_spec args: `--source=DIR` (copy DIR/model/ to <base>/model/,
    DIR/metrics.json to <base>/metrics.json and DIR/logs/ to <base>/logs/, where Vertex AI's
    AIP_TENSORBOARD_LOG_DIR points), `--crash` (fail), `--no-model` (succeed, write nothing).
    Like Vertex AI, it fails when a package URI does not exist.
    """
    client = storage_client(emulator_url)

    def blob(uri: str) -> Any:
        bucket, _, name = uri[len("gs://"):].partition("/")
        return client.bucket(bucket).blob(name)

    def run(job: dict[str, Any]) -> str | None:
        spec = job["jobSpec"]
        pkg = spec["workerPoolSpecs"][0].get("pythonPackageSpec", {})
        for uri in pkg.get("packageUris", []):
            if not blob(uri).exists():
                return f"Package {uri} could not be downloaded: no such object."
        args = pkg.get("args", [])
        if pkg.get("pythonModule") == EVALUATION_MODULE:
            return run_evaluation(client, pkg)
        if "--crash" in args:
            return "The replica workerpool0-0 exited with a non-zero status of 3."
        if "--no-model" in args:
            return None
        source = next((a.split("=", 1)[1] for a in args if a.startswith("--source=")), None)
        if source is None:
            return "replay runner: no --source=DIR in the job's args"
        base = spec["baseOutputDirectory"]["outputUriPrefix"].rstrip("/")
        root = Path(source)
        for folder in ("model", "logs"):
            for path in sorted((root / folder).rglob("*")):
                if path.is_file():
                    blob(f"{base}/{folder}/{path.relative_to(root / folder).as_posix()}").upload_from_filename(
                        str(path))
        if (root / "metrics.json").exists():
            blob(f"{base}/metrics.json").upload_from_filename(str(root / "metrics.json"))
        return None

    return run


EVALUATION_MODULE = "starchart_evaluation.task"


def run_evaluation(client: Any, pkg: dict[str, Any]) -> str | None:
    """An evaluation job as Vertex AI runs it, on this machine: the staged sdist is unpacked and its module run
    with this Python (which has TensorFlow) on the job's args, its gs:// inputs downloaded from the emulator first
    and its result uploaded after. A gs:// object that does not exist stays a path that does not exist, so the job
    says so as it would on Vertex AI."""
    import subprocess
    import sys
    import tarfile
    import tempfile

    def split(uri: str) -> tuple[Any, str]:
        bucket, _, name = uri[len("gs://"):].partition("/")
        return client.bucket(bucket), name

    with tempfile.TemporaryDirectory(prefix="vertex-fake-eval-") as tmp:
        work = Path(tmp)
        bucket, name = split(pkg["packageUris"][0])
        bucket.blob(name).download_to_filename(str(work / "package.tar.gz"))
        with tarfile.open(work / "package.tar.gz") as tar:
            tar.extractall(work / "src", filter="data")
        src = next((work / "src").iterdir())
        local_args: list[str] = []
        result: str | None = None
        for i, arg in enumerate(pkg.get("args", [])):
            flag, _, value = arg.partition("=")
            if value.startswith("gs://") and flag == "--result":
                result = value
                value = str(work / "result.json")
            elif value.startswith("gs://"):
                bucket, name = split(value)
                target = work / f"in{i}"
                blobs = list(bucket.list_blobs(prefix=name.rstrip("/") + "/")) if flag != "--data" else []
                for b in blobs:  # a SavedModel folder
                    path = target / b.name[len(name.rstrip("/")) + 1:]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    b.download_to_filename(str(path))
                if flag == "--data":
                    target = work / f"in{i}.csv"
                    if bucket.blob(name).exists():
                        bucket.blob(name).download_to_filename(str(target))
                value = str(target)
            local_args.append(f"{flag}={value}")
        proc = subprocess.run([sys.executable, "-m", EVALUATION_MODULE, *local_args], cwd=src,
                              env={**os.environ, "PYTHONPATH": str(src)}, capture_output=True,
                              text=True, timeout=600)
        if result is not None and (work / "result.json").exists():
            bucket, name = split(result)
            bucket.blob(name).upload_from_filename(str(work / "result.json"))
        if proc.returncode != 0:
            return f"The replica workerpool0-0 exited with a non-zero status of {proc.returncode}."
    return None


def fast_backend(fake: VertexFake, bucket: str, **overrides: Any) -> Any:
    """A VertexBackend pointed at the fake, with millisecond backoffs so tests never wait; its storage uses the
    Cloud Storage emulator the test's environment names (STORAGE_EMULATOR_HOST, read as the product reads it)."""
    from model_registry.adapters.backends.vertex import VertexBackend
    from model_registry.adapters.gcs import GcsStorage
    from model_registry.config import Settings

    storage = GcsStorage(project=fake.project, emulator_host=Settings.from_env().storage_emulator_host)
    options: dict[str, Any] = dict(api_endpoint=fake.url, poll_interval=(0.005, 0.02), retry_delays=(0.001, 0.005),
                                   retry_deadline=5.0, operation_poll=(0.001, 0.005), operation_timeout=10.0,
                                   storage=storage)
    options.update(overrides)
    return VertexBackend(fake.project, "us-central1", bucket, **options)


def vertex_env(bucket: str, project: str = "starchart-test") -> dict[str, str]:
    """The settings of a vertex-backed Registry (for conftest's make_registry(env=...))."""
    return {"STARCHART_BACKEND": "vertex", "STARCHART_BUCKET": bucket, "GCP_PROJECT_ID": project}