"""The local backend's model server: TensorFlow Serving's REST API for the versions on this machine.

`python -m model_registry.adapters.backends.local_serving SERVING_DIR` serves, on 127.0.0.1 and a free port:

    POST /v1/models/<model>:predict                     the default version (SERVING_DIR/<model>.json)
    POST /v1/models/<model>/versions/<version>:predict  a given version
    GET  /v1/models/<model>                             status of the default version
    GET  /healthz                                       the versions loaded and their model calls
    GET  /v1/models/<model>/canary                      the running canary's figures per side (local_canary.py)
    POST /v1/models/<model>/versions/<version>:warm     load a version and answer one prediction (before a
                                                        switch of the default sends it traffic)

The body of a predict is TF Serving's row format, {"instances": [...]} (each instance a dict of the
signature's inputs, or a bare value when it has one input), or its columnar format, {"inputs": {...}}.
The answer is {"predictions": [...]} (one value per instance when the signature has one output, else
a dict per instance), with the version that answered in the X-Model-Version header; errors are
{"error": "..."} with 400 or 404, as TF Serving answers them.

Every request must carry `Authorization: Bearer <secret>`, the random secret this server writes with its pid
and port to SERVING_DIR/server.json (mode 0600) when it starts: another local user cannot reach the models
around the web process's prediction token. Bodies are checked against the version's signature
(model_registry/domain/instances.py) before TensorFlow sees them, so no input can end the process.

This is a serving process: it imports TensorFlow (the bot's web process never does, and reaches it over
HTTP through LocalBackend.predict). It writes SERVING_DIR/server.json once it listens. It keeps loaded the
versions the pointer files name (default, canary's candidate) and those asked for by name lately, and unloads the
others, giving their memory back (local_versions.py).

It runs under waitress: one process (so requests for a version can be batched together and each SavedModel is
in memory once), an I/O loop that reads each request whole before a thread takes it (a slow client holds no
thread), keep-alive, a listen backlog that holds bursts, and idle connections closed after CHANNEL_TIMEOUT.
Predictions for one version are batched as TF Serving batches them (`serving: {max_batch_size,
batch_timeout_micros}` in the pointer file, from starchart.yaml): what is queued while the model is busy runs
as one call, so a request alone waits for nothing (batch_timeout_micros 0, the default) and concurrent ones
share calls.
"""

from __future__ import annotations

import contextlib
import faulthandler
import hmac
import importlib.util
import json
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from http import HTTPStatus
from pathlib import Path
from typing import Any

try:
    from model_registry.adapters.backends.local_runner import proc_start_time
except ImportError:  # run as a file by a Python without this project (STARCHART_TRAINER_PYTHON): a sibling file
    from local_runner import proc_start_time  # type: ignore[no-redef,import-not-found]
try:
    from model_registry.adapters.backends.local_canary import Canaries
except ImportError:  # run as a file by a Python without this project: a sibling file
    from local_canary import Canaries  # type: ignore[no-redef,import-not-found]
try:
    from model_registry.adapters.backends.local_versions import RequestError, Versions
except ImportError:  # run as a file by a Python without this project: a sibling file
    from local_versions import RequestError, Versions  # type: ignore[no-redef,import-not-found]
try:
    from model_registry.domain import instances
except ImportError:  # the same case: the domain's checks are one stdlib file, loaded by its path in the tree
    _spec = importlib.util.spec_from_file_location(
        "starchart_instances", Path(__file__).resolve().parents[2] / "domain" / "instances.py")
    assert _spec is not None and _spec.loader is not None
    instances = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(instances)

MAX_BODY = 8 * 1024 * 1024
THREADS = 32  # waitress' request threads: a full default batch of one-instance requests queues while one runs
BACKLOG = 2048  # connections the kernel holds before any is accepted: bursts are queued, not refused
CHANNEL_TIMEOUT = 60  # seconds an idle keep-alive connection stays open
MAX_BATCH_SIZE = 32  # instances per model call, unless the model's `serving:` says otherwise
# a version is warmed with these batch sizes before it takes traffic: TensorFlow's first call of a batch of more than
# one instance costs 25-35 ms more once (iris), whatever its size
WARM_BATCHES = (1, 2)
BATCH_TIMEOUT_MICROS = 0  # how long a batch waits for more requests when it is not full (0: not at all)
IDLE_EXIT = float(os.environ.get("STARCHART_SERVING_IDLE", "1800"))  # seconds without a request before exiting
_last_request = [time.monotonic()]
ROUTE = re.compile(r"^/v1/models/(?P<model>[a-z][a-z0-9_]{0,62})(?:/versions/(?P<version>v\d{14}))?"
                   r"(?P<verb>:predict|:warm)?$")
CANARY_ROUTE = re.compile(r"^/v1/models/(?P<model>[a-z][a-z0-9_]{0,62})/canary$")


class Models(Versions):
    """The versions this server serves (local_versions.py: which stay loaded), each a Batcher of its SavedModel."""

    def load(self, model: str, name: str, uri: str, options: dict[str, Any]) -> Batcher:
        import tensorflow as tf

        try:
            fn = tf.saved_model.load(uri.rstrip("/")).signatures["serving_default"]
        except Exception as exc:
            raise RequestError(404, f"could not load {model} {name} from {uri}: {exc}") from exc
        return Batcher(fn, max_batch_size=options.get("max_batch_size", MAX_BATCH_SIZE),
                       batch_timeout_micros=options.get("batch_timeout_micros", BATCH_TIMEOUT_MICROS))


class _Call:
    """One request's inputs (NumPy arrays), waiting for its share of a model call."""

    __slots__ = ("arrays", "rows", "ready", "finished", "outputs", "error")

    def __init__(self, arrays: dict[str, Any], rows: int | None) -> None:
        self.arrays, self.rows = arrays, rows  # rows None: not batch-major, runs alone
        self.ready = threading.Event()  # set when answered, or when this request's thread is to run the next batch
        self.finished = False
        self.outputs: dict[str, Any] | None = None
        self.error: BaseException | None = None


class Batcher:
    """One version's model calls, batched as TF Serving batches: the requests queued while the model is busy run
    as one call of up to `max_batch_size` instances (after waiting up to `batch_timeout_micros` for more when the
    batch is not full), and each request gets its rows of the outputs. A batch the model refuses is run again one
    request at a time, so only the request at fault gets the error.

    No thread of its own: the request that finds the model idle runs the call on its own thread (a request alone
    costs no hand-over), and when the call ends the head of the queue is woken to run the next batch. Dropping the
    batcher (an unloaded version) frees the model once the requests holding it finish."""

    def __init__(self, fn: Any, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_timeout_micros: int = BATCH_TIMEOUT_MICROS) -> None:
        self.fn = fn
        self.specs = fn.structured_input_signature[1]
        self.inputs = signature_inputs(self.specs)  # the signature in the stored form, for the body's checks
        self.max_batch_size = max(1, int(max_batch_size))
        self.timeout = max(0, int(batch_timeout_micros)) / 1e6
        self.calls = 0  # model calls made (read by tests and the benchmark through /healthz)
        self._queue: deque[_Call] = deque()
        self._cond = threading.Condition()
        self._busy = False  # a request's thread is running (or about to run) a batch

    def __call__(self, arrays: dict[str, Any], rows: int | None) -> dict[str, Any]:
        call = _Call(arrays, rows)
        with self._cond:
            self._queue.append(call)
            lead = not self._busy
            self._busy = True
            if self.timeout:
                self._cond.notify()  # a leader waiting for a fuller batch counts this one
        if not lead:
            call.ready.wait()
        if not call.finished:  # the model is this thread's: its request heads the queue, so the batch holds it
            self._lead()
        if call.error is not None:
            raise call.error
        assert call.outputs is not None
        return call.outputs

    def _lead(self) -> None:
        batch: list[_Call] = []
        try:
            with self._cond:
                if self.timeout:
                    deadline = time.monotonic() + self.timeout
                    while self._queued_rows() < self.max_batch_size and (left := deadline - time.monotonic()) > 0:
                        self._cond.wait(left)
                batch.append(self._queue.popleft())
                rows = batch[0].rows or self.max_batch_size
                while (self._queue and batch[0].rows is not None and self._queue[0].rows is not None
                       and rows + (self._queue[0].rows or 0) <= self.max_batch_size):
                    call = self._queue.popleft()
                    batch.append(call)
                    rows += call.rows or 0
            self._run(batch)
        finally:
            for c in batch:
                if c.outputs is None and c.error is None:  # not reached by _run: an error of this thread's
                    c.error = RequestError(500, "the model call was interrupted")
                c.finished = True
                c.ready.set()
            with self._cond:  # hand the model to the next request, or leave it idle
                if self._queue:
                    self._queue[0].ready.set()
                else:
                    self._busy = False

    def _queued_rows(self) -> int:
        return sum(c.rows or self.max_batch_size for c in self._queue)

    def _run(self, batch: list[_Call]) -> None:
        import numpy
        import tensorflow as tf

        if len(batch) > 1:
            # a refused batch, or outputs that are not one row per instance: one request at a time below
            with contextlib.suppress(tf.errors.InvalidArgumentError, ValueError, TypeError):
                outputs = self._call({k: numpy.concatenate([c.arrays[k] for c in batch]) for k in self.specs})
                total = sum(c.rows or 0 for c in batch)
                if all(v.ndim >= 1 and v.shape[0] == total for v in outputs.values()):
                    at = 0
                    for c in batch:
                        c.outputs = {k: v[at:at + (c.rows or 0)] for k, v in outputs.items()}
                        at += c.rows or 0
                    return
        for c in batch:
            try:
                c.outputs = self._call(c.arrays)
            except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
                c.error = RequestError(400, f"the model refused the input: {str(exc).splitlines()[0][:500]}")
            except Exception as exc:  # a bug or a broken model: this request's 500, the server keeps serving
                c.error = exc

    def _call(self, arrays: dict[str, Any]) -> dict[str, Any]:
        """One model call: the arrays as tensors of the signature's dtypes, the outputs as NumPy arrays."""
        import tensorflow as tf

        self.calls += 1
        tensors = {k: tf.constant(v, dtype=self.specs[k].dtype) for k, v in arrays.items()}
        return {k: v.numpy() for k, v in self.fn(**tensors).items()}


def columns(body: Any, specs: dict[str, Any]) -> dict[str, list[Any]]:
    """TF Serving's row or columnar request as one list of values per input."""
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise RequestError(400, 'the body must be a JSON object with either "instances" (a list) or "inputs"')
    names = sorted(specs)
    if "inputs" in body:
        inputs = body["inputs"]
        if len(names) == 1 and not isinstance(inputs, dict):
            inputs = {names[0]: inputs}
        if not isinstance(inputs, dict) or set(inputs) != set(names):
            raise RequestError(400, f'"inputs" must name exactly the inputs {", ".join(names)}')
        return {k: v if isinstance(v, list) else [v] for k, v in inputs.items()}
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise RequestError(400, '"instances" must be a non-empty list')
    out: dict[str, list[Any]] = {k: [] for k in names}
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            if len(names) != 1:
                raise RequestError(400, f"instance {i} is not an object, but the signature has the inputs "
                                        f"{', '.join(names)}: give each instance as {{name: value}}")
            inst = {names[0]: inst}
        missing, extra = set(names) - set(inst), set(inst) - set(names)
        if missing or extra:
            raise RequestError(400, f"instance {i}: " + "; ".join(
                ([f"missing input(s) {', '.join(sorted(missing))}"] if missing else [])
                + ([f"unknown input(s) {', '.join(sorted(extra))}"] if extra else []))
                + f" (the signature's inputs: {', '.join(names)})")
        for k in names:
            out[k].append(inst[k])
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def signature_inputs(specs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """TensorFlow's input specs in the form stored with versions: {name: {"dtype": "float32", "shape": [...]}}."""
    return {k: {"dtype": spec.dtype.name, "shape": None if spec.shape.rank is None
                else [-1 if d is None else int(d) for d in spec.shape.as_list()]} for k, spec in specs.items()}


def predict(models: Models, model: str, version: str | None, body: Any) -> tuple[str, dict[str, Any]]:
    import numpy

    name, batcher = models.signature(model, version)
    specs = batcher.specs
    try:  # the core checked already (with the model's policy on NaN); again here, as TensorFlow aborts on some
        instances.check_body(body, batcher.inputs, allow_non_finite=True)
    except instances.InstancesRefused as exc:
        raise RequestError(400, exc.message) from None
    arrays = {}  # checked values as NumPy arrays: made tensors once per model call, for the whole batch
    for key, values in columns(body, specs).items():
        spec = specs[key]
        try:
            arrays[key] = numpy.asarray(values, dtype=spec.dtype.as_numpy_dtype)
        except (TypeError, ValueError, OverflowError) as exc:
            raise RequestError(400, f"input {key}: expected {spec.dtype.name} values: {exc}") from None
        if not spec.shape.is_compatible_with(arrays[key].shape):
            raise RequestError(400, f"input {key}: shape {list(arrays[key].shape)} does not fit the "
                                    f"signature's {spec.shape}")
    ranks = {a.ndim for a in arrays.values()}
    sizes = {a.shape[0] for a in arrays.values() if a.ndim}
    rows = sizes.pop() if 0 not in ranks and len(sizes) == 1 else None  # batch-major inputs join a batch
    outputs = {k: _plain(v.tolist()) for k, v in batcher(arrays, rows).items()}
    if "inputs" in body:
        only = next(iter(outputs.values())) if len(outputs) == 1 else outputs
        return name, {"outputs": only}
    keys = sorted(outputs)
    rows = len(next(iter(outputs.values())))
    if len(keys) == 1:
        return name, {"predictions": outputs[keys[0]]}
    return name, {"predictions": [{k: outputs[k][i] for k in keys} for i in range(rows)]}


class App:
    """The WSGI application waitress serves: routes, the secret, the body limit, errors as JSON."""

    def __init__(self, models: Models, secret: str) -> None:
        self.models, self.secret = models, secret
        self.canaries = Canaries(lambda model, version, body: predict(self.models, model, version, body)[1])

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        _last_request[0] = time.monotonic()
        status, body, version = self.route(environ)
        data = b"" if environ["REQUEST_METHOD"] == "HEAD" else json.dumps(body).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
        if version:
            headers.append(("X-Model-Version", version))
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [data]

    def route(self, environ: dict[str, Any]) -> tuple[int, dict[str, Any], str | None]:
        given = environ.get("HTTP_AUTHORIZATION") or ""
        if not hmac.compare_digest(given.encode(), f"Bearer {self.secret}".encode()):
            return 401, {"error": "send this server's secret: Authorization: Bearer <secret in server.json>"}, None
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO") or "/"
        if method in ("GET", "HEAD") and path == "/healthz":
            return 200, {"ok": True, "pid": os.getpid(), "model_calls": {
                f"{m}/{v}": b.calls for (m, v), b in list(self.models.loaded.items())}}, None
        m = ROUTE.match(path)
        canary = CANARY_ROUTE.match(path)
        try:
            if method in ("GET", "HEAD") and canary:
                model = canary["model"]
                return 200, self.canaries.figures(model, self.models.pointer(model).get("canary")), None
            if method == "POST" and m and m["verb"] == ":warm" and m["version"]:
                return self.warm(m["model"], m["version"])
            if method in ("GET", "HEAD") and m and not m["verb"]:
                name, _ = self.models.resolve(m["model"], m["version"])
                return 200, {"model_version_status": [
                    {"version": name, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}, name
            if method != "POST" or not m or m["verb"] != ":predict":
                return 404, {"error": f"no route for {method} {path}"}, None
            return self.predict(environ, m["model"], m["version"])
        except RequestError as exc:
            return exc.status, {"error": exc.message}, None

    def warm(self, model: str, version: str) -> tuple[int, dict[str, Any], str]:
        """Load `version` and run predictions on an instance built from its signature, so that the first
        requests it gets after a switch find it ready: one instance, then two. TensorFlow specialises a signature's
        function again for its first batch of more than one instance (25-35 ms once, iris); unwarmed, that lands on
        the first batch after the switch and on every request waiting in it."""
        t0 = time.monotonic()
        name, batcher = self.models.signature(model, version)
        instance = instances.example_instance(signature_inputs(batcher.specs))
        for size in WARM_BATCHES:
            predict(self.models, model, name, {"instances": [instance] * size})
        took = time.monotonic() - t0
        sys.stderr.write(f"warmed {model} {name} with batches of {' and '.join(map(str, WARM_BATCHES))} instances "
                         f"in {took:.2f}s\n")
        sys.stderr.flush()
        return 200, {"model": model, "version": name, "seconds": round(took, 3)}, name

    def predict(self, environ: dict[str, Any], model: str, version: str | None) -> tuple[int, dict[str, Any], str]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            raise RequestError(400, "Content-Length is not a number") from None
        if length > MAX_BODY:
            raise RequestError(413, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(environ["wsgi.input"].read(length) or b"null")
        except RecursionError:
            raise RequestError(400, f"the body is nested more than {instances.MAX_DEPTH} levels deep") from None
        except ValueError as exc:
            raise RequestError(400, f"the body is not JSON: {exc}") from None
        canary = None
        if version is None:  # the default's route: a running canary takes its share (local_canary.py)
            version, canary = self.canaries.route(model, self.models.pointer(model))
        started, ok = time.monotonic(), False
        try:
            name, answer = predict(self.models, model, version, body)
            ok = True
        except RequestError:
            raise
        except Exception as exc:  # a bug or a broken model: say so, keep serving
            sys.stderr.write(f"predict failed: {exc!r}\n")
            raise RequestError(500, f"prediction failed: {type(exc).__name__}: {exc}"[:500]) from None
        finally:
            if canary is not None:
                side = "candidate" if version is not None else "base"
                self.canaries.count(model, canary, side, time.monotonic() - started, ok)
        if canary is not None and version is None:
            self.canaries.maybe_mirror(model, canary, body, answer)
        return 200, answer, name


def main() -> None:
    serving_dir = Path(sys.argv[1])
    serving_dir.mkdir(parents=True, exist_ok=True)
    try:
        import tensorflow  # noqa: F401 - at start: a server that cannot load a model should not listen
        import waitress.server
    except ImportError as exc:
        what = {"tensorflow": "TensorFlow", "waitress": "waitress"}.get(exc.name or "", exc.name)
        sys.stderr.write(f"cannot serve: {what} is not importable by {sys.executable} ({exc}); install it there "
                         "(pip install '.[train]') or set STARCHART_TRAINER_PYTHON to a Python that has it\n")
        sys.exit(3)
    # a fatal signal (TensorFlow aborting on an input no check foresaw) writes every thread's stack to server.log:
    # the requests in flight are named by the web process, which logs the id of each one cut off
    faulthandler.enable(file=sys.stderr, all_threads=True)
    secret = secrets.token_urlsafe(32)
    server = waitress.server.create_server(
        # bodies up to 4 x MAX_BODY are read and answered 413 with the reason; longer ones are cut off by waitress
        App(Models(serving_dir), secret), host="127.0.0.1", port=0, threads=THREADS, backlog=BACKLOG,
        channel_timeout=CHANNEL_TIMEOUT, max_request_body_size=4 * MAX_BODY, connection_limit=4096,
        ident="starchart-local-serving", clear_untrusted_proxy_headers=True)
    info = {"pid": os.getpid(), "pid_start": proc_start_time(os.getpid()), "port": server.effective_port,
            "secret": secret}
    tmp = serving_dir / f".server.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the secret: readable by this user only
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(info))
    os.replace(tmp, serving_dir / "server.json")
    sys.stderr.write(f"serving {serving_dir} on 127.0.0.1:{info['port']}\n")
    sys.stderr.flush()

    def forget_me() -> None:
        with contextlib.suppress(OSError, ValueError):  # another server took over, or the file is gone
            if json.loads((serving_dir / "server.json").read_text()).get("pid") == os.getpid():
                (serving_dir / "server.json").unlink()

    def exit_when_idle() -> None:  # a laptop's server does not outlive its use by long
        while time.monotonic() - _last_request[0] < IDLE_EXIT:
            time.sleep(min(30.0, IDLE_EXIT / 4))
        sys.stderr.write(f"no request for {IDLE_EXIT:.0f}s: exiting\n")
        sys.stderr.flush()
        forget_me()
        os._exit(0)  # waitress' loop has no stop from another thread; nothing is in flight after the idle time

    threading.Thread(target=exit_when_idle, daemon=True).start()
    try:
        server.run()
    finally:
        forget_me()


if __name__ == "__main__":
    main()
