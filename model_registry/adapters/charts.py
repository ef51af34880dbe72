"""PNG charts with matplotlib's Agg backend: a metric across a model's versions, and training curves side by side.

Each chart is drawn in a process of its own (`python -m model_registry.adapters.charts`, the request as JSON on
stdin, the PNG on stdout): drawing never holds the GIL of the process that asked (a web process's outbox sender,
beside the threads that ack Slack), and matplotlib never loads there. Figures are made with the object API
(`Figure` + `FigureCanvasAgg`), not pyplot.
"""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from model_registry.domain.errors import ArtifactError
from model_registry.domain.progress import TRAIN, VALIDATION, TrainingCurves

DPI = 100
HISTORY_SIZE = (9.0, 4.5)  # inches: 900 x 450 pixels
CURVE_PANEL = (4.5, 2.6)  # inches per panel: one row per metric, one column per version


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=DPI)
    return out.getvalue()


DRAW_TIMEOUT = 120.0  # seconds a drawing process may take (its first matplotlib import included)


def history_png(model: str, metric: str, points: Sequence[tuple[str, float]], default: str | None,
                candidate: str | None = None) -> bytes:
    """`metric` of each version (oldest first), the default and the candidate marked; 900 x 450 pixels."""
    return _drawn({"chart": "history", "model": model, "metric": metric, "points": [list(p) for p in points],
                   "default": default, "candidate": candidate})


def curves_png(model: str, versions: Sequence[tuple[str, TrainingCurves | None]]) -> bytes:
    """Per-epoch training (solid) and validation (dashed) values of each metric: one row per metric, one column per
    version (e.g. candidate, default); a version without event files gets an empty panel saying so."""
    return _drawn({"chart": "curves", "model": model, "versions": [
        [label, None if curves is None else {"planned_epochs": curves.planned_epochs, "runs": {
            run: {metric: [list(point) for point in series] for metric, series in metrics.items()}
            for run, metrics in curves.runs.items()}}] for label, curves in versions]})


def _drawn(request: dict[str, Any]) -> bytes:
    try:
        done = subprocess.run([sys.executable, "-m", "model_registry.adapters.charts"], input=json.dumps(request).encode(),
                              capture_output=True, timeout=DRAW_TIMEOUT, cwd=Path(__file__).resolve().parents[2])
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"drawing the {request['chart']} chart of {request['model']} took over {DRAW_TIMEOUT:g}s",
                            "the chart is left out; try `chart` again later") from None
    if done.returncode != 0 or not done.stdout.startswith(b"\x89PNG"):
        why = (done.stderr.decode("utf-8", "replace").strip().splitlines() or ["no output"])[-1][:300]
        raise ArtifactError(f"the {request['chart']} chart of {request['model']} could not be drawn: {why}",
                            "check that matplotlib is installed (pip install -e .)")
    return done.stdout


def _curves(data: dict[str, Any] | None) -> TrainingCurves | None:
    if data is None:
        return None
    return TrainingCurves(runs={run: {metric: tuple((int(e), float(v)) for e, v in series)
                                      for metric, series in metrics.items()}
                                for run, metrics in data["runs"].items()},
                          planned_epochs=data.get("planned_epochs"))


def _draw_history(model: str, metric: str, points: Sequence[tuple[str, float]], default: str | None,
                  candidate: str | None = None) -> bytes:
    figure = _figure(*HISTORY_SIZE)
    axes = figure.add_subplot()
    xs = list(range(len(points)))
    values = [value for _, value in points]
    axes.plot(xs, values, marker="o", color="#4c72b0", zorder=2)
    for i, (name, value) in enumerate(points):
        if name == default:
            axes.scatter([i], [value], s=160, marker="*", color="#2a9d3a", zorder=3, label=f"default {name}")
        if name == candidate:
            axes.scatter([i], [value], s=110, marker="D", facecolors="none", edgecolors="#d1495b", linewidths=2,
                         zorder=4, label=f"candidate {name}")
    axes.set_xticks(xs, [name for name, _ in points], rotation=35, ha="right", fontsize=8)
    axes.set_ylabel(metric)
    axes.set_title(f"{model}: {metric} of the last {len(points)} version{'s' if len(points) != 1 else ''}")
    axes.grid(True, alpha=0.3)
    if default in {n for n, _ in points} or candidate in {n for n, _ in points}:
        axes.legend(loc="best", fontsize=8)
    return _png(figure)


def _draw_curves(model: str, versions: Sequence[tuple[str, TrainingCurves | None]]) -> bytes:
    metrics = sorted({m for _, curves in versions if curves for m in curves.metrics()},
                     key=lambda name: (name != "loss", name))
    rows, cols = max(1, len(metrics)), max(1, len(versions))
    figure = _figure(CURVE_PANEL[0] * cols, CURVE_PANEL[1] * rows)
    grid = figure.subplots(rows, cols, squeeze=False, sharex="col", sharey="row")
    for col, (label, curves) in enumerate(versions):
        for row in range(rows):
            axes = grid[row][col]
            metric = metrics[row] if metrics else "loss"
            if row == 0:
                axes.set_title(f"{model} {label}", fontsize=10)
            if col == 0:
                axes.set_ylabel(metric)
            if row == rows - 1:
                axes.set_xlabel("epoch")
            axes.grid(True, alpha=0.3)
            drawn = False
            for run, style in ((TRAIN, "-"), (VALIDATION, "--")):
                series = (curves.runs.get(run, {}).get(metric) or ()) if curves else ()
                finite = [(epoch + 1, value) for epoch, value in series if math.isfinite(value)]
                if finite:
                    axes.plot([e for e, _ in finite], [v for _, v in finite], style, marker=".", label=run)
                    drawn = True
            if drawn:
                axes.legend(loc="best", fontsize=7)
            else:
                axes.text(0.5, 0.5, "no event files" if curves is None else f"no {metric} logged",
                          ha="center", va="center", transform=axes.transAxes, color="grey")
    return _png(figure)


def main() -> int:
    """Draw the chart the JSON on stdin asks for; its PNG on stdout."""
    request = json.loads(sys.stdin.buffer.read())
    if request["chart"] == "history":
        png = _draw_history(request["model"], request["metric"], [(str(n), float(v)) for n, v in request["points"]],
                            request.get("default"), request.get("candidate"))
    else:
        png = _draw_curves(request["model"], [(str(label), _curves(data)) for label, data in request["versions"]])
    sys.stdout.buffer.write(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
