"""Plays Slack's side of a Bolt app: signed slash commands and interactivity payloads over real HTTP.

    with serve_wsgi(SlackRequestHandler(app)) as url:
        driver = SlackDriver(url, signing_secret, response_urls=fake.response_url)
        assert driver.command("train iris").status == 200
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlencode
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import requests

FORM = "application/x-www-form-urlencoded"
SLACK_USER_AGENT = "Slackbot 1.0 (+https://api.slack.com/robots)"
DEFAULT_USER, DEFAULT_CHANNEL = "U0HUMAN001", "C0GENERAL1"
REPLAY_WINDOW = 5 * 60  # seconds; Slack's documented tolerance for X-Slack-Request-Timestamp


@dataclass(frozen=True)
class DriverResponse:
    """What the app answered: status, headers, body (JSON-decoded when possible), raw text, seconds taken."""

    status: int
    headers: dict[str, str]
    body: Any
    text: str
    elapsed: float

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def sign(signing_secret: str, timestamp: int | str, body: str | bytes) -> str:
    """Slack's v0 request signature: v0=HMAC-SHA256(secret, "v0:{timestamp}:{body}")."""
    raw = body if isinstance(body, bytes) else body.encode("utf-8")
    base = f"v0:{timestamp}:".encode() + raw
    return "v0=" + hmac.new(signing_secret.encode("utf-8"), base, hashlib.sha256).hexdigest()


class SlackDriver:
    """Sends correctly (or deliberately wrongly) signed Slack requests to a Bolt app's POST /slack/events."""

    def __init__(self, base_url: str, signing_secret: str, *, path: str = "/slack/events",
                 response_urls: Callable[..., str] | None = None, team_id: str = "T0FAKE0001",
                 team_domain: str = "starchart-fake", api_app_id: str = "A0FAKEAPP1",
                 verification_token: str = "fakeverificationtoken0001", timeout: float = 10.0) -> None:
        base = base_url.rstrip("/")
        self.url = base if base.endswith(path) else base + path
        self.signing_secret = signing_secret
        self.response_urls = response_urls
        self.team_id, self.team_domain, self.api_app_id = team_id, team_domain, api_app_id
        self.verification_token = verification_token
        self.timeout = timeout
        self._session = requests.Session()
        self._session.trust_env = False  # never route 127.0.0.1 through a proxy from the environment
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    def close(self) -> None:
        """Close the HTTP session."""
        self._session.close()

    # ----------------------------------------------------------------- ids Slack would mint

    def _next(self) -> int:
        with self._lock:
            return next(self._counter)

    def trigger_id(self) -> str:
        """A fresh trigger_id in Slack's format ("<digits>.<digits>.<hex>")."""
        return f"{int(time.time())}{self._next():04d}.{secrets.randbelow(10**12):012d}.{secrets.token_hex(16)}"

    def response_url(self, channel_id: str | None = None, message_ts: str | None = None) -> str:
        """From the response_urls factory (e.g. SlackFake.response_url), else a Slack-shaped hooks URL."""
        if self.response_urls is not None:
            return self.response_urls(channel=channel_id, message_ts=message_ts)
        return f"https://hooks.slack.com/commands/{self.team_id}/{self._next()}/{secrets.token_hex(12)}"

    def _user(self, user_id: str) -> dict[str, Any]:
        name = user_id.lower()
        return {"id": user_id, "username": name, "name": name, "team_id": self.team_id}

    # ----------------------------------------------------------------- bodies as Slack sends them

    def command_body(self, text: str, *, user_id: str = DEFAULT_USER, channel_id: str = DEFAULT_CHANNEL,
                     command: str = "/ml", response_url: str | None = None, trigger_id: str | None = None,
                     user_name: str | None = None, channel_name: str = "general") -> str:
        """A slash command's form-encoded body, fields in the order Slack sends them."""
        return urlencode({
            "token": self.verification_token,
            "team_id": self.team_id,
            "team_domain": self.team_domain,
            "channel_id": channel_id,
            "channel_name": channel_name,
            "user_id": user_id,
            "user_name": user_name or user_id.lower(),
            "command": command,
            "text": text,
            "api_app_id": self.api_app_id,
            "is_enterprise_install": "false",
            "response_url": response_url or self.response_url(channel_id),
            "trigger_id": trigger_id or self.trigger_id(),
        })

    def block_action_payload(self, action_id: str, value: str, *, user_id: str = DEFAULT_USER,
                             channel_id: str = DEFAULT_CHANNEL, message_ts: str | None = None,
                             response_url: str | None = None, trigger_id: str | None = None,
                             block_id: str = "actions", message: Mapping[str, Any] | None = None,
                             is_ephemeral: bool = False, button_text: str = "Button") -> dict[str, Any]:
        """A block_actions payload for a button click on a message, shaped like Slack's."""
        ts = message_ts or (message or {}).get("ts") or f"{int(time.time())}.{self._next():06d}"
        shown = dict(message or {"type": "message", "user": "U0BOTFAKE1", "text": "", "blocks": []})
        shown.setdefault("ts", ts)
        now = f"{time.time():.6f}"
        return {
            "type": "block_actions",
            "user": self._user(user_id),
            "api_app_id": self.api_app_id,
            "token": self.verification_token,
            "container": {"type": "message", "message_ts": ts, "channel_id": channel_id,
                          "is_ephemeral": is_ephemeral},
            "trigger_id": trigger_id or self.trigger_id(),
            "team": {"id": self.team_id, "domain": self.team_domain},
            "enterprise": None,
            "is_enterprise_install": False,
            "channel": {"id": channel_id, "name": "general"},
            "message": shown,
            "state": {"values": {}},
            "response_url": response_url or self.response_url(channel_id, ts),
            "actions": [{"action_id": action_id, "block_id": block_id, "value": value, "type": "button",
                         "text": {"type": "plain_text", "text": button_text, "emoji": True}, "action_ts": now}],
        }

    def home_action_payload(self, action_id: str, value: str, view: Mapping[str, Any], *,
                            user_id: str = DEFAULT_USER, trigger_id: str | None = None, block_id: str = "actions",
                            button_text: str = "Button") -> dict[str, Any]:
        """A block_actions payload for a button on the person's Home tab: the view instead of a message, and no
        channel or response_url (Slack sends none from a Home tab)."""
        return {
            "type": "block_actions",
            "user": self._user(user_id),
            "api_app_id": self.api_app_id,
            "token": self.verification_token,
            "container": {"type": "view", "view_id": view.get("id")},
            "trigger_id": trigger_id or self.trigger_id(),
            "team": {"id": self.team_id, "domain": self.team_domain},
            "enterprise": None,
            "is_enterprise_install": False,
            "view": dict(view),
            "state": {"values": {}},
            "actions": [{"action_id": action_id, "block_id": block_id, "value": value, "type": "button",
                         "text": {"type": "plain_text", "text": button_text, "emoji": True},
                         "action_ts": f"{time.time():.6f}"}],
        }

    def event_body(self, event: Mapping[str, Any]) -> str:
        """An Events API delivery (event_callback, JSON), as Slack posts it."""
        now = int(time.time())
        return json.dumps({
            "token": self.verification_token, "team_id": self.team_id, "api_app_id": self.api_app_id,
            "event": {"event_ts": f"{time.time():.6f}", **event}, "type": "event_callback",
            "event_id": f"Ev0DRIVER{self._next():05d}", "event_time": now,
            "authorizations": [{"enterprise_id": None, "team_id": self.team_id, "user_id": "U0BOTFAKE1",
                                "is_bot": True, "is_enterprise_install": False}],
            "is_ext_shared_channel": False,
        })

    def home_opened(self, user_id: str = DEFAULT_USER, tab: str = "home",
                    view: Mapping[str, Any] | None = None) -> DriverResponse:
        """Send a signed app_home_opened event: `user_id` opened the app's Home (or Messages) tab."""
        event: dict[str, Any] = {"type": "app_home_opened", "user": user_id, "channel": "D0HOME0001", "tab": tab}
        if view is not None:
            event["view"] = dict(view)
        return self.send_signed(self.event_body(event), "application/json")

    def view_submission_payload(self, callback_id: str, private_metadata: str = "",
                                state_values: Mapping[str, Any] | None = None, *, user_id: str = DEFAULT_USER,
                                view_id: str | None = None, title: str = "Modal") -> dict[str, Any]:
        """A view_submission payload; state_values is {block_id: {action_id: {"type": ..., "value": ...}}}."""
        vid = view_id or f"V0DRIVER{self._next():03d}"
        return {
            "type": "view_submission",
            "team": {"id": self.team_id, "domain": self.team_domain},
            "user": self._user(user_id),
            "api_app_id": self.api_app_id,
            "token": self.verification_token,
            "trigger_id": self.trigger_id(),
            "view": {
                "id": vid, "team_id": self.team_id, "type": "modal", "blocks": [],
                "private_metadata": private_metadata, "callback_id": callback_id,
                "state": {"values": dict(state_values or {})},
                "hash": f"{int(time.time())}.{secrets.token_hex(4)}",
                "title": {"type": "plain_text", "text": title, "emoji": True},
                "clear_on_close": False, "notify_on_close": False, "close": None,
                "submit": {"type": "plain_text", "text": "Submit", "emoji": True},
                "previous_view_id": None, "root_view_id": vid, "app_id": self.api_app_id,
                "external_id": "", "app_installed_team_id": self.team_id, "bot_id": "B0BOTFAKE1",
            },
            "response_urls": [],
            "is_enterprise_install": False,
            "enterprise": None,
        }

    @staticmethod
    def payload_body(payload: Mapping[str, Any]) -> str:
        """Interactivity bodies are form-encoded with the JSON in one `payload` field."""
        return urlencode({"payload": json.dumps(payload)})

    # ----------------------------------------------------------------- sending

    def signed_headers(self, body: str | bytes, timestamp: int | None = None) -> dict[str, str]:
        """X-Slack-Request-Timestamp and X-Slack-Signature for this body."""
        ts = int(time.time()) if timestamp is None else timestamp
        return {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": sign(self.signing_secret, ts, body)}

    def post(self, body: str | bytes, content_type: str = FORM,
             headers: Mapping[str, str] | None = None) -> DriverResponse:
        """POST exactly this body and headers (no signing) and return the app's answer."""
        sent = {"Content-Type": content_type, "User-Agent": SLACK_USER_AGENT, **(headers or {})}
        data = body.encode("utf-8") if isinstance(body, str) else body
        started = time.monotonic()
        resp = self._session.post(self.url, data=data, headers=sent, timeout=self.timeout)
        elapsed = time.monotonic() - started
        try:
            decoded: Any = resp.json()
        except ValueError:
            decoded = resp.text
        return DriverResponse(resp.status_code, dict(resp.headers), decoded, resp.text, elapsed)

    def send_signed(self, body: str | bytes, content_type: str = FORM, *,
                    timestamp: int | None = None) -> DriverResponse:
        """POST a correctly signed body (signed for `timestamp`, default now)."""
        return self.post(body, content_type, self.signed_headers(body, timestamp))

    def send_forged(self, body: str | bytes | None = None, content_type: str = FORM) -> DriverResponse:
        """POST with a current timestamp but a signature made with the wrong secret."""
        body = self.command_body("forged") if body is None else body
        ts = int(time.time())
        forged = sign("not-" + self.signing_secret, ts, body)
        return self.post(body, content_type, {"X-Slack-Request-Timestamp": str(ts), "X-Slack-Signature": forged})

    def send_unsigned(self, body: str | bytes | None = None, content_type: str = FORM) -> DriverResponse:
        """POST without X-Slack-Signature / X-Slack-Request-Timestamp."""
        return self.post(self.command_body("unsigned") if body is None else body, content_type)

    def send_stale(self, body: str | bytes | None = None, content_type: str = FORM, *,
                   age_seconds: int = REPLAY_WINDOW + 60) -> DriverResponse:
        """Replay: correctly signed, but for a timestamp `age_seconds` in the past (beyond Slack's 5 minutes)."""
        body = self.command_body("replayed") if body is None else body
        return self.send_signed(body, content_type, timestamp=int(time.time()) - age_seconds)

    def command(self, text: str, user_id: str = DEFAULT_USER, channel_id: str = DEFAULT_CHANNEL,
                command: str = "/ml", response_url: str | None = None, trigger_id: str | None = None,
                **fields: Any) -> DriverResponse:
        """Send a signed slash command (form-encoded, like Slack)."""
        body = self.command_body(text, user_id=user_id, channel_id=channel_id, command=command,
                                 response_url=response_url, trigger_id=trigger_id, **fields)
        return self.send_signed(body)

    def block_action(self, action_id: str, value: str, user_id: str = DEFAULT_USER,
                     channel_id: str = DEFAULT_CHANNEL, message_ts: str | None = None,
                     response_url: str | None = None, trigger_id: str | None = None, *,
                     block_id: str = "actions", message: Mapping[str, Any] | None = None,
                     **fields: Any) -> DriverResponse:
        """Send a signed block_actions payload (a button click on a message)."""
        payload = self.block_action_payload(action_id, value, user_id=user_id, channel_id=channel_id,
                                            message_ts=message_ts, response_url=response_url,
                                            trigger_id=trigger_id, block_id=block_id, message=message, **fields)
        return self.send_signed(self.payload_body(payload))

    def home_action(self, action_id: str, value: str, view: Mapping[str, Any], user_id: str = DEFAULT_USER,
                    **fields: Any) -> DriverResponse:
        """Send a signed block_actions payload for a button on a Home tab."""
        payload = self.home_action_payload(action_id, value, view, user_id=user_id, **fields)
        return self.send_signed(self.payload_body(payload))

    def view_submission(self, callback_id: str, private_metadata: str = "",
                        state_values: Mapping[str, Any] | None = None, user_id: str = DEFAULT_USER,
                        **fields: Any) -> DriverResponse:
        """Send a signed view_submission payload (a modal's Submit)."""
        payload = self.view_submission_payload(callback_id, private_metadata, state_values, user_id=user_id,
                                               **fields)
        return self.send_signed(self.payload_body(payload))


# --------------------------------------------------------------------------- serving a WSGI app locally


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test output shows failures, not every request."""


@contextmanager
def serve_wsgi(app: Callable[..., Any], host: str = "127.0.0.1") -> Iterator[str]:
    """Serve a WSGI app (e.g. slack_bolt.adapter.wsgi.SlackRequestHandler) on a free port; yields its base URL."""
    server = make_server(host, 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name="wsgi-under-test")
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
