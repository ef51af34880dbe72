"""Work after an ack waits for the requests in flight to be acked: the replay check's write included."""

from __future__ import annotations

import time
from typing import Any

from fakes.slack_driver import SlackDriver, serve_wsgi
from fakes.slack_fake import SlackFake
from sqlalchemy import func, select

from bot.app import create_bot
from bot.web import WebApp
from model_registry.adapters.records import SeenRequest
from model_registry.config import SlackSettings

SECRET = "pacing-test-secret"


def _seen(reg: Any) -> int:
    with reg.db.reads() as s:
        return int(s.execute(select(func.count()).select_from(SeenRequest)).scalar_one())


def test_a_listener_writes_nothing_while_another_request_waits_for_its_ack(make_registry: Any,
                                                                           db_url: str) -> None:
    reg = make_registry(db_url)
    with SlackFake(channels={"C0PACE": "pace"}) as fake:
        settings = SlackSettings.from_env({"SLACK_BOT_TOKEN": fake.token, "SLACK_SIGNING_SECRET": SECRET,
                                           "SLACK_API_URL": fake.base_url})
        bot = create_bot(settings, build=lambda: reg)
        bot.registry.get()  # the core has loaded: nothing else holds the listener back
        bot.gate.patience = 120.0  # the wait ends with the request in flight, not with the patience
        with serve_wsgi(WebApp(bot)) as url:
            driver = SlackDriver(url, SECRET, response_urls=fake.response_url)
            try:
                bot.gate.request_started()  # another Slack request is being handled
                assert driver.command("whoami", user_id="U0PACE", channel_id="C0PACE").status == 200
                time.sleep(0.5)
                assert _seen(reg) == 0, "the replay check wrote while another request waited for its ack"
                assert not fake.responses
                bot.gate.request_done()
                fake.wait_for(lambda: fake.responses or None, timeout=20)  # answered once that one is acked
                assert _seen(reg) == 1
            finally:
                driver.close()
                bot.stop()
