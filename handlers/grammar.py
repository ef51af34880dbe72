"""The command grammar shared by `starchart` (CLI) and `/ml` (Slack, console): one parser, two adapters."""

from __future__ import annotations

import argparse


class Usage(Exception):
    """A command that does not parse; its text is the usage to show."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise Usage(f"{self.prog}: {message}")


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_pos", nargs="?", metavar="MODEL")
    p.add_argument("-m", "--model", dest="model_opt", metavar="MODEL", help="model name (StarChart flag)")


def build_parser(prog: str = "starchart", cli: bool = True) -> Parser:
    """The whole grammar; `cli` adds the CLI's global --user/--json and the demo command."""
    parser = Parser(prog=prog, description="Train, expose, review and apply TensorFlow models.", add_help=cli)
    if cli:
        parser.add_argument("--user", help="who is acting (default: $STARCHART_USER or local:<login>)")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    if cli:  # `starchart approve 3 --user U` as well as `starchart --user U approve 3`
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("--user", default=argparse.SUPPRESS, help="who is acting")
        common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
        plain_add = sub.add_parser
        sub.add_parser = lambda *a, **k: plain_add(*a, parents=[common], **k)  # type: ignore[method-assign]

    p = sub.add_parser("train", help="start a training job: train MODEL [-M MODULE] [-- ARGS]")
    _model_arg(p)
    p.add_argument("-M", "--module", help="python module to run (default trainer.task)")
    p.add_argument("-s", "--scale-tier", help="BASIC, STANDARD_1, PREMIUM_1, BASIC_GPU")
    p.add_argument("-r", "--region")
    p.add_argument("--machine-type")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--accelerator", help="TYPE:COUNT")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    for name, help_text in (("state", "jobs of a model and their states"), ("jobs", "alias of state"),
                            ("expose", "turn succeeded jobs into versions"), ("versions", "versions of a model"),
                            ("requests", "promotion requests of a model")):
        _model_arg(sub.add_parser(name, help=help_text))
    p = sub.add_parser("logs", help="a job's log")
    p.add_argument("job_id")
    p.add_argument("--tail", type=int, default=40)
    p = sub.add_parser("cancel", help="cancel a running job")
    p.add_argument("job_id")
    p = sub.add_parser("diff", help="diff MODEL [VERSION [BASE]]")
    p.add_argument("model")
    p.add_argument("version", nargs="?")
    p.add_argument("base", nargs="?")
    p = sub.add_parser("promote", help="open a promotion request for a version")
    p.add_argument("model")
    p.add_argument("version")
    p.add_argument("--reason")
    for name, help_text in (("apply", "request the version marked isDefault in models/MODEL.yaml"),
                            ("rollback", "request the previous default back")):
        p = sub.add_parser(name, help=help_text)
        _model_arg(p)
        p.add_argument("--reason")
    p = sub.add_parser("approve", help="approve a promotion request")
    p.add_argument("request", type=_request_id)
    p = sub.add_parser("reject", help="reject a promotion request (a reason is required)")
    p.add_argument("request", type=_request_id)
    p.add_argument("--reason", required=True)
    p = sub.add_parser("show", help="show a promotion request")
    p.add_argument("request", type=_request_id)
    p = sub.add_parser("audit", help="audit [MODEL] [filters] | audit verify")
    p.add_argument("target", nargs="?", metavar="MODEL|verify|checkpoint")
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--actor", "--by", *([] if cli else ["--user"]), dest="actor", help="only events by this user")
    p.add_argument("--action")
    p.add_argument("--version")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--csv", action="store_true")
    p.add_argument("--at", help="which version was the default of MODEL at this time")
    if not cli:
        p.add_argument("--share", action="store_true", help="post the answer to the channel")
    p = sub.add_parser("predict", help="predict MODEL [--version V] JSON: predictions of the served model")
    p.add_argument("model")
    p.add_argument("--version", help="a version (default: the model's default)")
    p.add_argument("instances", nargs="?", metavar="JSON",
                   help='an instance {"input": value, ...}, a list of them, or {"instances": [...]}'
                        + (" (- or nothing: read standard input)" if cli else ""))
    p = sub.add_parser("pull", help="pull MODEL [VERSION]: the SavedModel of a version (default: the default), "
                                    + ("into a folder" if cli else "as a .tar.gz file"))
    p.add_argument("model")
    p.add_argument("version", nargs="?")
    if cli:
        p.add_argument("--to", metavar="DIR", help="folder to create (default ./MODEL-VERSION)")
    p = sub.add_parser("schedule", help='schedule list | schedule MODEL "CRON" [-- ARGS] | schedule MODEL off')
    p.add_argument("target", nargs="?", metavar="list|MODEL")
    p.add_argument("cron", nargs="?", metavar='"CRON"|off')
    p.add_argument("--timezone", default="UTC", help="IANA time zone of the cron (default UTC)")
    if cli:
        sub.add_parser("demo", help="the whole flow on a fresh temporary home")
        p = sub.add_parser("clock", help="start scheduled trainings when they are due")
        p.add_argument("--once", action="store_true", help="one pass, then exit")
        p = sub.add_parser("serve", help="the Slack bot over HTTP (POST /slack/events, GET /healthz)")
        p.add_argument("--port", type=int)
        p.add_argument("--workers", type=int)
        sub.add_parser("socket", help="the Slack bot over Socket Mode")
        sub.add_parser("console", help="type /ml commands in a terminal; cards render as text (--user U)")
        p = sub.add_parser("worker", help="follow jobs, reconcile interrupted applies, expire requests")
        p.add_argument("--once", action="store_true", help="one pass, then exit")
    return parser


def _request_id(text: str) -> int:
    value = text.lstrip("#").upper().removeprefix("R")
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"invalid promotion request id {text!r} (use the number, e.g. 7)")
    return int(value)


def model_of(args: argparse.Namespace) -> str:
    model = args.model_opt or args.model_pos
    if not model:
        raise Usage(f"starchart {args.command}: a model is required (MODEL or -m MODEL)")
    return model


