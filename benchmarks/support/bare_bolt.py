"""The baseline of the Slack benchmarks: a bare Bolt app that only acks, on the same WSGI stack."""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from slack_bolt import App
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_sdk import WebClient


def build() -> Any:
    client = WebClient(token=os.environ["SLACK_BOT_TOKEN"], base_url=os.environ["SLACK_API_URL"])
    app = App(token=os.environ["SLACK_BOT_TOKEN"], signing_secret=os.environ["SLACK_SIGNING_SECRET"],
              client=client, token_verification_enabled=False)

    @app.command("/ml")
    def ml(ack: Any) -> None:
        ack()

    @app.action("review.approve")
    def approve(ack: Any) -> None:
        ack()

    handler = SlackRequestHandler(app)

    def wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            body = json.dumps({"ok": True}).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        return handler(environ, start_response)

    return wsgi
