"""Review cards: post one for a promotion request, keep it current after every decision."""

from __future__ import annotations

from typing import Any

from handlers.context import Ctx, Deps


def post_card(deps: Deps, ctx: Ctx, req: dict[str, Any]) -> dict[str, Any]:
    """Post the review card to the model's channel (or where the command was typed) and remember it."""
    if req.get("message_ts"):
        refresh_card(deps, ctx, req)  # an open twin already has a card: bring it up to date
        return req
    channel = req.get("channel") or ctx.channel
    text, blocks, truncated = deps.render.review_card(req)
    posted = ctx.client.chat_postMessage(channel=channel, text=text, blocks=blocks, unfurl_links=False)
    channel, ts = posted["channel"], posted["ts"]
    deps.registry.promotions.set_card(req["id"], channel, ts)
    req = {**req, "channel": channel, "message_ts": ts}
    if truncated:
        full = deps.render.full_diff_text(req)
        ctx.client.chat_postMessage(channel=channel, thread_ts=ts, text="Full diff attached as a file.")
        ctx.client.files_upload_v2(channel=channel, thread_ts=ts, content=full,
                                   filename=f"{req['model']}-request-{req['id']}-diff.txt",
                                   title=f"Full diff of promotion request #{req['id']}")
    return req


def refresh_card(deps: Deps, ctx: Ctx, req: dict[str, Any]) -> None:
    if not req.get("message_ts") or not req.get("channel"):
        return
    text, blocks, _ = deps.render.decided_card(req) if req["decisions"] or req["state"] != "open" \
        else deps.render.review_card(req)
    ctx.client.chat_update(channel=req["channel"], ts=req["message_ts"], text=text, blocks=blocks)


def decide_and_apply(deps: Deps, ctx: Ctx, request_id: int, approve: bool, *, reason: str | None = None,
                     card_digest: str | None = None, channel: str | None = None,
                     message_ts: str | None = None) -> dict[str, Any]:
    """One decision, then (if it completed the approvals) the application, the card updated after each."""
    reg = deps.registry
    req = reg.promotions.decide(request_id, ctx.user, approve, reason=reason, card_digest=card_digest, channel=channel,
                     message_ts=message_ts, actor_name=deps.user_name(ctx.user))
    refresh_card(deps, ctx, req)
    if req["state"] == "approved":
        req = reg.promotions.apply_request(request_id, actor=ctx.user)
        refresh_card(deps, ctx, req)
    return req
