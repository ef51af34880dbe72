"""`starchart serve`: the web process under gunicorn (threads, so listeners ack while work goes on)."""

from __future__ import annotations

import os
from typing import Any

from gunicorn.app.base import BaseApplication


class _Server(BaseApplication):
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return build_wsgi()


def build_wsgi() -> Any:
    from bot.app import create_bot
    from bot.web import WebApp

    bot = create_bot(follow_interval=float(os.environ.get("STARCHART_FOLLOW_INTERVAL", "2")))
    return WebApp(bot)


def serve(port: int | None = None, workers: int | None = None) -> None:
    port = port or int(os.environ.get("PORT", "3000"))
    _Server({
        "bind": f"0.0.0.0:{port}",
        "workers": workers or int(os.environ.get("WEB_CONCURRENCY", "2")),
        "worker_class": "gthread",
        "threads": int(os.environ.get("WEB_THREADS", "8")),
        "timeout": 30,
        "graceful_timeout": 10,
        "accesslog": "-" if os.environ.get("STARCHART_ACCESS_LOG") else None,
    }).run()


def socket_mode() -> None:
    """`starchart socket`: the same app over Socket Mode (SLACK_APP_TOKEN, xapp-…)."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    from bot.app import create_bot
    from model_registry.errors import InvalidInput

    app_token = os.environ.get("SLACK_APP_TOKEN")
    if not app_token:
        raise InvalidInput("SLACK_APP_TOKEN is not set", "create an app-level token with connections:write")
    bot = create_bot()
    SocketModeHandler(bot.app, app_token).start()
