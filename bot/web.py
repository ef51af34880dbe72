"""The bot's web process (WSGI): POST /slack/events, GET /healthz. Signature checks are recorded."""

from __future__ import annotations

import io
import json
import logging
from typing import Any, Callable, Iterable

from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk.signature import SignatureVerifier

log = logging.getLogger("starchart.web")
MAX_BODY = 1024 * 1024

StartResponse = Callable[..., Any]


def _reply(start_response: StartResponse, status: str, body: dict[str, Any]) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


class WebApp:
    def __init__(self, bot: Any) -> None:
        self.bot = bot
        self.slack = SlackRequestHandler(bot.app, path="/slack/events")
        self.verifier = SignatureVerifier(bot.signing_secret)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if path == "/healthz" and method == "GET":
            return self.health(start_response)
        if path == "/slack/events" and method == "POST":
            return self.slack_events(environ, start_response)
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
            registry.default_version("healthz")
        except Exception as exc:  # the database is unreachable: not healthy
            return _reply(start_response, "503 Service Unavailable", {"ok": False, "core": "ready",
                                                                       "error": type(exc).__name__})
        return _reply(start_response, "200 OK", {"ok": True, "core": "ready"})

    def slack_events(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            return _reply(start_response, "413 Payload Too Large", {"error": "request body too large"})
        body = environ["wsgi.input"].read(length) if length else b""
        timestamp = environ.get("HTTP_X_SLACK_REQUEST_TIMESTAMP")
        signature = environ.get("HTTP_X_SLACK_SIGNATURE")
        if not self.verifier.is_valid(body=body, timestamp=timestamp, signature=signature):
            why = "missing signature" if not (timestamp and signature) else "invalid or expired signature"
            try:
                self.bot.registry.record_refusal("unknown", "bad_signature", why,
                                                 details={"remote_addr": environ.get("REMOTE_ADDR")})
            except Exception:  # recording must never turn a refusal into an acceptance
                log.exception("could not record a refused Slack request")
            return _reply(start_response, "401 Unauthorized", {"error": why})
        environ["wsgi.input"] = io.BytesIO(body)
        self.bot.gate.request_started()
        try:
            return self.slack(environ, start_response)
        finally:
            self.bot.gate.request_done()
