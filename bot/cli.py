"""`starchart`: the StarChart command line, plus the entry points of the bot's processes."""

from __future__ import annotations

import argparse
import csv
import gc
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from handlers.grammar import Usage, build_parser, model_of
from model_registry.config import default_user
from model_registry.errors import StarchartError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_JOB_FAILED = 0, 1, 2, 4


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, trainer_args = argv[:i], argv[i + 1:]
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        argv, instances = _json_argument(argv)
        args = build_parser().parse_args(argv)
        if instances is not None:
            args.instances = instances
        if args.command is None:
            build_parser().print_help()
            return EXIT_USAGE
        if args.command == "demo":
            from bot.demo import run_demo

            return run_demo()
        if args.command in ("serve", "socket", "console", "worker", "clock"):
            return run_process(args)
        return run(args, trainer_args)
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


def entry() -> None:
    """The `starchart` command: main(), then an exit that skips the interpreter's final garbage collections.

    Those scan every object SQLAlchemy and the rest left behind, about 0.1 s after a command's work is done
    (`train --wait` included). gc.freeze() moves them out of the collector's sight; atexit handlers, buffered
    output and open files are finalised as usual.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


def run_process(args: argparse.Namespace) -> int:
    """The long-running entry points: web, socket, console, worker."""
    if args.command == "serve":
        from bot.serve import serve

        serve(port=args.port, workers=args.workers)
    elif args.command == "socket":
        from bot.serve import socket_mode

        socket_mode()
    elif args.command == "console":
        from bot.console import run_console

        return run_console(user=args.user or default_user())
    elif args.command == "worker":
        from bot.worker import run_worker

        return run_worker(once=args.once)
    elif args.command == "clock":
        from bot.worker import run_clock

        return run_clock(once=args.once)
    return EXIT_OK


def run(args: argparse.Namespace, trainer_args: list[str] | None, registry: Any = None,
        out: Callable[[str], None] = print) -> int:
    from bot import text
    from model_registry.bootstrap import Core
    from model_registry.names import parse_time

    reg = registry or Core.from_env()
    user = args.user or default_user()
    cmd = args.command

    def emit(data: Any, render: Callable[[], str]) -> None:
        out(json.dumps(data, indent=2, default=str) if args.json else render())

    if cmd == "train":
        if trainer_args is not None and any(a == "--" for a in trainer_args):
            raise Usage("starchart train: only one `--` separates the trainer's arguments")
        job = reg.jobs.train(model_of(args), user, module=args.module, args=trainer_args, scale_tier=args.scale_tier,
                        region=args.region, machine_type=args.machine_type, workers=args.workers,
                        accelerator=args.accelerator)
        if not args.wait:
            emit(job, lambda: f"Job {job['job_id']} {job['state']}\n  train path: {job['train_path']}\n"
                              f"  follow it: starchart state {job['model']}")
            return EXIT_OK
        if not args.json:
            out(f"Job {job['job_id']} submitted; train path {job['train_path']}")
        job = reg.jobs.wait(job["job_id"], on_change=None if args.json else lambda j: out(f"  {j['state']}"))
        emit(job, lambda: f"Job {job['job_id']} {job['state']}" + (f"\n{job['error']}" if job["error"] else ""))
        return EXIT_OK if job["state"] == "SUCCEEDED" else EXIT_JOB_FAILED
    if cmd in ("state", "jobs"):
        jobs = reg.jobs.state(model_of(args))
        emit(jobs, lambda: text.table(jobs, [("job_id", "JOB"), ("state", "STATE"), ("created_at", "CREATED"),
                                             ("ended_at", "ENDED"), ("version", "VERSION"),
                                             ("requested_by", "BY"), ("args", "ARGS")]))
        return EXIT_OK
    if cmd == "logs":
        log = reg.jobs.logs(args.job_id, tail=args.tail)
        emit({"job_id": args.job_id, "log": log}, lambda: log)
        return EXIT_OK
    if cmd == "cancel":
        job = reg.jobs.cancel(args.job_id, user)
        emit(job, lambda: f"Job {job['job_id']} {job['state']}")
        return EXIT_OK
    if cmd == "expose":
        result = reg.versions.expose(model_of(args), user)
        lines = [f"exposed {v['name']} from {v['job_id']}" for v in result["exposed"]] or ["nothing new to expose"]
        lines += [f"error: {e['error']}" for e in result["errors"]]
        emit(result, lambda: "\n".join(lines))
        return EXIT_ERROR if result["errors"] else EXIT_OK
    if cmd == "versions":
        data = reg.versions.of_model(model_of(args))
        emit(data, lambda: text.table(data["versions"], [
            ("name", "VERSION"), ("is_default", "DEFAULT"), ("created_at", "CREATED"), ("job_id", "JOB"),
            ("trained_by", "TRAINED BY"), ("metrics", "METRICS")]))
        return EXIT_OK
    if cmd == "diff":
        diff = reg.versions.diff(args.model, args.version, args.base)
        emit(diff, lambda: "\n".join(text.diff_lines(diff)))
        return EXIT_OK
    if cmd in ("promote", "apply", "rollback"):
        if cmd == "promote":
            req = reg.promotions.promote(args.model, args.version, user, args.reason)
        else:
            req = getattr(reg.promotions, cmd)(model_of(args), user, args.reason)
        emit(req, lambda: "\n".join(text.request_lines(req) + [""] + text.diff_lines(req["diff"]) + [
            "", f"approve: starchart approve {req['id']} --user APPROVER"]))
        return EXIT_OK
    if cmd in ("approve", "reject"):
        req = reg.promotions.decide(args.request, user, cmd == "approve", reason=getattr(args, "reason", None))
        if req["state"] == "approved":
            req = reg.promotions.apply_request(req["id"], actor=user)
        emit(req, lambda: "\n".join(text.request_lines(req)))
        return EXIT_ERROR if req["state"] == "failed" else EXIT_OK
    if cmd == "show":
        req = reg.promotions.get(args.request)
        emit(req, lambda: "\n".join(text.request_lines(req) + [""] + text.diff_lines(req["diff"])))
        return EXIT_OK
    if cmd == "requests":
        reqs = reg.promotions.of_model(model_of(args))
        emit(reqs, lambda: text.table(reqs, [("id", "ID"), ("kind", "KIND"), ("candidate", "CANDIDATE"),
                                             ("base", "BASE"), ("state", "STATE"), ("requested_by", "BY"),
                                             ("approvals", "APPROVALS"), ("created_at", "CREATED")]))
        return EXIT_OK
    if cmd == "audit":
        if args.target == "checkpoint":
            cp = reg.audit.checkpoint()
            emit(cp, lambda: f"checkpoint: {cp['count']} events, head {cp['head'][:16]} at {cp['at']}"
                             + ("" if cp["sig"] else " (unsigned: set STARCHART_AUDIT_KEY)"))
            return EXIT_OK
        if args.target == "verify":
            result = reg.audit.verify()
            emit(result.__dict__, lambda: (f"audit chain OK: {result.events} events, head {result.head_hash[:16]}, "
                                           f"{result.checkpoints} checkpoints matched"
                                           if result.ok else f"audit chain BROKEN: {result.problem}"))
            return EXIT_OK if result.ok else EXIT_ERROR
        if args.at:
            if not args.target:
                raise Usage("starchart audit --at: a model is required (audit MODEL --at TIME)")
            answer = reg.audit.default_at(args.target, parse_time(args.at))
            emit(answer, lambda: "\n".join(text.default_at_lines(answer)))
            return EXIT_OK
        filters = {"model": args.target, "since": parse_time(args.since) if args.since else None,
                   "until": parse_time(args.until) if args.until else None, "actor": args.actor,
                   "action": args.action, "version": args.version}
        # --csv exports everything that matches; the table shows --limit rows
        events = reg.audit.all_events(**filters) if args.csv else reg.audit.events(limit=args.limit, **filters)
        if args.csv:
            writer = csv.writer(sys.stdout)
            writer.writerow(["seq", "at", "action", "actor", "model", "version", "request_id", "job_id", "details"])
            for e in events:
                writer.writerow([e["seq"], e["at"], e["action"], e["actor"], e["model"], e["version"],
                                 e["request_id"], e["job_id"], json.dumps(e["details"], sort_keys=True)])
            return EXIT_OK
        emit(events, lambda: text.table(events, [("at", "TIME"), ("action", "ACTION"), ("actor", "ACTOR"),
                                                 ("model", "MODEL"), ("version", "VERSION"),
                                                 ("request_id", "REQUEST"), ("job_id", "JOB"),
                                                 ("details", "DETAILS")]))
        return EXIT_OK
    if cmd == "predict":
        payload = args.instances if args.instances not in (None, "-") else sys.stdin.read()
        answer = reg.predictions.predict(args.model, payload, version=args.version)
        emit(answer, lambda: f"{answer['model']} {answer['version']}:\n" + json.dumps(
            {k: v for k, v in answer.items() if k in ("predictions", "outputs")}, indent=2))
        return EXIT_OK
    if cmd == "pull":
        pulled = reg.predictions.pull(args.model, args.version, args.to)
        emit(pulled, lambda: f"pulled {pulled['model']} {pulled['version']} into {pulled['path']} "
                             f"({pulled['files']} files, {pulled['bytes']:,} bytes)\n"
                             f"  load it: tf.saved_model.load({pulled['path']!r}).signatures['serving_default']")
        return EXIT_OK
    if cmd == "schedule":
        if args.target in (None, "list"):
            rows = reg.schedules.all()
            emit(rows, lambda: text.table(rows, [("model", "MODEL"), ("cron", "CRON"), ("timezone", "TZ"),
                                                 ("enabled", "ON"), ("next_run_at", "NEXT"), ("args", "ARGS")]))
            return EXIT_OK
        if args.cron is None:
            raise Usage('starchart schedule MODEL "CRON" [-- ARGS] | schedule MODEL off | schedule list')
        row = (reg.schedules.disable(args.target, user) if args.cron == "off"
               else reg.schedules.set(args.target, args.cron, user, trainer_args, args.timezone))
        emit(row, lambda: f"{row['model']}: {'every ' + row['cron'] + ' ' + row['timezone'] if row['enabled'] else 'off'}"
                          + (f", next run {row['next_run_at']}" if row["next_run_at"] else ""))
        return EXIT_OK
    raise Usage(f"starchart: unknown command {cmd!r}")


if __name__ == "__main__":
    entry()
