"""expose, versions, diff, predict, pull, chart."""

from __future__ import annotations

import argparse

from handlers.grammar import model_of
from handlers.results import (
    Chart,
    Compared,
    Diff,
    Exposed,
    Predictions,
    Pulled,
    PulledArchive,
    PulledLite,
    Result,
    SignedUrls,
    Versions,
)
from handlers.table import Invocation, Surface
from model_registry.domain.lite_check import FORMATS


def expose(inv: Invocation) -> Result:
    model = model_of(inv.args)
    return Exposed(model, inv.core.versions.expose(model, inv.user))


def versions(inv: Invocation) -> Result:
    return Versions(inv.core.versions.of_model(model_of(inv.args)))


def diff_arguments(p: argparse.ArgumentParser, _cli: bool) -> None:
    p.add_argument("model")
    p.add_argument("version", nargs="?")
    p.add_argument("base", nargs="?")


def diff(inv: Invocation) -> Result:
    args = inv.args
    return Diff(args.model, inv.core.versions.diff(args.model, args.version, args.base))


def predict_arguments(p: argparse.ArgumentParser, cli: bool) -> None:
    p.add_argument("model")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", help="a version (default: the model's default)")
    which.add_argument("--compare", metavar="VERSION", help="that version and the default, side by side")
    p.add_argument("instances", nargs="?", metavar="JSON",
                   help='an instance {"input": value, ...}, a list of them, or {"instances": [...]}'
                        + (" (- or nothing: read standard input)" if cli else ""))


def predict(inv: Invocation) -> Result:
    payload = inv.args.instances
    if payload in (None, "-") and inv.read_stdin is not None:
        payload = inv.read_stdin()
    if inv.args.compare:
        return Compared(inv.core.predictions.compare(inv.args.model, payload or "", inv.args.compare))
    return Predictions(inv.core.predictions.predict(inv.args.model, payload or "", version=inv.args.version))


def pull_arguments(p: argparse.ArgumentParser, cli: bool) -> None:
    p.add_argument("model")
    p.add_argument("version", nargs="?")
    p.add_argument("--format", choices=FORMATS, default="savedmodel",
                   help="savedmodel (default), or tflite: a TensorFlow Lite file for devices, checked against the "
                        "SavedModel when it is made")
    if cli:
        where = p.add_mutually_exclusive_group()
        where.add_argument("--to", metavar="DIR", help="folder to create (default ./MODEL-VERSION)")
        where.add_argument("--url", action="store_true",
                           help="Cloud Storage (vertex backend): print signed URLs valid for 1 hour instead of "
                                "downloading (tflite: uploaded beside the version's files first, or reused)")


def pull(inv: Invocation) -> Result:
    """The CLI fills a folder (or prints signed URLs); chat gets a file: the SavedModel as a .tar.gz, or the .tflite."""
    args, copies = inv.args, inv.core.copies
    if inv.surface is Surface.CLI:
        if args.url:
            return SignedUrls(copies.signed_urls(args.model, args.version, args.format))
        pulled = copies.pull(args.model, args.version, args.to, args.format)
        return PulledLite(pulled) if args.format == "tflite" else Pulled(pulled)
    if args.format == "tflite":
        return PulledLite(copies.tflite(args.model, args.version))
    return PulledArchive(copies.pull_archive(args.model, args.version))


def chart_arguments(p: argparse.ArgumentParser, cli: bool) -> None:
    p.add_argument("model")
    p.add_argument("metric", nargs="?", help="a metric of its versions (default: the gate's, else the first)")
    if cli:
        p.add_argument("--to", metavar="FILE", default=".",
                       help="PNG file to write (default: MODEL-METRIC-history.png here)")


def chart(inv: Invocation) -> Result:
    """The CLI writes the PNG to a file; chat gets it as a file in the conversation."""
    args = inv.args
    to = args.to if inv.surface is Surface.CLI else None
    return Chart(inv.core.charts.history(args.model, args.metric, to=to))
