"""The catalog: which models exist, a model's version, a request's approvals, a user group's members."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from model_registry.adapters import listings
from model_registry.adapters.db import Database
from model_registry.adapters.records import (
    Approval,
    ModelRecord,
    Version,
)
from model_registry.config import ProjectConfig
from model_registry.domain import names
from model_registry.domain.errors import NotFound
from model_registry.domain.policy import MembersOf


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
            # a close name is suggested with the recent ones: a version name is a time, so "close" can be far off
            hint = " ".join(filter(None, [names.suggest(name, list(recent)), f"recent versions: {', '.join(recent)}"])) \
                if recent else f"run `expose {model}` after a training"
            raise NotFound(f"{model} has no version {name!r}", hint)
        return v

    def approvals(self, s: Session, request_id: int) -> list[Approval]:
        return list(s.execute(select(Approval).where(Approval.request_id == request_id)
                              .order_by(Approval.id)).scalars())

