"""`starchart console`: /ml in a terminal, through the same command table as Slack and the CLI.

The console renders every result itself as text (bot.text, in Slack's marks); buttons are numbered choices the
user types, the reject form is a prompt.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bot import text
from handlers.chat import Chat, click, dispatch, report_error, submit_reject, submit_try
from handlers.deps import Deps
from handlers.follow import Follower
from handlers.output import Posted, Upload
from handlers.results import Form, RejectForm, RequestOpened, Result, ReviewCard, TryForm
from handlers.reviews import form_metadata, try_instance, try_metadata
from model_registry.services.evaluations import FOLLOWED

CONSOLE_CHANNEL = "CCONSOLE"


def _says(line: str, title: str) -> bool:
    """Whether a message's first line already says its title (a header, or an error line), marks aside."""
    return re.sub(r"[*`=]", "", title).strip() in re.sub(r"[*`=]", "", line)


class TerminalOutput:
    """handlers.output.Output for a terminal: messages are printed, files saved, forms asked for."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._ts = itertools.count(1)

    def _show(self, prefix: str, message: Result, channel: str, ts: str) -> None:
        shown = text.render(message, text.CHAT)
        lines = shown.lines if shown.lines and _says(shown.lines[0], shown.title) else [shown.title, *shown.lines]
        labels = []
        for choice in shown.choices:
            self.console.buttons.append((choice.action_id, choice.value, channel, ts))
            labels.append(f"[{len(self.console.buttons)}] {choice.label}")
        if labels:
            lines = [*lines, "   ".join(labels)]
        self.console.write("\n".join([prefix, *("  " + line for line in "\n".join(lines).splitlines())]))

    def post(self, channel: str, message: Result, thread_ts: str | None = None) -> Posted:
        ts = f"{next(self._ts)}.000000"
        where = f"#{channel}" + (f" (thread of {thread_ts})" if thread_ts else "")
        self._show(f"[{where} · message {ts}]", message, channel, ts)
        return Posted(channel, ts)

    def update(self, channel: str, ts: str, message: Result) -> None:
        self._show(f"[#{channel} · message {ts} updated]", message, channel, ts)

    def ephemeral(self, message: Result) -> None:
        self._show(f"[only {self.console.user} sees this]", message, CONSOLE_CHANNEL, "")

    def upload(self, channel: str, upload: Upload, thread_ts: str | None = None) -> None:
        comment = text.render(upload.comment, text.CHAT).body if upload.comment is not None else ""
        if upload.data is None:
            self.console.write(f"[file {upload.filename}: {upload.title}]\n{upload.content}")
            return
        path = Path.cwd() / upload.filename  # a binary file (a pulled model) is saved where the console runs
        if path.exists():
            path = Path(tempfile.mkdtemp(prefix="starchart-console-")) / upload.filename
        path.write_bytes(upload.data)
        self.console.write(f"[file {upload.filename}: {len(upload.data):,} bytes, saved as {path}]\n{comment}")

    def open_form(self, form: Form) -> None:
        self.console.pending_form = form
        shown = text.render(form, text.CHAT)
        if isinstance(form, RejectForm):
            self.console.write(f"[form: {shown.title}] type the reason and press Enter (empty to cancel)")
        else:
            self.console.write(f"[form: {shown.title}]\n{shown.body}\ntype an instance as JSON and press Enter "
                               "(empty: the example; a single dash cancels)")


class Console:
    """Reads lines like a Slack user types them; commands and clicks go through the table as in Slack."""

    def __init__(self, core: Any, user: str, write: Callable[[str], None] | None = None,
                 ask: Callable[[str], str] | None = None, follow_interval: float = 0.5) -> None:
        self.user = user
        self.write = write or (lambda s: print(s, flush=True))
        self.ask = ask or input
        self.buttons: list[tuple[str, str, str, str]] = []  # (action id, value, channel, message ts), numbered from 1
        self.pending_form: Form | None = None
        self.results: list[Result] = []  # what each command and click answered, newest last
        self.follow_interval, self.evaluation_timeout = follow_interval, 600.0
        self.out = TerminalOutput(self)
        # no thread: a training's message is followed to its end before the next prompt
        follower = Follower(lambda: core, interval=follow_interval, running_update_every=10.0, background=False,
                            report=report_error)
        self.deps = Deps(core=core, follower=follower)

    def chat(self, channel: str = CONSOLE_CHANNEL, message_ts: str | None = None) -> Chat:
        return Chat(user=self.user, channel=channel, out=self.out, message_ts=message_ts)

    def _reported(self, work: Callable[[], Result]) -> None:
        try:
            self.results.append(work())
        except Exception as exc:  # every failure is told, as Slack's error handler tells it
            report_error(self.out, exc)

    def handle(self, line: str) -> bool:
        """One typed line; False when the user quits."""
        line = line.strip()
        if not line:
            return True
        if line in ("/quit", "/exit", "quit", "exit"):
            return False
        if line.startswith("/as "):
            self.user = line[4:].strip()
            self.write(f"(you are now {self.user})")
            return True
        if line.isdigit():
            self.press(int(line))
            return True
        typed = line[3:] if line.startswith("/ml") else line
        self._reported(lambda: dispatch(self.deps, self.chat(), typed))
        if self.results and isinstance(self.results[-1], RequestOpened):
            self._follow_evaluation(self.results[-1].request["id"])
        return True

    def _follow_evaluation(self, request_id: int) -> None:
        """No worker runs beside a console: a new request's evaluation is run here, in the foreground (as a training
        is followed), and the card shown again with its result."""
        core, deadline = self.deps.core, time.monotonic() + self.evaluation_timeout
        req = core.promotions.get(request_id)
        if (req.get("evaluation") or {}).get("state") not in FOLLOWED:
            return
        self.write("(evaluating the candidate and the default on the same data…)")
        while (req.get("evaluation") or {}).get("state") in FOLLOWED:
            if time.monotonic() > deadline:
                self.write(f"(the evaluation goes on; `show {request_id}` shows it once a worker has finished it)")
                return
            try:
                core.evaluations.follow()
            except Exception as exc:  # told as any failure is; the card keeps saying where it stands
                report_error(self.out, exc)
                return
            time.sleep(self.follow_interval)
            req = core.promotions.get(request_id)
        ts = req.get("message_ts")
        if ts:
            self.out.update(req.get("channel") or CONSOLE_CHANNEL, ts, ReviewCard(req))

    def press(self, number: int) -> None:
        if not 1 <= number <= len(self.buttons):
            self.write(f"(no button [{number}]; {len(self.buttons)} shown so far)")
            return
        action_id, value, channel, ts = self.buttons[number - 1]
        chat = self.chat(channel, ts)
        self._reported(lambda: click(self.deps, chat, action_id, value))
        if isinstance(self.pending_form, RejectForm):
            form, self.pending_form = self.pending_form, None
            reason = self.ask("reason> ").strip()
            if not reason:
                self.write("(cancelled)")
                return
            self._reported(lambda: submit_reject(self.deps, chat, form_metadata(form), reason))
        elif isinstance(self.pending_form, TryForm):
            self._try(chat, self.pending_form)

    def _try(self, chat: Chat, form: TryForm) -> None:
        """The Try form in a terminal: an instance as JSON, checked field by field as the Slack form checks it."""
        self.pending_form = None
        typed = self.ask("instance> ").strip()
        if typed == "-":
            self.write("(cancelled)")
            return
        try:
            given = json.loads(typed) if typed else {name: first for name, _d, _s, first in form.fields}
        except ValueError as exc:
            self.write(f"error: that is not JSON: {exc}")
            return
        if not isinstance(given, dict):
            self.write('error: type one instance as a JSON object: {"input": value, ...}')
            return
        metadata = try_metadata(form)
        texts = {name: value if isinstance(value, str) else json.dumps(value) for name, value in given.items()}
        instance, errors = try_instance(metadata, texts)
        for name, why in errors.items():
            self.write(f"error: {name}: {why}")
        if not errors:
            self._reported(lambda: submit_try(self.deps, chat, metadata, instance))


def run_console(user: str) -> int:
    from model_registry.bootstrap import Core

    console = Console(Core.from_env(), user)
    console.write(f"StarChart console — you are {user}. Type /ml help; /as USER switches user; a number clicks "
                  f"that button; /quit leaves.")
    while True:
        try:
            line = console.ask(f"{console.user}> ")
        except (EOFError, KeyboardInterrupt):
            console.write("")
            return 0
        if not console.handle(line):
            return 0


if __name__ == "__main__":
    sys.exit(run_console(sys.argv[1] if len(sys.argv) > 1 else "local:console"))
