"""The canary card in Block Kit: candidate and default side by side, agreement, where it stands, and the buttons
Promote to 100% and Roll back while it runs."""

from __future__ import annotations

from typing import Any, Mapping

from bot.blocks import Blocks, Rendered, button, context, escape, mrkdwn, render, section
from bot.canary_text import agreement_text, canary_lines, figure_rows, split_text, standing
from bot.text import CHAT
from handlers import results as r
from handlers.canary import PROMOTE, ROLLBACK, card_value


def canary_card(view: Mapping[str, Any]) -> tuple[str, Blocks]:
    title = f"Canary: {view['model']} {view['base']} → {view['candidate']}"
    blocks: Blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": title[:150]}},
        section(f"*Promotion request #{view['request_id']}* — traffic {escape(split_text(view['split']))}; "
                f"bake {view['bake_seconds']}s" + (f" until {view['bake_until']}" if view.get("bake_until") else "")),
        section(escape(standing(view, CHAT))[:2900]),
    ]
    rows = figure_rows(view)
    if rows:
        blocks.append({"type": "section", "fields": [
            mrkdwn(f"*Candidate* `{escape(view['candidate'])}`\n" + "\n".join(f"{w}: {c}" for w, c, _ in rows)),
            mrkdwn(f"*Default* `{escape(view['base'])}`\n" + "\n".join(f"{w}: {b}" for w, _, b in rows)),
        ]})
    limits = view["limits"]
    blocks.append(context(escape(agreement_text(view)),
                          f"rolled back above {100 * limits['max_error_rate']:.1f}% errors or "
                          f"{limits['max_p99_ratio']:g}x the default's p99, judged after {limits['min_requests']} "
                          f"requests; auto_promote {'on' if limits['auto_promote'] else 'off'}"))
    if view["running"]:
        blocks.append({"type": "actions", "block_id": f"canary-{view['request_id']}", "elements": [
            button("Promote to 100%", PROMOTE, card_value(dict(view)), style="primary", confirm={
                "title": {"type": "plain_text", "text": "Promote to 100%?"},
                "text": mrkdwn(f"`{view['candidate']}` becomes the default of *{view['model']}* with all its "
                               "traffic."),
                "confirm": {"type": "plain_text", "text": "Promote"},
                "deny": {"type": "plain_text", "text": "Cancel"}}),
            button("Roll back", ROLLBACK, card_value(dict(view)), style="danger"),
        ]})
    return f"{title} — {view['state']}", blocks


@render.register(r.CanaryCard)
@render.register(r.CanaryShown)
def _canary_card(result: r.CanaryResult) -> Rendered:
    return Rendered(*canary_card(dict(result.canary)))


@render.register
def _canary_changed(result: r.CanaryChanged) -> Rendered:
    lines = canary_lines(dict(result.canary), CHAT)
    return Rendered(lines[2], [section(escape(line)) for line in lines[:3]])
