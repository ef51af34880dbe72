"""expose, versions, diff, predict, pull, chart."""

from __future__ import annotations

import argparse

from handlers.grammar import model_of
from handlers.results import Chart, Diff, Exposed, Predictions, Pulled, PulledArchive, Result, Versions
from handlers.table import Invocation, Surface


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
    p.add_argument("--version", help="a version (default: the model's default)")
    p.add_argument("instances", nargs="?", metavar="JSON",
                   help='an instance {"input": value, ...}, a list of them, or {"instances": [...]}'
                        + (" (- or nothing: read standard input)" if cli else ""))


def predict(inv: Invocation) -> Result:
    payload = inv.args.instances
    if payload in (None, "-") and inv.read_stdin is not None:
        payload = inv.read_stdin()
    return Predictions(inv.core.predictions.predict(inv.args.model, payload or "", version=inv.args.version))


def pull_arguments(p: argparse.ArgumentParser, cli: bool) -> None:
    p.add_argument("model")
    p.add_argument("version", nargs="?")
    if cli:
        p.add_argument("--to", metavar="DIR", help="folder to create (default ./MODEL-VERSION)")


def pull(inv: Invocation) -> Result:
    """The CLI fills a folder; chat gets the SavedModel as a .tar.gz file for a laptop or a client."""
    args = inv.args
    if inv.surface is Surface.CLI:
        return Pulled(inv.core.predictions.pull(args.model, args.version, args.to))
    return PulledArchive(inv.core.predictions.pull_archive(args.model, args.version))


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
