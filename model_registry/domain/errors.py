"""Errors the core raises: each says what was wrong and what to do about it."""

from __future__ import annotations


class StarchartError(Exception):
    """A refusal or failure a user can act on: `message` says what, `hint` says what to do."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} — {self.hint}" if self.hint else self.message


class NotFound(StarchartError):
    """A model, job, version or promotion request that does not exist."""


class InvalidInput(StarchartError):
    """A name, flag or value that is malformed."""


class Refused(StarchartError):
    """A well-formed action that policy or state forbids (not an approver, self-approval, stale...)."""

    def __init__(self, message: str, hint: str = "", reason: str = "refused") -> None:
        super().__init__(message, hint)
        self.reason = reason


class BackendError(StarchartError):
    """The training/serving backend failed; nothing was half-applied."""


class ArtifactError(StarchartError):
    """A training output (SavedModel, metrics.json, model file) is missing or unreadable."""


class SchemaError(StarchartError):
    """The database's schema is not the one this release needs (empty, older, or from a newer release)."""
