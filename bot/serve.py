"""`starchart serve`: the web process under gunicorn (threads, so listeners ack while work goes on; requests read
whole before they take a thread, see bot.whole_requests)."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from bot.whole_requests import RESERVED_THREADS, worker_class
from model_registry.config import SlackSettings, WebSettings


class _Server(BaseApplication):
    def __init__(self, options: dict[str, Any], with_worker: bool = False) -> None:
        self.options = options
        self.with_worker = with_worker
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return build_wsgi(with_worker=self.with_worker)


def build_wsgi(with_worker: bool = False) -> Any:
    """The WSGI app of one gunicorn worker; `with_worker`: the worker's and the clock's passes run here too (in one
    gunicorn worker of the machine at a time, see bot.worker.in_background)."""
    from bot.app import create_bot
    from bot.web import WebApp
    from model_registry.adapters.backends.local_versions import limit_arenas

    # before the listener threads start: 27 threads' own heaps cost a worker ~3 MB it never gave back (measured)
    limit_arenas(2)
    web = WebSettings.from_env()
    bot = create_bot(SlackSettings.from_env(), follow_interval=web.follow_interval)
    if with_worker:
        from bot.worker import in_background

        in_background(bot.registry)
    return WebApp(bot, web)


def _database_ready() -> None:
    """Refuse to start on a database without this release's schema (SQLite: migrate it), before anything listens:
    the core itself loads in the background (bot.app.LazyRegistry), where a refusal would only reach the log."""
    from model_registry.adapters.db import check_database
    from model_registry.config import Settings

    check_database(Settings.from_env().database_url)


def serve(port: int | None = None, workers: int | None = None, with_worker: bool = False) -> None:
    _database_ready()
    web = WebSettings.from_env()
    _Server({
        "bind": f"0.0.0.0:{port or web.port}",
        "workers": workers or web.workers,
        # gthread, but a thread only for a request that has arrived, within WEB_READ_TIMEOUT: slow clients hold none
        # and a prediction only while one of the threads but two is free: a model server that hangs leaves
        # threads for Slack's acks and /healthz (the others wait in the poller, holding none)
        "worker_class": worker_class(web.read_timeout, web.predict_wait),
        "threads": web.threads + RESERVED_THREADS,  # WEB_THREADS for predictions, and two they never take
        "timeout": 30,
        "graceful_timeout": 10,
        "accesslog": "-" if web.access_log else None,
    }, with_worker=with_worker).run()


def socket_mode() -> None:
    """`starchart socket`: the same app over Socket Mode (SLACK_APP_TOKEN, xapp-…)."""
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    from bot.app import create_bot
    from model_registry.domain.errors import InvalidInput

    slack = SlackSettings.from_env()
    if not slack.app_token:
        raise InvalidInput("SLACK_APP_TOKEN is not set", "create an app-level token with connections:write")
    _database_ready()
    bot = create_bot(slack)
    SocketModeHandler(bot.app, slack.app_token).start()
