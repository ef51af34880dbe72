"""The embedded backend: trains in detached local processes and serves from a pointer file."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, NamedTuple

from model_registry.adapters.backends import local_runner
from model_registry.adapters.backends.base import JobStatus, Relay, TrainingSpec
from model_registry.adapters.backends.local_runner import ProcessWatch, proc_start_time
from model_registry.adapters.packaging import Package
from model_registry.adapters.records import CANCELLED, FAILED, QUEUED, RUNNING, TERMINAL
from model_registry.adapters.storage import LocalStorage
from model_registry.domain.errors import BackendError, InvalidInput, NotFound

if TYPE_CHECKING:  # imported where it is used: a web process that only talks to Slack never loads it
    from model_registry.adapters.backends.local_client import Answer, ServerConnections

NEVER_STARTED_AFTER = 120.0  # seconds a job may wait for its runner before it is declared lost
SERVER_START_TIMEOUT = 120.0  # seconds the model server may take to listen (it loads TensorFlow lazily)
SERVER_LOG_MAX = 16 * 1024 * 1024  # bytes of server.log before a new server starts a new one (one old kept)
PREDICT_TIMEOUT = 120.0  # seconds for one predict or warm, the first load of a SavedModel included


log = logging.getLogger("starchart.local")


def _last_lines(path: Path, window: int) -> list[str]:
    """The lines of a log's last `window` bytes (read from its end: the file may be large); none if it is gone."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - window))
            return fh.read().decode("utf-8", "replace").rstrip().splitlines()
    except OSError:
        return []
LOCAL_SERVING = str(Path(__file__).with_name("local_serving.py"))  # the model server, run by file


class _KnownServer(NamedTuple):
    """The model server last seen answering: server.json as read, its (inode, mtime, size) then, its process."""

    info: dict[str, Any]
    stamp: tuple[int, int, int] | None
    watch: ProcessWatch


def _dt(epoch: float | None) -> datetime | None:
    return datetime.fromtimestamp(epoch, timezone.utc).replace(tzinfo=None) if epoch else None


class LocalBackend:
    name = "local"
    poll_interval = (0.05, 0.1)  # a status check is a file read: poll often, finish promptly

    def __init__(self, home: Path, python: str | None = None,
                 serving_options: Callable[[str], Mapping[str, int] | None] | None = None,
                 predict_timeout: float = PREDICT_TIMEOUT) -> None:
        self.home = home
        self.predict_timeout = predict_timeout  # seconds a prediction's answer may take (the first load included)
        self.serving_options = serving_options or (lambda _model: None)  # a model's `serving:` (batching)
        self.jobs = home / "jobs"
        self.serving = home / "serving"
        self._info_path = str(self.serving / "server.json")  # stat-ed at every prediction: made once
        self.python = python or sys.executable
        self.storage = LocalStorage()
        self._known: _KnownServer | None = None  # the model server last seen answering (ensure_server)
        self._connections_lock = threading.Lock()
        self._server_connections: ServerConnections | None = None

    def _job_dir(self, job_id: str) -> Path:
        return self.jobs / job_id

    def stage_package(self, package: Package, train_path: str) -> str:
        uri = self.storage.join(train_path, "packages", package.path.name)
        self.storage.upload_file(package.path, uri)
        return uri

    def submit(self, spec: TrainingSpec) -> str:
        job_dir = self._job_dir(spec.job_id)
        job_dir.mkdir(parents=True, exist_ok=False)
        tp = spec.train_path.rstrip("/")
        env = {
            "AIP_MODEL_DIR": f"{tp}/model/",
            "AIP_CHECKPOINT_DIR": f"{tp}/checkpoints/",
            "AIP_TENSORBOARD_LOG_DIR": f"{tp}/logs/",
            "CLOUD_ML_JOB_ID": spec.job_id,
        }
        (job_dir / "spec.json").write_text(json.dumps({
            "python": self.python, "module": spec.module, "args": list(spec.args), "package": spec.package_uri,
            "workers": spec.workers, "env": env, "trainer_env": list(spec.trainer_env), "submitted_at": time.time(),
        }))
        with open(job_dir / "runner.log", "ab") as runner_log:
            starter = subprocess.run(  # the runner is stdlib only: -S skips site-packages' start-up cost
                [sys.executable, "-S", local_runner.__file__, str(job_dir)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=runner_log,
            )
        if starter.returncode != 0:
            raise BackendError(f"could not start job {spec.job_id}", f"see {job_dir / 'runner.log'}")
        return str(job_dir)

    def _read_status(self, job_dir: Path) -> dict[str, Any] | None:
        try:
            return json.loads((job_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None

    def _alive(self, status: dict[str, Any]) -> bool:
        pid = status.get("pid")
        return pid is not None and proc_start_time(int(pid)) == status.get("pid_start")

    def status(self, job_id: str, ref: str | None) -> JobStatus:
        job_dir = self._job_dir(job_id)
        if not (job_dir / "spec.json").exists():
            return JobStatus(FAILED, error=f"the local backend has no record of {job_id} (STARCHART_HOME changed?)")
        st = self._read_status(job_dir)
        if st is None:
            submitted = json.loads((job_dir / "spec.json").read_text()).get("submitted_at", 0)
            if time.time() - submitted > NEVER_STARTED_AFTER:
                return JobStatus(FAILED, error="the job's runner never started; see runner.log")
            return JobStatus(QUEUED)
        started, ended = _dt(st.get("started_at")), _dt(st.get("ended_at"))
        if st["state"] in TERMINAL:
            return JobStatus(st["state"], started, ended, st.get("error"))
        if self._alive(st):
            return JobStatus(RUNNING, started)
        again = self._read_status(job_dir)  # the runner may have written its result and exited since the read
        if again is not None and again["state"] in TERMINAL:
            return JobStatus(again["state"], _dt(again.get("started_at")), _dt(again.get("ended_at")),
                             again.get("error"))
        if (job_dir / "cancel").exists():
            return JobStatus(CANCELLED, started, _dt(time.time()))
        return JobStatus(FAILED, started, _dt(time.time()),
                         "the job's runner stopped without a result (killed, or the machine restarted)")

    def wait_for_change(self, job_id: str, seconds: float) -> None:
        """Sleep up to `seconds`, but wake the moment the job's runner exits (a Linux pidfd), so `wait` returns as
        soon as the training ends rather than at the next poll."""
        st = self._read_status(self._job_dir(job_id))
        if st and st.get("state") in TERMINAL:
            return
        if not (st and st.get("pid")) or not hasattr(os, "pidfd_open"):  # queued: no runner yet to watch
            time.sleep(seconds)
            return
        pid = int(st["pid"])
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # the runner has exited already: the next status check tells how
            return
        try:
            if proc_start_time(pid) == st.get("pid_start"):  # else the pid was reused: the runner is gone
                select.select([fd], [], [], seconds)
        finally:
            os.close(fd)

    def cancel(self, job_id: str, ref: str | None) -> None:
        job_dir = self._job_dir(job_id)
        if not job_dir.exists():
            raise NotFound(f"the local backend has no job {job_id}")
        (job_dir / "cancel").write_text(str(time.time()))
        st = self._read_status(job_dir)
        if st and self._alive(st):
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile: the status says how
                os.killpg(int(st["pid"]), signal.SIGTERM)

    def logs(self, job_id: str, ref: str | None, tail: int = 40) -> str:
        lines = _last_lines(self._job_dir(job_id) / "train.log", 256 * 1024)
        return "\n".join(lines[-tail:]) if tail else "\n".join(lines)

    def _pointer(self, model: str) -> Path:
        return self.serving / f"{model}.json"

    def _read_pointer(self, model: str) -> dict[str, Any]:
        try:
            return json.loads(self._pointer(model).read_text())
        except (OSError, ValueError):
            return {"model": model, "default": None, "versions": {}}

    def _write_pointer(self, model: str, data: dict[str, Any]) -> None:
        """The model's versions, its default and its batching options, for the model server (read per request)."""
        self.serving.mkdir(parents=True, exist_ok=True)
        options = self.serving_options(model)
        if options:
            data = {**data, "serving": dict(options)}
        else:
            data = {k: v for k, v in data.items() if k != "serving"}
        tmp = self._pointer(model).with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self._pointer(model))

    def register_version(self, model: str, version: Mapping[str, Any], first: bool) -> str | None:
        data = self._read_pointer(model)
        data["versions"][version["name"]] = version["deployment_uri"]
        self._write_pointer(model, data)
        return version["deployment_uri"]

    def set_default(self, model: str, version: str, ref: str | None) -> None:
        """Switch the default without a dropped request: a running model server loads and warms the version
        first (one prediction), then the pointer moves; requests in flight finish on the version they began on.
        A version the server cannot load fails the switch, and the default stays as it was."""
        data = self._read_pointer(model)
        if version not in data["versions"]:
            raise BackendError(f"the local server does not know {model} {version}", "expose the version again")
        port = self._server_port()
        if port:
            self._warm(port, model, version)
        data["default"] = version
        data.pop("canary", None)  # a canary promoted: its candidate is the default, with all the traffic
        self._write_pointer(model, data)

    # ---------------------------------------------------------------- canaries (the split is in the pointer file)

    def start_canary(self, model: str, version: str, ref: str | None, percent: int, mirror: float) -> None:
        """The model server sends `percent`% of the default's requests to `version`, chosen at random per request,
        once the running server has loaded and warmed it; `mirror` of the default's other requests are answered by
        it too, off the request's path, and compared. Each canary counts from zero (its own id)."""
        data = self._read_pointer(model)
        if version not in data["versions"]:
            raise BackendError(f"the local server does not know {model} {version}", "expose the version again")
        if not data.get("default"):
            raise BackendError(f"{model} has no default on the local server to split", "apply a version first")
        port = self._server_port()
        if port:
            self._warm(port, model, version)
        data["canary"] = {"version": version, "percent": int(percent), "mirror": float(mirror),
                          "id": uuid.uuid4().hex[:12]}
        self._write_pointer(model, data)

    def end_canary(self, model: str) -> None:
        data = self._read_pointer(model)
        if data.pop("canary", None) is not None:
            self._write_pointer(model, data)

    def canary_split(self, model: str) -> dict[str, int]:
        data = self._read_pointer(model)
        default, canary = data.get("default"), data.get("canary")
        if not default:
            return {}
        if not canary:
            return {default: 100}
        return {default: 100 - int(canary["percent"]), canary["version"]: int(canary["percent"])}

    def canary_figures(self, model: str) -> dict[str, Any] | None:
        """What the running model server counted for this canary (GET /v1/models/<model>/canary, with the
        server's secret); all zero when no server runs (a restarted server counts from zero again)."""
        canary = self._read_pointer(model).get("canary")
        if not canary:
            return None
        empty = {"candidate": {}, "base": {}, "mirrored": 0, "agreed": 0}
        port = self._server_port()
        if not port:
            return empty
        try:
            resp = self._connections(port).request("GET", f"/v1/models/{model}/canary", read_timeout=30.0,
                                                   headers=self._server_auth())
        except OSError as exc:
            raise BackendError(f"the local model server did not give the canary's figures: {exc}",
                               f"see {self.serving / 'server.log'}") from exc
        if resp.status != 200:
            raise self._refusal(model, resp.status, resp.data, resp.reason)
        figures = json.loads(resp.data)
        return figures if figures.get("id") == canary["id"] else empty

    def _warm(self, port: int, model: str, version: str) -> None:
        try:
            resp = self._connections(port).request(
                "POST", f"/v1/models/{model}/versions/{version}:warm", read_timeout=PREDICT_TIMEOUT,
                headers=self._server_auth())
        except OSError as exc:
            raise BackendError(f"the local model server could not warm {model} {version}: {exc}",
                               f"see {self.serving / 'server.log'}; the default is unchanged") from exc
        if resp.status != 200:
            refusal = self._refusal(model, resp.status, resp.data, resp.reason)
            raise BackendError(f"{model} {version} did not load on the local model server: {refusal}",
                               f"see {self.serving / 'server.log'}; the default is unchanged")

    def apply_timeout(self, model: str) -> float:
        return 0.0  # a local switch is one pointer-file write: the apply's first lease covers it, none is renewed

    def current_default(self, model: str) -> str | None:
        return self._read_pointer(model).get("default")

    # ---------------------------------------------------------------- serving (the local prediction API)

    def predict(self, model: str, version: str | None, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """TF Serving's REST predict on the local model server (started on first use); (version, answer).

        A server that was not listening (idle exit, killed before) is started and asked again, once. A request
        the server refused is not retried, nor one during which it died: that one is logged with its request id
        and the end of server.log, and a new server is started for the next request.
        """
        from model_registry.adapters.backends.local_client import NotSent

        path, data, request_id = self._predict_request(model, version, body)
        attempt = 0
        while True:
            attempt += 1
            port = self.ensure_server()
            try:
                resp = self._connections(port).request("POST", path, body=data, read_timeout=self.predict_timeout,
                                                       headers=self._predict_headers(request_id))
            except NotSent:  # nothing listened: the request was never sent
                self._forget_server()
                if attempt == 1:
                    continue
                raise BackendError("the local model server did not answer: nothing listens on its port",
                                   f"see {self.serving / 'server.log'}") from None
            except OSError as exc:
                raise self._predict_failed(exc, request_id, model) from exc
            return self._predict_answered(model, version, resp)

    def relay(self, model: str, version: str | None, body: dict[str, Any]) -> Relay | None:
        """`predict` as a Relay (the web worker's loop sends it and waits for its answer holding no thread), when
        a server is known to answer; None otherwise (`predict` starts one). A Relay's NotSent is `predict`'s
        first attempt failing: the caller runs `predict`, which starts a server."""
        port = self._trusted_port()
        if port is None:
            return None
        path, data, request_id = self._predict_request(model, version, body)
        exchange = self._connections(port).exchange("POST", path, body=data, headers=self._predict_headers(request_id))
        return Relay(exchange, partial(self._relay_answered, model, version),
                     partial(self._predict_failed, request_id=request_id, model=model), self.predict_timeout)

    def _predict_request(self, model: str, version: str | None, body: dict[str, Any]) -> tuple[str, bytes, str]:
        path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
        return path, json.dumps(body).encode(), uuid.uuid4().hex[:16]

    def _predict_headers(self, request_id: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "X-Request-Id": request_id, **self._server_auth()}

    def _predict_answered(self, model: str, version: str | None, resp: Answer) -> tuple[str, dict[str, Any]]:
        answered, data = self._relay_answered(model, version, resp)
        return answered, json.loads(data)

    def _relay_answered(self, model: str, version: str | None, resp: Answer) -> tuple[str, bytes]:
        """The version that answered and the answer's JSON as the model server wrote it: TF Serving's
        {"predictions": ...} or {"outputs": ...}, nothing else; a refusal raised as predict raises it."""
        if resp.status >= 400:
            raise self._refusal(model, resp.status, resp.data, resp.reason)
        return resp.headers.get("x-model-version") or version or "", resp.data

    def _predict_failed(self, exc: OSError, request_id: str, model: str) -> BackendError:
        """The error for a predict sent and then not answered; a server that died meanwhile is started again."""
        from model_registry.adapters.backends.local_client import CutOff

        if isinstance(exc, CutOff):  # sent, then cut off
            what = "stopped while answering" if self._server_died(request_id, model, exc) else "cut off"
            return BackendError(f"the local model server {what} this request (request {request_id}); "
                                "it is not sent again", f"see {self.serving / 'server.log'}")
        # a time-out, or another transport failure
        return BackendError(f"the local model server did not answer: {exc}", f"see {self.serving / 'server.log'}")

    def _connections(self, port: int) -> ServerConnections:
        """Keep-alive connections to the model server on `port` (one set per server, shared by threads)."""
        from model_registry.adapters.backends.local_client import ServerConnections

        with self._connections_lock:
            if self._server_connections is None or self._server_connections.port != port:
                if self._server_connections is not None:
                    self._server_connections.close()
                self._server_connections = ServerConnections(port)
            return self._server_connections

    def _refusal(self, model: str, status: int, data: bytes, reason: str | None) -> Exception:
        try:
            message = json.loads(data).get("error") or reason or str(status)
        except (ValueError, AttributeError):
            message = reason or str(status)
        if status == 404:
            return NotFound(message, f"list versions with `versions {model}`")
        if status in (400, 413):
            return InvalidInput(message, 'send {"instances": [{INPUT: VALUE, ...}, ...]}; '
                                         f"`diff {model}` shows the signature's inputs")
        return BackendError(f"the local model server failed: {message}", f"see {self.serving / 'server.log'}")

    def _known_info(self) -> dict[str, Any] | None:
        """server.json as read when the server was last seen answering, else as it is now."""
        known = self._known
        return (known.info if known else None) or self._server_info()

    def _server_auth(self) -> dict[str, str]:
        info = self._known_info() or {}
        return {"Authorization": f"Bearer {info.get('secret', '')}"}

    def _server_died(self, request_id: str, model: str, exc: BaseException) -> bool:
        """Log which request ended the model server and why (server.log's last lines), and start a new one;
        False (and only logged) when the server still runs."""
        info = self._known_info()
        deadline = time.monotonic() + 5.0
        while info and proc_start_time(int(info["pid"])) == info.get("pid_start") and time.monotonic() < deadline:
            time.sleep(0.05)  # an aborting process takes a moment to go; its last words reach server.log
        if info and proc_start_time(int(info["pid"])) == info.get("pid_start"):
            log.error("the local model server cut off request %s (predict %s) but still runs: %s",
                      request_id, model, exc)
            return False
        tail = _last_lines(self.serving / "server.log", 16384)[-3:]
        log.error("the local model server stopped during request %s (predict %s): %s; server.log ends: %s",
                  request_id, model, exc, " | ".join(tail) or "(empty)")
        self._forget_server()

        def restart() -> None:
            try:
                self.ensure_server()
            except BackendError as error:
                log.error("the local model server did not start again: %s", error.message)

        threading.Thread(target=restart, name="model-server-restart", daemon=True).start()
        return True

    def ensure_server(self) -> int:
        """The port of the running model server, starting one if none answers (one per STARCHART_HOME).

        A server this process has seen answer is trusted while its process lives and server.json is the file it
        was read from (its stat; no health request per prediction); one that stopped answering is forgotten by
        `predict`. (A killed server's pooled connections would be cut off mid-request: its process is watched,
        local_runner.ProcessWatch.)
        """
        port = self._trusted_port()
        if port is not None:
            return port
        port = self._server_port()
        if port:
            return port
        self.serving.mkdir(parents=True, exist_ok=True)
        with open(self.serving / "server.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first predicts (web workers) start one server
            port = self._server_port()
            if port:
                return port
            self._forget_server()
            log_path = self.serving / "server.log"
            with contextlib.suppress(OSError):  # one old log kept: the file does not grow without end
                if log_path.stat().st_size > SERVER_LOG_MAX:
                    os.replace(log_path, log_path.with_name("server.log.1"))
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(  # by file: the serving Python may be another environment (TensorFlow's)
                    [self.python, LOCAL_SERVING, str(self.serving)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                )
            threading.Thread(target=proc.wait, name="model-server-reaper", daemon=True).start()
            deadline = time.monotonic() + SERVER_START_TIMEOUT
            while time.monotonic() < deadline:
                port = self._server_port(pid=proc.pid)
                if port:
                    return port
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
            proc.kill()
            lines = _last_lines(self.serving / "server.log", 16384)[-1:]
            why = lines[-1] if proc.returncode is not None and lines else "it did not listen in time"
            raise BackendError(f"the local model server did not start: {why}", f"see {self.serving / 'server.log'}")

    def _trusted_port(self) -> int | None:
        """The port of the server last seen answering while its process lives and server.json is unchanged."""
        known = self._known
        if known is not None and known.stamp is not None and self._info_stamp() == known.stamp and known.watch.alive():
            return int(known.info["port"])
        return None

    def stop_server(self) -> bool:
        """Stop this home's model server, if one runs; True when one was stopped."""
        info = self._server_info()
        alive = info is not None and proc_start_time(int(info["pid"])) == info.get("pid_start")
        if info is not None and alive:
            os.kill(int(info["pid"]), signal.SIGTERM)
        self._forget_server()
        return alive

    def _server_info(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.serving / "server.json").read_text())
        except (OSError, ValueError):
            return None

    def _info_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._info_path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _server_port(self, pid: int | None = None) -> int | None:
        stamp = self._info_stamp()  # before the read: a file replaced after it is read again next time
        info = self._server_info()
        if not info or (pid is not None and info.get("pid") != pid):
            return None
        if proc_start_time(int(info["pid"])) != info.get("pid_start"):
            return None
        req = urllib.request.Request(f"http://127.0.0.1:{info['port']}/healthz",
                                     headers={"Authorization": f"Bearer {info.get('secret', '')}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                if json.loads(resp.read()).get("pid") != info["pid"]:
                    return None
        except (OSError, ValueError):
            return None
        watch = ProcessWatch(int(info["pid"]), info.get("pid_start"))
        if not watch.alive():  # it ended since the health request
            return None
        old, self._known = self._known, _KnownServer(info, stamp, watch)
        if old is not None:
            old.watch.close()
        return int(info["port"])

    def _forget_server(self) -> None:
        old, self._known = self._known, None
        if old is not None:
            old.watch.close()
        (self.serving / "server.json").unlink(missing_ok=True)
