"""Text rendering for the CLI and the console: a pure function of each result, plus its building blocks.

`render(result, style)` gives a title, lines and the choices (buttons) a message offers. The CLI prints the
lines in PLAIN style; the console prints title and lines in CHAT style, which keeps Slack's marks (`code`,
*bold*, :emoji:, @mentions) as a person would read them in Slack, and numbers the choices.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import singledispatch
from typing import Any

from handlers import results as r
from handlers.audit import AUDIT_NEXT
from handlers.reviews import APPROVE, REJECT, RETRY, TRY, card_value


def table(rows: Iterable[Mapping[str, Any]], columns: Sequence[tuple[str, str]], empty: str = "(none)") -> str:
    rows = list(rows)
    if not rows:
        return empty
    cells = [[_cell(r.get(key)) for key, _ in columns] for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title) in enumerate(columns)]
    head = "  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)).rstrip()
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join([head, *lines])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return str(value).splitlines()[0] if str(value) else ""


def fmt_number(value: Any) -> str:
    return "-" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def shape_text(shape: Any) -> str:
    return "unknown rank" if shape is None else "(" + ", ".join(str(d) for d in shape) + ")"


def diff_lines(diff: Mapping[str, Any]) -> list[str]:
    """The review content as lines: what a reviewer must see before approving."""
    cand, base = diff["candidate"], diff.get("base")
    out = [f"Candidate {cand['name']} (job {cand['job_id']}, trained by {cand['trained_by']})"]
    out.append(f"Default   {base['name']} (job {base['job_id']}, trained by {base['trained_by']})" if base
               else "Default   (none yet)")
    sig = diff["signature"]
    if sig["breaking"]:
        out.append("BREAKING signature changes:")
        out += [f"  ! {b}" for b in sig["breaking"]]
    changes = [("input", c) for c in sig["inputs"]] + [("output", c) for c in sig["outputs"]]
    if changes:
        out.append("Signature:")
        for kind, c in changes:
            detail = {"renamed": f"→ {c.get('to')}", "removed": "", "added": "",
                      "dtype": f"{c.get('base')} → {c.get('candidate')}",
                      "shape": f"{shape_text(c.get('base'))} → {shape_text(c.get('candidate'))}"}[c["change"]]
            out.append(f"  {kind} {c['name']}: {c['change']} {detail}".rstrip())
    elif base:
        out.append("Signature: unchanged")
    out.append("Parameters:" if diff["parameters"] else "Parameters: unchanged")
    out += [f"  {p['name']}: {fmt_number(p['base'])} → {fmt_number(p['candidate'])}" for p in diff["parameters"]]
    if diff["metrics"]:
        out.append("Metrics:")
        for m in diff["metrics"]:
            delta = "" if m["delta"] is None else f" ({m['delta']:+.4f}, {'better' if m['better'] else 'worse' if m['better'] is False else 'same'}; {m['direction']} is better)"
            out.append(f"  {m['name']}: {fmt_number(m['base'])} → {fmt_number(m['candidate'])}{delta}")
    prog = diff["program"]
    if prog["changed"]:
        out.append(f"Program: changed {str(prog['base'])[:12]} → {str(prog['candidate'])[:12]} ({prog['module']})")
    else:
        out.append(f"Program: {str(prog['candidate'])[:12]} ({prog['module']})" + (", unchanged" if base else ""))
    return out


def approvals_text(count: int) -> str:
    return f"{count} approval{'s' if count != 1 else ''}"


def rules_strictest_first(req: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A request's approval rules, the one `show --json` names as `rule` first, the others as configured."""
    rules = list(req.get("rules") or [])
    top = req.get("rule")
    return ([top] + [r for r in rules if r != top]) if top in rules else rules


def rule_lines(req: Mapping[str, Any], style: Style) -> list[str]:
    """`Rule: why — N approvals from @S…`: the approval rules the request takes (several: each must be met)."""
    lines = [f"{rule['why']} — {approvals_text(rule['required_approvals'])} from "
             + (", ".join(style.who(a) for a in rule["approvers"]) or "any approver")
             + (f" ({len(rule['approved_by'])}/{rule['required_approvals']} so far)" if rule.get("approved_by") else "")
             for rule in rules_strictest_first(req)]
    if len(lines) <= 1:
        return [f"Rule: {line}" for line in lines]
    return ["Rules (each must be met):"] + [f"  {line}" for line in lines]


def request_lines(req: Mapping[str, Any]) -> list[str]:
    head = (f"Promotion request #{req['id']} ({req['kind']}): {req['model']} {req['base'] or '(none)'} → "
            f"{req['candidate']} — {req['state']}")
    out = [head, f"Requested by {req['requested_by']}" + (f": {req['reason']}" if req.get("reason") else ""),
           f"Approvals {req['approvals']}/{req['required_approvals']}, expires {req['expires_at']}"]
    out += rule_lines(req, PLAIN)
    out += [f"  {d['decision'].rstrip('e')}ed by {d['user']} at {d['at']}" + (f": {d['reason']}" if d.get("reason") else "")
            for d in req.get("decisions", [])]
    if req.get("error"):
        out.append(f"Error: {req['error']}")
    return out


def evaluation_lines(req: Mapping[str, Any], shown: int = 5) -> list[str]:
    """A request's evaluation: candidate and default on the same data, or why there is none (and what to do)."""
    ev = req.get("evaluation") or {"state": "not_configured"}
    state, data = ev.get("state"), ev.get("data")
    gate = ev.get("gate")
    gate_line = []
    if gate:
        said = {"waiting": "waits for the evaluation", "passed": "passed"}.get(gate.get("state"),
                                                                             f"refused: {gate.get('why')}")
        gate_line = [f"Nightly gate on the evaluation ({gate['metric']}, min delta {gate['min_delta']:+.4f}): {said}"]
    if state == "not_configured":
        return [f"Evaluation: not evaluated — {ev.get('hint') or 'configure `evaluation:` in starchart.yaml'}"]
    if state in ("pending", "starting"):
        return [f"Evaluation: waiting to start on {data}", *gate_line]
    if state == "running":
        return [f"Evaluation: running on {data} (job {ev.get('job_id')})…", *gate_line]
    if state == "failed":
        return [f"Evaluation failed: {ev.get('error')}" + (f" — {ev['hint']}" if ev.get("hint") else ""),
                "(the request can still be decided)", *gate_line]
    cand, base = ev.get("candidate") or {}, ev.get("base")
    out = [f"Evaluation on {ev.get('rows')} rows of {data} (label {ev.get('label')}, output {ev.get('output')}):"]
    for name in cand:
        if base is None:
            out.append(f"  {name}: {fmt_number(cand[name])}")
            continue
        b, c = base.get(name), cand[name]
        delta = f" ({c - b:+.4f})" if isinstance(b, (int, float)) and isinstance(c, (int, float)) else ""
        out.append(f"  {name}: {fmt_number(b)} → {fmt_number(c)}{delta}")
    if ev.get("agreement") is not None:
        rows = ev.get("rows") or 0
        alike = round(ev["agreement"] * rows)
        out.append(f"  agreement: {ev['agreement']:.1%} ({alike} of {rows} rows answered alike)")
        for d in ev.get("disagreements", [])[:shown]:
            inputs = json.dumps(d["inputs"], sort_keys=True, ensure_ascii=False)[:200]
            out.append(f"  line {d['line']}: {inputs} label {json.dumps(d['label'])} · candidate "
                       f"{json.dumps(d['candidate'])} · default {json.dumps(d['base'])}")
    elif base is None:
        out.append("  (no current default to compare with)")
    return out + gate_line


def default_at_lines(answer: dict[str, Any]) -> list[str]:
    """`audit MODEL --at T`: the default then, and the decisions and training behind it."""
    out = [f"At {answer['at']} the default of {answer['model']} was {answer['version']} "
           f"(since {answer['since']}, {answer['how']})"]
    out.append(f"  requested by {answer.get('requested_by') or '-'}; approved by "
               f"{', '.join(answer.get('approved_by') or []) or '- (first version of a new model)'}")
    if answer.get("split"):
        shares = ", ".join(f"{v} {p}%" for v, p in answer["split"].items())
        canary = answer.get("canary_request")
        out.append(f"  traffic: {shares}" + (f" (the canary of promotion request #{canary})" if canary else ""))
    if answer.get("job_id"):
        program = answer.get("program") or {}
        out.append(f"  from job {answer['job_id']} trained by {answer.get('trained_by')}")
        out.append(f"  args: {' '.join(answer.get('args') or []) or '(none)'}")
        out.append(f"  program: {program.get('module')} sha256 {str(program.get('sha256'))[:16]}")
    return out


def elapsed(start: str | None, end: str | None = None) -> str:
    """`2m05s` between two of the core's UTC times (`end` omitted: until now)."""
    if not start:
        return ""
    t0 = datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    t1 = (datetime.strptime(end, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
          if end else time.time())
    seconds = max(0, int(t1 - t0))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


BAR_WIDTH = 20


def progress_line(progress: Mapping[str, Any]) -> str:
    """`epoch 3/10 ██████░░░░░░░░░░░░░░ loss 0.4123`; without a planned count, the epochs done."""
    done, planned, loss = progress["epoch"], progress.get("planned"), progress.get("loss")
    if planned:
        filled = round(BAR_WIDTH * min(done, planned) / planned)
        line = f"epoch {done}/{planned} {'█' * filled}{'░' * (BAR_WIDTH - filled)}"
    else:
        line = f"{done} epoch{'' if done == 1 else 's'} done"
    return line + (f" · loss {fmt_number(loss)}" if loss is not None else "")


# ------------------------------------------------------------------ results as text

@dataclass(frozen=True)
class Style:
    """PLAIN for the CLI; CHAT keeps Slack's marks, as the console shows what Slack shows."""

    chat: bool

    def code(self, text: Any) -> str:
        return f"`{text}`" if self.chat else str(text)

    def bold(self, text: Any) -> str:
        return f"*{text}*" if self.chat else str(text)

    def who(self, user: Any) -> str:
        return f"@{user}" if self.chat else str(user)

    def where(self, channel: Any) -> str:
        return f"#{channel}" if self.chat else str(channel)

    def emoji(self, name: str) -> str:
        return f":{name}: " if self.chat else ""


PLAIN, CHAT = Style(False), Style(True)


@dataclass(frozen=True)
class Choice:
    """A button: what a click sends (`action_id`, `value`) and its label."""

    action_id: str
    value: str
    label: str


@dataclass(frozen=True)
class Text:
    title: str
    lines: list[str]
    choices: list[Choice] = field(default_factory=list)

    @property
    def body(self) -> str:
        return "\n".join(self.lines)


def _one(line: str) -> Text:
    return Text(line, [line])


@singledispatch
def render(result: r.Result, style: Style = PLAIN) -> Text:
    raise TypeError(f"no text rendering for {type(result).__name__}")


JOB_COLUMNS = [("job_id", "JOB"), ("state", "STATE"), ("created_at", "CREATED"), ("ended_at", "ENDED"),
               ("version", "VERSION"), ("requested_by", "BY"), ("args", "ARGS")]
VERSION_COLUMNS = [("name", "VERSION"), ("is_default", "DEFAULT"), ("created_at", "CREATED"), ("job_id", "JOB"),
                   ("trained_by", "TRAINED BY"), ("metrics", "METRICS")]
REQUEST_COLUMNS = [("id", "ID"), ("kind", "KIND"), ("candidate", "CANDIDATE"), ("base", "BASE"), ("state", "STATE"),
                   ("requested_by", "BY"), ("approvals", "APPROVALS"), ("created_at", "CREATED")]
AUDIT_COLUMNS = [("at", "TIME"), ("action", "ACTION"), ("actor", "ACTOR"), ("model", "MODEL"), ("version", "VERSION"),
                 ("request_id", "REQUEST"), ("job_id", "JOB"), ("details", "DETAILS")]
SCHEDULE_COLUMNS = [("model", "MODEL"), ("cron", "CRON"), ("timezone", "TZ"), ("enabled", "ON"),
                    ("next_run_at", "NEXT"), ("args", "ARGS")]


@render.register
def _job_started(result: r.JobStarted, style: Style = PLAIN) -> Text:
    job = result.job
    head = f"Job {job['job_id']} {job['state']}"
    return Text(head, [head, f"  train path: {job['train_path']}", f"  follow it: starchart state {job['model']}"])


@render.register
def _job_submitted(result: r.JobSubmitted, style: Style = PLAIN) -> Text:
    return _one(f"Job {result.job['job_id']} submitted; train path {result.job['train_path']}")


@render.register
def _job_progress(result: r.JobProgress, style: Style = PLAIN) -> Text:
    return _one(f"  {result.job['state']}")


@render.register(r.JobEnded)
@render.register(r.JobCancelled)
def _job_state(result: r.JobResult, style: Style = PLAIN) -> Text:
    job = result.job
    head = f"Job {job['job_id']} {job['state']}"
    return Text(head, [head] + ([job["error"]] if isinstance(result, r.JobEnded) and job.get("error") else []))


_JOB_ICONS = {"QUEUED": "hourglass", "RUNNING": "gear", "SUCCEEDED": "white_check_mark", "FAILED": "x",
              "CANCELLED": "no_entry_sign"}


@render.register
def _training(result: r.TrainingMessage, style: Style = PLAIN) -> Text:
    job, state = result.job, result.job["state"]
    head = f"{style.emoji(_JOB_ICONS.get(state, 'grey_question'))}Training {style.bold(job['job_id'])} — " \
           f"{style.bold(state.lower())}"
    if state == "RUNNING":
        head += f" ({elapsed(job.get('started_at'))})"
    elif state in ("SUCCEEDED", "FAILED", "CANCELLED") and job.get("started_at"):
        head += f" after {elapsed(job.get('started_at'), job.get('ended_at'))}"
    lines = [head, f"   requested by {style.who(job['requested_by'])} · args: "
                   f"{style.code(' '.join(job.get('args') or []) or '(none)')}"]
    if state == "RUNNING" and result.progress:
        lines.append(f"   {progress_line(result.progress)}")
    if result.metrics:
        lines.append(" · ".join(f"{style.bold(k)} {fmt_number(v)}" for k, v in result.metrics.items()))
    if state == "SUCCEEDED":
        lines.append(f"   expose it: {style.code('/ml expose ' + job['model'])}")
    if state == "FAILED" and job.get("error"):
        lines += job["error"][-2500:].splitlines()
    return Text(f"Training {job['job_id']} {state.lower()}", lines)


def gate_facts(gate: Mapping[str, Any], style: Style = PLAIN) -> str:
    """What the gate compared: the metric, the candidate's and the default's values, their change, min_delta."""
    def value(v: Any) -> str:
        return "missing" if v is None else number(v)

    base = f"default {style.code(gate['base_version'])}" if gate.get("base_version") else "default"
    said = [f"{style.bold(gate['metric'])}: candidate {value(gate.get('candidate'))}",
            f"{base} {value(gate.get('base'))}"]
    if isinstance(gate.get("delta"), (int, float)):
        said.append(f"change {gate['delta']:+.4f}")
    better = f", {gate['direction']} is better" if gate.get("direction") else ""
    said.append(f"gate min_delta {float(gate['min_delta']):+.4f}{better}")
    return " · ".join(said)


@render.register
def _review_skipped(result: r.ReviewSkipped, style: Style = PLAIN) -> Text:
    head = (f"{style.emoji('no_entry')}Nightly retrain of {style.bold(result.model)}: {style.code(result.version)} "
            f"was not put up for review")
    return Text(head, [head, f"   the gate refused it: {result.gate['why']}", f"   {gate_facts(result.gate, style)}",
                       f"   review it anyway: {style.code(f'/ml promote {result.model} {result.version}')}"])


@render.register
def _schedule_not_started(result: r.ScheduleNotStarted, style: Style = PLAIN) -> Text:
    head = f"{style.emoji('warning')}The scheduled training of {style.bold(result.model)} did not start: {result.error}"
    lines = [head] + ([f"   {result.hint}"] if result.hint else [])
    return Text(head, lines + [f"   the next firing tries again: {style.code('/ml schedule list')}"])


@render.register
def _scheduled_failed(result: r.ScheduledFailed, style: Style = PLAIN) -> Text:
    job = result.job
    head = f"{style.emoji('x')}Scheduled training {style.bold(job['job_id'])} of {style.bold(job['model'])} failed"
    if job.get("started_at"):
        head += f" after {elapsed(job.get('started_at'), job.get('ended_at'))}"
    lines = [head, f"   args: {style.code(' '.join(job.get('args') or []) or '(none)')} · "
                   f"the whole log: {style.code('/ml logs ' + job['job_id'])}"]
    return Text(f"Scheduled training {job['job_id']} failed", lines + (job.get("error") or "")[-2500:].splitlines())


@render.register
def _nightly_exposed(result: r.NightlyExposed, style: Style = PLAIN) -> Text:
    v = result.version
    head = (f"{style.emoji('package')}Nightly retrain of {style.bold(result.model)}: exposed {style.code(v['name'])} "
            f"from {style.code(v['job_id'])}")
    lines = [head]
    if v.get("metrics"):
        lines.append("   " + " · ".join(f"{style.bold(k)} {number(m)}" for k, m in v["metrics"].items()))
    diff = f"/ml diff {result.model} {v['name']}"
    lines.append(f"   compare it with the default: {style.code(diff)}")
    return Text(head, lines)


@render.register
def _jobs(result: r.Jobs, style: Style = PLAIN) -> Text:
    return Text(f"Jobs of {result.model}", [table(result.jobs, JOB_COLUMNS)])


@render.register
def _log(result: r.Log, style: Style = PLAIN) -> Text:
    return Text(f"Log of {result.job_id}", [result.log])


def number(value: Any) -> str:
    """A metric value: a number, or the "NaN"/"Infinity" text a diverged run leaves (see Versions.expose)."""
    return format(value, ".4g") if isinstance(value, (int, float)) else str(value)


@render.register
def _exposed(result: r.Exposed, style: Style = PLAIN) -> Text:
    lines = [f"exposed {style.code(v['name'])} from {style.code(v['job_id'])}"
             + "".join(f" {k}={number(m)}" for k, m in v["metrics"].items()) for v in result.result["exposed"]]
    lines += [f"error: {e['error']}" for e in result.result["errors"]]
    return Text(f"Expose {result.model}", lines or ["Nothing new to expose: no succeeded job without a version."])


@render.register
def _versions(result: r.Versions, style: Style = PLAIN) -> Text:
    data = result.listing
    return Text(f"Versions of {data['model']} (default {data['default'] or 'none'})",
                [table(data["versions"], VERSION_COLUMNS)])


@render.register
def _diff(result: r.Diff, style: Style = PLAIN) -> Text:
    base = result.diff["base"]["name"] if result.diff.get("base") else "(none)"
    return Text(f"{result.model}: {result.diff['candidate']['name']} against {base}", diff_lines(result.diff))


@render.register
def _predictions(result: r.Predictions, style: Style = PLAIN) -> Text:
    answer = result.answer
    shown = {k: v for k, v in answer.items() if k in ("predictions", "outputs")}
    count = f" ({len(answer['predictions'])})" if "predictions" in answer else ""
    return Text(f"Predictions of {answer['model']} {answer['version']}{count}",
                [f"{answer['model']} {answer['version']}:", json.dumps(shown, indent=2)])


@render.register
def _pulled(result: r.Pulled, style: Style = PLAIN) -> Text:
    p = result.pulled
    head = f"pulled {p['model']} {p['version']} into {p['path']} ({p['files']} files, {p['bytes']:,} bytes)"
    return Text(head, [head, f"  load it: tf.saved_model.load({p['path']!r}).signatures['serving_default']"])


@render.register
def _chart(result: r.Chart, style: Style = PLAIN) -> Text:
    c = result.chart
    head = f"{c['title']}" + (f" written to {c['path']}" if c.get("path") else "")
    return Text(head, [head, f"  versions: {' '.join(c['versions'])}"])


@render.register
def _archive(result: r.PulledArchive, style: Style = PLAIN) -> Text:
    p = result.pulled
    inputs = ", ".join(sorted(p["signature"].get("inputs") or {})) or "-"
    return _one(f"{p['model']} {p['version']} — SavedModel ({p['files']} files), serving_default inputs: {inputs}. "
                f"Unpack it and load it with tf.saved_model.load(FOLDER).")


def lite_check_text(check: Mapping[str, Any]) -> str:
    """How a TensorFlow Lite copy was checked, in one phrase."""
    return (f"checked against the SavedModel on {check['instances']} instances of {check['on']}: "
            f"max abs difference {check['max_abs_diff']:.2g} (tolerance: {check['tolerance']})")


@render.register
def _pulled_lite(result: r.PulledLite, style: Style = PLAIN) -> Text:
    p = result.pulled
    what = f"{p['model']} {p['version']} as TensorFlow Lite"
    if p["path"] is None:  # a file in the conversation
        return _one(f"{p['filename']}: {what}, {p['bytes']:,} bytes, {lite_check_text(p['check'])}. "
                    f"Load it with ai_edge_litert.interpreter.Interpreter(model_path=FILE).")
    head = f"pulled {what} into {p['path']} ({p['bytes']:,} bytes)"
    return Text(head, [head, f"  {lite_check_text(p['check'])}",
                       f"  load it: ai_edge_litert.interpreter.Interpreter(model_path={p['path']!r})"
                       ".get_signature_runner('serving_default')"])


@render.register
def _signed(result: r.SignedUrls, style: Style = PLAIN) -> Text:
    s = result.signed
    minutes = s["expires_in"] // 60
    head = (f"{s['model']} {s['version']} ({s['format']}): {len(s['urls'])} signed URL(s), valid for "
            f"{minutes} minutes (until {s['expires_at']})")
    lines = [head]
    if s.get("check"):
        lines.append(("  converted and uploaded now; " if s["uploaded"] else "  the copy already uploaded; ")
                     + lite_check_text(s["check"]))
    lines += [f"{u['path']}  {u['url']}" for u in s["urls"]]
    return Text(head, lines)


# ------------------------------------------------------------------ promotion requests and their cards

@render.register
def _opened(result: r.RequestOpened, style: Style = PLAIN) -> Text:
    req = result.request
    return Text(f"Promotion request #{req['id']} is open", request_lines(req) + applied_from(req) + [""]
                + diff_lines(req["diff"]) + ["", f"approve: starchart approve {req['id']} --user APPROVER"])


def applied_from(req: Mapping[str, Any]) -> list[str]:
    """apply's request: the version it asks for and the model file(s) that mark it."""
    if not req.get("model_files"):
        return []
    return [f"{req['candidate']} is marked isDefault in {' and '.join(req['model_files'])}"]


@render.register
def _decided(result: r.Decided, style: Style = PLAIN) -> Text:
    return Text(f"Promotion request #{result.request['id']} is {result.request['state']}",
                request_lines(result.request))


@render.register
def _shown(result: r.RequestShown, style: Style = PLAIN) -> Text:
    req = result.request
    return Text(f"Promotion request #{req['id']}", request_lines(req) + [""] + diff_lines(req["diff"]))


@render.register
def _card_posted(result: r.CardPosted, style: Style = PLAIN) -> Text:
    req = result.request
    said = f"Promotion request #{req['id']} is open for review in {style.where(req['channel'])}."
    return _one(" ".join([said, *applied_from(req)]))


@render.register
def _request_state(result: r.RequestState, style: Style = PLAIN) -> Text:
    return _one(f"Promotion request #{result.request['id']} is {result.request['state']}.")


@render.register
def _requests(result: r.Requests, style: Style = PLAIN) -> Text:
    return Text(f"Promotion requests of {result.model}", [table(result.requests, REQUEST_COLUMNS)])


def outcome(req: dict[str, Any], style: Style) -> str:
    """A decided card's last line: where the request stands."""
    e = style.emoji
    return {
        "open": f"{e('hourglass')}waiting for approvals ({req['approvals']}/{req['required_approvals']})",
        "approved": f"{e('hourglass_flowing_sand')}approved — applying…",
        "applying": f"{e('hourglass_flowing_sand')}applying…",
        "applied": f"{e('rocket')}applied at {req.get('applied_at')}: {style.code(req['candidate'])} is the default",
        "failed": f"{e('x')}apply failed: {req.get('error') or 'unknown error'}",
        "rejected": f"{e('no_entry')}rejected",
        "expired": f"{e('alarm_clock')}expired",
        "stale": f"{e('warning')}stale — the default or the candidate changed; open a new request",
        "canary": f"{e('hatching_chick')}canary running: {(req.get('canary') or {}).get('percent')}% of the "
                  f"default's traffic goes to {style.code(req['candidate'])} (see its canary card)",
        "rolled_back": f"{e('leftwards_arrow_with_hook')}canary rolled back: {(req.get('canary') or {}).get('why')}",
    }.get(req["state"], req["state"])


def decided(req: dict[str, Any]) -> bool:
    """A card shows its decisions (and no longer asks for them) once there are any, or the request moved on."""
    return bool(req["decisions"]) or req["state"] != "open"


@render.register
def _card(result: r.ReviewCard, style: Style = PLAIN) -> Text:
    req = dict(result.request)
    cand, base = req["diff"]["candidate"], req["diff"].get("base")
    title = f"Review: {req['model']} {req['base'] or '(none)'} → {req['candidate']}"
    lines = [f"== {title} ==",
             style.bold(f"{req['kind'].capitalize()} request #{req['id']}") + f" by {style.who(req['requested_by'])}"
             + (f": {req['reason']}" if req.get("reason") else ""),
             f"Candidate {style.code(cand['name'])} trained by {style.who(cand['trained_by'])}",
             f"Current default {style.code(base['name'])} trained by {style.who(base['trained_by'])}" if base
             else "Current default (none)",
             *rule_lines(req, style),
             *diff_lines(req["diff"])[2:],
             *evaluation_lines(req),
             f"   expires {req['expires_at']} · approvals {req['approvals']}/{req['required_approvals']}"]
    value = json.dumps(card_value(req), separators=(",", ":"))
    ask = [Choice(APPROVE, value, "Approve"), Choice(REJECT, value, "Reject"), Choice(TRY, value, "Try")]
    if not decided(req):
        return Text(title, lines, ask)
    lines += [f"{style.emoji('white_check_mark' if d['decision'] == 'approve' else 'x')}{d['decision'].rstrip('e')}ed "
              f"by {style.who(d['user'])} at {d['at']}" + (f": {d['reason']}" if d.get("reason") else "")
              for d in req["decisions"]]
    lines.append(f"{style.bold('Outcome:')} {outcome(req, style)}")
    choices = ask if req["state"] == "open" else [Choice(RETRY, value, "Retry")] if req["state"] == "failed" else []
    return Text(f"{title} — {req['state']}", lines, choices)


@render.register
def _form(result: r.RejectForm, style: Style = PLAIN) -> Text:
    return Text("Reject promotion", ["Why?"])


@render.register
def _try_form(result: r.TryForm, style: Style = PLAIN) -> Text:
    example = {name: first for name, _dtype, _shape, first in result.fields}
    return Text(f"Try {result.value['m']} {result.value['v']}",
                [f"{name} ({dtype}): {json.dumps(first)}" for name, dtype, _shape, first in result.fields]
                + [f"example: {json.dumps(example)}"])


def compared_lines(c: Mapping[str, Any], shown: int = 5) -> list[str]:
    """Both versions' answers, instance by instance (the first `shown`), and how often they agree."""
    sides = [c["candidate"], c["base"]]
    lines = []
    for side in sides:
        label = f"{side['role']} {side.get('version') or '(none)'}"
        if "error" in side:
            lines.append(f"{label}: no answer: {side['error']}")
    if c.get("agreement") is not None:
        lines.append(f"agreement: {c['agreement']:.0%} of {len(c['instances'])} instance(s)")
    for i, instance in enumerate(c["instances"][:shown]):
        lines.append(f"{i + 1}. {json.dumps(instance, sort_keys=True)[:300]}")
        for side in sides:
            if "predictions" in side:
                answer = side["predictions"][i] if i < len(side["predictions"]) else None
                lines.append(f"   {side['role']} {side['version']}: {json.dumps(answer, sort_keys=True)[:500]}")
    if len(c["instances"]) > shown:
        lines.append(f"(and {len(c['instances']) - shown} more instance(s))")
    return lines


@render.register
def _compared(result: r.Compared, style: Style = PLAIN) -> Text:
    c = result.compared
    versions = f"{c['candidate'].get('version') or '?'} vs the default {c['base'].get('version') or '(none)'}"
    return Text(f"{c['model']}: {versions}", compared_lines(c))


# ------------------------------------------------------------------ audit, schedules, answers

@render.register
def _audit_page(result: r.AuditPage, style: Style = PLAIN) -> Text:
    title = "Audit events" + (f" of {result.model}" if result.model else "")
    more = [Choice(AUDIT_NEXT, json.dumps(result.next, separators=(",", ":")), "Next")] if result.next else []
    return Text(title, [table(result.events, AUDIT_COLUMNS)], more)


@render.register
def _audit_export(result: r.AuditExport, style: Style = PLAIN) -> Text:
    return Text(f"Audit events ({len(result.events)})", [result.csv().rstrip("\r\n")])


@render.register
def _uploaded(result: r.Uploaded, style: Style = PLAIN) -> Text:
    return _one(f"Uploaded {result.count} {result.what} as {result.filename}.")


@render.register
def _verified(result: r.AuditVerified, style: Style = PLAIN) -> Text:
    v = result.verify
    if v.ok:
        return _one(f"{style.emoji('white_check_mark')}Audit chain OK: {v.events} events, head "
                    f"{style.code(v.head_hash[:16])}, {v.checkpoints} checkpoints matched")
    return _one(f"{style.emoji('rotating_light')}Audit chain BROKEN: {v.problem}")


@render.register
def _checkpoint(result: r.Checkpoint, style: Style = PLAIN) -> Text:
    cp = result.checkpoint
    return _one(f"Audit checkpoint: {cp['count']} events, head {style.code(cp['head'])} at {cp['at']}"
                + (f", signature {style.code(cp['sig'])}" if cp["sig"] else " (unsigned: set STARCHART_AUDIT_KEY)"))


@render.register
def _checkpoint_posted(result: r.CheckpointPosted, style: Style = PLAIN) -> Text:
    return _one(f"Checkpoint posted to {style.where(result.channel)}.")


@render.register
def _default_at(result: r.DefaultAt, style: Style = PLAIN) -> Text:
    lines = default_at_lines(dict(result.answer))
    return Text(lines[0], lines)


@render.register
def _schedules(result: r.Schedules, style: Style = PLAIN) -> Text:
    return Text("Schedules", [table(result.schedules, SCHEDULE_COLUMNS)])


@render.register
def _schedule_changed(result: r.ScheduleChanged, style: Style = PLAIN) -> Text:
    row = result.schedule
    if not row["enabled"]:
        return _one(f"The schedule of {row['model']} is off.")
    return _one(f"{row['model']} trains at {style.code(row['cron'])} ({row['timezone']}); next run "
                f"{row['next_run_at']}.")


@render.register
def _help(result: r.Help, style: Style = PLAIN) -> Text:
    return Text("/ml", [result.text])


@render.register
def _notice(result: r.Notice, style: Style = PLAIN) -> Text:
    return _one(result.text)


@render.register
def _failure(result: r.Failure, style: Style = PLAIN) -> Text:
    return Text(result.message, [f"error: {result.message}"] + ([f"  hint: {result.hint}"] if result.hint else []))


from bot import canary_text as _canary_text  # noqa: E402,F401 - registers the canary's renderings
