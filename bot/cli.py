"""`starchart`: the StarChart command line — every command from the table, plus the entry points of the
bot's processes."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from handlers.commands import TABLE
from handlers.grammar import Usage, build_parser
from handlers.results import JobProgress, JobSubmitted, Result
from handlers.table import Arguments, Invocation, Surface, no_arguments
from model_registry.config import default_user
from model_registry.domain.errors import StarchartError

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------- the processes (not chat commands)

def _once(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("--once", action="store_true", help="one pass, then exit")


def _serve_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--with-worker", action="store_true",
                   help="run the worker and the clock in this process too (one machine: no other process needed)")


def _db_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("action", choices=["upgrade"], help="upgrade: run the migrations the database has not had yet")


@dataclass(frozen=True)
class Process:
    """A long-running entry point: declared like a command, started by main() rather than run through the table."""

    name: str
    help: str
    start: Callable[[argparse.Namespace], int | None]
    arguments: Arguments = no_arguments
    aliases: tuple[str, ...] = ()


def _demo(_args: argparse.Namespace) -> int:
    from bot.demo import run_demo

    return run_demo()


def _serve(args: argparse.Namespace) -> int | None:
    from bot.serve import serve

    serve(port=args.port, workers=args.workers, with_worker=args.with_worker)
    return None


def _db(args: argparse.Namespace) -> int:
    from model_registry.adapters.db import upgrade_database
    from model_registry.config import Settings

    database, migrated = upgrade_database(Settings.from_env().database_url)
    if args.json:
        print(json.dumps({"database": database, "from": migrated.before, "to": migrated.after}))
    else:
        print(f"{database}: {migrated}")
    return EXIT_OK


def _socket(_args: argparse.Namespace) -> int | None:
    from bot.serve import socket_mode

    socket_mode()
    return None


def _console(args: argparse.Namespace) -> int:
    from bot.console import run_console

    return run_console(user=args.user or default_user())


def _worker(args: argparse.Namespace) -> int:
    from bot.worker import run_worker

    return run_worker(once=args.once)


def _clock(args: argparse.Namespace) -> int:
    from bot.worker import run_clock

    return run_clock(once=args.once)


def _outbox_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("--retry", nargs="?", const="failed", metavar="ID",
                   help="deliver failed messages again (all of them, or message ID) once the cause is fixed")


def _outbox(args: argparse.Namespace) -> int:
    """`starchart outbox`: the messages not yet delivered to Slack, and why."""
    from model_registry.bootstrap import Core
    from model_registry.config import SlackSettings

    core = Core.from_env()
    if args.retry:
        again = core.outbox.retry_failed(None if args.retry == "failed" else _message_id(args.retry))
        print(f"{again} failed message(s) will be delivered again")
        return EXIT_OK
    messages = core.outbox.undelivered()
    if args.json:
        print(json.dumps(messages, indent=2, default=str))
    else:
        for line in outbox_lines(messages, slack_configured=bool(SlackSettings.from_env().bot_token)):
            print(line)
    return EXIT_ERROR if any(m["state"] == "failed" for m in messages) else EXIT_OK


def _message_id(raw: str) -> int:
    if not raw.isdigit():
        raise Usage(f"starchart outbox --retry: {raw!r} is not a message id (see `starchart outbox`)")
    return int(raw)


def outbox_lines(messages: list[dict[str, Any]], slack_configured: bool) -> list[str]:
    """One line per undelivered message: what, where, and why it is not there yet."""
    from handlers.chat import slack_hint

    if not messages:
        return ["Every message has been delivered to Slack."]
    lines = []
    for m in messages:
        head = f"#{m['id']} {m['kind'].replace('_', ' ')} {m['subject']} → {m['channel']}"
        if m["state"] == "failed":
            lines.append(f"{head}: failed ({m['error']}) after {m['attempts']} attempt(s) — "
                         f"{slack_hint(m['error']) if m['error'] not in ('record_not_found', 'malformed_payload') else m['last_error']}")
            continue
        why = f"{m['attempts']} attempt(s)" + (f", last: {m['last_error']}" if m["last_error"] else "")
        if m["lease_owner"]:
            why += f"; being delivered by {m['lease_owner']} (lease until {m['lease_until']})"
        lines.append(f"{head}: pending (revision {m['wanted']}, delivered {m['delivered']}), next attempt "
                     f"{m['next_attempt_at']}; {why}")
    if not slack_configured and any(m["state"] == "pending" for m in messages):
        lines.append("Nothing delivers these here: SLACK_BOT_TOKEN is not set (the worker and `starchart serve` "
                     "deliver them when it is).")
    failed = sum(m["state"] == "failed" for m in messages)
    if failed:
        lines.append(f"{failed} failed: fix the cause, then `starchart outbox --retry` delivers them again.")
    return lines


PROCESSES = {p.name: p for p in (
    Process("demo", "the whole flow on a fresh temporary home", _demo),
    Process("clock", "start scheduled trainings when they are due", _clock, _once),
    Process("serve", "the Slack bot over HTTP (POST /slack/events, GET /healthz)", _serve, _serve_arguments),
    Process("socket", "the Slack bot over Socket Mode", _socket),
    Process("console", "type /ml commands in a terminal; cards render as text (--user U)", _console),
    Process("db", "`db upgrade`: migrate the database once (the Procfile's release: step)", _db, _db_arguments),
    Process("worker", "follow jobs, deliver messages, reconcile interrupted applies, expire requests", _worker,
            _once),
    Process("outbox", "messages not yet delivered to Slack, and why", _outbox, _outbox_arguments),
)}


def parser() -> argparse.ArgumentParser:
    return build_parser(TABLE, extra=PROCESSES.values())


# ---------------------------------------------------------------- main

def main(argv: Sequence[str] | None = None, core: Any = None, out: Callable[[str], None] = print) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, trainer_args = argv[:i], argv[i + 1:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        argv, instances = _json_argument(argv)
        args = parser().parse_args(argv)
        if instances is not None:
            args.instances = instances
        if args.command is None:
            parser().print_help()
            return EXIT_USAGE
        if args.command in PROCESSES:
            return PROCESSES[args.command].start(args) or EXIT_OK
        return run(args, trainer_args, core, out)
    except Usage as exc:
        print(f"{exc}\nRun `starchart --help` or `starchart COMMAND --help` for usage.", file=sys.stderr)
        return EXIT_USAGE
    except StarchartError as exc:
        print(f"error: {exc.message}" + (f"\n  hint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _json_argument(argv: list[str]) -> tuple[list[str], str | None]:
    """predict's JSON argument taken out before parsing, so flags may come before or after it (argparse cannot
    match an optional positional that follows a flag)."""
    if "predict" not in argv:
        return argv, None
    for i in range(argv.index("predict") + 1, len(argv)):
        if argv[i][:1] in ("{", "[") or argv[i] == "-":
            return argv[:i] + argv[i + 1:], argv[i]
    return argv, None


def run(args: argparse.Namespace, trainer_args: list[str] | None, core: Any = None,
        out: Callable[[str], None] = print) -> int:
    """One command from the table: its result printed as text (or its data as JSON); the exit code is the result's."""
    from bot import text

    if core is None:
        from model_registry.bootstrap import Core

        core = Core.from_env()

    def progress(result: Result) -> None:  # `train --wait`: submitted, then each state
        if not args.json and isinstance(result, (JobSubmitted, JobProgress)):
            out(text.render(result).body)

    inv = Invocation(core=core, user=args.user or default_user(), args=args, trainer_args=trainer_args,
                     surface=Surface.CLI, progress=progress, read_stdin=sys.stdin.read)
    result = TABLE.run(inv)
    out(json.dumps(result.data, indent=2, default=str) if args.json else text.render(result).body)
    return result.exit_code


def entry() -> None:
    """The `starchart` command: main(), then an exit that skips the interpreter's final garbage collections.

    Those scan every object SQLAlchemy and the rest left behind, about 0.1 s after a command's work is done
    (`train --wait` included). gc.freeze() moves them out of the collector's sight; atexit handlers, buffered
    output and open files are finalised as usual.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
