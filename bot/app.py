"""Composition root: configuration, the Slack client, the core, the Bolt app and its listeners."""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from slack_bolt import App
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

from bot import blocks
from handlers.context import Deps
from handlers.ml import register
from model_registry.errors import InvalidInput

log = logging.getLogger("starchart.bot")
SLACK_API_DEFAULT = "https://slack.com/api/"


class TtlCache:
    """A small thread-safe cache for Slack look-ups (user-group members, display names)."""

    def __init__(self, fetch: Callable[[str], Any], ttl: float) -> None:
        self.fetch, self.ttl = fetch, ttl
        self._values: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, key: str) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = self._values.get(key)
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        value = self.fetch(key)
        with self._lock:
            self._values[key] = (now, value)
        return value


def slack_client(env: Mapping[str, str] | None = None, token: str | None = None) -> WebClient:
    env = os.environ if env is None else env
    base_url = env.get("SLACK_API_URL") or SLACK_API_DEFAULT
    client = WebClient(token=token or env.get("SLACK_BOT_TOKEN"), base_url=base_url.rstrip("/") + "/")
    client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=2))
    return client


def group_members(client: WebClient) -> Callable[[str], list[str]]:
    def fetch(group: str) -> list[str]:
        try:
            return list(client.usergroups_users_list(usergroup=group)["users"])
        except SlackApiError as exc:  # fail closed: an unreadable group grants nobody
            log.warning("cannot read members of user group %s: %s", group, exc.response.get("error"))
            return []

    return TtlCache(fetch, ttl=60.0)


def display_names(client: WebClient) -> Callable[[str], str | None]:
    def fetch(user: str) -> str | None:
        try:
            info = client.users_info(user=user)["user"]
        except SlackApiError:
            return None
        profile = info.get("profile") or {}
        return profile.get("display_name") or info.get("real_name") or info.get("name")

    return TtlCache(fetch, ttl=3600.0)


class LazyRegistry:
    """The core, loaded in a thread while the web process already acks (SQLAlchemy takes a while to import).

    Attribute access waits for it; `ready()` tells /healthz whether it has loaded, and a load error
    is raised again to every caller instead of being lost.
    """

    def __init__(self, build: Callable[[], Any]) -> None:
        self._done = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None

        def load() -> None:
            try:
                self._value = build()
            except BaseException as exc:  # noqa: BLE001 - kept and re-raised to every caller
                log.exception("the core failed to load")
                self._error = exc
            finally:
                self._done.set()

        threading.Thread(target=load, name="starchart-core-load", daemon=True).start()

    def ready(self) -> bool:
        return self._done.is_set() and self._error is None

    def failed(self) -> BaseException | None:
        return self._error if self._done.is_set() else None

    def get(self, timeout: float | None = 120.0) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError("the core is still loading")
        if self._error is not None:
            raise self._error
        return self._value

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


@dataclass
class Bot:
    app: App
    deps: Deps
    registry: Any
    client: WebClient
    signing_secret: str
    gate: AckFirst


class AckFirst:
    """Acks before background work: a queued task waits while Slack requests are being answered.

    Work that competes for the GIL delays acks; Slack gives 3 s for an ack and none for the rest.
    A task waits at most `patience` seconds, so a steady stream of requests cannot starve it.
    """

    def __init__(self, patience: float = 1.0) -> None:
        self.patience = patience
        self._inflight = 0
        self._idle = threading.Condition()

    def request_started(self) -> None:
        with self._idle:
            self._inflight += 1

    def request_done(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    def wait_for_gap(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=self.patience)


def background_executor(gate: AckFirst | None = None, max_workers: int = 16) -> Callable[[Callable[[], None]], None]:
    pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="starchart-bg")

    def submit(fn: Callable[[], None]) -> None:
        def task() -> None:
            if gate is not None:
                gate.wait_for_gap()
            fn()

        pool.submit(task)

    return submit


def create_bot(env: Mapping[str, str] | None = None,
               background: Callable[[Callable[[], None]], None] | None = None,
               follow_interval: float = 2.0) -> Bot:
    """The Bolt app with every listener, wired to the core; nothing here imports TensorFlow."""
    env = os.environ if env is None else env
    token, secret = env.get("SLACK_BOT_TOKEN"), env.get("SLACK_SIGNING_SECRET")
    if not token:
        raise InvalidInput("SLACK_BOT_TOKEN is not set", "set it to the app's Bot User OAuth Token (xoxb-…)")
    client = slack_client(env, token)
    members = group_members(client)

    def build() -> Any:
        from model_registry.bootstrap import Core

        core = Core.from_env(members_of=members)
        core.promotions.reconcile()  # an apply interrupted by the last stop ends applied or failed, never applying
        return core

    registry = LazyRegistry(build)
    gate = AckFirst()
    app = App(token=token, signing_secret=secret or "", client=client, token_verification_enabled=False,
              request_verification_enabled=True, process_before_response=False)
    deps = Deps(registry=registry, render=blocks, background=background or background_executor(gate),
                watch=lambda fn: threading.Thread(target=fn, name="starchart-watch", daemon=True).start(),
                user_name=display_names(client), follow_interval=follow_interval)
    register(app, deps)
    return Bot(app=app, deps=deps, registry=registry, client=client, signing_secret=secret or "", gate=gate)
