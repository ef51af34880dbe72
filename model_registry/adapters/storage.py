"""Where training outputs live: a local folder or a gs:// bucket, behind one small interface."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Protocol, runtime_checkable

from model_registry.domain.errors import ArtifactError


class Storage(Protocol):
    def read_bytes(self, uri: str) -> bytes: ...
    def write_bytes(self, uri: str, data: bytes, if_generation_match: int | None = None) -> None: ...
    def exists(self, uri: str) -> bool: ...
    def upload_file(self, local_path: Path, uri: str) -> None: ...
    def join(self, base: str, *parts: str) -> str: ...

    def list_files(self, prefix: str) -> list[str]:
        """Paths of the files under the folder `prefix`, relative to it (sorted)."""

    def download_file(self, uri: str, local_path: Path) -> None: ...


@runtime_checkable
class SignsUrls(Protocol):
    """Storage that can hand out time-limited URLs to its objects (Cloud Storage's signed URLs)."""

    def signed_url(self, uri: str, expiration: timedelta, filename: str | None = None) -> str: ...


class LocalStorage:
    """The embedded backend's bucket: plain files under $STARCHART_HOME/bucket."""

    def read_bytes(self, uri: str) -> bytes:
        try:
            return Path(uri).read_bytes()
        except FileNotFoundError as exc:
            raise ArtifactError(f"{uri} does not exist", "check that the training job wrote it") from exc
        except OSError as exc:
            raise ArtifactError(f"cannot read {uri}: {exc.strerror}", "check the file's permissions") from exc

    def write_bytes(self, uri: str, data: bytes, if_generation_match: int | None = None) -> None:
        path = Path(uri)
        if if_generation_match == 0 and path.exists():
            raise ArtifactError(f"{uri} already exists", "a record is written once; use a new train path")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def exists(self, uri: str) -> bool:
        return Path(uri).exists()

    def upload_file(self, local_path: Path, uri: str) -> None:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local_path, uri)

    def join(self, base: str, *parts: str) -> str:
        return str(Path(base, *parts))

    def list_files(self, prefix: str) -> list[str]:
        root = Path(prefix)
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    def download_file(self, uri: str, local_path: Path) -> None:
        local_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(uri, local_path)
        except OSError as exc:
            raise ArtifactError(f"cannot copy {uri}: {exc.strerror}", "check that the file is there") from exc

