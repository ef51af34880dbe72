"""List queries of the chat commands (`state`, `versions`, model checks): SQLAlchemy Core on the read-only engine.

Times are read as the database's text of a timestamp and cut to the views' form (names.iso_text): parsing a
thousand rows' times into datetimes and formatting them again was half of a `state` on SQLite.
"""

from __future__ import annotations

from typing import Any, TypedDict

from sqlalchemy import ColumnElement, String, bindparam, cast, select
from sqlalchemy.engine import Engine

from model_registry.adapters.db import reader
from model_registry.adapters.records import Job, ModelRecord, Version
from model_registry.domain.names import iso_text


class JobRow(TypedDict):
    """One line of `state`: a job in a model's list."""

    job_id: str
    state: str
    created_at: str | None
    started_at: str | None
    ended_at: str | None
    requested_by: str
    version: str | None
    args: list[str]
    error: str | None


class VersionRow(TypedDict):
    """One line of `versions`."""

    name: str
    job_id: str
    created_at: str | None
    trained_by: str
    metrics: dict[str, Any]
    deployment_uri: str
    is_default: bool


class VersionList(TypedDict):
    model: str
    default: str | None
    versions: list[VersionRow]


_J, _V, _M = Job.__table__.c, Version.__table__.c, ModelRecord.__table__.c


def _as_text(column: ColumnElement[Any]) -> ColumnElement[str]:
    """A DateTime column as text: 'YYYY-MM-DD HH:MM:SS[.ffffff]' on SQLite and on PostgreSQL (ISO DateStyle)."""
    return cast(column, String).label(column.key)


_JOBS = (select(_J.job_id, _J.state, _as_text(_J.created_at), _as_text(_J.started_at), _as_text(_J.ended_at),
                _J.requested_by, _J.version_name, _J.args, _J.error)
         .where(_J.model == bindparam("model")).order_by(_J.ts.desc()).limit(bindparam("limit")))
_DEFAULT = select(_M.default_version).where(_M.name == bindparam("model"))
# the default rides along as a scalar subquery: versions and default come from one statement's snapshot
_VERSIONS = (select(_V.name, _V.job_id, _as_text(_V.created_at), _V.trained_by, _V.metrics, _V.deployment_uri,
                    _DEFAULT.scalar_subquery().label("default_version"))
             .where(_V.model == bindparam("model")).order_by(_V.name.desc()))
_MODEL_KNOWN = select(_M.name).where(_M.name == bindparam("model"))
_NO_LIMIT = 2**31 - 1


def jobs_of(engine: Engine, model: str, limit: int | None = None) -> list[JobRow]:
    """The jobs of `model`, newest first (at most `limit`), as `state` shows them."""
    with reader(engine).connect() as conn:
        rows = conn.execute(_JOBS, {"model": model, "limit": limit or _NO_LIMIT}).all()
    return [
        {"job_id": job_id, "state": state, "created_at": iso_text(created), "started_at": iso_text(started),
         "ended_at": iso_text(ended), "requested_by": by, "version": version, "args": args, "error": error}
        for job_id, state, created, started, ended, by, version, args, error in rows
    ]


def versions_of(engine: Engine, model: str) -> VersionList:
    """The versions of `model`, newest first, and which one is the default, as `versions` shows them."""
    with reader(engine).connect() as conn:
        rows = conn.execute(_VERSIONS, {"model": model}).all()
        default = rows[0].default_version if rows else conn.execute(_DEFAULT, {"model": model}).scalar()
    return {
        "model": model, "default": default,
        "versions": [
            {"name": name, "job_id": job_id, "created_at": iso_text(created), "trained_by": by, "metrics": metrics,
             "deployment_uri": uri, "is_default": name == default}
            for name, job_id, created, by, metrics, uri, _default in rows
        ],
    }


def model_exists(engine: Engine, name: str) -> bool:
    """Whether the database has a record of model `name` (written by its first training or version)."""
    with reader(engine).connect() as conn:
        return conn.execute(_MODEL_KNOWN, {"model": name}).first() is not None
