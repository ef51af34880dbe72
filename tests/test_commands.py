"""One command table behind three surfaces: the CLI and the console answer alike on the same records, and a
command added to the table in one place is reachable from Slack (over Bolt), the console and the CLI."""

from __future__ import annotations

import json
import shlex
from datetime import timedelta
from typing import Any

from conftest import expose_two_versions
from fakes.slack_driver import SlackDriver, serve_wsgi
from fakes.slack_fake import SlackFake

from bot import cli
from bot.console import Console
from handlers.commands import TABLE
from handlers.results import Notice, Result
from handlers.table import Command, Invocation
from model_registry.domain.names import utcnow

VOLATILE = {"id", "created_at", "expires_at", "message_ts", "channel", "at"}


def _normal(data: Any, mask: bool = False) -> Any:
    data = json.loads(json.dumps(data, default=str))

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: "*" if mask and k in VOLATILE else walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(data)


def _cli_data(reg: Any, line: list[str], user: str) -> Any:
    printed: list[str] = []
    assert cli.main(["--json", "--user", user, *line], core=reg, out=printed.append) == 0, printed
    return json.loads(printed[-1])


def _console_result(console: Console, line: str) -> Result:
    before = len(console.results)
    console.handle(line)
    assert len(console.results) == before + 1, f"{line!r} failed in the console"
    return console.results[-1]


def test_cli_and_console_give_the_same_results(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = expose_two_versions(make_registry(sqlite_url, defaults={"approvers": ["U_OK"], "required_approvals": 1}),
                              trained)
    console = Console(reg, "U_REQ", write=lambda _s: None)
    job = reg.jobs.state("iris")[0]["job_id"]
    newest = reg.versions.of_model("iris")["versions"][0]["name"]
    request = reg.promotions.promote("iris", newest, "U_REQ", "better")["id"]
    at = (utcnow() + timedelta(seconds=2)).isoformat(timespec="seconds")
    reads = ["state iris", "jobs -m iris", f"logs {job}", "versions iris", "diff iris", f"show {request}",
             "requests iris", "audit iris --limit 5", "audit verify", f"audit iris --at {at}", "schedule list"]
    for line in reads:  # the same records: the same data
        assert _cli_data(reg, line.split(), "U_REQ") == _normal(_console_result(console, line).data), line
    # changes: each surface makes its own, from the same starting point; ids and times aside, they agree
    on = ["schedule", "iris", "0 3 * * *", "--timezone", "UTC"]
    writes = [(["promote", "iris", newest, "--reason", "again"], None), (["expose", "iris"], None), (on, None),
              (["schedule", "iris", "off"], on)]  # (command, what puts the records back before the console's turn)
    for words, again in writes:
        by_cli = _cli_data(reg, words, "U_REQ")
        if again:
            _console_result(console, shlex.join(again))
        by_console = _console_result(console, shlex.join(words)).data
        assert _normal(by_cli, mask=True) == _normal(by_console, mask=True), words


def whoami(inv: Invocation) -> Result:
    """A command declared only here, in the test."""
    return Notice(f"{inv.user} acts through {inv.surface.value}", {"user": inv.user})


def test_a_command_added_to_the_table_reaches_every_surface(make_registry: Any, sqlite_url: str) -> None:
    reg = make_registry(sqlite_url)
    TABLE.add(Command("whoami", "who is acting", whoami))
    try:
        # the CLI: parsed with the grammar built from the table, its data printed as JSON
        assert _cli_data(reg, ["whoami"], "U_CLI") == {"text": "U_CLI acts through cli", "user": "U_CLI"}
        # the console
        shown: list[str] = []
        Console(reg, "U_CONSOLE", write=shown.append).handle("/ml whoami")
        assert "U_CONSOLE acts through chat" in "\n".join(shown)
        # Slack: a signed slash command through Bolt, the answer posted to the response_url
        _over_slack(reg)
    finally:
        TABLE.remove("whoami")
    shown.clear()
    Console(reg, "U_CONSOLE", write=shown.append).handle("/ml whoami")
    assert "unknown command 'whoami'" in "\n".join(shown)


def _over_slack(reg: Any) -> None:
    from bot.app import create_bot
    from bot.web import WebApp
    from model_registry.config import SlackSettings

    secret = "table-test-secret"
    with SlackFake(channels={"C0TABLE": "table"}) as fake:
        settings = SlackSettings.from_env({"SLACK_BOT_TOKEN": fake.token, "SLACK_SIGNING_SECRET": secret,
                                           "SLACK_API_URL": fake.base_url})
        bot = create_bot(settings, build=lambda: reg)
        with serve_wsgi(WebApp(bot)) as url:
            driver = SlackDriver(url, secret, response_urls=fake.response_url)
            try:
                assert driver.command("whoami", user_id="U0SLACK", channel_id="C0TABLE").status == 200
                answer = fake.wait_for(lambda: next((r for r in fake.responses
                                                     if "U0SLACK acts through chat" in json.dumps(r["payload"])),
                                                    None), timeout=10)
                assert answer["payload"]["response_type"] == "ephemeral"
                assert driver.command("help whoami", user_id="U0SLACK", channel_id="C0TABLE").status == 200
                fake.wait_for(lambda: any("usage: /ml whoami" in json.dumps(r["payload"]) for r in fake.responses),
                              timeout=10)
            finally:
                driver.close()
                bot.stop()
