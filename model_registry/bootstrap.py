"""The core, built once per process: each group of use cases receives what it uses, nothing reaches for more.

    core = bootstrap(Settings.from_env(), ProjectConfig.load(path))
    core.jobs.train("iris", "U123", args=["--epochs=5"])

CLI, console, Slack handlers, worker and clock all hold one `Core`.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_registry.adapters import outbox
from model_registry.adapters.audit_log import AuditLog
from model_registry.adapters.backends.base import Backend
from model_registry.adapters.db import Database
from model_registry.adapters.tflite import TfliteConverter
from model_registry.config import ProjectConfig, Settings
from model_registry.domain.policy import MembersOf
from model_registry.services.audit_trail import AuditTrail
from model_registry.services.canaries import Canaries
from model_registry.services.catalog import Catalog
from model_registry.services.charts import Charts
from model_registry.services.copies import Copies
from model_registry.services.evaluations import Evaluations
from model_registry.services.jobs import Jobs
from model_registry.services.outbox import Outbox
from model_registry.services.overview import Overview
from model_registry.services.predictions import Predictions
from model_registry.services.promotions import Promotions
from model_registry.services.schedules import Schedules
from model_registry.services.versions import Versions


@dataclass(frozen=True)
class Core:
    """Every use case of the product, grouped by what it is about."""

    settings: Settings
    config: ProjectConfig
    db: Database
    audit_log: AuditLog
    backend: Backend
    catalog: Catalog
    jobs: Jobs
    versions: Versions
    promotions: Promotions
    canaries: Canaries
    evaluations: Evaluations
    audit: AuditTrail
    schedules: Schedules
    predictions: Predictions
    copies: Copies
    outbox: Outbox
    charts: Charts
    overview: Overview

    @classmethod
    def from_env(cls, members_of: MembersOf | None = None) -> Core:
        settings = Settings.from_env()
        return bootstrap(settings, ProjectConfig.load(settings.config_path), members_of=members_of)

    def close(self) -> None:
        self.db.dispose()


def make_backend(settings: Settings, config: ProjectConfig) -> Backend:
    """The backend STARCHART_BACKEND names; Google's libraries load only when it is `vertex`."""
    if settings.backend == "vertex":
        from model_registry.adapters.backends.vertex import VertexBackend

        endpoints = {m: p.endpoint for m in config.models if (p := config.policy(m)).endpoint}
        return VertexBackend.from_settings(settings, endpoints=endpoints)
    from model_registry.adapters.backends.local import LocalBackend

    return LocalBackend(settings.home, python=settings.trainer_python,
                        serving_options=lambda model: config.policy(model).serving,
                        predict_timeout=settings.predict_timeout)


def bootstrap(settings: Settings, config: ProjectConfig, backend: Backend | None = None,
              members_of: MembersOf | None = None) -> Core:
    """Open the database (SQLite: migrating it), choose the backend, and wire the groups of use cases."""
    db = Database(settings.database_url)
    audit_log = AuditLog()
    backend = backend or make_backend(settings, config)
    catalog = Catalog(db, config, members_of)
    audit_trail = AuditTrail(db, audit_log, catalog, settings)
    jobs = Jobs(db, audit_log, catalog, config, settings, backend)
    versions = Versions(db, audit_log, catalog, config, backend, jobs)
    promotions = Promotions(db, audit_log, catalog, config, backend, versions, audit_trail,
                            apply_lease=settings.apply_lease, project=settings.gcp_project)
    for kind in (outbox.REVIEW_CARD, outbox.CARD_FILE):  # both render the request: read with their lease
        db.record_views[kind] = lambda s, subject: promotions.read(s, int(subject))
    return Core(
        settings=settings, config=config, db=db, audit_log=audit_log, backend=backend, catalog=catalog, jobs=jobs,
        versions=versions, promotions=promotions, audit=audit_trail,
        canaries=Canaries(db, audit_log, catalog, config, backend, promotions),
        evaluations=Evaluations(db, audit_log, catalog, config, backend, settings.bucket,
                                settings.home / "cache" / "evaluation"),
        schedules=Schedules(db, audit_log, catalog, config, jobs, versions, promotions),
        predictions=Predictions(db, catalog, backend, config),
        copies=Copies(db, catalog, backend, config, TfliteConverter(settings.trainer_python)), outbox=Outbox(db),
        charts=Charts(db, catalog, config, jobs),
        overview=Overview(db, catalog, promotions),
    )
