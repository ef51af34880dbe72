"""A local fake of Slack's Web API, spoken to over real HTTP by the real slack_sdk WebClient.

    with SlackFake(users={"U1": {"name": "ada"}}, usergroups={"S1": ["U1"]}) as fake:
        client = WebClient(token=fake.token, base_url=fake.base_url)
        client.chat_postMessage(channel="C1", text="hi")
        assert fake.calls_to("chat.postMessage")[0].params["text"] == "hi"

Answers are shaped like Slack's (ok/error, Retry-After on 429, error names from Slack's method docs) and
Slack's documented Block Kit limits are enforced where the real API rejects a payload.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import mimetypes
import re
import socket
import threading
import time
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable, Mapping, NamedTuple
from urllib.parse import parse_qsl, urlsplit

DEFAULT_TOKEN = "xoxb-0000000000-0000000000000-fakefakefakefakefakefake"
DEFAULT_APP_TOKEN = "xapp-1-A0FAKEAPP1-0000000000000-fakefakefakefakefakefakefakefakefakefakefakefake"
TEAM_ID, TEAM_DOMAIN = "T0FAKE0001", "starchart-fake"
BOT_USER_ID, BOT_ID, APP_ID = "U0BOTFAKE1", "B0BOTFAKE1", "A0FAKEAPP1"

# Slack's documented limits (Block Kit reference; chat.postMessage / views.open method docs).
MAX_TEXT = 40_000
MAX_MESSAGE_BLOCKS = 50
MAX_VIEW_BLOCKS = 100
MAX_SECTION_TEXT = 3000
MAX_SECTION_FIELDS, MAX_FIELD_TEXT = 10, 2000
MAX_HEADER_TEXT = 150
MAX_BUTTON_TEXT, MAX_BUTTON_VALUE = 75, 2000
MAX_ACTION_ID = MAX_BLOCK_ID = 255
MAX_URL = 3000
MAX_ACTIONS_ELEMENTS, MAX_CONTEXT_ELEMENTS = 25, 10
MAX_VIEW_TITLE = 24

# Form-encoded requests carry these as JSON strings; JSON requests carry them as objects.
JSON_FIELDS = ("blocks", "attachments", "view", "files", "metadata")
TRIGGER_ID = re.compile(r"^\d+\.\d+\.[0-9A-Za-z]+$")


class Call(NamedTuple):
    """One request the fake received: Web API method (or "upload" / "response_url"), params, headers."""

    method: str
    params: dict[str, Any]
    headers: dict[str, str]


class SlackError(Exception):
    """Raised inside a method handler; answered as {"ok": false, "error": ...} like Slack does."""

    def __init__(self, error: str, *, status: int = 200, messages: Iterable[str] = (),
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(error)
        self.error, self.status, self.messages = error, status, list(messages)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": False, "error": self.error}
        if self.messages:
            out["errors"] = self.messages
            out["response_metadata"] = {"messages": [f"[ERROR] {m}" for m in self.messages]}
        return out


Handler = Callable[[dict[str, Any]], dict[str, Any]]


# --------------------------------------------------------------------------- Block Kit validation


def _too_long(value: Any, limit: int, pointer: str, out: list[str]) -> None:
    if isinstance(value, str) and len(value) > limit:
        out.append(f"must be less than {limit + 1} characters [json-pointer:{pointer}]")


def _text_object(obj: Any, limit: int, pointer: str, out: list[str]) -> None:
    if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
        out.append(f"must provide an object with a text string [json-pointer:{pointer}]")
        return
    if not obj["text"]:
        out.append(f"must be more than 0 characters [json-pointer:{pointer}/text]")
    _too_long(obj["text"], limit, f"{pointer}/text", out)


def _element(element: Any, pointer: str, out: list[str]) -> None:
    if not isinstance(element, dict) or not isinstance(element.get("type"), str):
        out.append(f"missing required field: type [json-pointer:{pointer}]")
        return
    _too_long(element.get("action_id"), MAX_ACTION_ID, f"{pointer}/action_id", out)
    _too_long(element.get("url"), MAX_URL, f"{pointer}/url", out)
    if element["type"] == "button":
        _text_object(element.get("text"), MAX_BUTTON_TEXT, f"{pointer}/text", out)
        _too_long(element.get("value"), MAX_BUTTON_VALUE, f"{pointer}/value", out)


def block_problems(blocks: list[Any], max_blocks: int, base: str = "/blocks") -> list[str]:
    """Slack-style messages for every documented Block Kit limit `blocks` breaks (empty when valid)."""
    out: list[str] = []
    if len(blocks) > max_blocks:
        out.append(f"no more than {max_blocks} items allowed [json-pointer:{base}]")
    for i, block in enumerate(blocks):
        at = f"{base}/{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            out.append(f"missing required field: type [json-pointer:{at}]")
            continue
        _too_long(block.get("block_id"), MAX_BLOCK_ID, f"{at}/block_id", out)
        kind = block["type"]
        if kind == "section":
            if "text" not in block and "fields" not in block:
                out.append(f"must provide text or fields [json-pointer:{at}]")
            if "text" in block:
                _text_object(block["text"], MAX_SECTION_TEXT, f"{at}/text", out)
            fields = block.get("fields") or []
            if len(fields) > MAX_SECTION_FIELDS:
                out.append(f"no more than {MAX_SECTION_FIELDS} items allowed [json-pointer:{at}/fields]")
            for j, field in enumerate(fields):
                _text_object(field, MAX_FIELD_TEXT, f"{at}/fields/{j}", out)
            if "accessory" in block:
                _element(block["accessory"], f"{at}/accessory", out)
        elif kind == "header":
            _text_object(block.get("text"), MAX_HEADER_TEXT, f"{at}/text", out)
        elif kind == "actions":
            elements = block.get("elements") or []
            if len(elements) > MAX_ACTIONS_ELEMENTS:
                out.append(f"no more than {MAX_ACTIONS_ELEMENTS} items allowed [json-pointer:{at}/elements]")
            for j, element in enumerate(elements):
                _element(element, f"{at}/elements/{j}", out)
        elif kind == "context":
            if len(block.get("elements") or []) > MAX_CONTEXT_ELEMENTS:
                out.append(f"no more than {MAX_CONTEXT_ELEMENTS} items allowed [json-pointer:{at}/elements]")
        elif kind == "input":
            _element(block.get("element"), f"{at}/element", out)
    return out


def check_message(params: Mapping[str, Any], *, require_content: bool = True) -> None:
    """Raise SlackError the way chat.postMessage & co. reject a message payload."""
    text, blocks = params.get("text"), params.get("blocks")
    if require_content and not text and not blocks and not params.get("attachments"):
        raise SlackError("no_text")
    if isinstance(text, str) and len(text) > MAX_TEXT:
        raise SlackError("msg_too_long")
    if blocks is None:
        return
    if not isinstance(blocks, list):
        raise SlackError("invalid_blocks_format")
    problems = block_problems(blocks, MAX_MESSAGE_BLOCKS)
    if problems:
        raise SlackError("invalid_blocks", messages=problems)


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("true", "1"))


def _decode_json_fields(params: dict[str, Any]) -> None:
    for key in JSON_FIELDS:
        value = params.get(key)
        if isinstance(value, str):
            try:
                params[key] = json.loads(value)
            except ValueError:
                pass  # left as a string: the method handler rejects it as malformed


def _parse_multipart(content_type: str, body: bytes) -> dict[str, Any]:
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    params: dict[str, Any] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        params[str(name)] = data if part.get_filename() else data.decode("utf-8", "replace")
    return params


def parse_body(content_type: str, body: bytes) -> dict[str, Any]:
    """Params from a JSON, form-encoded or multipart body, as the Web API accepts all three."""
    kind = content_type.split(";")[0].strip().lower()
    if not body:
        return {}
    if kind == "application/json":
        data = json.loads(body.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("a JSON body must be an object")
        return data
    if kind == "multipart/form-data":
        return _parse_multipart(content_type, body)
    return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))


# --------------------------------------------------------------------------- HTTP plumbing


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_POST(self) -> None:
        self.server.fake._serve(self)

    do_GET = do_POST

    def reply(self, status: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean; every request is in fake.calls anyway


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: SlackFake


# --------------------------------------------------------------------------- the fake


class SlackFake:
    """Fake Slack Web API on 127.0.0.1 (a free port); a context manager that starts and stops the server."""

    def __init__(self, *, token: str | Iterable[str] = DEFAULT_TOKEN,
                 users: Mapping[str, Mapping[str, Any]] | None = None,
                 usergroups: Mapping[str, Iterable[str]] | None = None,
                 channels: Mapping[str, str] | None = None,
                 strict_channels: bool = False, delay_seconds: float = 0.0,
                 app_token: str | Iterable[str] = DEFAULT_APP_TOKEN) -> None:
        tokens = [token] if isinstance(token, str) else list(token)
        self.token: str = tokens[0]
        self.tokens: set[str] = set(tokens)
        app_tokens = [app_token] if isinstance(app_token, str) else list(app_token)
        if not app_tokens or not all(t.startswith("xapp-") for t in app_tokens):
            raise ValueError("app-level tokens start with xapp-")
        self.app_token: str = app_tokens[0]
        self.app_tokens: set[str] = set(app_tokens)  # accepted by apps.connections.open (Socket Mode)
        self._ws_server: Any = None
        self._ws_thread: threading.Thread | None = None
        self._ws_conns: list[Any] = []
        self.strict_channels = strict_channels
        self.delay_seconds = delay_seconds
        self._lock = threading.RLock()
        self._counter = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._users: dict[str, dict[str, Any]] = {}
        self._groups: dict[str, list[str]] = {}
        self._channels: dict[str, dict[str, Any]] = {}
        self._failures: dict[str, list[SlackError]] = {}
        # method -> (seconds each applied call waits, then hangs up; which calls: None for the next, whatever it is)
        self._lost_replies: dict[str, list[tuple[float, Callable[[Any], bool] | None]]] = {}
        self._revoked: set[str] = set()
        self._last_ts = 0.0
        self._handlers: dict[str, Handler] = {
            "auth.test": self._auth_test,
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.postEphemeral": self._post_ephemeral,
            "views.open": self._views_open,
            "views.publish": self._views_publish,
            "usergroups.users.list": self._usergroup_users,
            "users.info": self._users_info,
            "conversations.info": self._conversations_info,
            "conversations.history": self._conversations_history,
            "conversations.open": self._conversations_open,
            "files.getUploadURLExternal": self._get_upload_url,
            "files.completeUploadExternal": self._complete_upload,
            "files.list": self._files_list,
            "apps.connections.open": self._connections_open,
        }
        self.clear()
        self.add_user(BOT_USER_ID, "starchart", real_name="StarChart", is_bot=True)
        for user_id, spec in (users or {}).items():
            spec = dict(spec)
            self.add_user(user_id, spec.pop("name", user_id.lower()), **spec)
        for group_id, members in (usergroups or {}).items():
            self.set_usergroup(group_id, members)
        for channel_id, name in (channels or {}).items():
            self.add_channel(channel_id, name)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> SlackFake:
        """Start serving on a free port of 127.0.0.1."""
        server = _Server(("127.0.0.1", 0), _RequestHandler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="slack-fake", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the server (and the Socket Mode server, if started) and wait for their threads."""
        self._stop_socket_server()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> SlackFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def root_url(self) -> str:
        """http://127.0.0.1:PORT (no trailing slash)."""
        if self._server is None:
            raise RuntimeError("the SlackFake is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def base_url(self) -> str:
        """The Web API base URL for WebClient(base_url=...); ends with "/api/"."""
        return f"{self.root_url}/api/"

    # ----------------------------------------------------------------- Socket Mode

    def socket_mode_server(self) -> str:
        """Start (once) the local Socket Mode WebSocket server; its ws:// URL, as apps.connections.open gives.

        On connect it sends Slack's {"type": "hello", ...}; socket_send() pushes envelopes to the client,
        and every JSON message the client sends back is recorded (socket_acks: those with an envelope_id).
        """
        from websockets.sync.server import serve

        with self._lock:
            if self._ws_server is None:
                self._ws_server = serve(self._ws_handler, "127.0.0.1", 0, ping_interval=None)
                self._ws_thread = threading.Thread(target=self._ws_server.serve_forever, name="slack-fake-ws",
                                                   daemon=True)
                self._ws_thread.start()
            port = self._ws_server.socket.getsockname()[1]
        return f"ws://127.0.0.1:{port}/link/?ticket={uuid.uuid4()}&app_id={APP_ID}"

    def socket_send(self, envelope: Mapping[str, Any], timeout: float = 5.0) -> str:
        """Push an envelope to the newest Socket Mode connection (waiting up to `timeout` for one).

        An envelope_id is added when missing; returns it."""
        envelope = dict(envelope)
        envelope.setdefault("envelope_id", str(uuid.uuid4()))
        conn = self.wait_for(lambda: self._ws_conns[-1] if self._ws_conns else None, timeout=timeout)
        conn.send(json.dumps(envelope))
        return str(envelope["envelope_id"])

    @property
    def socket_connections(self) -> int:
        """How many Socket Mode clients are connected now."""
        with self._lock:
            return len(self._ws_conns)

    @property
    def socket_received(self) -> list[dict[str, Any]]:
        """Every JSON message Socket Mode clients sent, in order."""
        with self._lock:
            return copy.deepcopy(self._socket_received)

    @property
    def socket_acks(self) -> list[dict[str, Any]]:
        """Acks received over Socket Mode: {"envelope_id": ..., "payload"?: ...}, each with "received_at"."""
        with self._lock:
            return copy.deepcopy([m for m in self._socket_received if "envelope_id" in m])

    def _ws_handler(self, conn: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        with self._lock:
            self._ws_conns.append(conn)
        try:
            conn.send(json.dumps({"type": "hello", "num_connections": len(self._ws_conns),
                                  "debug_info": {"host": "applink-fake", "build_number": 1,
                                                 "approximate_connection_time": 18060},
                                  "connection_info": {"app_id": APP_ID}}))
            for raw in conn:
                try:
                    message = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(message, dict):
                    message["received_at"] = time.monotonic()
                    with self._lock:
                        self._socket_received.append(message)
        except ConnectionClosed:
            return  # the bot hung up: that is how a session ends
        finally:
            with self._lock:
                if conn in self._ws_conns:
                    self._ws_conns.remove(conn)

    def _stop_socket_server(self) -> None:
        with self._lock:
            server, thread, conns = self._ws_server, self._ws_thread, list(self._ws_conns)
            self._ws_server = self._ws_thread = None
        if server is None:
            return
        server.shutdown()
        for conn in conns:
            conn.close()
        if thread is not None:
            thread.join(timeout=5)

    # ----------------------------------------------------------------- configuration

    def add_user(self, user_id: str, name: str, *, real_name: str | None = None, display_name: str | None = None,
                 **extra: Any) -> dict[str, Any]:
        """Make users.info know a user (shaped like Slack's user object)."""
        real = real_name if real_name is not None else name
        display = display_name if display_name is not None else ""
        user = {"id": user_id, "team_id": TEAM_ID, "name": name, "real_name": real, "deleted": False,
                "is_bot": False, "tz": "Europe/London",
                "profile": {"real_name": real, "real_name_normalized": real, "display_name": display,
                            "display_name_normalized": display, "team": TEAM_ID}}
        user.update(extra)
        with self._lock:
            self._users[user_id] = user
        return copy.deepcopy(user)

    def set_usergroup(self, group_id: str, members: Iterable[str]) -> None:
        """Make usergroups.users.list answer `members` for `group_id`."""
        with self._lock:
            self._groups[group_id] = list(members)

    def add_channel(self, channel_id: str, name: str, *, is_private: bool = False, is_member: bool = True) -> None:
        """Make conversations.info (and, when strict_channels, posting) know a channel; without `is_member`, the bot
        is not in it (posting answers not_in_channel)."""
        with self._lock:
            self._channels[channel_id] = {
                "id": channel_id, "name": name, "is_channel": not is_private, "is_group": is_private,
                "is_im": False, "is_private": is_private, "is_archived": False, "is_member": is_member,
                "created": 1700000000, "context_team_id": TEAM_ID,
            }

    def register(self, method: str, handler: Handler) -> None:
        """Serve another Web API method: handler(params) returns the body without "ok" or raises SlackError."""
        with self._lock:
            self._handlers[method] = handler

    def fail_next(self, method: str, error: str, *, status: int = 200, retry_after: int | None = None,
                  times: int = 1) -> None:
        """Answer the next `times` calls to `method` with this error (e.g. "ratelimited", status=429)."""
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
        with self._lock:
            self._failures.setdefault(method, []).extend(
                SlackError(error, status=status, headers=headers) for _ in range(times))

    def lose_reply_next(self, method: str, *, after: float = 0.0, times: int = 1,
                        when: Callable[[Any], bool] | None = None) -> None:
        """Apply the next `times` calls to `method` as usual, but never answer them: after `after` seconds the
        connection is dropped (a reply lost on the way, or a caller that died waiting). `method` "upload" is a
        file's bytes posted to its upload URL (files_upload_v2's second step). `when`: only calls whose parameters
        (for "upload", the pending file: its name and title) it accepts."""
        with self._lock:
            self._lost_replies.setdefault(method, []).extend((after, when) for _ in range(times))

    def _take_lost(self, method: str, about: Any) -> float | None:
        """The hold of the first lost reply waiting for this call, taken (under the lock)."""
        waiting = self._lost_replies.get(method) or []
        for i, (after, when) in enumerate(waiting):
            if when is None or when(about):
                del waiting[i]
                return after
        return None

    def revoke(self, token: str) -> None:
        """Answer every call made with `token` with token_revoked (as Slack does once an app is uninstalled)."""
        with self._lock:
            self._revoked.add(token)

    def restore(self, token: str) -> None:
        with self._lock:
            self._revoked.discard(token)

    def messages_in(self, channel: str) -> list[dict[str, Any]]:
        """The messages of a channel (a user id: the bot's direct messages with that person), oldest first."""
        with self._lock:
            channel = self._channel({"channel": channel})
            return [copy.deepcopy(m) for (c, _ts), m in sorted(self._messages.items(), key=lambda kv: float(kv[0][1]))
                    if c == channel]

    def seed_message(self, channel: str, text: str = "", *, blocks: list[Any] | None = None,
                     user: str = "U0HUMAN001", thread_ts: str | None = None) -> str:
        """Put a message in a channel as if a person posted it (chat.update on it answers cant_update_message)."""
        with self._lock:
            ts = self._next_ts()
            message = {"type": "message", "user": user, "text": text, "blocks": blocks or [], "ts": ts,
                       "team": TEAM_ID}
            if thread_ts:
                message["thread_ts"] = thread_ts
            self._messages[(channel, ts)] = message
            return ts

    def response_url(self, channel: str | None = None, message_ts: str | None = None) -> str:
        """A fresh response_url on the fake; bind it to a message so replace/delete_original act on it."""
        with self._lock:
            key = uuid.uuid4().hex
            self._response_urls[key] = (channel, message_ts)
        return f"{self.root_url}/response/{key}"

    def clear(self) -> None:
        """Forget every recorded call, message, view, upload and response (configuration stays)."""
        with self._lock:
            self._calls: list[Call] = []
            self._messages: dict[tuple[str, str], dict[str, Any]] = {}
            self._ephemerals: list[dict[str, Any]] = []
            self._views: dict[str, dict[str, Any]] = {}
            self._homes: dict[str, dict[str, Any]] = {}  # user id -> their Home tab as published last
            self._files: dict[str, dict[str, Any]] = {}
            self._uploads: list[dict[str, Any]] = []
            self._responses: list[dict[str, Any]] = []
            self._response_urls: dict[str, tuple[str | None, str | None]] = {}
            self._used_triggers: set[str] = set()
            self._socket_received: list[dict[str, Any]] = []

    # ----------------------------------------------------------------- recorded state (copies)

    @property
    def calls(self) -> list[Call]:
        """Every request received, in order."""
        with self._lock:
            return copy.deepcopy(self._calls)

    def calls_to(self, method: str) -> list[Call]:
        """The recorded calls to one method."""
        with self._lock:
            return copy.deepcopy([c for c in self._calls if c.method == method])

    @property
    def messages(self) -> dict[tuple[str, str], dict[str, Any]]:
        """(channel, ts) -> the message as it stands now (chat.update and response_url edits applied)."""
        with self._lock:
            return copy.deepcopy(self._messages)

    @property
    def ephemerals(self) -> list[dict[str, Any]]:
        """chat.postEphemeral messages: channel, user, text, blocks, message_ts."""
        with self._lock:
            return copy.deepcopy(self._ephemerals)

    @property
    def views(self) -> dict[str, dict[str, Any]]:
        """View id -> view opened with views.open."""
        with self._lock:
            return copy.deepcopy(self._views)

    @property
    def homes(self) -> dict[str, dict[str, Any]]:
        """User id -> the Home view published for them last (views.publish)."""
        with self._lock:
            return copy.deepcopy(self._homes)

    @property
    def uploads(self) -> list[dict[str, Any]]:
        """Completed uploads: id, filename, title, content (bytes), channel, channels, thread_ts, ..."""
        with self._lock:
            return copy.deepcopy(self._uploads)

    @property
    def responses(self) -> list[dict[str, Any]]:
        """response_url posts: url, payload (the JSON posted), status, error."""
        with self._lock:
            return copy.deepcopy(self._responses)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.01) -> Any:
        """Poll until predicate() is truthy and return its value; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"condition not met within {timeout}s; calls so far: "
                                     f"{[c.method for c in self.calls]}")
            time.sleep(interval)

    # ----------------------------------------------------------------- request dispatch

    def _serve(self, request: _RequestHandler) -> None:
        url = urlsplit(request.path)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in request.headers.items()}
        parts = url.path.strip("/").split("/")
        if len(parts) == 2 and parts[0] == "api":
            self._serve_api(request, parts[1], url.query, body, headers)
        elif len(parts) == 2 and parts[0] == "upload":
            self._serve_upload(request, parts[1], body, headers)
        elif len(parts) == 2 and parts[0] == "response":
            self._serve_response(request, parts[1], body, headers)
        else:
            request.reply(404, b"not found", "text/plain")

    def _serve_api(self, request: _RequestHandler, method: str, query: str, body: bytes,
                   headers: dict[str, str]) -> None:
        try:
            params: dict[str, Any] = dict(parse_qsl(query, keep_blank_values=True))
            params.update(parse_body(headers.get("content-type", ""), body))
        except ValueError:
            params = {}
            error: SlackError | None = SlackError("invalid_json")
        else:
            error = None
        _decode_json_fields(params)
        token = params.pop("token", None)
        auth = headers.get("authorization", "")
        if auth.startswith("Bearer "):
            token = auth[len("Bearer "):]
        with self._lock:
            self._calls.append(Call(method, params, headers))
            injected = self._failures.get(method)
            error = error or (injected.pop(0) if injected else None)
        if self.delay_seconds > 0:
            time.sleep(self.delay_seconds)
        accepted = self.app_tokens if method == "apps.connections.open" else self.tokens
        if error is None and not token:
            error = SlackError("not_authed")
        elif error is None and token in self._revoked:
            error = SlackError("token_revoked")
        elif error is None and token not in accepted:
            wrong_type = token in self.tokens or token in self.app_tokens
            error = SlackError("not_allowed_token_type" if wrong_type else "invalid_auth")
        result: dict[str, Any] = {}
        if error is None:
            with self._lock:
                handler = self._handlers.get(method)
                try:
                    if handler is None:
                        raise SlackError("unknown_method")
                    result = {"ok": True, **handler(copy.deepcopy(params))}
                except SlackError as exc:
                    error = exc
        with self._lock:
            hold = self._take_lost(method, params) if error is None else None
        if hold is not None:  # applied, but the reply never arrives: the connection is dropped
            time.sleep(hold)
            request.close_connection = True
            with contextlib.suppress(OSError):
                request.connection.shutdown(socket.SHUT_RDWR)
            return
        extra = {"X-OAuth-Scopes": "chat:write,commands,files:write,files:read,usergroups:read,users:read,channels:read,"
                                   "channels:history,groups:history,im:write"}
        if error is not None:
            result = error.body()
            extra.update(error.headers)
        status = error.status if error is not None else 200
        request.reply(status, json.dumps(result).encode(), "application/json; charset=utf-8", extra)

    def _serve_upload(self, request: _RequestHandler, file_id: str, body: bytes, headers: dict[str, str]) -> None:
        with self._lock:
            self._calls.append(Call("upload", {"file_id": file_id, "length": len(body)}, headers))
            pending = self._files.get(file_id)
            if pending is not None:
                pending["content"] = body
            hold = self._take_lost("upload", pending) if pending is not None else None
        if hold is not None:  # the bytes arrived; the answer never does (the upload is not shared until completed)
            time.sleep(hold)
            request.close_connection = True
            with contextlib.suppress(OSError):
                request.connection.shutdown(socket.SHUT_RDWR)
            return
        if pending is None:
            request.reply(404, b"file_not_found", "text/plain")
        else:
            request.reply(200, f"OK - {len(body)}".encode(), "text/plain; charset=utf-8")

    def _serve_response(self, request: _RequestHandler, key: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            payload = json.loads(body.decode("utf-8") or "null")
        except ValueError:
            payload = None
        status, error = 200, None
        with self._lock:
            self._calls.append(Call("response_url", payload if isinstance(payload, dict) else {}, headers))
            target = self._response_urls.get(key)
            try:
                if target is None:
                    raise SlackError("expired_url", status=404)
                if not isinstance(payload, dict):
                    raise SlackError("invalid_payload", status=400)
                check_message(payload, require_content=not _truthy(payload.get("delete_original")))
                self._apply_response(target, payload)
            except SlackError as exc:
                status, error = (exc.status if exc.status != 200 else 400), exc.error
            self._responses.append({"url": f"{self.root_url}/response/{key}", "payload": payload,
                                    "status": status, "error": error})
        request.reply(status, (error or "ok").encode(), "text/plain; charset=utf-8")

    def _apply_response(self, target: tuple[str | None, str | None], payload: dict[str, Any]) -> None:
        channel, message_ts = target
        key = (channel or "", message_ts or "")
        original = self._messages.get(key)
        if _truthy(payload.get("delete_original")):
            self._messages.pop(key, None)
        elif _truthy(payload.get("replace_original")):
            if original is not None:
                original.update(text=payload.get("text", ""), blocks=payload.get("blocks") or [])
        elif payload.get("response_type") == "in_channel" and channel:
            self._store_message(channel, payload)

    # ----------------------------------------------------------------- method handlers (called with the lock)

    def _next_ts(self) -> str:
        """Like Slack's: the time of the message, in microseconds, unique (and increasing) in the workspace."""
        self._last_ts = max(round(time.time(), 6), round(self._last_ts + 0.000001, 6))
        return f"{self._last_ts:.6f}"

    def _channel(self, params: Mapping[str, Any], key: str = "channel") -> str:
        value = params.get(key)
        if not value:
            raise SlackError("channel_not_found")
        name = str(value).lstrip("#")
        if name in self._users:  # a user id: the bot's direct message with that person
            return "D" + name[1:]
        for channel_id, info in self._channels.items():
            if info["name"] == name:
                return channel_id
        if self.strict_channels and value not in self._channels and not str(value).startswith("D"):
            raise SlackError("channel_not_found")
        return str(value)

    def _member_of(self, channel: str) -> str:
        info = self._channels.get(channel)
        if info is not None and not info["is_member"]:
            raise SlackError("not_in_channel")
        return channel

    def _store_message(self, channel: str, params: Mapping[str, Any]) -> dict[str, Any]:
        ts = self._next_ts()
        message: dict[str, Any] = {"type": "message", "user": BOT_USER_ID, "bot_id": BOT_ID, "app_id": APP_ID,
                                   "team": TEAM_ID, "text": params.get("text") or "",
                                   "blocks": params.get("blocks") or [], "ts": ts}
        if params.get("thread_ts"):
            message["thread_ts"] = params["thread_ts"]
        if params.get("metadata"):
            message["metadata"] = params["metadata"]
        self._messages[(channel, ts)] = message
        return message

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"url": f"https://{TEAM_DOMAIN}.slack.com/", "team": "StarChart Fake", "user": "starchart",
                "team_id": TEAM_ID, "user_id": BOT_USER_ID, "bot_id": BOT_ID, "is_enterprise_install": False}

    def _post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._member_of(self._channel(params))
        check_message(params)
        message = self._store_message(channel, params)
        return {"channel": channel, "ts": message["ts"], "message": copy.deepcopy(message)}

    def _update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(params)
        check_message(params)
        message = self._messages.get((channel, str(params.get("ts"))))
        if message is None:
            raise SlackError("message_not_found")
        if message.get("user") != BOT_USER_ID:
            raise SlackError("cant_update_message")
        # Slack keeps the old blocks when chat.update omits them (an empty list removes them).
        if "text" in params:
            message["text"] = params["text"] or ""
        if "blocks" in params:
            message["blocks"] = params["blocks"] or []
        message["edited"] = {"user": BOT_USER_ID, "ts": self._next_ts()}
        return {"channel": channel, "ts": message["ts"], "text": message["text"], "message": copy.deepcopy(message)}

    def _post_ephemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(params)
        if not params.get("user"):
            raise SlackError("invalid_arguments", messages=["missing required field: user"])
        check_message(params)
        ts = self._next_ts()
        self._ephemerals.append({"channel": channel, "user": params["user"], "text": params.get("text") or "",
                                 "blocks": params.get("blocks") or [], "thread_ts": params.get("thread_ts"),
                                 "message_ts": ts})
        return {"message_ts": ts}

    def _views_open(self, params: dict[str, Any]) -> dict[str, Any]:
        trigger = params.get("trigger_id") or params.get("interactivity_pointer")
        if not trigger:
            raise SlackError("invalid_arguments", messages=["missing required field: trigger_id"])
        if not TRIGGER_ID.match(str(trigger)):
            raise SlackError("invalid_trigger_id")
        if trigger in self._used_triggers:
            raise SlackError("exchanged_trigger_id")
        view = params.get("view")
        if not isinstance(view, dict) or not isinstance(view.get("type"), str):
            raise SlackError("invalid_arguments", messages=["missing required field: view"])
        problems = block_problems(view.get("blocks") or [], MAX_VIEW_BLOCKS, base="/view/blocks")
        title = (view.get("title") or {}).get("text")
        _too_long(title, MAX_VIEW_TITLE, "/view/title/text", problems)
        if problems:
            raise SlackError("invalid_arguments", messages=problems)
        self._used_triggers.add(str(trigger))
        view_id = f"V0FAKE{next(self._counter):05d}"
        opened = {"id": view_id, "team_id": TEAM_ID, "app_id": APP_ID, "bot_id": BOT_ID, "root_view_id": view_id,
                  "previous_view_id": None, "external_id": "", "hash": f"{int(time.time())}.{uuid.uuid4().hex[:8]}",
                  "state": {"values": {}}, "private_metadata": "", "callback_id": "", "blocks": [],
                  "clear_on_close": False, "notify_on_close": False, **view}
        self._views[view_id] = opened
        return {"view": copy.deepcopy(opened)}

    def _views_publish(self, params: dict[str, Any]) -> dict[str, Any]:
        user = params.get("user_id")
        if not user:
            raise SlackError("invalid_arguments", messages=["missing required field: user_id"])
        if str(user) not in self._users:
            raise SlackError("user_not_found")
        view = params.get("view")
        if not isinstance(view, dict) or not isinstance(view.get("type"), str):
            raise SlackError("invalid_arguments", messages=["missing required field: view"])
        if view["type"] != "home":
            raise SlackError("invalid_arguments", messages=["must be a home view [json-pointer:/view/type]"])
        problems = block_problems(view.get("blocks") or [], MAX_VIEW_BLOCKS, base="/view/blocks")
        if problems:
            raise SlackError("invalid_arguments", messages=problems)
        published = self._homes.get(str(user))
        if params.get("hash") and published is not None and params["hash"] != published["hash"]:
            raise SlackError("hash_conflict")  # the view changed since the hash the caller read
        view_id = published["id"] if published else f"V0HOME{next(self._counter):05d}"
        shown = {"id": view_id, "team_id": TEAM_ID, "app_id": APP_ID, "bot_id": BOT_ID, "root_view_id": view_id,
                 "previous_view_id": None, "external_id": "", "hash": f"{int(time.time())}.{uuid.uuid4().hex[:8]}",
                 "state": {"values": {}}, "private_metadata": "", "callback_id": "", "close": None, "submit": None,
                 "clear_on_close": False, "notify_on_close": False, "title": {"type": "plain_text", "text": "View"},
                 **view}
        self._homes[str(user)] = shown
        return {"view": copy.deepcopy(shown)}

    def _usergroup_users(self, params: dict[str, Any]) -> dict[str, Any]:
        members = self._groups.get(str(params.get("usergroup")))
        if members is None:
            raise SlackError("no_such_subteam")
        return {"users": list(members)}

    def _users_info(self, params: dict[str, Any]) -> dict[str, Any]:
        user = self._users.get(str(params.get("user")))
        if user is None:
            raise SlackError("user_not_found")
        return {"user": copy.deepcopy(user)}

    def _conversations_info(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channels.get(str(params.get("channel")))
        if channel is None:
            raise SlackError("channel_not_found")
        return {"channel": copy.deepcopy(channel)}

    def _conversations_history(self, params: dict[str, Any]) -> dict[str, Any]:
        """Top-level messages newest first, after `oldest` (exclusive); metadata only with include_all_metadata."""
        channel = self._member_of(self._channel(params))
        if channel not in self._channels and not channel.startswith("D") and self.strict_channels:
            raise SlackError("channel_not_found")
        oldest = float(params.get("oldest") or 0)
        latest = float(params.get("latest") or "inf")
        limit = max(1, min(int(params.get("limit") or 100), 999))
        start = int(params.get("cursor") or 0)
        found = sorted((m for (c, ts), m in self._messages.items() if c == channel and oldest < float(ts) < latest
                        and m.get("thread_ts") in (None, m["ts"])), key=lambda m: float(m["ts"]), reverse=True)
        page = [copy.deepcopy(m) for m in found[start:start + limit]]
        if not _truthy(params.get("include_all_metadata")):
            for m in page:
                m.pop("metadata", None)
        more = start + limit < len(found)
        return {"messages": page, "has_more": more, "pin_count": 0,
                "response_metadata": {"next_cursor": str(start + limit) if more else ""}}

    def _conversations_open(self, params: dict[str, Any]) -> dict[str, Any]:
        users = [u for u in str(params.get("users") or "").split(",") if u]
        if len(users) != 1 or users[0] not in self._users:
            raise SlackError("user_not_found")
        return {"channel": {"id": "D" + users[0][1:], "is_im": True, "user": users[0]}}

    def _connections_open(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"url": self.socket_mode_server()}

    def _get_upload_url(self, params: dict[str, Any]) -> dict[str, Any]:
        filename, length = params.get("filename"), str(params.get("length") or "")
        if not filename or not length.isdigit():
            raise SlackError("invalid_arguments", messages=["filename and a numeric length are required"])
        file_id = f"F0FAKE{next(self._counter):05d}"
        self._files[file_id] = {"id": file_id, "filename": filename, "length": int(length),
                                "alt_txt": params.get("alt_txt"), "snippet_type": params.get("snippet_type"),
                                "content": None}
        return {"upload_url": f"{self.root_url}/upload/{file_id}", "file_id": file_id}

    def _complete_upload(self, params: dict[str, Any]) -> dict[str, Any]:
        files = params.get("files")
        if not isinstance(files, list) or not files:
            raise SlackError("invalid_arguments", messages=["files must be a non-empty JSON array"])
        channels = [c for c in str(params.get("channels") or "").split(",") if c]
        if params.get("channel_id"):
            channels.insert(0, str(params["channel_id"]))
        channels = [self._channel({"channel": c}) for c in channels]
        thread_ts = params.get("thread_ts")
        if thread_ts and not channels:
            raise SlackError("invalid_arguments", messages=["thread_ts requires channel_id"])
        pending = [self._files.get(str(f.get("id"))) if isinstance(f, dict) else None for f in files]
        if any(p is None or p["content"] is None for p in pending):
            raise SlackError("file_not_found")
        shown = []
        for spec, upload in zip(files, pending):
            assert upload is not None
            title = spec.get("title") or upload["filename"]
            created = int(time.time())
            self._uploads.append({**upload, "title": title, "channel": channels[0] if channels else None,
                                  "channels": channels, "thread_ts": thread_ts, "created": created,
                                  "share_ts": self._next_ts(),
                                  "initial_comment": params.get("initial_comment")})
            shown.append(self._file_object(self._uploads[-1]))
            del self._files[upload["id"]]
        return {"files": shown}

    def _file_object(self, upload: Mapping[str, Any]) -> dict[str, Any]:
        """A completed upload as Slack's file object (files.completeUploadExternal, files.list)."""
        mimetype = mimetypes.guess_type(upload["filename"])[0] or "application/octet-stream"
        share = {"ts": upload["share_ts"], **({"thread_ts": upload["thread_ts"]} if upload["thread_ts"] else {})}
        return {"id": upload["id"], "name": upload["filename"], "title": upload["title"], "mimetype": mimetype,
                "size": len(upload["content"]), "user": BOT_USER_ID, "created": upload["created"],
                "timestamp": upload["created"], "channels": list(upload["channels"]), "groups": [], "ims": [],
                "shares": {"public": {c: [share] for c in upload["channels"]}},
                "url_private": f"{self.root_url}/files/{upload['id']}/{upload['filename']}"}

    def _files_list(self, params: dict[str, Any]) -> dict[str, Any]:
        """Files shared in `channel` (all without it), newest first, created in [ts_from, ts_to]; `count` per
        `page` (Slack's defaults: 100 and 1), with Slack's `paging`."""
        channel = self._channel(params) if params.get("channel") else None
        try:
            ts_from = float(params.get("ts_from") or 0)
            ts_to = float(params.get("ts_to") or "inf")
            count = max(1, min(int(params.get("count") or 100), 1000))
            page = max(1, int(params.get("page") or 1))
        except ValueError:
            raise SlackError("invalid_arguments", messages=["ts_from, ts_to, count and page are numbers"]) from None
        found = [u for u in reversed(self._uploads) if ts_from <= u["created"] <= ts_to
                 and (channel is None or channel in u["channels"])]
        pages = max(1, -(-len(found) // count))
        return {"files": [self._file_object(u) for u in found[(page - 1) * count:page * count]],
                "paging": {"count": count, "total": len(found), "page": page, "pages": pages}}
