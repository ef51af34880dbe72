"""From what a Slack client sends to a parsed command: entities, smart punctuation, mentions, quoting."""

from __future__ import annotations

import argparse
import html
import re
import shlex

from handlers.commands import TABLE
from handlers.grammar import Parser, Usage, build_parser
from model_registry.domain.errors import InvalidInput
from model_registry.domain.names import suggest

MAX_TEXT = 4000  # longer than any real /ml command; refuse rather than parse a pasted novel

_MENTION = re.compile(r"<[@#!]([A-Z0-9]+)(?:\|[^>]*)?>")  # <@U123|name>, <#C123|general>, <!subteam^S1>
_SUBTEAM = re.compile(r"<!subteam\^([A-Z0-9]+)(?:\|[^>]*)?>")
_LINK = re.compile(r"<((?:https?|mailto):[^|>]+)(?:\|[^>]*)?>")
_SMART = str.maketrans({"“": '"', "”": '"', "„": '"', "‘": "'", "’": "'", "‚": "'"})
_DASHED_FLAG = re.compile(r"(^|\s)[—–―]{1,2}(?=\S|\s|$)")


def normalize(text: str) -> str:
    """Undo what Slack clients do to typed text: HTML entities, smart quotes and dashes, mention markup."""
    text = _SUBTEAM.sub(r"\1", text)
    text = _MENTION.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = html.unescape(text).translate(_SMART)
    text = _DASHED_FLAG.sub(lambda m: m.group(1) + "--", text)
    return text.replace("\u00a0", " ").strip()


def tokenize(text: str) -> list[str]:
    if len(text) > MAX_TEXT:
        raise InvalidInput(f"the command is {len(text):,} characters long (at most {MAX_TEXT:,})",
                           "shorten it; put long trainer arguments in starchart.yaml under models.<model>.args")
    try:
        return shlex.split(normalize(text))
    except ValueError as exc:
        raise InvalidInput(f"cannot read the command: {exc}", "close every quote you open") from None


_SLACK_PARSER: list[Parser] = []  # built on first use, again after the table changes


def slack_parser() -> Parser:
    if not _SLACK_PARSER:
        _SLACK_PARSER.append(build_parser(TABLE, prog="/ml", cli=False))
    return _SLACK_PARSER[0]


TABLE.on_change(_SLACK_PARSER.clear)


def usage_text(message: str) -> str:
    """A usage error as the person reads it: an unknown command gets the nearest known one."""
    m = re.search(r"argument (?:command|COMMAND): invalid choice: '([^']*)'", message)  # not another argument's
    if m:
        hint = suggest(m.group(1), TABLE.names())
        return f"unknown command '{m.group(1)}'" + (f" — {hint}" if hint else "") + "\n\n" + slack_parser().format_usage()
    return message


def subcommand_help(name: str | None) -> str:
    parser = slack_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    choices = actions[0].choices if actions else {}
    if name and name in choices:
        return choices[name].format_help()
    return parser.format_help()


_JSON_COMMANDS = ("predict",)  # commands whose last argument is JSON, taken as typed rather than split by shlex


def _json_tail(text: str) -> tuple[str, str | None]:
    """`predict iris --version v1 {"a": 1}` -> ('predict iris --version v1', '{"a": 1}')."""
    clean = normalize(text)
    if clean.split(maxsplit=1)[:1] and clean.split(maxsplit=1)[0] in _JSON_COMMANDS:
        starts = [i for i in (clean.find("{"), clean.find("[")) if i >= 0]
        if starts:
            return clean[:min(starts)], clean[min(starts):].strip()
    return text, None


def parse(text: str) -> tuple[argparse.Namespace, list[str] | None]:
    """Parse `/ml` text into (args, trainer args after `--`). Raises Usage or InvalidInput."""
    text, json_tail = _json_tail(text)
    tokens = tokenize(text)
    trainer_args = None
    if "--" in tokens:
        i = tokens.index("--")
        tokens, trainer_args = tokens[:i], tokens[i + 1:]
    if not tokens or tokens[0] in ("help", "-h", "--help"):
        raise Usage(subcommand_help(tokens[1] if len(tokens) > 1 else None))
    if any(t in ("-h", "--help") for t in tokens):
        raise Usage(subcommand_help(tokens[0]))
    args = slack_parser().parse_args(tokens)
    if json_tail is not None:
        args.instances = json_tail
    return args, trainer_args
