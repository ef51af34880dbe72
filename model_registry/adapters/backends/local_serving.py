"""The local backend's model server: TensorFlow Serving's REST API for the versions on this machine.

`python -m model_registry.adapters.backends.local_serving SERVING_DIR` serves, on 127.0.0.1 and a free port:

    POST /v1/models/<model>:predict                     the default version (SERVING_DIR/<model>.json)
    POST /v1/models/<model>/versions/<version>:predict  a given version
    GET  /v1/models/<model>                             status of the default version
    GET  /healthz

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
HTTP through LocalBackend.predict). It writes SERVING_DIR/server.json once it listens, and
keeps the few versions it served last loaded.
"""

from __future__ import annotations

import hmac
import importlib.util
import json
import os
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

try:
    from model_registry.adapters.backends.local_runner import proc_start_time
except ImportError:  # run as a file by a Python without this project (STARCHART_TRAINER_PYTHON): a sibling file
    from local_runner import proc_start_time  # type: ignore[no-redef,import-not-found]
try:
    from model_registry.domain import instances
except ImportError:  # the same case: the domain's checks are one stdlib file, loaded by its path in the tree
    _spec = importlib.util.spec_from_file_location(
        "starchart_instances", Path(__file__).resolve().parents[2] / "domain" / "instances.py")
    assert _spec is not None and _spec.loader is not None
    instances = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(instances)

MAX_BODY = 8 * 1024 * 1024
LOADED_VERSIONS = 4  # SavedModels kept in memory, least recently used dropped first
IDLE_EXIT = float(os.environ.get("STARCHART_SERVING_IDLE", "1800"))  # seconds without a request before exiting
_last_request = [time.monotonic()]
ROUTE = re.compile(r"^/v1/models/(?P<model>[a-z][a-z0-9_]{0,62})(?:/versions/(?P<version>v\d{14}))?"
                   r"(?P<verb>:predict)?$")


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Models:
    """Versions resolved through the local backend's pointer files, loaded on first use."""

    def __init__(self, serving_dir: Path) -> None:
        self.serving_dir = serving_dir
        self.loaded: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.lock = threading.Lock()

    def pointer(self, model: str) -> dict[str, Any]:
        try:
            return json.loads((self.serving_dir / f"{model}.json").read_text())
        except (OSError, ValueError):
            raise RequestError(404, f"Servable not found for request: Latest({model})") from None

    def resolve(self, model: str, version: str | None) -> tuple[str, str]:
        data = self.pointer(model)
        name = version or data.get("default")
        if not name:
            raise RequestError(404, f"{model} has no default version yet: apply one, or name a version")
        uri = (data.get("versions") or {}).get(name)
        if not uri:
            raise RequestError(404, f"Servable not found for request: Specific({model}, {name})")
        return name, uri

    def signature(self, model: str, version: str | None) -> tuple[str, Any]:
        name, uri = self.resolve(model, version)
        key = (model, name)
        with self.lock:  # one load at a time; a version loads once
            fn = self.loaded.get(key)
            if fn is None:
                import tensorflow as tf

                try:
                    fn = tf.saved_model.load(uri.rstrip("/")).signatures["serving_default"]
                except Exception as exc:
                    raise RequestError(404, f"could not load {model} {name} from {uri}: {exc}") from exc
                self.loaded[key] = fn
                while len(self.loaded) > LOADED_VERSIONS:
                    self.loaded.popitem(last=False)
            self.loaded.move_to_end(key)
        return name, fn


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
    import tensorflow as tf

    name, fn = models.signature(model, version)
    specs = fn.structured_input_signature[1]
    try:  # the core checked already (with the model's policy on NaN); again here, as TensorFlow aborts on some
        instances.check_body(body, signature_inputs(specs), allow_non_finite=True)
    except instances.InstancesRefused as exc:
        raise RequestError(400, exc.message) from None
    tensors = {}
    for key, values in columns(body, specs).items():
        spec = specs[key]
        try:
            tensors[key] = tf.constant(values, dtype=spec.dtype)
        except (TypeError, ValueError) as exc:
            raise RequestError(400, f"input {key}: expected {spec.dtype.name} values: {exc}") from None
        if not spec.shape.is_compatible_with(tensors[key].shape):
            raise RequestError(400, f"input {key}: shape {tensors[key].shape.as_list()} does not fit the "
                                    f"signature's {spec.shape}")
    try:
        result = fn(**tensors)
    except (tf.errors.InvalidArgumentError, ValueError, TypeError) as exc:
        raise RequestError(400, f"the model refused the input: {str(exc).splitlines()[0][:500]}") from None
    outputs = {k: _plain(v.numpy().tolist()) for k, v in result.items()}
    if "inputs" in body:
        only = next(iter(outputs.values())) if len(outputs) == 1 else outputs
        return name, {"outputs": only}
    keys = sorted(outputs)
    rows = len(next(iter(outputs.values())))
    if len(keys) == 1:
        return name, {"predictions": outputs[keys[0]]}
    return name, {"predictions": [{k: outputs[k][i] for k in keys} for i in range(rows)]}


class Handler(BaseHTTPRequestHandler):
    models: Models
    secret: str
    server_version = "starchart-local-serving"

    def log_message(self, fmt: str, *args: Any) -> None:  # stderr is the server's log file
        sys.stderr.write("%s %s\n" % (self.log_date_time_string(), fmt % args))

    def answer(self, status: int, body: dict[str, Any], version: str | None = None) -> None:
        _last_request[0] = time.monotonic()
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if version:
            self.send_header("X-Model-Version", version)
        self.end_headers()
        self.wfile.write(data)

    def authorized(self) -> bool:
        """True when the request carries this server's secret; else it is answered 401."""
        given = self.headers.get("Authorization") or ""
        if hmac.compare_digest(given.encode(), f"Bearer {self.secret}".encode()):
            return True
        self.answer(401, {"error": "send this server's secret: Authorization: Bearer <secret in server.json>"})
        return False

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if not self.authorized():
            return None
        if self.path == "/healthz":
            return self.answer(200, {"ok": True, "pid": os.getpid()})
        m = ROUTE.match(self.path)
        if not m or m["verb"]:
            return self.answer(404, {"error": f"no route for GET {self.path}"})
        try:
            name, _ = self.models.resolve(m["model"], m["version"])
        except RequestError as exc:
            return self.answer(exc.status, {"error": exc.message})
        self.answer(200, {"model_version_status": [
            {"version": name, "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}, name)

    def do_POST(self) -> None:  # noqa: N802
        if not self.authorized():
            return None
        m = ROUTE.match(self.path)
        if not m or not m["verb"]:
            return self.answer(404, {"error": f"no route for POST {self.path}"})
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            return self.answer(413, {"error": f"request body over {MAX_BODY} bytes"})
        try:
            try:
                body = json.loads(self.rfile.read(length) or b"null")
            except RecursionError:
                raise RequestError(400, f"the body is nested more than {instances.MAX_DEPTH} levels deep") from None
            except ValueError as exc:
                raise RequestError(400, f"the body is not JSON: {exc}") from None
            # logged before TensorFlow runs: if the process dies anyway, the log names the request
            self.log_message("request %s: POST %s", self.headers.get("X-Request-Id") or "-", self.path)
            sys.stderr.flush()
            name, answer = predict(self.models, m["model"], m["version"], body)
        except RequestError as exc:
            return self.answer(exc.status, {"error": exc.message})
        except Exception as exc:  # a bug or a broken model: say so, keep serving
            self.log_message("predict failed: %r", exc)
            return self.answer(500, {"error": f"prediction failed: {type(exc).__name__}: {exc}"[:500]})
        self.answer(200, answer, name)


def main() -> None:
    serving_dir = Path(sys.argv[1])
    serving_dir.mkdir(parents=True, exist_ok=True)
    try:
        import tensorflow  # noqa: F401 - at start: a server that cannot load a model should not listen
    except ImportError as exc:
        sys.stderr.write(f"cannot serve: TensorFlow is not importable by {sys.executable} ({exc}); install it there "
                         "(pip install '.[train]') or set STARCHART_TRAINER_PYTHON to a Python that has it\n")
        sys.exit(3)
    Handler.models = Models(serving_dir)
    Handler.secret = secrets.token_urlsafe(32)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    info = {"pid": os.getpid(), "pid_start": proc_start_time(os.getpid()), "port": server.server_address[1],
            "secret": Handler.secret}
    tmp = serving_dir / f".server.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the secret: readable by this user only
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(info))
    os.replace(tmp, serving_dir / "server.json")
    sys.stderr.write(f"serving {serving_dir} on 127.0.0.1:{info['port']}\n")
    sys.stderr.flush()

    def exit_when_idle() -> None:  # a laptop's server does not outlive its use by long
        while time.monotonic() - _last_request[0] < IDLE_EXIT:
            time.sleep(min(30.0, IDLE_EXIT / 4))
        sys.stderr.write(f"no request for {IDLE_EXIT:.0f}s: exiting\n")
        server.shutdown()

    threading.Thread(target=exit_when_idle, daemon=True).start()
    server.serve_forever()
    try:
        if json.loads((serving_dir / "server.json").read_text()).get("pid") == os.getpid():
            (serving_dir / "server.json").unlink()
    except (OSError, ValueError):  # another server took over, or the file is gone: nothing to clean
        return


if __name__ == "__main__":
    main()
