"""What every group of use cases shares: the records' database (units of work) and the catalog of names."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, cast

from sqlalchemy import CursorResult, Result, select
from sqlalchemy.orm import Session, sessionmaker

from model_registry import listings, names
from model_registry.config import ProjectConfig
from model_registry.db import make_engine, migrate, reader
from model_registry.errors import NotFound
from model_registry.policy import MembersOf
from model_registry.records import (
    Approval,
    ModelRecord,
    Version,
)


class Database:
    """The records' database, migrated when opened: units of work for changes, read-only sessions for reads."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.reader = reader(self.engine)  # read-only work: no write lock on SQLite, no transaction on PostgreSQL
        self.reads = sessionmaker(self.reader, expire_on_commit=False)

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        """One transaction: every state change commits with its audit event, or neither does."""
        with self.sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def rows_changed(result: Result[Any]) -> int:
    """How many rows an UPDATE changed: the conditional updates that make a transition happen once."""
    return cast(CursorResult[Any], result).rowcount


class Catalog:
    """Look-ups every use case makes: which models exist, a model's version, a request's approvals, group members."""

    def __init__(self, db: Database, config: ProjectConfig, members_of: MembersOf | None = None) -> None:
        self.db = db
        self.config = config
        self._members_of = members_of

    def members_of(self, group: str) -> list[str]:
        """A user group's members: from Slack when the bot runs, else from starchart.yaml's `usergroups`."""
        if self._members_of is not None:
            return list(self._members_of(group))
        return list(self.config.usergroups.get(group, ()))

    def known_models(self) -> list[str]:
        base = self.config.trainer_base
        on_disk = {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
        return sorted(on_disk | set(self.config.models))

    def require_model(self, model: str, session: Session | None = None) -> None:
        names.validate_model_name(model)
        if model in self.known_models():
            return
        if session is not None and session.get(ModelRecord, model) is not None:
            return
        if session is None and listings.model_exists(self.db.engine, model):
            return
        hint = names.suggest(model, self.known_models()) or f"known models: {', '.join(self.known_models()) or 'none'}"
        raise NotFound(f"unknown model {model!r}", hint)

    def version(self, s: Session, model: str, name: str) -> Version:
        v = s.execute(select(Version).where(Version.model == model, Version.name == name)).scalar_one_or_none()
        if v is None:
            recent = s.execute(select(Version.name).where(Version.model == model)
                               .order_by(Version.name.desc()).limit(5)).scalars().all()
            hint = names.suggest(name, list(recent)) or (
                f"recent versions: {', '.join(recent)}" if recent else f"run `expose {model}` after a training")
            raise NotFound(f"{model} has no version {name!r}", hint)
        return v

    def approvals(self, s: Session, request_id: int) -> list[Approval]:
        return list(s.execute(select(Approval).where(Approval.request_id == request_id)
                              .order_by(Approval.id)).scalars())

