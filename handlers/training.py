"""/ml train, state (jobs), logs, cancel — and the training message that follows a job to its end."""

from __future__ import annotations

import argparse
import time
from typing import Any

from handlers.context import Ctx, Deps, run_reported
from handlers.grammar import model_of

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def train(deps: Deps, ctx: Ctx, args: argparse.Namespace, trainer_args: list[str] | None) -> None:
    job = deps.registry.jobs.train(model_of(args), ctx.user, module=args.module, args=trainer_args,
                              scale_tier=args.scale_tier, region=args.region, machine_type=args.machine_type,
                              workers=args.workers, accelerator=args.accelerator)
    text, blocks = deps.render.job_message(job)
    posted = ctx.client.chat_postMessage(channel=ctx.channel, text=text, blocks=blocks, unfurl_links=False)
    run_reported(deps, ctx, lambda: follow(deps, ctx, job, posted["channel"], posted["ts"]), long=True)


def follow(deps: Deps, ctx: Ctx, job: dict[str, Any], channel: str, ts: str, timeout: float = 24 * 3600) -> None:
    """Edit the training message as the job goes: queued → running (elapsed) → succeeded (metrics) / failed."""
    reg = deps.registry
    shown, last_edit, deadline = job["state"], time.monotonic(), time.monotonic() + timeout
    while job["state"] not in TERMINAL and time.monotonic() < deadline:
        time.sleep(deps.follow_interval)
        reg.jobs.refresh(job["model"])
        job = reg.jobs.get(job["job_id"])
        due = job["state"] == "RUNNING" and time.monotonic() - last_edit >= deps.running_update_every
        if job["state"] != shown or due:
            metrics = reg.jobs.metrics(job["job_id"]) if job["state"] == "SUCCEEDED" else None
            text, blocks = deps.render.job_message(job, metrics)
            ctx.client.chat_update(channel=channel, ts=ts, text=text, blocks=blocks)
            shown, last_edit = job["state"], time.monotonic()


def state(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    model = model_of(args)
    jobs = deps.registry.jobs.state(model, limit=40)
    text, blocks, truncated = deps.render.table(
        f"Jobs of {model}", jobs, [("job_id", "JOB"), ("state", "STATE"), ("created_at", "CREATED"),
                                   ("version", "VERSION"), ("requested_by", "BY"), ("args", "ARGS")],
        footer="newest 40 shown" if len(jobs) == 40 else None)
    ctx.ephemeral(text, blocks)


def logs(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    text, blocks = deps.render.plain_text(f"Log of {args.job_id}", deps.registry.jobs.logs(args.job_id, tail=args.tail))
    ctx.ephemeral(text, blocks)


def cancel(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    job = deps.registry.jobs.cancel(args.job_id, ctx.user)
    ctx.ephemeral(f"Job {job['job_id']} {job['state'].lower()}")
