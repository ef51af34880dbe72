"""The service layer's shared part: configuration, database, backend, units of work, name checks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Self

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from model_registry import listings, names
from model_registry.backends.base import Backend
from model_registry.config import ProjectConfig, Settings
from model_registry.db import make_engine, migrate, reader
from model_registry.errors import NotFound
from model_registry.policy import MembersOf
from model_registry.records import (
    Approval,
    ModelRecord,
    Version,
)


class Service:
    """What every group of use cases needs; `Registry` combines the groups."""
    """The service layer: one instance per process, shared by CLI, console, Slack handlers and worker."""

    def __init__(
        self,
        settings: Settings,
        config: ProjectConfig,
        backend: Backend | None = None,
        members_of: MembersOf | None = None,
    ) -> None:
        self.settings = settings
        self.config = config
        self.engine = make_engine(settings.database_url)
        migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.reads = sessionmaker(reader(self.engine), expire_on_commit=False)  # read-only use cases
        self.backend = backend or self._make_backend()
        self._members_of = members_of

    @classmethod
    def from_env(cls, **kwargs: Any) -> Self:
        settings = Settings.from_env()
        return cls(settings, ProjectConfig.load(settings.config_path), **kwargs)

    def _make_backend(self) -> Backend:
        if self.settings.backend == "vertex":
            from model_registry.backends.vertex import VertexBackend  # google.cloud only when chosen

            endpoints = {m: p.endpoint for m in self.config.models if (p := self.config.policy(m)).endpoint}
            return VertexBackend.from_settings(self.settings, endpoints=endpoints)
        from model_registry.backends.local import LocalBackend

        return LocalBackend(self.settings.home)

    def members_of(self, group: str) -> list[str]:
        if self._members_of is not None:
            return list(self._members_of(group))
        return list(self.config.usergroups.get(group, ()))

    @contextmanager
    def unit_of_work(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session

    # ---------------------------------------------------------------- models and names

    def known_models(self) -> list[str]:
        base = self.config.trainer_base
        on_disk = {p.name for p in base.iterdir() if p.is_dir()} if base.is_dir() else set()
        return sorted(on_disk | set(self.config.models))

    def _require_model(self, model: str, session: Session | None = None) -> None:
        names.validate_model_name(model)
        if model in self.known_models():
            return
        if session is not None and session.get(ModelRecord, model) is not None:
            return
        if session is None and listings.model_exists(self.engine, model):
            return
        hint = names.suggest(model, self.known_models()) or f"known models: {', '.join(self.known_models()) or 'none'}"
        raise NotFound(f"unknown model {model!r}", hint)

    def _version(self, s: Session, model: str, name: str) -> Version:
        v = s.execute(select(Version).where(Version.model == model, Version.name == name)).scalar_one_or_none()
        if v is None:
            recent = s.execute(select(Version.name).where(Version.model == model)
                               .order_by(Version.name.desc()).limit(5)).scalars().all()
            hint = names.suggest(name, list(recent)) or (
                f"recent versions: {', '.join(recent)}" if recent else f"run `expose {model}` after a training")
            raise NotFound(f"{model} has no version {name!r}", hint)
        return v

    def _approvals(self, s: Session, request_id: int) -> list[Approval]:
        return list(s.execute(select(Approval).where(Approval.request_id == request_id)
                              .order_by(Approval.id)).scalars())
