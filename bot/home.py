"""The Home tab as a Block Kit view: the requests waiting for the person (with the review card's own Approve and
Reject buttons, so a click there is decided as one on the card), each model's default and last training, and the
failures of the last days.

Budget: Slack takes at most 100 blocks in a Home view; sections hold at most 3,000 characters. Requests beyond
WAITING_SHOWN, and lines past a section's room, are summarised with where to find the rest.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from bot.blocks import SECTION_TEXT, Blocks, button, context, escape, rule_lines, section
from handlers.results import HomeTab
from handlers.reviews import APPROVE, REJECT, card_value

HOME_BLOCKS = 100
WAITING_SHOWN = 15  # two blocks each: the request and its buttons
LINES_SHOWN = 40  # model and failure lines, each list
ERROR_CHARS = 200


def _lines(title: str, lines: Sequence[str], empty: str, more: str) -> Blocks:
    """A titled list as few sections as fit Slack's section size, past LINES_SHOWN summarised by `more`."""
    if not lines:
        return [section(f"*{title}*\n{empty}")]
    shown = list(lines[:LINES_SHOWN])
    if len(lines) > LINES_SHOWN:
        shown.append(f"… and {len(lines) - LINES_SHOWN} more: {more}")
    out: Blocks = []
    chunk = f"*{title}*"
    for line in shown:
        if len(chunk) + 1 + len(line) > SECTION_TEXT:
            out.append(section(chunk))
            chunk = ""
        chunk = f"{chunk}\n{line}" if chunk else line
    out.append(section(chunk))
    return out


def _waiting(req: Mapping[str, Any]) -> Blocks:
    head = (f"*{escape(req['model'])}* `{escape(req['base'] or '(none)')}` → `{escape(req['candidate'])}` — "
            f"{escape(req['kind'])} request #{req['id']} by <@{escape(req['requested_by'])}>"
            + (f": {escape(req['reason'])[:300]}" if req.get("reason") else ""))
    breaking = req["diff"]["signature"]["breaking"]
    lines = [head] + [f":lock: {line}" for line in rule_lines(req)]
    if breaking and not req.get("rules"):
        lines.append(f":rotating_light: {len(breaking)} breaking signature change{'s' if len(breaking) != 1 else ''}")
    lines.append(f"approvals {req['approvals']}/{req['required_approvals']} · expires {req['expires_at']}"
                 + (f" · <#{escape(req['channel'])}>" if req.get("channel") else ""))
    value = card_value(dict(req))
    return [section("\n".join(lines)), {"type": "actions", "block_id": f"home-review-{req['id']}", "elements": [
        button("Approve", APPROVE, value, style="primary", confirm={
            "title": {"type": "plain_text", "text": "Approve this version?"},
            "text": {"type": "mrkdwn", "text": f"`{req['candidate']}` becomes the default of *{req['model']}* once "
                                                f"approvals are complete."},
            "confirm": {"type": "plain_text", "text": "Approve"},
            "deny": {"type": "plain_text", "text": "Cancel"}}),
        button("Reject", REJECT, value, style="danger")]}]


def _model_line(m: Mapping[str, Any]) -> str:
    job = m.get("last_training")
    trained = "never trained" if job is None else (
        f"last training `{escape(job['job_id'])}` {job['state'].lower()} "
        f"{'at ' + str(job['ended_at']) if job.get('ended_at') else 'since ' + str(job['created_at'])}")
    default = f"default `{escape(m['default'])}`" if m.get("default") else "no default yet"
    return f"• *{escape(m['model'])}* {default} · {trained}"


def _failure_line(f: Mapping[str, Any]) -> str:
    what = f"training `{escape(f['subject'])}`" if f["kind"] == "training" else f"apply of request {f['subject']}"
    lines = (f.get("error") or "").strip().splitlines()
    error = escape(lines[-1] if lines else "no reason recorded")[:ERROR_CHARS]  # a traceback's last line says why
    return f"• :x: {what} of *{escape(f['model'])}* at {f['at']}: {error}"


def home_view(page: HomeTab) -> dict[str, Any]:
    """The Home view of one person, within Slack's 100 blocks."""
    home = page.home
    blocks: Blocks = [{"type": "header", "text": {"type": "plain_text", "text": "StarChart"}}]
    if page.notice is not None:
        blocks.append(section(f":warning: {escape(page.notice.message)}"
                              + (f"\n_{escape(page.notice.hint)}_" if page.notice.hint else "")))
    waiting = list(home["waiting"])
    more = len(waiting) - WAITING_SHOWN + home.get("waiting_more", 0)
    blocks.append(section(f"*Waiting for your approval* ({len(waiting) + home.get('waiting_more', 0)})" if waiting
                          else "*Waiting for your approval*\nNothing waits for you."))
    for req in waiting[:WAITING_SHOWN]:
        blocks += _waiting(req)
    if more > 0:
        blocks.append(context(f"… and {more} more: `/ml requests MODEL` lists them"))
    blocks.append({"type": "divider"})
    blocks += _lines("Models", [_model_line(m) for m in home["models"]], "No model yet: `/ml train MODEL`.",
                     "`/ml versions MODEL`")
    blocks.append({"type": "divider"})
    blocks += _lines(f"Failures since {home.get('since')}", [_failure_line(f) for f in home["failures"]],
                     "None.", "`/ml audit --since 7d`")
    return {"type": "home", "blocks": blocks[:HOME_BLOCKS]}
