"""Composition root: the Slack client, the core, the Bolt app and its listeners, one listener executor."""

from __future__ import annotations

import contextlib
import gc
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, cast

from cachetools import TTLCache, cached
from slack_bolt import App, BoltRequest, BoltResponse
from slack_bolt.middleware.request_verification import RequestVerification
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

from handlers.deps import Deps
from handlers.listeners import SIGNATURE_KEY, register, where
from model_registry.config import SlackSettings
from model_registry.domain.errors import InvalidInput

if TYPE_CHECKING:  # loaded beside the core, not before the process listens (build_and_deliver)
    from bot.slack_output import SlackOutput

log = logging.getLogger("starchart.bot")
REPLAY_WINDOW = 5 * 60  # seconds: Slack's tolerance for X-Slack-Request-Timestamp
SLACK_TIMESTAMP = re.compile(r"[0-9]{1,12}")
REMOTE_ADDR_HEADER = "x-starchart-remote-addr"  # set by bot.web from the connection, never taken from the client


def slack_client(slack: SlackSettings) -> WebClient:
    client = WebClient(token=slack.bot_token, base_url=slack.api_url)
    client.retry_handlers.append(RateLimitErrorRetryHandler(max_retry_count=2))
    return client


def _cached(fetch: Callable[[str], Any], ttl: float, failed: Any, failed_ttl: float = 0.0) -> Callable[[str], Any]:
    """Slack look-ups kept for `ttl` seconds (the lock makes the cache safe across listener threads).

    A look-up that fails in any way (a Slack error, the network, an answer without the field) answers `failed`,
    so the decision it serves is still made and recorded. The failure is kept `failed_ttl` seconds (none: the
    next one asks again): a missing scope or a Slack outage then costs one call a key, not one every click.
    """
    lock = threading.Lock()
    kept = cached(TTLCache(maxsize=4096, ttl=ttl), lock=lock)(fetch)
    misses: TTLCache[str, bool] | None = TTLCache(maxsize=4096, ttl=failed_ttl) if failed_ttl else None

    def look_up(key: str) -> Any:
        if misses is not None:
            with lock:
                if key in misses:
                    return failed
        try:
            return kept(key)
        except Exception as exc:  # noqa: BLE001 - any failure answers `failed`
            error = exc.response.get("error") if isinstance(exc, SlackApiError) else f"{type(exc).__name__}: {exc}"
            log.warning("Slack look-up of %s failed (%s); going on without it", key, error)
            if misses is not None:
                with lock:
                    misses[key] = True
            return failed

    return look_up


def group_members(client: WebClient) -> Callable[[str], list[str]]:
    """Members of a user group; fails closed: a group that cannot be read grants nobody."""
    def fetch(group: str) -> list[str]:
        return [str(user) for user in client.usergroups_users_list(usergroup=group)["users"]]

    return _cached(fetch, ttl=60.0, failed=[])


def display_names(client: WebClient) -> Callable[[str], str | None]:
    """A person's display name for the records; None when Slack cannot say (the user id then stands alone)."""
    def fetch(user: str) -> str | None:
        info = client.users_info(user=user)["user"]
        profile = info.get("profile") or {}
        return profile.get("display_name") or info.get("real_name") or info.get("name")

    return _cached(fetch, ttl=3600.0, failed=None, failed_ttl=60.0)


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


class RecordedRequestVerification(RequestVerification):
    """Bolt's signature check: a refusal is a 401 and a request.refused event (bounded per address); a replay is
    acked and dropped.

    It is the app's one verification: Bolt's built-in one is turned off, this runs in its place (before
    authorization); Socket Mode requests skip it as Bolt's would.
    """

    def __init__(self, signing_secret: str, registry: Any) -> None:
        super().__init__(signing_secret)
        self.registry = registry

    def process(self, *, req: BoltRequest, resp: BoltResponse, next: Callable[[], BoltResponse]) -> BoltResponse:
        if self._can_skip(req.mode, req.body):
            return next()
        timestamp = req.headers.get("x-slack-request-timestamp", [""])[0]
        signature = req.headers.get("x-slack-signature", [""])[0]
        if not (timestamp and signature):
            why = "missing signature"
        elif not SLACK_TIMESTAMP.fullmatch(timestamp):  # int() of it could fail or overflow the clock's float
            why = "malformed X-Slack-Request-Timestamp (Unix seconds, up to 12 digits)"
        elif abs(time.time() - int(timestamp)) > REPLAY_WINDOW:
            why = "expired X-Slack-Request-Timestamp (more than 5 minutes from now)"
        elif self.verifier.is_valid(req.raw_body, timestamp, signature):
            return self._once(req, signature, next)
        else:
            why = "invalid signature"
        address = req.headers.get(REMOTE_ADDR_HEADER, [""])[0]
        try:  # bounded per address: an unauthenticated flood writes one event a minute, not one a request
            self.registry.audit.record_refusal("unknown", "bad_signature", why, details={"remote_addr": address},
                                               source=address)
        except Exception:  # recording must never turn a refusal into an acceptance
            log.exception("could not record a refused Slack request")
        return BoltResponse(status=401, body={"error": why})

    def _once(self, req: BoltRequest, signature: str, next: Callable[[], BoltResponse]) -> BoltResponse:
        """A Slack retry is acked and dropped here; a replayed signature is dropped by the listener it reaches."""
        retry = req.headers.get("x-slack-retry-num", [""])[0]
        if retry:  # Slack retries a delivery it thinks failed; the first one was taken
            log.info("acked Slack's retry %s (%s) without acting on it", retry,
                     req.headers.get("x-slack-retry-reason", [""])[0])
            return BoltResponse(status=200, body="")
        # the replay check needs the database: it runs in the listener, after the ack (handlers.listeners.taken)
        req.context[SIGNATURE_KEY] = signature
        return next()


class AckFirst:
    """Acks before background work: a listener's work waits for a quiet moment in the Slack requests.

    Work that competes for the GIL delays acks; Slack gives 3 s for an ack and none for the rest. Acks take
    well under a millisecond, so "no request in flight" happens between two requests of a burst: the gap must
    also have lasted `quiet` seconds. A task waits at most `patience` seconds, so a steady stream of requests
    cannot starve it. Work whose patience ran out while requests are still in flight runs one task at a time
    (`turn`): sixteen listener threads taking turns at the GIL with the request threads put each ack behind
    many switch intervals; one puts it behind at most one.
    """

    def __init__(self, patience: float = 1.0, quiet: float = 0.05) -> None:
        self.patience, self.quiet = patience, quiet
        self._inflight = 0
        self._last_done = 0.0
        self._count = threading.Lock()
        self._impatient = threading.Lock()  # held by the one task that runs while requests are in flight

    def request_started(self) -> None:
        with self._count:
            self._inflight += 1

    def request_done(self) -> None:
        with self._count:
            self._inflight -= 1
            self._last_done = time.monotonic()

    def wait_for_gap(self) -> bool:
        """Wait for a quiet gap; False when the patience ran out first (requests are still coming).

        The waiting tasks look again every `quiet` seconds at most; a request that ends wakes none of them (a gap
        only starts `quiet` seconds later): waking every waiting listener at each ack of a burst took the GIL
        from the acks."""
        deadline = time.monotonic() + self.patience
        while True:
            now = time.monotonic()
            idle = self._inflight == 0
            if idle and now - self._last_done >= self.quiet:
                return True
            if now >= deadline:
                return False
            wait = self.quiet - (now - self._last_done) if idle else self.quiet
            time.sleep(max(0.001, min(wait, deadline - now)))

    @contextlib.contextmanager
    def turn(self) -> Iterator[None]:
        """A listener's work after its ack: in a quiet gap, or one task at a time while requests are in flight."""
        if self.wait_for_gap():
            yield
            return
        with self._impatient:
            yield


@dataclass
class Bot:
    app: App
    deps: Deps
    registry: Any
    client: WebClient
    gate: AckFirst
    background: list[Any] = field(default_factory=list)  # the outbox's sender and the job watch, once loaded

    def stop(self) -> None:
        """Stop the background work (tests; a process that ends takes its daemon threads with it)."""
        for work in self.background:
            work.stop()


def create_bot(slack: SlackSettings, follow_interval: float = 2.0, build: Callable[[], Any] | None = None,
               listener_threads: int = 16) -> Bot:
    """The Bolt app with every listener, wired to the core (`build`, loaded lazily); nothing here imports TensorFlow.

    Once the core has loaded, the outbox's sender delivers the messages the bot sends on its own, and the job
    watch follows unfinished jobs every `follow_interval` seconds (one loop each per process)."""
    if not slack.bot_token:
        raise InvalidInput("SLACK_BOT_TOKEN is not set", "set it to the app's Bot User OAuth Token (xoxb-…)")
    client = slack_client(slack)
    members = group_members(client)

    def build_core() -> Any:
        from model_registry.bootstrap import Core

        core = Core.from_env(members_of=members)
        try:  # an apply the last stop interrupted is settled now if the backend shows how it ended
            core.promotions.reconcile()
        except Exception:  # the process serves all the same; the worker's passes settle it
            log.exception("could not settle the applies left in progress at start")
        return core

    background: list[Any] = []

    def build_and_deliver() -> Any:
        core = (build or build_core)()
        # What the listeners reach once they run: the command table and the renderers, and the outbox's sender.
        # Loaded here, beside the core, not before the process listens: the acks need none of them (start to
        # healthy, benchmarks/slack_ack.py)
        import bot.slack_output  # noqa: F401
        import handlers.chat  # noqa: F401
        from bot.delivery import start_delivery

        background.extend(w for w in start_delivery(core, slack, follow_interval) if w is not None)
        # What the load made (SQLAlchemy, the core, Bolt) stays for the process's life: out of the collector's
        # full passes, which held the GIL — and every ack waiting for it — 70-140 ms each under a burst (measured)
        gc.collect()
        gc.freeze()
        return core

    registry = LazyRegistry(build_and_deliver)
    secret = slack.signing_secret or ""
    # Background work is the listeners' own, on Bolt's listener executor: one pool in the process.
    app = App(token=slack.bot_token, signing_secret=secret, client=client, token_verification_enabled=False,
              request_verification_enabled=False, before_authorize=RecordedRequestVerification(secret, registry),
              process_before_response=False,
              listener_executor=ThreadPoolExecutor(max_workers=listener_threads, thread_name_prefix="starchart-bolt"))
    gate = AckFirst()  # bot.web counts the Slack requests in flight
    # the lazily loaded core stands in for Core: attribute access waits for it
    deps = Deps(core=cast(Any, registry), outbox=True, user_name=display_names(client), pace=gate.turn,
                team_id=slack.team_id)

    def outputs(body: dict[str, Any], web: Any, respond: Any, channel: str | None) -> SlackOutput:
        from bot.slack_output import SlackOutput

        return SlackOutput(web, respond, user=where(body)[0], channel=channel, trigger_id=body.get("trigger_id"))

    register(app, deps, outputs)
    return Bot(app=app, deps=deps, registry=registry, client=client, gate=gate, background=background)
