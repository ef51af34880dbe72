"""train, state (jobs), logs, cancel."""

from __future__ import annotations

import argparse

from handlers.grammar import UNKNOWN_HINT, Usage, model_arg, model_of
from handlers.results import JobCancelled, JobEnded, JobProgress, Jobs, JobStarted, JobSubmitted, Log, Result
from handlers.table import Invocation, Surface


def train_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    model_arg(p)
    p.add_argument("-M", "--module", help="python module to run (default trainer.task)")
    p.add_argument("-s", "--scale-tier", help="BASIC, STANDARD_1, PREMIUM_1, BASIC_GPU")
    p.add_argument("-r", "--region")
    p.add_argument("--machine-type")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--accelerator", help="TYPE:COUNT")
    p.add_argument("--wait", action="store_true", help="follow the job until it ends")
    p.set_defaults(**{UNKNOWN_HINT: "the trainer's own arguments go after --, as in: train iris -- --epochs=5"})


def train(inv: Invocation) -> Result:
    """Start a job; the CLI's --wait follows it here (chat follows its message instead)."""
    args = inv.args
    if inv.trainer_args is not None and "--" in inv.trainer_args:
        raise Usage("starchart train: only one `--` separates the trainer's arguments")
    job = inv.core.jobs.train(model_of(args), inv.user, module=args.module, args=inv.trainer_args,
                              scale_tier=args.scale_tier, region=args.region, machine_type=args.machine_type,
                              workers=args.workers, accelerator=args.accelerator,
                              message_channel=inv.channel if inv.outbox else None)
    if not (args.wait and inv.surface is Surface.CLI):
        return JobStarted(job)
    inv.progress(JobSubmitted(job))
    return JobEnded(inv.core.jobs.wait(job["job_id"], on_change=lambda j: inv.progress(JobProgress(j))))


def state(inv: Invocation) -> Result:
    model = model_of(inv.args)
    return Jobs(model, inv.core.jobs.state(model))


def logs_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("job_id")
    p.add_argument("--tail", type=int, default=40)


def logs(inv: Invocation) -> Result:
    return Log(inv.args.job_id, inv.core.jobs.logs(inv.args.job_id, tail=inv.args.tail))


def job_id_argument(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("job_id")


def cancel(inv: Invocation) -> Result:
    return JobCancelled(inv.core.jobs.cancel(inv.args.job_id, inv.user))
