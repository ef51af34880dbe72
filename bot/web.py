"""The bot's web process (WSGI): POST /slack/events, GET /healthz, and the local prediction API.

Slack requests go to Bolt, which verifies their signatures once (bot.app.RecordedRequestVerification records
each refusal). The prediction API has TF Serving's REST shape
(`POST /v1/models/<model>[/versions/<version>]:predict`, `GET /v1/models/<model>`); this process does not
import TensorFlow: the core hands predictions to the backend (the local model server).
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import re
from typing import TYPE_CHECKING, Any, Callable, Iterable
from urllib.parse import unquote_plus

from slack_bolt import BoltRequest, BoltResponse
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_bolt.adapter.wsgi.http_request import WsgiHttpRequest

from model_registry.config import WebSettings
from model_registry.domain.errors import InvalidInput, NotFound, Refused, StarchartError

if TYPE_CHECKING:
    from model_registry.adapters.backends.base import Relay

log = logging.getLogger("starchart.web")
MAX_BODY = 1024 * 1024
PREDICT_ROUTE = re.compile(r"^/v1/models/(?P<model>[^/:]+)(?:/versions/(?P<version>[^/:]+))?(?P<verb>:predict)?$")

StartResponse = Callable[..., Any]


Answer = tuple[str, list[tuple[str, str]], bytes]  # status, headers, body


def _answer(status: str, body: dict[str, Any] | bytes, version: str | None = None) -> Answer:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    if version:  # which version answered, as the model server (and TF Serving's REST API) says it
        headers.append(("X-Model-Version", version))
    return status, headers, data


def _reply(start_response: StartResponse, status: str, body: dict[str, Any],
           version: str | None = None) -> Iterable[bytes]:
    status, headers, data = _answer(status, body, version)
    start_response(status, headers)
    return [data]


def _prediction_answer(version: str | None, answer: dict[str, Any]) -> Answer:
    return _answer("200 OK", {k: v for k, v in answer.items() if k in ("predictions", "outputs")}, version)


def _prediction_error(exc: StarchartError) -> Answer:
    return _answer(_prediction_status(exc), {"error": exc.message + (f" ({exc.hint})" if exc.hint else "")})


def _prediction_status(exc: StarchartError) -> str:
    """TF Serving's statuses: bad instances 400; no such servable 404 (a model or version not served, too)."""
    if isinstance(exc, InvalidInput):
        return "400 Bad Request"
    if isinstance(exc, (NotFound, Refused)):
        return "404 Not Found"
    return "503 Service Unavailable"


NOT_AN_OBJECT = "the payload field is not a JSON object; Slack sends payload={...} for interactions"


def _malformed(body: bytes) -> str | None:
    """What is wrong with a Slack request body Bolt cannot read, or None: UTF-8 text, `payload=` a JSON object.

    The payload is parsed once, by Bolt (a click's takes 60 us to parse): here only its first character is read;
    JSON that does not parse is answered by `SlackRequests`."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "the request body is not UTF-8 text; Slack sends UTF-8 form fields or JSON"
    if text.startswith("payload=") and not unquote_plus(text[len("payload="):][:3]).startswith("{"):
        return NOT_AN_OBJECT
    return None


class SlackRequests(SlackRequestHandler):
    """Bolt's WSGI adapter, with a payload that is not JSON answered 400 and why (Bolt's own parse fails with a 500)."""

    def dispatch(self, request: WsgiHttpRequest) -> BoltResponse:
        try:
            bolt_request = BoltRequest(body=request.get_body(), query=request.query_string,
                                       headers=request.get_headers())
        except ValueError:  # the payload field's JSON, which Bolt parses as it builds the request
            return BoltResponse(status=400, body=json.dumps({"error": NOT_AN_OBJECT}),
                                headers={"content-type": "application/json"})
        return self.app.dispatch(bolt_request)


class WebApp:
    def __init__(self, bot: Any, settings: WebSettings | None = None) -> None:
        self.bot = bot
        self.settings = settings or WebSettings()
        self.slack = SlackRequests(bot.app, path="/slack/events")

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == "/healthz" and method in ("GET", "HEAD"):
            answer = self.health(start_response)
            return [] if method == "HEAD" else answer  # HEAD: the status and headers only
        if path == "/slack/events" and method == "POST":
            return self.slack_events(environ, start_response)
        route = PREDICT_ROUTE.match(path)
        if route and method == ("POST" if route["verb"] else "GET"):
            return self.prediction(environ, start_response, route["model"], route["version"], bool(route["verb"]))
        return _reply(start_response, "404 Not Found", {"error": f"no route for {method} {path}"})

    def health(self, start_response: StartResponse) -> Iterable[bytes]:
        """Healthy once Slack requests can be acked; the core may still be loading (work then waits for it)."""
        registry = self.bot.registry
        failed = getattr(registry, "failed", lambda: None)()
        if failed is not None:
            return _reply(start_response, "503 Service Unavailable", {"ok": False, "core": "failed",
                                                                       "error": str(failed)[:300]})
        if not getattr(registry, "ready", lambda: True)():
            return _reply(start_response, "200 OK", {"ok": True, "core": "loading"})
        try:
            registry.versions.default("healthz")
        except Exception as exc:  # the database is unreachable: not healthy
            return _reply(start_response, "503 Service Unavailable", {"ok": False, "core": "ready",
                                                                       "error": type(exc).__name__})
        return _reply(start_response, "200 OK", {"ok": True, "core": "ready"})

    def prediction(self, environ: dict[str, Any], start_response: StartResponse, model: str,
                   version: str | None, predict: bool) -> Iterable[bytes]:
        """TF Serving's REST API for the served versions; a bearer token when STARCHART_PREDICT_TOKEN is set."""
        token = self.settings.predict_token
        given = environ.get("HTTP_AUTHORIZATION", "")  # exactly "Bearer <token>": the scheme is not optional
        if token and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return _reply(start_response, "401 Unauthorized",
                          {"error": "send the prediction token: Authorization: Bearer $STARCHART_PREDICT_TOKEN"})
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            return _reply(start_response, "413 Payload Too Large", {"error": "request body too large"})
        try:
            if not predict:
                status = self.bot.registry.predictions.served(model, version)
                return _reply(start_response, "200 OK", {"model_version_status": [
                    {"version": status["version"], "state": "AVAILABLE",
                     "status": {"error_code": "OK", "error_message": ""}}]}, status["version"])
            body = environ["wsgi.input"].read(length) if length else b""
            answer = self.bot.registry.predictions.predict(model, body, version=version)
        except StarchartError as exc:
            status, headers, data = _prediction_error(exc)
        else:
            status, headers, data = _prediction_answer(answer.get("version"), answer)
        start_response(status, headers)
        return [data]

    def relay(self, path: str, authorization: str, body: bytes) -> Relay | None:
        """A prediction (POST to PREDICT_ROUTE, `path` without its query) as the core's Relay, for the worker's
        loop to send to the model server and wait for holding no thread (bot.whole_requests); None for every
        request `prediction` must answer: one it refuses (token, body, instances), a core still loading, a
        backend that cannot relay. Each refusal is said in one place, there."""
        route = PREDICT_ROUTE.match(path)
        token = self.settings.predict_token
        if route is None or not route["verb"] or "%" in path or len(body) > MAX_BODY:  # a quoted name: WSGI's
            return None
        if token and not hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
            return None
        registry = self.bot.registry
        if not getattr(registry, "ready", lambda: True)():
            return None
        try:
            return registry.predictions.relay(route["model"], body, version=route["version"])
        except (StarchartError, OSError):  # refused (said there), or no connection to the model server: predict's
            return None
        except Exception:  # a fault: the WSGI path answers it (500) and the worker's loop goes on
            log.exception("a prediction for %s could not be relayed", route["model"])
            return None

    @staticmethod
    def relayed(relay: Relay, answer: Any) -> Answer:
        """What `prediction` answers for a relayed prediction's answer from the model server (never raises: it
        runs on the worker's loop)."""
        try:
            version, body = relay.answered(answer)
        except StarchartError as exc:
            return _prediction_error(exc)
        except Exception:
            log.exception("a relayed prediction's answer could not be read")
            return _answer("500 Internal Server Error", {"error": "the model server's answer could not be read; "
                                                                   "see the web process's log"})
        return _answer("200 OK", body, version)  # TF Serving's JSON as the model server wrote it

    @staticmethod
    def relay_failed(relay: Relay, exc: OSError) -> Answer:
        """What `prediction` answers when a relayed prediction's exchange failed after it was sent (this may wait
        a few seconds for a model server that is stopping: not on the worker's loop)."""
        return _prediction_error(relay.failed(exc))

    def slack_events(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            return _reply(start_response, "413 Payload Too Large", {"error": "request body too large"})
        body = environ["wsgi.input"].read(length) if length else b""
        problem = _malformed(body)
        if problem is not None:  # Slack never sends these; Bolt would fail on them with a 500
            return _reply(start_response, "400 Bad Request", {"error": problem})
        environ["wsgi.input"] = io.BytesIO(body)
        # the refusal record names the connection's address; a client's own header of that name is overwritten
        environ["HTTP_X_STARCHART_REMOTE_ADDR"] = environ.get("REMOTE_ADDR") or ""
        self.bot.gate.request_started()
        try:
            return self.slack(environ, start_response)
        finally:
            self.bot.gate.request_done()
