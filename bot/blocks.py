"""Block Kit rendering: the one module that owns Slack's size limits.

Budget: at most 50 blocks, section text at most 3,000 characters, button values at most 2,000, and
the whole message kept under MESSAGE_BUDGET characters. What does not fit is summarised, and the
caller posts the full text to the thread and as a file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import singledispatch
from typing import Any, Iterable, Mapping, Sequence

from bot import text as plain
from handlers import results as r
from handlers.audit import AUDIT_NEXT
from handlers.forms import REJECT_VIEW, TRY_VIEW
from handlers.output import Upload
from handlers.reviews import APPROVE, REJECT, RETRY, TRY, card_value, form_metadata, try_metadata
from model_registry.domain.policy import is_group

MAX_BLOCKS = 50
MAX_MODAL_FIELDS = 90  # a modal holds 100 blocks; the rest of a signature's inputs keep their examples
SECTION_TEXT = 3000
BUTTON_VALUE = 2000
MESSAGE_BUDGET = 11000
LIST_ITEMS = 8  # rows of parameters, signature changes, metrics shown on a card before "and N more"

__all__ = ["APPROVE", "AUDIT_NEXT", "REJECT", "REJECT_VIEW", "RETRY", "render"]

Blocks = list[dict[str, Any]]


def mrkdwn(text: str) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": text}


def escape(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def section(text: str) -> dict[str, Any]:
    if len(text) > SECTION_TEXT:
        text = text[: SECTION_TEXT - 2] + " …"
    return {"type": "section", "text": mrkdwn(text)}


def context(*texts: str) -> dict[str, Any]:
    return {"type": "context", "elements": [mrkdwn(t[:SECTION_TEXT]) for t in texts[:10]]}


def code_sections(body: str, limit_blocks: int = 10, limit_chars: int = MESSAGE_BUDGET - 1500
                  ) -> tuple[Blocks, bool]:
    """Monospace text split on line boundaries into sections, within a block and a character budget.

    Returns (blocks, truncated); a truncated text ends with a line saying how many lines were left out.
    """
    lines = [escape(line)[: SECTION_TEXT - 40] for line in (body.splitlines() or [""])]
    per_section = SECTION_TEXT - 40  # room for the fences and the "… N more lines" note
    blocks: Blocks = []
    chunk: list[str] = []
    size = total = 0
    for i, line in enumerate(lines):
        if size + len(line) + 1 > per_section or total + len(line) + 1 > limit_chars:
            blocks.append(section("```" + "\n".join(chunk) + "```"))
            chunk, size = [], 0
            if len(blocks) >= limit_blocks or total + len(line) + 1 > limit_chars:
                note = f"\n… {len(lines) - i} more lines"
                blocks[-1] = section(blocks[-1]["text"]["text"][:-3] + note + "```")
                return blocks, True
        chunk.append(line)
        size += len(line) + 1
        total += len(line) + 1
    blocks.append(section("```" + "\n".join(chunk) + "```"))
    return blocks, False


def message_size(blocks: Blocks, fallback: str = "") -> int:
    return len(json.dumps(blocks, ensure_ascii=False)) + len(fallback)


def fits(blocks: Blocks, fallback: str = "") -> bool:
    return len(blocks) <= MAX_BLOCKS and message_size(blocks, fallback) <= MESSAGE_BUDGET and all(
        len(b.get("text", {}).get("text", "")) <= SECTION_TEXT for b in blocks)


def button(label: str, action_id: str, value: dict[str, Any], style: str | None = None,
           confirm: dict[str, Any] | None = None) -> dict[str, Any]:
    encoded = json.dumps(value, separators=(",", ":"))
    if len(encoded) > BUTTON_VALUE:
        raise ValueError("button value over Slack's 2,000 characters")
    b: dict[str, Any] = {"type": "button", "text": {"type": "plain_text", "text": label}, "action_id": action_id,
                         "value": encoded}
    if style:
        b["style"] = style
    if confirm:
        b["confirm"] = confirm
    return b


# ------------------------------------------------------------------ simple messages

def error(message: str, hint: str = "") -> tuple[str, Blocks]:
    body = f":warning: {escape(message)}" + (f"\n_{escape(hint)}_" if hint else "")
    return f"{message}" + (f" — {hint}" if hint else ""), [section(body)]


def plain_text(title: str, body: str) -> tuple[str, Blocks]:
    blocks, _ = code_sections(body, limit_blocks=MAX_BLOCKS - 2)
    return title, [section(f"*{escape(title)}*"), *blocks]


def table(title: str, rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]],
          footer: str | None = None) -> tuple[str, Blocks, bool]:
    body = plain.table(rows, columns)
    blocks, truncated = code_sections(body, limit_blocks=12)
    out = [section(f"*{escape(title)}*"), *blocks]
    if footer:
        out.append(context(footer))
    return title, out, truncated


def job_message(job: dict[str, Any], metrics: dict[str, Any] | None = None,
                progress: dict[str, Any] | None = None) -> tuple[str, Blocks]:
    icon = {"QUEUED": ":hourglass:", "RUNNING": ":gear:", "SUCCEEDED": ":white_check_mark:",
            "FAILED": ":x:", "CANCELLED": ":no_entry_sign:"}.get(job["state"], ":grey_question:")
    head = f"{icon} Training *{escape(job['job_id'])}* — *{job['state'].lower()}*"
    if job["state"] == "RUNNING":
        head += f" ({plain.elapsed(job.get('started_at'))})"
    elif job["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") and job.get("started_at"):
        head += f" after {plain.elapsed(job.get('started_at'), job.get('ended_at'))}"
    blocks: Blocks = [section(head)]
    args = " ".join(job.get("args") or []) or "(none)"
    blocks.append(context(f"requested by <@{escape(job['requested_by'])}>", f"args: `{escape(args)[:500]}`"))
    if job["state"] == "RUNNING" and progress:
        blocks.append(section(f"`{plain.progress_line(progress)}`"))
    if metrics:
        blocks.append(section(" · ".join(f"*{escape(k)}* {plain.fmt_number(v)}" for k, v in metrics.items())))
    if job["state"] == "SUCCEEDED":
        blocks.append(context(f"expose it: `/ml expose {job['model']}`"))
    if job["state"] == "FAILED" and job.get("error"):
        blocks += error_tail(job["error"])
    return f"Training {job['job_id']} {job['state'].lower()}", blocks


def error_tail(error: str) -> Blocks:
    """A failed job's error and log tail (capped by the core at 2,300 characters) in one monospace section."""
    tail, _ = code_sections(error[-2500:], limit_blocks=1)
    return tail


def said_with_context(shown: plain.Text) -> Blocks:
    """A text rendering in CHAT style as Block Kit: its first line a section, the others one context each."""
    head, *rest = shown.lines
    return [section(escape(head)), *(context(escape(line.strip())) for line in rest[:9])]


# ------------------------------------------------------------------ review card

def _limited(lines: list[str], limit: int = LIST_ITEMS) -> tuple[list[str], bool]:
    if len(lines) <= limit:
        return lines, False
    return lines[:limit] + [f"… and {len(lines) - limit} more (full diff in the thread)"], True


def mention(ident: str) -> str:
    """A user id as <@U…>, a user-group id as <!subteam^S…>: Slack shows both as mentions."""
    return f"<!subteam^{escape(ident)}>" if is_group(ident) else f"<@{escape(ident)}>"


def rule_lines(req: Mapping[str, Any]) -> list[str]:
    """The approval rules a request takes: why each applies, and how many approvals from whom it needs."""
    return [f"{escape(rule['why'])} — {plain.approvals_text(rule['required_approvals'])} from "
            + (", ".join(mention(a) for a in rule["approvers"]) or "any approver")
            + (f" ({len(rule['approved_by'])}/{rule['required_approvals']} so far)" if rule.get("approved_by") else "")
            for rule in plain.rules_strictest_first(req)]


def evaluation_section(req: Mapping[str, Any]) -> dict[str, Any]:
    """The card's evidence: candidate and default on the same data (bot.text.evaluation_lines, in mrkdwn)."""
    head, *rest = plain.evaluation_lines(req)
    state = (req.get("evaluation") or {}).get("state")
    icon = {"done": ":bar_chart:", "failed": ":warning:", "running": ":hourglass_flowing_sand:",
            "pending": ":hourglass:", "starting": ":hourglass:"}.get(str(state), ":grey_question:")
    title, _, tail = head.partition(":")
    return section(f"{icon} *{escape(title)}*:{escape(tail)}" + "".join(f"\n{escape(line)}" for line in rest))


def review_card(req: dict[str, Any]) -> tuple[str, Blocks, bool]:
    """The review card for an open request; returns (fallback text, blocks, truncated)."""
    diff = req["diff"]
    cand, base = diff["candidate"], diff.get("base")
    title = f"Review: {req['model']} {req['base'] or '(none)'} → {req['candidate']}"
    blocks: Blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        section(f"*{req['kind'].capitalize()} request #{req['id']}* by <@{escape(req['requested_by'])}>"
                + (f": {escape(req['reason'])[:500]}" if req.get("reason") else "")),
        {"type": "section", "fields": [
            mrkdwn(f"*Candidate*\n`{cand['name']}`\ntrained by <@{escape(cand['trained_by'])}>"),
            mrkdwn(f"*Current default*\n`{base['name']}`\ntrained by <@{escape(base['trained_by'])}>" if base
                   else "*Current default*\n(none)"),
        ]},
    ]
    rules = rule_lines(req)
    if len(rules) == 1:
        blocks.append(section(f":lock: *Approval rule:* {rules[0]}"))
    elif rules:
        blocks.append(section(":lock: *Approval rules* (each must be met)\n" + "\n".join(f"• {r}" for r in rules)))
    truncated = False
    breaking = diff["signature"]["breaking"]
    if breaking:
        lines, cut = _limited([f"• {escape(b)}" for b in breaking])
        truncated |= cut
        blocks.append(section(":rotating_light: *Breaking signature changes*\n" + "\n".join(lines)))
    sig_changes = [f"• {kind} `{escape(c['name'])}` {c['change']}" + (" (breaking)" if c.get("breaking") else "")
                   for kind, key in (("input", "inputs"), ("output", "outputs"))
                   for c in diff["signature"][key]]
    if sig_changes and not breaking:
        lines, cut = _limited(sig_changes)
        truncated |= cut
        blocks.append(section("*Signature*\n" + "\n".join(lines)))
    elif not sig_changes:
        blocks.append(section("*Signature* unchanged"))
    params = [f"• `{escape(p['name'])}`: {escape(plain.fmt_number(p['base']))} → "
              f"{escape(plain.fmt_number(p['candidate']))}" for p in diff["parameters"]]
    lines, cut = _limited(params)
    truncated |= cut
    blocks.append(section("*Parameters*\n" + "\n".join(lines) if params else "*Parameters* unchanged"))
    metrics = []
    for m in diff["metrics"]:
        arrow = "" if m["better"] is None else (" :arrow_up_small:" if m["better"] else " :small_red_triangle_down:")
        delta = "" if m["delta"] is None else f" ({m['delta']:+.4f}, {m['direction']} is better){arrow}"
        metrics.append(f"• `{escape(m['name'])}`: {plain.fmt_number(m['base'])} → "
                       f"{plain.fmt_number(m['candidate'])}{delta}")
    lines, cut = _limited(metrics)
    truncated |= cut
    blocks.append(section("*Metrics*\n" + "\n".join(lines) if metrics else "*Metrics* none reported"))
    blocks.append(evaluation_section(req))
    prog = diff["program"]
    blocks.append(context(
        f"program `{str(prog['candidate'])[:12]}`" + (f" (was `{str(prog['base'])[:12]}`)" if prog["changed"]
                                                      else " unchanged" if base else ""),
        f"module `{escape(prog['module'])}`", f"expires {req['expires_at']}",
        f"approvals {req['approvals']}/{req['required_approvals']}"))
    if diff.get("canary"):
        plan = diff["canary"]
        blocks.append(section(f":hatching_chick: *Canary*: once approved, {plan['percent']}% of the default's traffic "
                              f"goes to `{req['candidate']}` for {plan['bake_seconds']}s before it becomes the "
                              "default"))
    if truncated:
        blocks.append(context(":thread: The full diff is in the thread and attached as a file."))
    blocks.append({"type": "actions", "block_id": f"review-{req['id']}", "elements": [
        button("Approve", APPROVE, card_value(req), style="primary", confirm={
            "title": {"type": "plain_text", "text": "Approve this version?"},
            "text": mrkdwn(f"`{req['candidate']}` becomes the default of *{req['model']}* once approvals are "
                           f"complete."),
            "confirm": {"type": "plain_text", "text": "Approve"},
            "deny": {"type": "plain_text", "text": "Cancel"}}),
        button("Reject", REJECT, card_value(req), style="danger"),
        button("Try", TRY, card_value(req)),
    ]})
    while not fits(blocks, title) and len(blocks) > 4:  # last resort: drop detail sections, keep the buttons
        blocks.pop(-3)
        truncated = True
    return title, blocks, truncated


def decided_card(req: dict[str, Any]) -> tuple[str, Blocks, bool]:
    """The card after a decision: buttons replaced by who decided when, then the outcome."""
    title, blocks, truncated = review_card(req)
    blocks = [b for b in blocks if b.get("type") != "actions"]
    decisions = [f"{':white_check_mark:' if d['decision'] == 'approve' else ':x:'} {d['decision'].rstrip('e')}ed by "
                 f"<@{escape(d['user'])}> at {d['at']}" + (f": {escape(d['reason'])[:300]}" if d.get("reason")
                                                            else "") for d in req["decisions"]]
    if decisions:
        blocks.append(section("\n".join(decisions)))
    state = req["state"]
    outcome = {
        "open": f":hourglass: waiting for approvals ({req['approvals']}/{req['required_approvals']})",
        "approved": ":hourglass_flowing_sand: approved — applying…",
        "applying": ":hourglass_flowing_sand: applying…",
        "applied": f":rocket: applied at {req.get('applied_at')}: `{req['candidate']}` is the default",
        "failed": f":x: apply failed: {escape(req.get('error') or 'unknown error')[:1000]}",
        "rejected": ":no_entry: rejected",
        "expired": ":alarm_clock: expired",
        "stale": ":warning: stale — the default or the candidate changed; open a new request",
        "canary": f":hatching_chick: canary running: {(req.get('canary') or {}).get('percent')}% of the default's "
                  f"traffic goes to `{req['candidate']}` (see its canary card)",
        "rolled_back": f":leftwards_arrow_with_hook: canary rolled back: "
                       f"{escape((req.get('canary') or {}).get('why') or '')[:1000]}",
    }.get(state, state)
    blocks.append(section(f"*Outcome:* {outcome}"))
    if state == "open":
        blocks.append({"type": "actions", "block_id": f"review-{req['id']}", "elements": [
            button("Approve", APPROVE, card_value(req), style="primary"),
            button("Reject", REJECT, card_value(req), style="danger")]})
    elif state == "failed":
        blocks.append({"type": "actions", "block_id": f"retry-{req['id']}",
                       "elements": [button("Retry", RETRY, card_value(req))]})
    return f"{title} — {state}", blocks[:MAX_BLOCKS], truncated


def reject_modal(form: r.RejectForm) -> dict[str, Any]:
    return {
        "type": "modal", "callback_id": REJECT_VIEW, "private_metadata": form_metadata(form),
        "title": {"type": "plain_text", "text": "Reject promotion"},
        "submit": {"type": "plain_text", "text": "Reject"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [{"type": "input", "block_id": "reason", "label": {"type": "plain_text", "text": "Why?"},
                    "element": {"type": "plain_text_input", "action_id": "reason", "multiline": True,
                                "max_length": 2000}}],
    }


def try_modal(form: r.TryForm) -> dict[str, Any]:
    """One field per input of the candidate's signature, filled with an example; scalars typed as they are,
    other shapes as JSON."""
    fields = []
    for name, dtype, shape, first in form.fields[:MAX_MODAL_FIELDS]:
        scalar = isinstance(shape, list) and len(shape) <= 1
        initial = (first if isinstance(first, str) else json.dumps(first)) if scalar else json.dumps(first)
        fields.append({"type": "input", "block_id": name,
                       "label": {"type": "plain_text", "text": f"{name} ({dtype.lower().removeprefix('dt_')})"[:2000]},
                       "hint": {"type": "plain_text", "text": "a value" if scalar else "JSON, in the input's shape"},
                       "optional": dtype.lower() in ("string", "dt_string"),
                       "element": {"type": "plain_text_input", "action_id": "value", "initial_value": initial[:3000],
                                   "multiline": not scalar}})
    return {
        "type": "modal", "callback_id": TRY_VIEW, "private_metadata": try_metadata(form)[:3000],
        "title": {"type": "plain_text", "text": f"Try {form.value['v']}"[:24]},
        "submit": {"type": "plain_text", "text": "Predict"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [context(f"*{escape(str(form.value['m']))}*: `{form.value['v']}` and the default answer the same "
                           "instance; only you see the answers."), *fields],
    }


def full_diff_text(req: dict[str, Any]) -> str:
    return "\n".join(plain.request_lines(req) + [""] + plain.diff_lines(req["diff"]))


def audit_table(events: Iterable[Mapping[str, Any]], title: str, next_value: dict[str, Any] | None
                ) -> tuple[str, Blocks]:
    rows = list(events)
    _, blocks, _ = table(title, rows, [("at", "TIME"), ("action", "ACTION"), ("actor", "ACTOR"),
                                       ("model", "MODEL"), ("version", "VERSION"), ("request_id", "REQ")])
    if next_value is not None:
        blocks.append({"type": "actions", "elements": [button("Next", AUDIT_NEXT, next_value)]})
    return title, blocks


def diff_message(title: str, diff: dict[str, Any]) -> tuple[str, Blocks]:
    return plain_text(title, "\n".join(plain.diff_lines(diff)))


def request_message(req: dict[str, Any]) -> tuple[str, Blocks]:
    return plain_text(f"Promotion request #{req['id']}", full_diff_text(req))


def default_at_message(answer: dict[str, Any]) -> tuple[str, Blocks]:
    lines = plain.default_at_lines(answer)
    return lines[0], [section(escape(lines[0])), *code_sections("\n".join(lines[1:]), limit_blocks=2)[0]]


# ------------------------------------------------------------------ results as Slack messages

@dataclass(frozen=True)
class Rendered:
    """A Slack message: fallback text, blocks (None: text only), and a file for what did not fit."""

    text: str
    blocks: Blocks | None = None
    attachment: Upload | None = None


def _said(text: str) -> Rendered:
    return Rendered(text, [section(text)])


@singledispatch
def render(result: r.Result) -> Rendered:
    """A result without a Block Kit form of its own: its text, as the console shows it."""
    shown = plain.render(result, plain.CHAT)
    return Rendered(shown.title, [section(escape(shown.body))])


@render.register
def _training(result: r.TrainingMessage) -> Rendered:
    return Rendered(*job_message(dict(result.job), dict(result.metrics) if result.metrics else None,
                                 dict(result.progress) if result.progress else None))


@render.register(r.ReviewSkipped)
@render.register(r.ScheduleNotStarted)
@render.register(r.NightlyExposed)
def _nightly(result: r.Result) -> Rendered:
    shown = plain.render(result, plain.CHAT)
    return Rendered(shown.title, said_with_context(shown))


@render.register
def _scheduled_failed(result: r.ScheduledFailed) -> Rendered:
    job = result.job
    shown = plain.render(r.ScheduledFailed({**job, "error": None}), plain.CHAT)  # the tail goes in monospace below
    return Rendered(shown.title, said_with_context(shown) + (error_tail(job["error"]) if job.get("error") else []))


@render.register
def _jobs(result: r.Jobs) -> Rendered:
    shown = 40
    text, blocks, _ = table(f"Jobs of {result.model}", result.jobs[:shown], [
        ("job_id", "JOB"), ("state", "STATE"), ("created_at", "CREATED"), ("version", "VERSION"),
        ("requested_by", "BY"), ("args", "ARGS")], footer=f"newest {shown} shown" if len(result.jobs) > shown else None)
    return Rendered(text, blocks)


@render.register
def _log(result: r.Log) -> Rendered:
    return Rendered(*plain_text(f"Log of {result.job_id}", result.log))


@render.register
def _cancelled(result: r.JobCancelled) -> Rendered:
    return Rendered(f"Job {result.job['job_id']} {result.job['state'].lower()}")


@render.register
def _exposed(result: r.Exposed) -> Rendered:
    lines = [f"• exposed `{v['name']}` from `{v['job_id']}` " + " ".join(f"{k}={plain.number(m)}"
                                                                        for k, m in v["metrics"].items())
             for v in result.result["exposed"]]
    lines += [f"• :warning: {e['error']}" for e in result.result["errors"]]
    body = "\n".join(lines) or "Nothing new to expose: no succeeded job without a version."
    return Rendered(f"Expose {result.model}", [section(f"*Expose {result.model}*\n{body}")])


@render.register
def _versions(result: r.Versions) -> Rendered:
    data = result.listing
    text, blocks, _ = table(f"Versions of {data['model']} (default {data['default'] or 'none'})",
                            data["versions"][:40], [("name", "VERSION"), ("is_default", "DEFAULT"),
                                                    ("created_at", "CREATED"), ("trained_by", "TRAINED BY"),
                                                    ("metrics", "METRICS")])
    return Rendered(text, blocks)


@render.register
def _diff(result: r.Diff) -> Rendered:
    return Rendered(*diff_message(plain.render(result).title, dict(result.diff)))


@render.register
def _predictions(result: r.Predictions) -> Rendered:
    shown = {k: v for k, v in result.answer.items() if k in ("predictions", "outputs")}
    return Rendered(*plain_text(plain.render(result).title, json.dumps(shown, indent=1)))


@render.register
def _compared(result: r.Compared) -> Rendered:
    return Rendered(*plain_text(plain.render(result).title, "\n".join(plain.compared_lines(result.compared))))


@render.register
def _shown(result: r.RequestShown) -> Rendered:
    return Rendered(*request_message(dict(result.request)))


@render.register
def _card(result: r.ReviewCard) -> Rendered:
    req = dict(result.request)
    if plain.decided(req):
        text, blocks, _ = decided_card(req)
        return Rendered(text, blocks)
    text, blocks, truncated = review_card(req)
    full = Upload(f"{req['model']}-request-{req['id']}-diff.txt", f"Full diff of promotion request #{req['id']}",
                  content=full_diff_text(req)) if truncated else None
    return Rendered(text, blocks, full)


@render.register
def _card_posted(result: r.CardPosted) -> Rendered:
    req = result.request
    said = f"Promotion request #{req['id']} is open for review in <#{req['channel']}>."
    if req.get("model_files"):  # apply: what it asks for, and which file said so
        files = " and ".join(f"`{name}`" for name in req["model_files"])
        said += f" It asks for `{req['candidate']}`, marked isDefault in {files}."
    return Rendered(said)


@render.register
def _request_state(result: r.RequestState) -> Rendered:
    return Rendered(f"Promotion request #{result.request['id']} is {result.request['state']}.")


@render.register
def _requests(result: r.Requests) -> Rendered:
    text, blocks, _ = table(f"Promotion requests of {result.model}", result.requests, [
        ("id", "ID"), ("kind", "KIND"), ("candidate", "CANDIDATE"), ("base", "BASE"), ("state", "STATE"),
        ("requested_by", "BY"), ("approvals", "APPROVALS")])
    return Rendered(text, blocks)


@render.register
def _audit_page(result: r.AuditPage) -> Rendered:
    return Rendered(*audit_table(result.events, plain.render(result).title, dict(result.next) if result.next else None))


@render.register
def _verified(result: r.AuditVerified) -> Rendered:
    v = result.verify
    return _said(f":white_check_mark: Audit chain OK: {v.events} events, head `{v.head_hash[:16]}`, "
                 f"{v.checkpoints} checkpoints matched" if v.ok else f":rotating_light: Audit chain BROKEN: {v.problem}")


@render.register
def _checkpoint(result: r.Checkpoint) -> Rendered:
    cp = result.checkpoint
    return _said(f"Audit checkpoint: {cp['count']} events, head `{cp['head']}` at {cp['at']}"
                 + (f", signature `{cp['sig']}`" if cp["sig"] else " (unsigned)"))


@render.register
def _checkpoint_posted(result: r.CheckpointPosted) -> Rendered:
    return Rendered(f"Checkpoint posted to <#{result.channel}>.")


@render.register
def _default_at(result: r.DefaultAt) -> Rendered:
    return Rendered(*default_at_message(dict(result.answer)))


@render.register
def _schedules(result: r.Schedules) -> Rendered:
    text, blocks, _ = table("Schedules", result.schedules, [
        ("model", "MODEL"), ("cron", "CRON"), ("timezone", "TZ"), ("enabled", "ON"), ("next_run_at", "NEXT"),
        ("args", "ARGS")])
    return Rendered(text, blocks)


@render.register
def _schedule_changed(result: r.ScheduleChanged) -> Rendered:
    row = result.schedule
    if not row["enabled"]:
        return Rendered(f"The schedule of {row['model']} is off.")
    return Rendered(f"{row['model']} trains at `{row['cron']}` ({row['timezone']}); next run {row['next_run_at']}.")


@render.register
def _help(result: r.Help) -> Rendered:
    return Rendered(*plain_text("/ml", result.text))


@render.register
def _failure(result: r.Failure) -> Rendered:
    return Rendered(*error(result.message, result.hint))


@render.register(r.Notice)
@render.register(r.Uploaded)
@render.register(r.Chart)
@render.register(r.PulledArchive)
@render.register(r.PulledLite)
@render.register(r.SignedUrls)
def _text_only(result: r.Result) -> Rendered:
    return Rendered(plain.render(result, plain.CHAT).body)


from bot import canary_blocks as _canary_blocks  # noqa: E402,F401 - registers the canary card
