"""Trainer arguments under policy: which flags a person may pass, and where path-valued arguments may point."""

from __future__ import annotations

import posixpath
import re
from typing import Iterable, Sequence

from model_registry.domain.errors import InvalidInput

TRAIN_PATH = "TRAIN_PATH"  # the literal replaced by the job's train path (DESIGN.md)
_NUMBER = re.compile(r"^-\.?\d")  # a negative number is a value, not a flag
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def substitute_train_path(args: Iterable[str], train_path: str) -> tuple[str, ...]:
    return tuple(a.replace(TRAIN_PATH, train_path) for a in args)


def flag_name(token: str) -> str | None:
    """`--epochs` of `--epochs=5`; None for a value (a token not starting with '-', or a negative number)."""
    if not token.startswith("-") or _NUMBER.match(token):
        return None
    return token.split("=", 1)[0]


def values_of(token: str) -> list[str]:
    """The value parts of one token (`--x=a,b` -> ['a', 'b']; a bare value is its own value)."""
    name = flag_name(token)
    if name is None:
        values = [token]
    elif token.startswith("--"):
        values = [token.split("=", 1)[1]] if "=" in token else []
    else:  # a short option carries its value attached (`-s/data`, `-s=/data`): check every reading of it
        values = [token[2:], *([token.split("=", 1)[1]] if "=" in token else [])]
    return [part for value in values for part in value.split(",") if part]


def looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith("~") or value in (".", "..")


def normalize_root(root: str) -> str:
    """A data root as compared: no trailing slash (so `gs://b/` does not admit `gs://b-other/`)."""
    return root.rstrip("/") or "/"


def under(path: str, root: str) -> bool:
    root = normalize_root(root)
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def path_refusal(value: str, roots: Sequence[str]) -> str | None:
    """Why a path-valued argument may not be passed, or None when it lies under one of `roots`."""
    scheme = _SCHEME.match(value)
    rest = value[scheme.end():] if scheme else value
    segments = rest.replace("\\", "/").split("/")
    if ".." in segments:
        return "`..` is not allowed in a path"
    candidate = value if scheme else posixpath.normpath(value)
    if any(under(candidate, root) for root in roots):
        return None
    if not scheme and not value.startswith("/"):
        return "a path must be absolute (or start with TRAIN_PATH)"
    return "it lies outside the data roots"


def check_trainer_args(model: str, args: Sequence[str], *, allowed: Sequence[str] | None,
                       data_roots: Sequence[str], train_path: str) -> None:
    """Raise InvalidInput unless every flag is in `allowed` (None: any flag) and every path-valued argument lies
    under `data_roots` or `train_path`. `args` have TRAIN_PATH replaced already."""
    for token in args:
        name = flag_name(token)
        if allowed is not None and name is not None and name not in allowed:
            listed = ", ".join(allowed) if allowed else "none (this model takes no trainer arguments from chat)"
            raise InvalidInput(f"`{name}` is not a flag you may pass to {model}: allowed are {listed}",
                               f"operators list the flags under `args_allowed` for {model} in starchart.yaml")
        roots = [*data_roots, train_path]
        for value in values_of(token):
            if not looks_like_path(value):
                continue
            why = path_refusal(value, roots)
            if why:
                where = ", ".join([*data_roots, TRAIN_PATH]) if data_roots else TRAIN_PATH
                raise InvalidInput(f"the path `{value}` in `{token}` may not be passed to {model}: {why}",
                                   f"paths must lie under {where}; operators set `data_roots` in starchart.yaml")
