"""The Registry: every use case of the core in one object per process (CLI, console, Slack, worker).

Each use case runs in one unit of work (one transaction) and records its audit event in it. The
groups live in their own modules: training, exposing, promotions, audit_trail, schedules, serving.
"""

from __future__ import annotations

from model_registry.audit_trail import AuditTrail
from model_registry.exposing import Exposing
from model_registry.promotions import Promotions
from model_registry.schedules import Schedules
from model_registry.serving import Serving
from model_registry.training import Training
from model_registry.views import iso, job_view, request_view, version_view

__all__ = ["Registry", "iso", "job_view", "request_view", "version_view"]


class Registry(Training, Exposing, Promotions, AuditTrail, Schedules, Serving):
    """The service layer: one instance per process."""
