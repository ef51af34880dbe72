"""The command table: every command declared once — its words, the use case it runs, its help.

`starchart` (CLI), `/ml` (Slack over Bolt) and `starchart console` all parse with the grammar built from
TABLE and run `TABLE[name].run(invocation)`; each renders the typed result its own way. ACTIONS does the same
for the buttons of the bot's messages.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from handlers import audit, canary, reviews, schedules, training, versions
from handlers.grammar import model_arg
from handlers.results import Result
from handlers.table import Command, Invocation, Table


def _model(p: argparse.ArgumentParser, _cli: bool) -> None:
    model_arg(p)


TABLE = Table()
for _command in (
    Command("train", "start a training job: train MODEL [-M MODULE] [-- ARGS]", training.train,
            training.train_arguments),
    Command("state", "jobs of a model and their states", training.state, _model, aliases=("jobs",)),
    Command("expose", "turn succeeded jobs into versions", versions.expose, _model),
    Command("versions", "versions of a model", versions.versions, _model),
    Command("requests", "promotion requests of a model", reviews.requests, _model),
    Command("logs", "a job's log", training.logs, training.logs_arguments),
    Command("cancel", "cancel a running job", training.cancel, training.job_id_argument),
    Command("diff", "diff MODEL [VERSION [BASE]]", versions.diff, versions.diff_arguments),
    Command("promote", "open a promotion request for a version", reviews.promote, reviews.promote_arguments),
    Command("apply", "request the version marked isDefault in models/MODEL.yaml (or StarChart's MODEL.json)", reviews.apply,
            reviews.reason_arguments),
    Command("rollback", "request the previous default back", reviews.rollback, reviews.reason_arguments),
    Command("approve", "approve a promotion request", reviews.approve, reviews.request_argument),
    Command("reject", "reject a promotion request (a reason is required)", reviews.reject, reviews.reject_arguments),
    Command("show", "show a promotion request", reviews.show, reviews.request_argument),
    Command("audit", "audit [MODEL] [filters] | audit verify", audit.audit, audit.audit_arguments),
    Command("predict", "predict MODEL [--version V | --compare V] JSON: predictions of the served model (--compare: "
                       "that version and the default side by side)", versions.predict,
            versions.predict_arguments),
    Command("pull", "pull MODEL [VERSION] [--format savedmodel|tflite]: a copy of a version (default: the default), "
                    "into a folder (CLI) or as a file (chat: .tar.gz or .tflite)", versions.pull,
            versions.pull_arguments),
    Command("chart", "chart MODEL [METRIC]: a PNG of the metric across recent versions, the default marked",
            versions.chart, versions.chart_arguments),
    Command("canary", "canary MODEL [status|promote|rollback]: the running canary's figures, or promote it (all "
                      "the traffic) or roll it back", canary.canary, canary.canary_arguments),
    Command("schedule", 'schedule list | schedule MODEL "CRON" [-- ARGS] | schedule MODEL off', schedules.schedule,
            schedules.schedule_arguments),
):
    TABLE.add(_command)

Action = Callable[[Invocation, "str | None"], Result]

ACTIONS: dict[str, Action] = {
    reviews.APPROVE: reviews.on_approve,
    reviews.REJECT: reviews.on_reject,
    reviews.RETRY: reviews.on_retry,
    reviews.TRY: reviews.on_try,
    audit.AUDIT_NEXT: audit.on_next,
    canary.PROMOTE: canary.on_promote,
    canary.ROLLBACK: canary.on_rollback,
}
