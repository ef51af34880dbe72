"""What the command table hands to the renderers: one typed result per answer, pure data.

`data` is what `starchart --json` prints; `exit_code` is the CLI's (0 ok, 1 error, 4 job not succeeded).
Records from the core stay mappings (`Record`): the core owns their shape, the renderers read their keys.
"""

from __future__ import annotations

import csv
import io
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

Record = Mapping[str, Any]
EXIT_OK, EXIT_ERROR, EXIT_JOB_FAILED = 0, 1, 4
AUDIT_CSV_COLUMNS = ("seq", "at", "action", "actor", "actor_name", "model", "version", "request_id", "job_id",
                     "channel", "message_ts", "details")


@dataclass(frozen=True)
class Result(ABC):
    """Base of every answer."""

    @property
    @abstractmethod
    def data(self) -> Any:
        """What `starchart --json` prints."""

    @property
    def exit_code(self) -> int:
        return EXIT_OK


# ------------------------------------------------------------------ jobs

@dataclass(frozen=True)
class JobResult(Result):
    job: Record

    @property
    def data(self) -> Any:
        return self.job


@dataclass(frozen=True)
class JobStarted(JobResult):
    """train: the job is submitted (chat then posts the training message and follows it)."""


@dataclass(frozen=True)
class JobSubmitted(JobResult):
    """`train --wait`: the job is submitted, progress follows."""


@dataclass(frozen=True)
class JobProgress(JobResult):
    """`train --wait`: the job changed state."""


@dataclass(frozen=True)
class JobEnded(JobResult):
    """`train --wait`: the job ended (or the wait did)."""

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.job["state"] == "SUCCEEDED" else EXIT_JOB_FAILED


@dataclass(frozen=True)
class JobCancelled(JobResult):
    """cancel: the job as it is after the request."""


@dataclass(frozen=True)
class TrainingMessage(Result):
    """The message that follows a training in its channel: queued → running (epoch k/N, last loss) → succeeded
    (metrics) / failed."""

    job: Record
    metrics: Record | None = None
    progress: Record | None = None  # while it runs: {"epoch", "planned", "loss"} from its event files

    @property
    def data(self) -> Any:
        return {"job": self.job, "metrics": self.metrics, "progress": self.progress}


@dataclass(frozen=True)
class Jobs(Result):
    model: str
    jobs: Sequence[Record]

    @property
    def data(self) -> Any:
        return list(self.jobs)


@dataclass(frozen=True)
class Log(Result):
    job_id: str
    log: str

    @property
    def data(self) -> Any:
        return {"job_id": self.job_id, "log": self.log}


# ------------------------------------------------------------------ versions

@dataclass(frozen=True)
class Exposed(Result):
    model: str
    result: Record

    @property
    def data(self) -> Any:
        return self.result

    @property
    def exit_code(self) -> int:
        return EXIT_ERROR if self.result["errors"] else EXIT_OK


@dataclass(frozen=True)
class Versions(Result):
    listing: Record  # {model, default, versions}

    @property
    def data(self) -> Any:
        return self.listing


@dataclass(frozen=True)
class Diff(Result):
    model: str
    diff: Record

    @property
    def data(self) -> Any:
        return self.diff


@dataclass(frozen=True)
class Predictions(Result):
    answer: Record

    @property
    def data(self) -> Any:
        return self.answer


@dataclass(frozen=True)
class Compared(Result):
    """The same instances answered by a version and by the default (`predict --compare`, the card's Try)."""

    compared: Record

    @property
    def data(self) -> Any:
        return self.compared


@dataclass(frozen=True)
class Pulled(Result):
    """A version's SavedModel copied into a folder (the CLI)."""

    pulled: Record

    @property
    def data(self) -> Any:
        return self.pulled


@dataclass(frozen=True)
class PulledArchive(Result):
    """A version's SavedModel as a .tar.gz, for the conversation (Slack, console)."""

    pulled: Record

    @property
    def data(self) -> Any:
        return {k: v for k, v in self.pulled.items() if k != "data"}


@dataclass(frozen=True)
class PulledLite(Result):
    """A version converted to TensorFlow Lite and checked: in a folder (the CLI, `path`) or as a file (chat, `data`)."""

    pulled: Record

    @property
    def data(self) -> Any:
        return {k: v for k, v in self.pulled.items() if k != "data"}


@dataclass(frozen=True)
class SignedUrls(Result):
    """Time-limited URLs to a version's files in Cloud Storage (`pull --url`)."""

    signed: Record

    @property
    def data(self) -> Any:
        return self.signed


# ------------------------------------------------------------------ promotion requests

@dataclass(frozen=True)
class RequestResult(Result):
    request: Record

    @property
    def data(self) -> Any:
        return self.request


@dataclass(frozen=True)
class RequestOpened(RequestResult):
    """promote, apply, rollback: a promotion request is open (chat posts its review card)."""


@dataclass(frozen=True)
class RequestChanged(RequestResult):
    """A decision, an application or a retry changed the request: its card is brought up to date."""


@dataclass(frozen=True)
class Decided(RequestResult):
    """approve, reject (command, button or form): the decision and, when it completed the approvals, the apply.

    `notice`: the person gets an answer of their own (a typed command); a click shows on the card itself.
    """

    notice: bool = True

    @property
    def exit_code(self) -> int:
        return EXIT_ERROR if self.request["state"] == "failed" else EXIT_OK


@dataclass(frozen=True)
class RequestShown(RequestResult):
    """show: a promotion request as it is now."""


@dataclass(frozen=True)
class ReviewCard(RequestResult):
    """The card in the model's channel: open (Approve/Reject), or decided (who, when, the outcome)."""


@dataclass(frozen=True)
class CardPosted(RequestResult):
    """The answer to promote/apply/rollback in chat: where the card is."""


@dataclass(frozen=True)
class RequestState(RequestResult):
    """The answer to a typed approve/reject in chat."""


@dataclass(frozen=True)
class CanaryResult(Result):
    canary: Record

    @property
    def data(self) -> Any:
        return self.canary


@dataclass(frozen=True)
class CanaryShown(CanaryResult):
    """canary MODEL status: the split, the bake, both sides' figures and what the rules make of them."""


@dataclass(frozen=True)
class CanaryChanged(CanaryResult):
    """canary MODEL promote|rollback (command or button); a click shows on the card itself (`notice` off)."""

    notice: bool = True


@dataclass(frozen=True)
class CanaryCard(CanaryResult):
    """The canary card in the model's channel, delivered by the outbox."""


@dataclass(frozen=True)
class Requests(Result):
    model: str
    requests: Sequence[Record]

    @property
    def data(self) -> Any:
        return list(self.requests)


@dataclass(frozen=True)
class RejectForm(Result):
    """The form asking why a request is rejected; `value` names the request and card, `channel`/`ts` the card;
    `home`: Reject was clicked on the person's Home tab (refreshed once the rejection is recorded)."""

    value: Record
    channel: str | None
    message_ts: str | None
    home: bool = False

    @property
    def data(self) -> Any:
        return {"value": self.value, "channel": self.channel, "message_ts": self.message_ts}


# ------------------------------------------------------------------ audit

@dataclass(frozen=True)
class TryForm(Result):
    """The form of a card's Try: one field per input of the candidate's signature, filled with an example.

    `fields` are (input name, dtype, shape, first value); `value` names the request, model and candidate;
    `channel`/`message_ts` the card (the answer is shown there, to the person who tried)."""

    value: Record
    fields: tuple[tuple[str, str, Any, Any], ...]
    channel: str | None
    message_ts: str | None

    @property
    def data(self) -> Any:
        return {"value": self.value, "fields": [list(f) for f in self.fields], "channel": self.channel,
                "message_ts": self.message_ts}


Form = RejectForm | TryForm  # what Output.open_form shows


@dataclass(frozen=True)
class AuditPage(Result):
    """Audit events, newest first; `next` (chat) is the value of the Next button when more match."""

    events: Sequence[Record]
    model: str | None = None
    next: Record | None = None
    share: bool = False

    @property
    def data(self) -> Any:
        return list(self.events)


@dataclass(frozen=True)
class AuditExport(Result):
    """Every matching audit event as CSV (one format for the CLI's stdout and Slack's file)."""

    events: Sequence[Record]

    @property
    def data(self) -> Any:
        return list(self.events)

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(AUDIT_CSV_COLUMNS)
        for e in self.events:
            writer.writerow([json.dumps(e[c], sort_keys=True) if c == "details" else e[c] for c in AUDIT_CSV_COLUMNS])
        return buf.getvalue()


@dataclass(frozen=True)
class Chart(Result):
    """chart: a PNG of a metric across a model's versions (written to a file by the CLI, uploaded in chat)."""

    chart: Record

    @property
    def data(self) -> Any:
        return {k: v for k, v in self.chart.items() if k != "png"}


@dataclass(frozen=True)
class Uploaded(Result):
    """The answer after a file went to the conversation."""

    what: str
    count: int
    filename: str

    @property
    def data(self) -> Any:
        return {"what": self.what, "count": self.count, "filename": self.filename}


@dataclass(frozen=True)
class AuditVerified(Result):
    """The audit chain checked end to end (model_registry.adapters.audit_log.VerifyResult)."""

    verify: Any

    @property
    def data(self) -> Any:
        return dict(vars(self.verify))

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.verify.ok else EXIT_ERROR


@dataclass(frozen=True)
class Checkpoint(Result):
    """An audit checkpoint; `channel` is where chat posts it (starchart.yaml's audit_checkpoint.channel)."""

    checkpoint: Record
    channel: str | None = None

    @property
    def data(self) -> Any:
        return self.checkpoint


@dataclass(frozen=True)
class CheckpointPosted(Result):
    channel: str

    @property
    def data(self) -> Any:
        return {"channel": self.channel}


@dataclass(frozen=True)
class DefaultAt(Result):
    answer: Record
    share: bool = False

    @property
    def data(self) -> Any:
        return self.answer


# ------------------------------------------------------------------ nightly retrains (their channel's news)

@dataclass(frozen=True)
class ReviewSkipped(Result):
    """A nightly retrain not put up for review: the gate refused it (`gate`: services.views.GateRefusal)."""

    model: str
    version: str
    gate: Record

    @property
    def data(self) -> Any:
        return {"model": self.model, "version": self.version, "gate": dict(self.gate)}


@dataclass(frozen=True)
class ScheduleNotStarted(Result):
    """A scheduled training that did not start: what was wrong and what to do; the next firing tries again."""

    model: str
    error: str
    hint: str = ""

    @property
    def data(self) -> Any:
        return {"model": self.model, "error": self.error, "hint": self.hint}


@dataclass(frozen=True)
class ScheduledFailed(JobResult):
    """A scheduled training that failed: the job, its error ending with the log tail (capped by the core)."""


@dataclass(frozen=True)
class NightlyExposed(Result):
    """A version a nightly retrain exposed (`version`: its row in the model's version list)."""

    model: str
    version: Record

    @property
    def data(self) -> Any:
        return {"model": self.model, "version": self.version}


# ------------------------------------------------------------------ schedules, help, notices, errors

@dataclass(frozen=True)
class Schedules(Result):
    schedules: Sequence[Record]

    @property
    def data(self) -> Any:
        return list(self.schedules)


@dataclass(frozen=True)
class ScheduleChanged(Result):
    schedule: Record

    @property
    def data(self) -> Any:
        return self.schedule


@dataclass(frozen=True)
class Help(Result):
    """Help or a usage error, as the grammar words it."""

    text: str

    @property
    def data(self) -> Any:
        return {"usage": self.text}


@dataclass(frozen=True)
class Notice(Result):
    """A one-line answer in plain words (no markup)."""

    text: str
    fields: Record = field(default_factory=dict)

    @property
    def data(self) -> Any:
        return {"text": self.text, **self.fields}


@dataclass(frozen=True)
class Failure(Result):
    """An error told to the person: what went wrong and what to do."""

    message: str
    hint: str = ""

    @property
    def data(self) -> Any:
        return {"error": self.message, "hint": self.hint}

    @property
    def exit_code(self) -> int:
        return EXIT_ERROR


# ------------------------------------------------------------------ the Home tab

@dataclass(frozen=True)
class HomeTab(Result):
    """One person's Home: requests waiting for their decision (with the card's buttons), each model's default and
    last training, recent failures; `notice`: what went wrong with their last click there."""

    home: Record
    notice: Failure | None = None

    @property
    def data(self) -> Any:
        return self.home
