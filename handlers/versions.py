"""/ml expose, versions, diff, predict, pull."""

from __future__ import annotations

import argparse
import json
from typing import Any

from handlers.context import Ctx, Deps
from handlers.grammar import model_of


def expose(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    model = model_of(args)
    result = deps.registry.versions.expose(model, ctx.user)
    lines = [f"• exposed `{v['name']}` from `{v['job_id']}` "
             + " ".join(f"{k}={_number(v2)}" for k, v2 in v["metrics"].items()) for v in result["exposed"]]
    lines += [f"• :warning: {e['error']}" for e in result["errors"]]
    body = "\n".join(lines) or "Nothing new to expose: no succeeded job without a version."
    ctx.ephemeral(f"Expose {model}", [deps.render.section(f"*Expose {model}*\n{body}")])


def _number(value: Any) -> str:
    """A metric value: a number, or the "NaN"/"Infinity" text a diverged run leaves (see Versions.expose)."""
    return format(value, ".4g") if isinstance(value, (int, float)) else str(value)


def versions(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    data = deps.registry.versions.of_model(model_of(args))
    text, blocks, _ = deps.render.table(
        f"Versions of {data['model']} (default {data['default'] or 'none'})", data["versions"][:40],
        [("name", "VERSION"), ("is_default", "DEFAULT"), ("created_at", "CREATED"), ("trained_by", "TRAINED BY"),
         ("metrics", "METRICS")])
    ctx.ephemeral(text, blocks)


def diff(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    result = deps.registry.versions.diff(args.model, args.version, args.base)
    base = result["base"]["name"] if result.get("base") else "(none)"
    text, blocks = deps.render.diff_message(f"{args.model}: {result['candidate']['name']} against {base}", result)
    ctx.ephemeral(text, blocks)


def predict(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    answer = deps.registry.predictions.predict(args.model, args.instances or "", version=args.version)
    result = {k: v for k, v in answer.items() if k in ("predictions", "outputs")}
    count = len(answer["predictions"]) if "predictions" in answer else None
    title = f"Predictions of {answer['model']} {answer['version']}" + (f" ({count})" if count is not None else "")
    ctx.ephemeral(*deps.render.plain_text(title, json.dumps(result, indent=1)))


def pull(deps: Deps, ctx: Ctx, args: argparse.Namespace, _extra: Any = None) -> None:
    """The version's SavedModel as a .tar.gz in the conversation, for use on a laptop or in a client."""
    pulled = deps.registry.predictions.pull_archive(args.model, args.version)
    inputs = ", ".join(sorted((pulled["signature"].get("inputs") or {}))) or "-"
    comment = (f"{pulled['model']} {pulled['version']} — SavedModel ({pulled['files']} files), serving_default "
               f"inputs: {inputs}. Unpack it and load it with tf.saved_model.load(FOLDER).")
    ctx.client.files_upload_v2(channel=ctx.channel, file=pulled["data"], filename=pulled["filename"],
                               title=pulled["filename"], initial_comment=comment)
