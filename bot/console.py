"""`starchart console`: the Slack handlers in a terminal. Cards render as text, buttons as numbered choices."""

from __future__ import annotations

import itertools
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from bot import blocks
from handlers.context import Ctx, Deps
from handlers.ml import action_handlers, dispatch
from handlers.reviews import click, reject_submission

CONSOLE_CHANNEL = "CCONSOLE"


def render_blocks(items: list[dict[str, Any]], buttons: list[tuple[str, str, str, str]], channel: str,
                  ts: str) -> list[str]:
    """Block Kit as plain lines; each button gets a number the user types to click it."""
    out: list[str] = []
    for b in items:
        kind = b.get("type")
        if kind == "header":
            out.append(f"== {b['text']['text']} ==")
        elif kind == "section":
            if b.get("text"):
                out.append(_mrkdwn(b["text"]["text"]))
            out += [_mrkdwn(f["text"]) for f in b.get("fields", [])]
        elif kind == "context":
            out.append("   " + " · ".join(_mrkdwn(e.get("text", "")) for e in b["elements"]))
        elif kind == "actions":
            labels = []
            for e in b["elements"]:
                buttons.append((e["action_id"], e.get("value", ""), channel, ts))
                labels.append(f"[{len(buttons)}] {e['text']['text']}")
            out.append("   " + "   ".join(labels))
    return out


def _mrkdwn(text: str) -> str:
    text = text.replace("```", "")
    text = re.sub(r"<[@#]([A-Z0-9_:.\-a-z]+)(\|[^>]*)?>", r"@\1", text)
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


class ConsoleClient:
    """The slice of slack_sdk.WebClient the handlers use, printing to the terminal instead of posting."""

    def __init__(self, console: "Console") -> None:
        self.console = console
        self._ts = itertools.count(1)

    def _show(self, prefix: str, channel: str, ts: str, text: str, items: list[dict[str, Any]] | None) -> None:
        lines = render_blocks(items, self.console.buttons, channel, ts) if items else [_mrkdwn(text)]
        self.console.write("\n".join([prefix, *("  " + line for line in "\n".join(lines).splitlines())]))

    def chat_postMessage(self, channel: str, text: str = "", blocks: Any = None, thread_ts: str | None = None,
                         **_: Any) -> dict[str, Any]:
        ts = f"{next(self._ts)}.000000"
        where = f"#{channel}" + (f" (thread of {thread_ts})" if thread_ts else "")
        self._show(f"[{where} · message {ts}]", channel, ts, text, blocks)
        return {"ok": True, "channel": channel, "ts": ts}

    def chat_update(self, channel: str, ts: str, text: str = "", blocks: Any = None, **_: Any) -> dict[str, Any]:
        self._show(f"[#{channel} · message {ts} updated]", channel, ts, text, blocks)
        return {"ok": True, "channel": channel, "ts": ts}

    def chat_postEphemeral(self, channel: str, user: str, text: str = "", blocks: Any = None,
                           **_: Any) -> dict[str, Any]:
        self._show(f"[only {user} sees this]", channel, "", text, blocks)
        return {"ok": True, "message_ts": ""}

    def files_upload_v2(self, content: str = "", filename: str = "file.txt", title: str = "",
                        file: bytes | None = None, initial_comment: str = "", **_: Any) -> dict[str, Any]:
        if file is None:
            self.console.write(f"[file {filename}: {title}]\n{content}")
            return {"ok": True, "files": [{"name": filename}]}
        path = Path.cwd() / filename  # a binary file (a pulled model) is saved where the console runs
        if path.exists():
            path = Path(tempfile.mkdtemp(prefix="starchart-console-")) / filename
        path.write_bytes(file)
        self.console.write(f"[file {filename}: {len(file):,} bytes, saved as {path}]\n{initial_comment}")
        return {"ok": True, "files": [{"name": filename}]}

    def views_open(self, trigger_id: str | None, view: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.console.pending_modal = view
        self.console.write(f"[form: {view['title']['text']}] type the reason and press Enter (empty to cancel)")
        return {"ok": True, "view": {"id": "VCONSOLE"}}

    def usergroups_users_list(self, usergroup: str, **_: Any) -> dict[str, Any]:
        return {"ok": True, "users": list(self.console.deps.registry.config.usergroups.get(usergroup, ()))}

    def users_info(self, user: str, **_: Any) -> dict[str, Any]:
        return {"ok": True, "user": {"id": user, "name": user}}


class Console:
    """Reads lines like a Slack user types them; the handlers are exactly the Slack ones."""

    def __init__(self, registry: Any, user: str, write: Callable[[str], None] | None = None,
                 ask: Callable[[str], str] | None = None, follow_interval: float = 0.5) -> None:
        self.user = user
        self.write = write or (lambda s: print(s, flush=True))
        self.ask = ask or input
        self.buttons: list[tuple[str, str, str, str]] = []
        self.pending_modal: dict[str, Any] | None = None
        self.client = ConsoleClient(self)
        self.deps = Deps(registry=registry, render=blocks, background=lambda fn: fn(),
                         follow_interval=follow_interval, running_update_every=10.0)
        self.actions = action_handlers(blocks)

    def ctx(self, channel: str = CONSOLE_CHANNEL, message_ts: str | None = None) -> Ctx:
        def respond(text: str = "", blocks: Any = None, **_: Any) -> None:
            self.client.chat_postEphemeral(channel=channel, user=self.user, text=text, blocks=blocks)

        return Ctx(user=self.user, channel=channel, client=self.client, respond=respond, trigger_id="console",
                   message_ts=message_ts)

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
        text = line[3:] if line.startswith("/ml") else line
        dispatch(self.deps, self.ctx(), text)
        return True

    def press(self, number: int) -> None:
        if not 1 <= number <= len(self.buttons):
            self.write(f"(no button [{number}]; {len(self.buttons)} shown so far)")
            return
        action_id, value, channel, ts = self.buttons[number - 1]
        ctx = self.ctx(channel, ts)
        click(self.deps, ctx, self.actions[action_id], value)
        if self.pending_modal is not None:
            modal, self.pending_modal = self.pending_modal, None
            reason = self.ask("reason> ").strip()
            if not reason:
                self.write("(cancelled)")
                return
            meta = modal.get("private_metadata") or json.dumps({})
            reject_submission(self.deps, ctx, meta, reason)


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
