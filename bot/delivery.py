"""The outbox's sender: delivers to Slack the messages the core recorded with its state changes.

Each message is rendered from its record as it is at delivery (bot.blocks), so pending updates of one message
collapse into one. One sender at a time works on a message (its lease). A post carries the outbox id in its
`metadata`; a post that had an attempt before is first looked for in the channel (conversations.history), so a
post whose reply was lost is not posted twice; a file (a card's full diff in its thread) carries the outbox id in its
name, and one that had an attempt before is first looked for with files.list. Rate limits (Retry-After), Slack's 5xx and time-outs are retried
with backoff, the next attempt time kept in the row; a permanent error stops the message, is recorded, and the
person whose action produced it gets a direct message saying what to do.

`JobWatch` follows unfinished jobs on the backend in one loop per process (not a thread per training): each
state change records its message update (services/jobs.py refresh).
"""

from __future__ import annotations

import collections
import http.client
import logging
import os
import re
import socket
import threading
import uuid
from datetime import datetime, timezone
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from bot import blocks
from handlers.chat import slack_hint
from handlers.results import (
    CanaryCard,
    Checkpoint,
    Failure,
    NightlyExposed,
    Result,
    ReviewCard,
    ReviewSkipped,
    ScheduledFailed,
    ScheduleNotStarted,
    TrainingMessage,
)
from model_registry.adapters import outbox as kinds
from model_registry.config import SlackSettings
from model_registry.domain.errors import StarchartError
from model_registry.domain.names import utcnow
from model_registry.services.outbox import Claimed, Settled

log = logging.getLogger("starchart.outbox")
OUTBOX_EVENT = "starchart_outbox"  # the metadata event type of every message the outbox posts
FILE_NOTE = "Full diff attached as a file."
CHARTS_NOTE = "Charts: the metric across recent versions, and the training curves of the candidate and the default."
# Slack's errors that pass: retried with backoff (429 honours Retry-After); any other error is permanent
PASSING = {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout",
           "team_added_to_org", "timeout"}
WHOLE_APP = {"invalid_auth", "token_revoked", "account_inactive", "not_authed", "token_expired"}  # not one channel
PERSON = re.compile(r"^[UW][A-Z0-9]{2,}$")


class Undeliverable(Exception):
    """A message that can never be delivered as recorded: its record is gone, or its row is malformed."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code, self.detail = code, detail


def call_timeout(lease: float) -> int:
    """Seconds one Slack call may take: well within the lease (20 s with the default lease of 120 s)."""
    return max(2, min(20, int(lease // 4)))


def sender_client(slack: SlackSettings) -> WebClient:
    """The sender's own client: no retries inside slack_sdk (a blind retry of a post could post twice; the sender
    retries itself, looking first), a time-out well within the lease."""
    client = WebClient(token=slack.bot_token, base_url=slack.api_url, timeout=call_timeout(slack.outbox_lease))
    client.retry_handlers.clear()
    return client


def _what(message: Claimed) -> str:
    return {kinds.TRAINING: f"the training message of {message.subject}",
            kinds.REVIEW_CARD: f"the review card of promotion request #{message.subject}",
            kinds.CARD_FILE: f"the full diff of promotion request #{message.subject}",
            kinds.CARD_CHARTS: f"the charts of promotion request #{message.subject}",
            kinds.CANARY_CARD: f"the canary card of promotion request #{message.subject}",
            kinds.CHECKPOINT: "the audit checkpoint",
            kinds.NIGHTLY: f"the nightly retrain's message {message.subject}"}.get(message.kind,
                                                                                 f"a {message.kind} message")


def render(core: Any, message: Claimed) -> blocks.Rendered:
    """The message as its record stands now."""
    try:
        if message.kind == kinds.TRAINING:
            job = core.jobs.get(message.subject)
            metrics = core.jobs.metrics(job["job_id"]) if job["state"] == "SUCCEEDED" else None
            progress = core.jobs.progress(job["job_id"]) if job["state"] == "RUNNING" else None
            return blocks.render(TrainingMessage(job, metrics, progress))
        if message.kind in (kinds.REVIEW_CARD, kinds.CARD_FILE):  # read with the lease, else now
            return blocks.render(ReviewCard(message.record or core.promotions.get(int(message.subject))))
        if message.kind == kinds.CANARY_CARD:
            return blocks.render(CanaryCard(core.canaries.get(int(message.subject))))
        if message.kind == kinds.CHECKPOINT:
            checkpoint = _payload(message).get("checkpoint")
            if not isinstance(checkpoint, dict):
                raise Undeliverable("malformed_payload", "the checkpoint message carries no checkpoint")
            return blocks.render(Checkpoint(checkpoint, message.channel))
        if message.kind == kinds.NIGHTLY:
            return blocks.render(_nightly(core, _payload(message)))
        if message.kind == kinds.NOTICE:
            text, hint = _payload(message).get("message"), _payload(message).get("hint", "")
            if not isinstance(text, str) or not text or not isinstance(hint, str):
                raise Undeliverable("malformed_payload", "the notice carries no message")
            return blocks.render(Failure(text, hint))
    except StarchartError as exc:  # the job or the promotion request no longer exists
        raise Undeliverable("record_not_found", exc.message) from None
    except (ValueError, TypeError) as exc:
        raise Undeliverable("malformed_payload", f"{type(exc).__name__}: {exc}") from None
    raise Undeliverable("malformed_payload", f"unknown message kind {message.kind!r}")


def _nightly(core: Any, payload: dict[str, Any]) -> Result:
    """A nightly retrain's news as its record stands: the job or the version it is about, or what it recorded."""
    event, model = payload.get("event"), payload.get("model")
    if not isinstance(model, str) or not model:
        raise Undeliverable("malformed_payload", "the nightly message names no model")
    if event == kinds.TRAINING_FAILED:
        return ScheduledFailed(core.jobs.get(str(payload.get("job_id"))))
    if event == kinds.EXPOSED:
        name = payload.get("version")
        version = next((v for v in core.versions.of_model(model)["versions"] if v["name"] == name), None)
        if version is None:
            raise Undeliverable("record_not_found", f"{model} has no version {name!r} any more")
        return NightlyExposed(model, version)
    if event == kinds.REVIEW_SKIPPED:
        gate = payload.get("gate")
        if not isinstance(gate, dict) or not isinstance(gate.get("metric"), str) or \
                not isinstance(gate.get("why"), str) or not isinstance(gate.get("min_delta"), (int, float)):
            raise Undeliverable("malformed_payload", "the skipped review carries no gate")
        return ReviewSkipped(model, str(payload.get("version")), gate)
    if event == kinds.NOT_STARTED:
        error, hint = payload.get("error"), payload.get("hint", "")
        if not isinstance(error, str) or not isinstance(hint, str):
            raise Undeliverable("malformed_payload", "the nightly message carries no error")
        return ScheduleNotStarted(model, error, hint)
    raise Undeliverable("malformed_payload", f"unknown nightly event {event!r}")


def _payload(message: Claimed) -> dict[str, Any]:
    if not isinstance(message.payload, dict):
        raise Undeliverable("malformed_payload", f"the recorded payload is a {type(message.payload).__name__}")
    return message.payload


def _retry_after(exc: SlackApiError) -> float | None:
    for key, value in (getattr(exc.response, "headers", None) or {}).items():
        if key.lower() == "retry-after":
            raw = value[0] if isinstance(value, list) else value
            try:
                return max(0.0, float(raw))
            except (TypeError, ValueError):
                return None
    return None


def classify(exc: BaseException) -> tuple[bool, str, float | None]:
    """(passing, Slack's error code or what went wrong, Retry-After seconds) of a failed call."""
    if isinstance(exc, SlackApiError):
        status = int(getattr(exc.response, "status_code", 200) or 200)
        code = str(exc.response.get("error") or f"http_{status}")
        if status == 429 or code == "ratelimited":
            return True, "ratelimited", _retry_after(exc)
        return status >= 500 or code in PASSING, code if status < 500 else f"{code} (HTTP {status})", None
    if isinstance(exc, (OSError, http.client.HTTPException, socket.timeout)):  # time-outs, resets, lost replies
        return True, f"{type(exc).__name__}: {exc}"[:300], None
    return False, f"{type(exc).__name__}: {exc}"[:300], None


def file_name(filename: str, message_id: int) -> str:
    """A file's name as the outbox uploads it: with the outbox id, by which a retry finds an earlier upload."""
    stem, dot, suffix = filename.rpartition(".")
    return f"{stem}.outbox-{message_id}.{suffix}" if dot and stem else f"{filename}.outbox-{message_id}"


def _epoch(at: datetime) -> float:
    return at.replace(tzinfo=timezone.utc).timestamp()


class Sender:
    """Delivers due outbox messages: `deliver_due()` once, or `start()` a thread woken after each commit that
    recorded a message in this process and polling every `poll` seconds otherwise."""

    def __init__(self, core: Any, client: WebClient, *, owner: str | None = None, poll: float = 1.0,
                 lease: float = 120.0, backoff: float = 1.0, max_backoff: float = 300.0, lookback: float = 120.0
                 ) -> None:
        self.core, self.client = core, client
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.poll, self.lease, self.backoff, self.max_backoff, self.lookback = poll, lease, backoff, max_backoff, lookback
        # an attempt calls Slack only with this much of its lease left: the call's time-out and some
        self.margin = min(lease / 2, call_timeout(lease) + 5.0)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._handed: collections.deque[Claimed] = collections.deque()  # new messages this process leased to us
        self._next: Settled | None = None  # the last outcome's claim of the next message, in its transaction
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ the loop

    def start(self) -> Sender:
        """Deliver in a thread; messages this process records from now on are leased to it as they commit."""
        self.core.db.after_message.append(self.wake)
        self.core.db.sender = (self.owner, self.lease)
        self._thread = threading.Thread(target=self._loop, name="starchart-outbox", daemon=True)
        self._thread.start()
        return self

    def wake(self, handed: list[dict[str, Any]] | None = None) -> None:
        """After a commit that recorded messages; `handed`: the new ones leased to this sender, as recorded."""
        self._handed.extend(Claimed(**message) for message in handed or ()
                            if self.core.db.sender and self.owner == self.core.db.sender[0])
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        if self.core.db.sender == (self.owner, self.lease):
            self.core.db.sender = None
        self._stop.set()
        self._wake.set()
        if self.wake in self.core.db.after_message:
            self.core.db.after_message.remove(self.wake)
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                later = self.deliver_due()
            except Exception:  # the database is away for a moment: the next round tries again
                log.exception("outbox delivery round failed")
                later = None
            wait = self.poll
            if later is not None:
                wait = min(wait, max(0.01, (later - utcnow()).total_seconds()))
            self._wake.wait(wait)

    def deliver_due(self) -> datetime | None:
        """Deliver every message due now, one claim at a time (each attempt's outcome claims the next in its own
        transaction); answers when the next message waiting for its backoff is due (or None)."""
        self._next = None
        while not self._stop.is_set():
            if self._handed:  # leased to us by the commit that recorded them
                message: Claimed | None = self._handed.popleft()
            elif self._next is not None and self._next.claimed:
                message, self._next = self._next.next, None
            else:
                message = self.core.outbox.claim(self.owner, self.lease)
            if message is None:
                break
            self.attempt(message)
        self._next = None
        return self.core.outbox.next_due()

    # ------------------------------------------------------------ one attempt

    def attempt(self, message: Claimed) -> None:
        try:
            shown = render(self.core, message) if message.kind != kinds.CARD_CHARTS else None
        except Undeliverable as exc:
            self._failed(message, exc.code, exc.detail)
            return
        try:
            if shown is None:
                self._charts(message)
            elif message.kind == kinds.CARD_FILE:
                self._upload(message, shown)
            elif message.ts is None:
                self._post(message, shown)
            else:
                self._update(message, message.posted_channel or message.channel, message.ts, shown)
                self._settled(self.core.outbox.delivered(message, self.owner, message.wanted,
                                                         claim_next=self._claim_next()))
        except Undeliverable as exc:
            self._failed(message, exc.code, exc.detail)
        except _CardNotPosted:
            self._retry(message, "waiting for the review card to be posted", None)
        except _CardFailed:  # stopped with its card, whose failure told the person already
            log.error("outbox message #%s (%s) stopped: its review card was not posted", message.id, _what(message))
            self._settled(self.core.outbox.fail(
                message, self.owner, "card_failed", "the review card was not posted (see its row) — `starchart "
                "outbox --retry` delivers the card, then its charts", claim_next=self._claim_next()))
        except _LeaseEnded:
            log.warning("outbox message #%s: the lease ran out before Slack was called; another attempt follows",
                        message.id)
        except Exception as exc:  # noqa: BLE001 - every failure is classified and recorded in the row
            passing, code, retry_after = classify(exc)
            if passing:
                self._retry(message, code, retry_after)
            else:
                if not isinstance(exc, SlackApiError):
                    log.exception("outbox message #%s failed", message.id)
                self._failed(message, code.split(" ")[0], str(exc)[:2000] or code)

    def _check_lease(self, message: Claimed) -> None:
        if (message.lease_until - utcnow()).total_seconds() < self.margin:
            raise _LeaseEnded()

    def _post(self, message: Claimed, shown: blocks.Rendered) -> None:
        found = self._find(message) if message.attempts > 1 else None
        self._check_lease(message)
        if found is not None:  # Slack applied an earlier attempt whose reply was lost: no second post
            channel, ts = found
            log.info("outbox message #%s was posted already (%s %s): updated, not posted again", message.id,
                     channel, ts)
            self.client.chat_update(channel=channel, ts=ts, text=shown.text, blocks=shown.blocks)
        else:
            answer = self.client.chat_postMessage(
                channel=message.channel, text=shown.text, blocks=shown.blocks, unfurl_links=False,
                metadata={"event_type": OUTBOX_EVENT, "event_payload": {"outbox_id": message.id}})
            channel, ts = str(answer["channel"]), str(answer["ts"])
        follow_up: tuple[str, dict[str, Any]] | None = (kinds.CARD_FILE, {}) if message.kind == kinds.REVIEW_CARD and shown.attachment else None
        self._settled(self.core.outbox.posted(message, self.owner, channel, ts, message.wanted, follow_up,
                                              claim_next=self._claim_next()))

    def _update(self, message: Claimed, channel: str, ts: str, shown: blocks.Rendered) -> None:
        self._check_lease(message)
        self.client.chat_update(channel=channel, ts=ts, text=shown.text, blocks=shown.blocks)

    def _upload(self, message: Claimed, shown: blocks.Rendered) -> None:
        thread_ts = _payload(message).get("thread_ts")
        if not isinstance(thread_ts, str) or not thread_ts:
            raise Undeliverable("malformed_payload", "the file message names no thread")
        upload = shown.attachment
        if upload is not None:  # else the card fits Slack's limits now: nothing left for its thread
            name = file_name(upload.filename, message.id)
            if message.attempts > 1 and self._file_found(message, name):
                log.info("outbox message #%s was uploaded already (%s): not uploaded again", message.id, name)
            else:
                self._check_lease(message)
                self.client.files_upload_v2(channel=message.channel, thread_ts=thread_ts, filename=name,
                                            title=upload.title, initial_comment=FILE_NOTE,
                                            **({"file": upload.data} if upload.data is not None
                                               else {"content": upload.content}))
        self._settled(self.core.outbox.delivered(message, self.owner, message.wanted, claim_next=self._claim_next()))

    def _file_found(self, message: Claimed, name: str, channel: str | None = None) -> bool:
        """Whether an earlier attempt's upload was shared in the channel (files.list since shortly before the first
        attempt, matched by the file name that carries the outbox id)."""
        return name in self._files_found(message, [name], channel)

    def _files_found(self, message: Claimed, names: list[str], channel: str | None = None) -> set[str]:
        """Which of `names` an earlier attempt shared in the channel (see _file_found)."""
        ts_from = str(int(_epoch(message.first_attempt_at or utcnow()) - self.lookback))
        found: set[str] = set()
        for page in range(1, 21):  # at most 20 pages of 100 files
            self._check_lease(message)
            answer = self.client.files_list(channel=channel or message.channel, ts_from=ts_from, count=100, page=page)
            found |= {str(f.get("name")) for f in answer.get("files") or []} & set(names)
            if found == set(names) or page >= int((answer.get("paging") or {}).get("pages") or 1):
                break
        return found

    def _charts(self, message: Claimed) -> None:
        """A review card's charts, rendered now (PNG) and uploaded to the card's thread once the card is posted."""
        card = self.core.outbox.about(kinds.REVIEW_CARD, message.subject)
        if card is None:
            raise Undeliverable("record_not_found", "the charts belong to a review card that was never recorded")
        if card["state"] == "failed" and not card["ts"]:
            raise _CardFailed()
        if not card["ts"]:
            raise _CardNotPosted()
        try:
            made = self.core.charts.for_request(int(message.subject))
        except StarchartError as exc:  # the promotion request no longer exists
            raise Undeliverable("record_not_found", exc.message) from None
        channel = card["posted_channel"] or card["channel"]
        named = [(file_name(c["filename"], message.id), c) for c in made]
        if named and message.attempts > 1:  # an earlier attempt's upload may have landed: only the missing go
            there = self._files_found(message, [name for name, _ in named], channel)
            if there:
                log.info("outbox message #%s: %s uploaded already, not again", message.id, ", ".join(sorted(there)))
            named = [(name, c) for name, c in named if name not in there]
        if named:
            self._check_lease(message)
            self.client.files_upload_v2(
                channel=channel, thread_ts=card["ts"], initial_comment=CHARTS_NOTE,
                file_uploads=[{"file": c["png"], "filename": name, "title": c["title"]} for name, c in named])
        self._settled(self.core.outbox.delivered(message, self.owner, message.wanted, claim_next=self._claim_next()))

    def _find(self, message: Claimed) -> tuple[str, str] | None:
        """The message an earlier attempt posted, by the outbox id in its metadata; None when Slack has none."""
        channel = message.channel
        if PERSON.match(channel):  # a direct message: its conversation's id
            channel = str(self.client.conversations_open(users=channel)["channel"]["id"])
        oldest = f"{_epoch(message.first_attempt_at or utcnow()) - self.lookback:.6f}"
        cursor: str | None = None
        for _ in range(20):  # at most 20 pages of 200 messages since the first attempt
            self._check_lease(message)
            page = self.client.conversations_history(channel=channel, oldest=oldest, include_all_metadata=True,
                                                     limit=200, cursor=cursor)
            for item in page.get("messages") or []:
                meta = item.get("metadata") or {}
                if meta.get("event_type") == OUTBOX_EVENT and \
                        (meta.get("event_payload") or {}).get("outbox_id") == message.id:
                    return channel, str(item["ts"])
            cursor = ((page.get("response_metadata") or {}).get("next_cursor")) or None
            if not page.get("has_more") or not cursor:
                return None
        return None

    # ------------------------------------------------------------ outcomes

    def _claim_next(self) -> float | None:
        """The lease to claim the next message with in an outcome's transaction: none while messages handed to us
        wait (they go first), while an earlier outcome's claim waits, or once stopping (a claim held by a stopped
        sender waits for its lease to end)."""
        waiting = self._handed or (self._next is not None and self._next.next is not None)
        return None if waiting or self._stop.is_set() else self.lease

    def _settled(self, settled: Settled) -> None:
        if settled.claimed:  # else nothing was claimed: an earlier claim (if any) still waits
            self._next = settled

    def _retry(self, message: Claimed, error: str, retry_after: float | None) -> None:
        delay = retry_after if retry_after is not None else min(self.backoff * 2 ** (message.attempts - 1),
                                                                self.max_backoff)
        log.warning("outbox message #%s (%s): %s; attempt %d again in %.1fs", message.id, _what(message), error,
                    message.attempts + 1, delay)
        self._settled(self.core.outbox.retry_later(message, self.owner, error, delay, claim_next=self._claim_next()))

    def _failed(self, message: Claimed, code: str, detail: str) -> None:
        hint = slack_hint(code) if code not in ("record_not_found", "malformed_payload") else (
            "nothing to post any more: the record it was about is gone" if code == "record_not_found"
            else "the recorded message is malformed; report it to the bot's admins")
        log.error("outbox message #%s (%s to %s) stopped: %s (%s)", message.id, _what(message), message.channel,
                  code, detail[:300])
        notice = None
        if message.notify and PERSON.match(message.notify) and code not in WHOLE_APP:
            where = f"<@{message.channel}>" if PERSON.match(message.channel) else f"<#{message.channel}>"
            notice = {"message": f"I could not post {_what(message)} in {where}: {code}", "hint": hint,
                      "about": message.id}
        self._settled(self.core.outbox.fail(message, self.owner, code, f"{detail} — {hint}", notice,
                                            claim_next=self._claim_next()))


class _CardNotPosted(Exception):
    """A card's charts wait for the card: their thread does not exist yet."""


class _CardFailed(Exception):
    """A card's charts have no thread to go to: the card failed permanently."""


class _LeaseEnded(Exception):
    """The attempt ran out of lease before calling Slack: another sender may take the message."""


class JobWatch:
    """Follows unfinished jobs on the backend, one loop per process: every `interval` seconds `jobs.refresh()`,
    whose state changes record their training-message updates, and `evaluations.follow()`, which starts the
    pending evaluations and records their results with their cards' updates."""

    def __init__(self, core: Any, interval: float = 2.0) -> None:
        self.core, self.interval = core, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> JobWatch:
        self._thread = threading.Thread(target=self._loop, name="starchart-jobs", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.core.jobs.refresh()
                self.core.evaluations.follow()
            except Exception:  # the backend or the database is away for a moment
                log.exception("following jobs failed")


def start_delivery(core: Any, slack: SlackSettings, follow_interval: float | None = 2.0,
                   poll: float = 1.0) -> tuple[Sender, JobWatch | None]:
    """What a process that talks to Slack runs in the background: the sender, and (with `follow_interval`) the
    job watch."""
    sender = Sender(core, sender_client(slack), poll=poll, lease=slack.outbox_lease).start()
    watch = JobWatch(core, follow_interval).start() if follow_interval else None
    return sender, watch
