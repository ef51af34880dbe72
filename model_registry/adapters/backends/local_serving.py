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

It runs under uvicorn (httptools' parser, uvloop's event loop where they are importable): one process, so
requests for a version can be batched together and each SavedModel is in memory once; one event loop reads every
connection, so a slow client holds no thread; keep-alive, a listen backlog that holds bursts, idle connections
closed after CHANNEL_TIMEOUT, and a body that does not arrive within BODY_TIMEOUT answered 408. The requests'
Python work (JSON, the checks) runs on the loop, and the model calls on threads (MODEL_CALLS), where TensorFlow
releases the GIL. Predictions for one version are batched as TF Serving batches them (`serving: {max_batch_size,
batch_timeout_micros}` in the pointer file, from starchart.yaml): what is queued while the model is busy runs
as one call, so a request alone waits for nothing (batch_timeout_micros 0, the default) and concurrent ones
share calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import hmac
import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
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
# threads for model calls (one per version at a time: TensorFlow releases the GIL, the loop reads requests meanwhile)
MODEL_CALLS = ThreadPoolExecutor(8, thread_name_prefix="model-call")
BACKLOG = 2048  # connections the kernel holds before any is accepted: bursts are queued, not refused
CHANNEL_TIMEOUT = 60  # seconds an idle keep-alive connection stays open
BODY_TIMEOUT = float(os.environ.get("STARCHART_SERVING_BODY_TIMEOUT", "30"))  # seconds a request's body may take
MAX_BATCH_SIZE = 32  # instances per model call, unless the model's `serving:` says otherwise
# a version is warmed with these batch sizes before it takes traffic: TensorFlow's first call of a batch of more than
# one instance costs 25-35 ms more once (iris), whatever its size
WARM_BATCHES = (1, 2)
BATCH_TIMEOUT_MICROS = 0  # how long a batch waits for more requests when it is not full (0: see GATHER_TURNS)
# with no batch_timeout_micros, a batch that is not full is gathered while the loop's turns bring requests for it,
# and closes after this many turns that brought none: a request alone waits a few microseconds; concurrent clients
# answered by the last batch are in the next one (at 32 clients, batches of 31 instead of two alternating of 16)
GATHER_TURNS = 3
IDLE_EXIT = float(os.environ.get("STARCHART_SERVING_IDLE", "1800"))  # seconds without a request before exiting
_last_request = [time.monotonic()]
ROUTE = re.compile(r"^/v1/models/(?P<model>[a-z][a-z0-9_]{0,62})(?:/versions/(?P<version>v\d{14}))?"
                   r"(?P<verb>:predict|:warm)?$")
CANARY_ROUTE = re.compile(r"^/v1/models/(?P<model>[a-z][a-z0-9_]{0,62})/canary$")


class Models(Versions):
    """The versions this server serves (local_versions.py: which stay loaded), each a Batcher of its SavedModel."""

    def __init__(self, serving_dir: Path) -> None:
        # the server's event loop, where the batchers queue, and its thread (App sets both at its first request)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.loop_thread: int | None = None
        self._turn: dict[str, os.stat_result | None] = {}  # the pointer files' stats taken in this turn of the loop
        super().__init__(serving_dir)  # last: it starts the sweep's thread, which stats the pointer files

    def _stat(self, model: str) -> os.stat_result | None:
        """On the loop, a pointer file's stat is taken once per turn of the loop: every request handled in a turn
        arrived before the turn began, so a stat taken in it sees any switch made before the request was sent.
        (A stat per request releases the GIL twice a request; under load the loop then waits for the model
        call's thread to give it back: a quarter of the loop's time, measured.)"""
        if self.loop is None or threading.get_ident() != self.loop_thread:
            return super()._stat(model)
        if model in self._turn:
            return self._turn[model]
        if not self._turn:  # the first stat of this turn: forgotten at the start of the next one
            self.loop.call_soon(self._turn.clear)
        stat = self._turn[model] = super()._stat(model)
        return stat

    def load(self, model: str, name: str, uri: str, options: dict[str, Any]) -> Batcher:
        import tensorflow as tf

        assert self.loop is not None, "versions are loaded for requests, which come through the loop"

        try:
            fn = tf.saved_model.load(uri.rstrip("/")).signatures["serving_default"]
        except Exception as exc:
            raise RequestError(404, f"could not load {model} {name} from {uri}: {exc}") from exc
        return Batcher(fn, self.loop, max_batch_size=options.get("max_batch_size", MAX_BATCH_SIZE),
                       batch_timeout_micros=options.get("batch_timeout_micros", BATCH_TIMEOUT_MICROS))


class _Call:
    """One request's inputs (NumPy arrays), waiting on the server's event loop for its share of a model call."""

    __slots__ = ("arrays", "rows", "future", "outputs", "error")

    def __init__(self, arrays: dict[str, Any], rows: int | None, future: asyncio.Future[dict[str, Any]]) -> None:
        self.arrays, self.rows = arrays, rows  # rows None: not batch-major, runs alone
        self.future = future  # resolved on the loop when the call's rows are known
        self.outputs: dict[str, Any] | None = None
        self.error: BaseException | None = None


class Batcher:
    """One version's model calls, batched as TF Serving batches: the requests queued while the model is busy run
    as one call of up to `max_batch_size` instances (after waiting up to `batch_timeout_micros` for more when the
    batch is not full), and each request gets its rows of the outputs. A batch the model refuses is run again one
    request at a time, so only the request at fault gets the error.

    The queue lives on the server's event loop: a request finding the model idle starts the drain, which takes a
    batch once GATHER_TURNS turns of the loop have brought no more requests for it (or after batch_timeout_micros,
    when that is set), so the requests arriving together share the call. A model call runs on a
    thread of MODEL_CALLS (TensorFlow releases the GIL, and the loop reads the next requests meanwhile); one call per
    version at a time. Dropping the batcher (an unloaded version) frees the model once the requests holding it
    finish."""

    def __init__(self, fn: Any, loop: asyncio.AbstractEventLoop, max_batch_size: int = MAX_BATCH_SIZE,
                 batch_timeout_micros: int = BATCH_TIMEOUT_MICROS) -> None:
        self.fn, self.loop = fn, loop
        self.specs = fn.structured_input_signature[1]
        self.inputs = signature_inputs(self.specs)  # the signature in the stored form, for the body's checks
        # each input's NumPy dtype and shape (None: any size), for the checks of every request
        self.dtypes = {k: spec.dtype.as_numpy_dtype for k, spec in self.specs.items()}
        self.shapes = {k: None if spec.shape.rank is None else tuple(spec.shape.as_list())
                       for k, spec in self.specs.items()}
        self.max_batch_size = max(1, int(max_batch_size))
        self.timeout = max(0, int(batch_timeout_micros)) / 1e6
        self.calls = 0  # model calls made (read by tests and the benchmark through /healthz)
        self._queue: deque[_Call] = deque()
        self._drainer: asyncio.Task[None] | None = None  # running while the queue is not empty
        self._full: asyncio.Event | None = None  # set when a batch waiting for more requests is full

    async def submit(self, arrays: dict[str, Any], rows: int | None) -> dict[str, Any]:
        """The outputs of one request's rows (on the loop)."""
        call = _Call(arrays, rows, self.loop.create_future())
        self._queue.append(call)
        if self._drainer is None:
            self._drainer = self.loop.create_task(self._drain())
        elif self._full is not None and self._queued_rows() >= self.max_batch_size:
            self._full.set()
        return await call.future

    def __call__(self, arrays: dict[str, Any], rows: int | None) -> dict[str, Any]:
        """The same from a thread other than the loop's (a warm, a mirrored request): queued with the others."""
        return asyncio.run_coroutine_threadsafe(self.submit(arrays, rows), self.loop).result()

    async def _drain(self) -> None:
        batch: list[_Call] = []
        try:
            while self._queue:
                if self.timeout and self._queued_rows() < self.max_batch_size:
                    self._full = asyncio.Event()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._full.wait(), self.timeout)
                    self._full = None
                quiet = 0  # turns of the loop that brought no request for this batch
                while not self.timeout and quiet < GATHER_TURNS and self._queued_rows() < self.max_batch_size:
                    queued = len(self._queue)
                    await asyncio.sleep(0)  # one turn: the connections that are ready are read
                    quiet = quiet + 1 if len(self._queue) == queued else 0
                batch = self._take()
                try:
                    await self.loop.run_in_executor(MODEL_CALLS, self._run, batch)
                except Exception as exc:  # not one of the request's errors (_run answers those): each request's 500
                    for c in batch:
                        if c.outputs is None and c.error is None:
                            c.error = exc
                self._settle(batch)
                batch = []
        finally:  # cancelled (the server stops): nobody waits for ever
            self._drainer = None
            self._settle(batch + list(self._queue))
            self._queue.clear()

    def _take(self) -> list[_Call]:
        batch = [self._queue.popleft()]
        rows = batch[0].rows or self.max_batch_size
        while (self._queue and batch[0].rows is not None and self._queue[0].rows is not None
               and rows + (self._queue[0].rows or 0) <= self.max_batch_size):
            call = self._queue.popleft()
            batch.append(call)
            rows += call.rows or 0
        return batch

    @staticmethod
    def _settle(batch: list[_Call]) -> None:
        for c in batch:
            if c.future.done():  # its request was cancelled
                continue
            if c.outputs is not None:
                c.future.set_result(c.outputs)
            else:
                c.future.set_exception(c.error or RequestError(500, "the model call was interrupted"))

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


def _inputs(batcher: Batcher, body: Any) -> tuple[dict[str, Any], int | None]:
    """A request's checked inputs as NumPy arrays (made tensors once per model call, for the whole batch), and its
    rows when they are batch-major (None: it runs alone)."""
    import numpy

    specs = batcher.specs
    try:  # the core checked already (with the model's policy on NaN); again here, as TensorFlow aborts on some
        instances.check_body(body, batcher.inputs, allow_non_finite=True)
    except instances.InstancesRefused as exc:
        raise RequestError(400, exc.message) from None
    arrays = {}
    for key, values in columns(body, specs).items():
        try:
            arrays[key] = array = numpy.asarray(values, dtype=batcher.dtypes[key])
        except (TypeError, ValueError, OverflowError) as exc:
            raise RequestError(400, f"input {key}: expected {specs[key].dtype.name} values: {exc}") from None
        shape = batcher.shapes[key]
        if shape is not None and (len(shape) != array.ndim
                                  or any(d is not None and d != n for d, n in zip(shape, array.shape))):
            raise RequestError(400, f"input {key}: shape {list(array.shape)} does not fit the "
                                    f"signature's {specs[key].shape}")
    ranks = {a.ndim for a in arrays.values()}
    sizes = {a.shape[0] for a in arrays.values() if a.ndim}
    return arrays, (sizes.pop() if 0 not in ranks and len(sizes) == 1 else None)  # batch-major inputs join a batch


def _answer(body: Any, result: dict[str, Any]) -> dict[str, Any]:
    """TF Serving's answer to `body` (row or columnar format) from its rows of the outputs."""
    outputs = {k: _plain(v.tolist()) for k, v in result.items()}
    if "inputs" in body:
        only = next(iter(outputs.values())) if len(outputs) == 1 else outputs
        return {"outputs": only}
    keys = sorted(outputs)
    rows = len(next(iter(outputs.values())))
    if len(keys) == 1:
        return {"predictions": outputs[keys[0]]}
    return {"predictions": [{k: outputs[k][i] for k in keys} for i in range(rows)]}


def predict(models: Models, model: str, version: str | None, body: Any) -> tuple[str, dict[str, Any]]:
    """A prediction from a thread other than the loop's (a warm, a mirrored request)."""
    name, batcher = models.signature(model, version)
    arrays, rows = _inputs(batcher, body)
    return name, _answer(body, batcher(arrays, rows))


async def predict_async(models: Models, model: str, version: str | None, body: Any) -> tuple[str, dict[str, Any]]:
    """A prediction on the loop: a version not loaded yet is loaded on another thread, so the loop goes on."""
    found = models.signature_if_loaded(model, version)
    if found is None:
        found = await asyncio.get_running_loop().run_in_executor(None, models.signature, model, version)
    name, batcher = found
    arrays, rows = _inputs(batcher, body)
    return name, _answer(body, await batcher.submit(arrays, rows))


class _Closing(RequestError):
    """A refusal after which the connection is closed: the rest of the request is not read."""


def _header(scope: dict[str, Any], name: bytes) -> bytes | None:
    for key, value in scope["headers"]:  # ASGI gives the names in lower case
        if key == name:
            return bytes(value)
    return None


class App:
    """The ASGI application uvicorn serves: routes, the secret, the body limit, errors as JSON."""

    def __init__(self, models: Models, secret: str) -> None:
        self.models = models
        self.expected = f"Bearer {secret}".encode()  # the Authorization header every request must carry
        self.canaries = Canaries(lambda model, version, body: predict(self.models, model, version, body)[1])
        self.reading: dict[asyncio.Task[Any], float] = {}  # requests reading their bodies, since when
        self.late: set[asyncio.Task[Any]] = set()  # of those, the ones the sweep is ending

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # no lifespan, no websockets (uvicorn is told so)
            return
        _last_request[0] = time.monotonic()
        if self.models.loop is None:
            self.models.loop, self.models.loop_thread = asyncio.get_running_loop(), threading.get_ident()
            self.sweep_reads()
        close = False
        try:
            status, body, version = await self.route(scope, receive)
        except RequestError as exc:
            status, body, version, close = exc.status, {"error": exc.message}, None, isinstance(exc, _Closing)
        except Exception as exc:  # a bug: this request's 500, the server keeps serving
            sys.stderr.write(f"request failed: {exc!r}\n")
            status, body, version = 500, {"error": f"{type(exc).__name__}: {exc}"[:500]}, None
        data = b"" if scope["method"] == "HEAD" else json.dumps(body).encode()
        headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(data))]
        if version:
            headers.append((b"x-model-version", version.encode()))
        if close:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def route(self, scope: dict[str, Any], receive: Any) -> tuple[int, dict[str, Any], str | None]:
        if not hmac.compare_digest(_header(scope, b"authorization") or b"", self.expected):
            return 401, {"error": "send this server's secret: Authorization: Bearer <secret in server.json>"}, None
        method, path = scope["method"], scope["path"] or "/"
        if method in ("GET", "HEAD") and path == "/healthz":
            return 200, {"ok": True, "pid": os.getpid(), "model_calls": {
                f"{m}/{v}": b.calls for (m, v), b in list(self.models.loaded.items())}}, None
        m = ROUTE.match(path)
        canary = CANARY_ROUTE.match(path)
        if method in ("GET", "HEAD") and canary:
            model = canary["model"]
            return 200, self.canaries.figures(model, self.models.pointer(model).get("canary")), None
        if method == "POST" and m and m["verb"] == ":warm" and m["version"]:
            return await asyncio.get_running_loop().run_in_executor(None, self.warm, m["model"], m["version"])
        if method in ("GET", "HEAD") and m and not m["verb"]:
            name, _ = self.models.resolve(m["model"], m["version"])
            return 200, {"model_version_status": [
                {"version": name, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}, name
        if method != "POST" or not m or m["verb"] != ":predict":
            return 404, {"error": f"no route for {method} {path}"}, None
        return await self.predict(scope, receive, m["model"], m["version"])

    def warm(self, model: str, version: str) -> tuple[int, dict[str, Any], str]:
        """Load `version` and run predictions on an instance built from its signature, so that the first
        requests it gets after a switch find it ready: one instance, then two. TensorFlow specialises a signature's
        function again for its first batch of more than one instance (25-35 ms once, iris); unwarmed, that lands on
        the first batch after the switch and on every request waiting in it. (On a thread of its own.)"""
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

    async def read_body(self, scope: dict[str, Any], receive: Any) -> bytes:
        """The request's body, of at most MAX_BODY bytes, arriving within BODY_TIMEOUT."""
        given = _header(scope, b"content-length")
        if given is not None:  # the parser has checked that it is a number
            length = int(given)
            if length > MAX_BODY:
                # the rest of a body up to 4 x MAX_BODY is read and dropped, so a client that sends it all before
                # reading gets the reason; a longer one is not read: the connection is closed
                error = RequestError if length <= 4 * MAX_BODY else _Closing
                raise error(413, f"request body over {MAX_BODY} bytes")
        chunks, size, more = [], 0, True
        task = asyncio.current_task()
        assert task is not None
        self.reading[task] = time.monotonic()  # the sweep ends a read that takes longer than BODY_TIMEOUT
        try:
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _Closing(400, "the client went away before its body arrived")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > MAX_BODY:  # a chunked body: its length is known as it arrives
                    raise _Closing(413, f"request body over {MAX_BODY} bytes")
                chunks.append(chunk)
                more = message.get("more_body", False)
        except asyncio.CancelledError:
            if task not in self.late:
                raise  # the server stops
            self.late.discard(task)
            task.uncancel()
            raise _Closing(408, f"the request's body did not arrive within {BODY_TIMEOUT:g} seconds") from None
        finally:
            del self.reading[task]
        return b"".join(chunks)

    def sweep_reads(self) -> None:
        """Each second, on the loop: the bodies being read for longer than BODY_TIMEOUT are given up (408). One
        sweep for all requests: a timer per request costs the loop more than the rest of reading its body."""
        assert self.models.loop is not None
        now = time.monotonic()
        for task, since in list(self.reading.items()):
            if now - since > BODY_TIMEOUT and task not in self.late:
                self.late.add(task)
                task.cancel()  # the task waits in read_body's receive(): only a task reading is in self.reading
        self.models.loop.call_later(1.0, self.sweep_reads)

    async def predict(self, scope: dict[str, Any], receive: Any, model: str,
                      version: str | None) -> tuple[int, dict[str, Any], str]:
        data = await self.read_body(scope, receive)
        try:
            body = json.loads(data or b"null")
        except RecursionError:
            raise RequestError(400, f"the body is nested more than {instances.MAX_DEPTH} levels deep") from None
        except ValueError as exc:
            raise RequestError(400, f"the body is not JSON: {exc}") from None
        canary = None
        if version is None:  # the default's route: a running canary takes its share (local_canary.py)
            version, canary = self.canaries.route(model, self.models.pointer(model))
        started, ok = time.monotonic(), False
        try:
            name, answer = await predict_async(self.models, model, version, body)
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


def listening_socket() -> socket.socket:
    """A socket on 127.0.0.1 and a free port, listening: its port goes to server.json before the loop starts, and
    connections made meanwhile wait in the backlog."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(BACKLOG)
    return sock


def main() -> None:
    serving_dir = Path(sys.argv[1])
    serving_dir.mkdir(parents=True, exist_ok=True)
    try:
        import tensorflow  # noqa: F401 - at start: a server that cannot load a model should not listen
        import uvicorn
    except ImportError as exc:
        what = {"tensorflow": "TensorFlow", "uvicorn": "uvicorn"}.get(exc.name or "", exc.name)
        sys.stderr.write(f"cannot serve: {what} is not importable by {sys.executable} ({exc}); install it there "
                         "(pip install '.[train]') or set STARCHART_TRAINER_PYTHON to a Python that has it\n")
        sys.exit(3)
    # a fatal signal (TensorFlow aborting on an input no check foresaw) writes every thread's stack to server.log:
    # the requests in flight are named by the web process, which logs the id of each one cut off
    faulthandler.enable(file=sys.stderr, all_threads=True)
    secret = secrets.token_urlsafe(32)
    sock = listening_socket()
    config = uvicorn.Config(
        App(Models(serving_dir), secret), ws="none", lifespan="off", backlog=BACKLOG,
        # httptools' parser and uvloop's loop where importable (uvicorn's own choice is the same): h11 and asyncio's
        # loop answer the same, slower
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        timeout_keep_alive=CHANNEL_TIMEOUT, timeout_graceful_shutdown=5, server_header=False, proxy_headers=False,
        access_log=False, log_config=None, log_level="warning")
    info = {"pid": os.getpid(), "pid_start": proc_start_time(os.getpid()), "port": sock.getsockname()[1],
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
        os._exit(0)  # nothing is in flight after the idle time

    threading.Thread(target=exit_when_idle, daemon=True).start()
    # uvicorn catches SIGTERM and SIGINT, lets the requests in flight finish (up to 5 s), then raises the signal
    # again with the handler it found: this one, so that server.json is removed on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        forget_me()


if __name__ == "__main__":
    main()
