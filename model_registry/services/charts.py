"""Charts of a model: its metric across recent versions (`chart`, and a review card's thread) and the training curves
of a promotion request's candidate beside its default's, from their event files."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, TypedDict

from model_registry.adapters import charts, listings
from model_registry.adapters.db import Database
from model_registry.adapters.listings import VersionRow
from model_registry.adapters.records import PromotionRequest
from model_registry.config import ProjectConfig
from model_registry.domain import names
from model_registry.domain.errors import ArtifactError, InvalidInput, NotFound, StarchartError
from model_registry.services.catalog import Catalog
from model_registry.services.jobs import Jobs

log = logging.getLogger("starchart.charts")
RECENT_VERSIONS = 20  # versions on a history chart (the default and the candidate are always among them)


class ChartView(TypedDict):
    model: str
    kind: str  # "history" | "curves"
    metric: str | None
    versions: list[str]  # what the chart shows, oldest first (curves: candidate, default)
    filename: str
    title: str
    png: bytes
    path: str | None  # where it was written (`chart --to`), else None


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


class Charts:
    def __init__(self, db: Database, catalog: Catalog, config: ProjectConfig, jobs: Jobs) -> None:
        self.db, self.catalog, self.config, self.jobs = db, catalog, config, jobs

    def history(self, model: str, metric: str | None = None, candidate: str | None = None,
                to: str | None = None) -> ChartView:
        """`metric` (default: the model's gate metric, else the newest version's first) across its recent versions,
        the default marked (and `candidate`); with `to` (a file, or a folder for the chart's own file name), the PNG
        is also written there."""
        names.validate_model_name(model)
        self.catalog.require_model(model)
        listing = listings.versions_of(self.db.engine, model)
        rows, default = listing["versions"], listing["default"]
        if not rows:
            raise NotFound(f"{model} has no versions yet", f"train it and `expose {model}` first")
        metric = metric or self._metric_of(model, rows)
        known = sorted({k for row in rows for k, v in row["metrics"].items() if _number(v) is not None})
        if metric not in known:
            raise InvalidInput(f"no version of {model} has a metric {metric!r}" if metric else
                               f"no version of {model} has metrics to chart",
                               f"use one of: {', '.join(known)}" if known else
                               "the trainer writes them to metrics.json; train and expose a version again")
        shown = [r for i, r in enumerate(rows) if i < RECENT_VERSIONS or r["name"] in (default, candidate)]
        points = [(r["name"], value) for r in reversed(shown) if (value := _number(r["metrics"].get(metric)))
                  is not None]
        png = charts.history_png(model, metric, points, default, candidate)
        view: ChartView = {
            "model": model, "kind": "history", "metric": metric, "versions": [n for n, _ in points],
            "filename": f"{model}-{metric}-history.png", "png": png, "path": None,
            "title": f"{metric} of {model}'s last {len(points)} versions (default {default or 'none'})"}
        if to:
            target = Path(to)
            view["path"] = self._write(target / view["filename"] if target.is_dir() else target, png)
        return view

    def for_request(self, request_id: int) -> list[ChartView]:
        """The charts of a review card's thread: the history of the gate's (or first) metric with the candidate
        and the default marked, and the training curves of both. A chart that cannot be made is left out."""
        with self.db.reads() as s:
            req = s.get(PromotionRequest, request_id)
            if req is None:
                raise NotFound(f"no promotion request #{request_id}", "list them with `requests MODEL`")
            model, candidate, base = req.model, req.candidate_version, req.base_version
            jobs = {v: self.catalog.version(s, model, v).job_id for v in (candidate, base) if v}
        out: list[ChartView] = []
        try:
            out.append(self.history(model, candidate=candidate))
        except StarchartError as exc:  # no metric to chart: the card's thread gets the curves only
            log.info("no history chart for request #%s: %s", request_id, exc)
        curves = [(f"candidate {candidate}", self.jobs.curves(jobs[candidate]))]
        if base:
            curves.append((f"default {base}", self.jobs.curves(jobs[base])))
        if any(c is not None for _, c in curves):
            out.append({"model": model, "kind": "curves", "metric": None, "versions": [v for v in (candidate, base) if v],
                        "filename": f"{model}-{candidate}-curves.png", "png": charts.curves_png(model, curves),
                        "path": None, "title": f"Training curves of {candidate}" + (f" and {base}" if base else "")})
        return out

    def _metric_of(self, model: str, rows: list[VersionRow]) -> str | None:
        gate = self.config.policy(model).gate
        if gate is not None:
            return gate.metric
        return next((k for row in rows for k, v in row["metrics"].items() if _number(v) is not None), None)

    @staticmethod
    def _write(path: Path, png: bytes) -> str:
        try:
            path.write_bytes(png)
        except OSError as exc:
            raise ArtifactError(f"cannot write {path}: {exc.strerror}",
                                "pass --to a file in a folder that exists and that you may write to") from exc
        return str(path)
