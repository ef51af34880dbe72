"""Copies of a version for use elsewhere: its SavedModel, a checked TensorFlow Lite file, or signed URLs to them."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

from model_registry.adapters.backends.base import Backend
from model_registry.adapters.db import Database
from model_registry.adapters.records import ModelRecord
from model_registry.adapters.storage import LocalStorage, SignsUrls
from model_registry.adapters.tflite import TfliteConverter
from model_registry.config import Evaluation, ProjectConfig
from model_registry.domain import lite_check, names
from model_registry.domain.errors import ArtifactError, InvalidInput, NotFound, Refused
from model_registry.services.catalog import Catalog
from model_registry.services.views import (
    LiteCheck,
    Pulled,
    PulledArchive,
    PulledLite,
    SignedUrls,
    VersionView,
    version_view,
)

FORMATS = lite_check.FORMATS
MAX_ARCHIVE = 50 * 1024 * 1024  # bytes of a pulled copy sent as a file (Slack); larger: `starchart pull`
VERSION_FILE = "starchart-version.json"  # beside a pulled copy: what it is (signature, metrics, program, check)
URL_LIFETIME = timedelta(hours=1)  # how long a signed URL lets its holder download
PROBED = "test values built from the signature"
TFLITE_FOLDER = "tflite"  # beside the version's model/ in its train path: <model>-<version>.tflite and check.json


class Copies:
    """A version's SavedModel or TensorFlow Lite file, for a folder, a chat upload or a signed URL."""

    def __init__(self, db: Database, catalog: Catalog, backend: Backend, config: ProjectConfig,
                 converter: TfliteConverter) -> None:
        self.db, self.catalog, self.backend, self.config, self.converter = db, catalog, backend, config, converter

    def _version(self, model: str, version: str | None) -> VersionView:
        """The version named, or the model's default."""
        names.validate_model_name(model)
        with self.db.reads() as s:
            self.catalog.require_model(model, s)
            if version is None:
                record = s.get(ModelRecord, model)
                version = record.default_version if record else None
                if version is None:
                    raise NotFound(f"{model} has no default version yet", f"name one of `versions {model}`")
            return version_view(self.catalog.version(s, model, version))

    # ---------------------------------------------------------------- the SavedModel

    def pull(self, model: str, version: str | None = None, dest: str | Path | None = None,
             format: str = "savedmodel") -> Pulled | PulledLite:
        """Copy a version (default: the default version) into the folder `dest`, for local use.

        savedmodel: the SavedModel and starchart-version.json (name, signature, metrics, program, digest).
        tflite: <model>-<version>.tflite, checked against the SavedModel (see `tflite`), and starchart-version.json.
        The folder is filled under a temporary name and renamed at the end: an interrupted or refused pull leaves
        nothing behind.
        """
        _check_format(format)
        view = self._version(model, version)
        target = Path(dest or f"{model}-{view['name']}").resolve()
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            raise InvalidInput(f"{target} already exists", "pull into another folder (--to DIR), or remove it")
        if format == "tflite":
            return self._pull_tflite(view, target)
        return self._pull_saved_model(view, target)

    def pull_archive(self, model: str, version: str | None = None) -> PulledArchive:
        """A pulled version as one .tar.gz in memory (for a chat upload): pull()'s answer plus filename and data."""
        view = self._version(model, version)
        with tempfile.TemporaryDirectory(prefix="starchart-pull-") as tmp:
            pulled = self._pull_saved_model(view, Path(tmp) / "model")
            _fits_a_message(model, pulled["version"], pulled["bytes"])
            name = f"{model}-{pulled['version']}"
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w:gz") as tar:
                tar.add(pulled["path"], arcname=name)
        return {**pulled, "path": None, "filename": f"{name}.tar.gz", "data": buf.getvalue()}

    def _pull_saved_model(self, view: VersionView, target: Path) -> Pulled:
        files = self._saved_model_files(view)

        def fill(partial: Path) -> None:
            self._download(view, files, partial)
            (partial / VERSION_FILE).write_text(json.dumps(view, indent=2, sort_keys=True))

        _filled(target, fill)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        return {"model": view["model"], "version": view["name"], "path": str(target), "files": len(files) + 1,
                "bytes": size, "signature": view["signature"], "source": view["deployment_uri"]}

    def _saved_model_files(self, view: VersionView) -> list[str]:
        store, source = self.backend.storage, view["deployment_uri"]
        files = store.list_files(source)
        if "saved_model.pb" not in files:
            raise ArtifactError(f"{source} holds no SavedModel (saved_model.pb is missing)",
                                f"the version's files were moved or deleted; train and expose {view['model']} again")
        return files

    def _download(self, view: VersionView, files: list[str], into: Path) -> None:
        store = self.backend.storage
        for name in files:
            store.download_file(store.join(view["deployment_uri"], name), into / name)

    # ---------------------------------------------------------------- TensorFlow Lite

    def tflite(self, model: str, version: str | None = None) -> PulledLite:
        """A version converted to TensorFlow Lite, in memory (for a chat upload), checked as `pull` checks it."""
        view = self._version(model, version)
        with tempfile.TemporaryDirectory(prefix="starchart-tflite-") as tmp:
            path, check = self._convert(view, Path(tmp))
            data = path.read_bytes()
        _fits_a_message(model, view["name"], len(data))
        return {**self._lite_answer(view, None, len(data), check), "data": data}

    def _pull_tflite(self, view: VersionView, target: Path) -> PulledLite:
        filename = _lite_name(view)
        with tempfile.TemporaryDirectory(prefix="starchart-tflite-") as tmp:
            path, check = self._convert(view, Path(tmp))  # refused before anything is written to the folder

            def fill(partial: Path) -> None:
                shutil.copyfile(path, partial / filename)
                (partial / VERSION_FILE).write_text(json.dumps({**view, "tflite_check": check}, indent=2,
                                                               sort_keys=True))

            _filled(target, fill)
        return self._lite_answer(view, str(target / filename), (target / filename).stat().st_size, check)

    def _lite_answer(self, view: VersionView, path: str | None, size: int, check: LiteCheck) -> PulledLite:
        return {"model": view["model"], "version": view["name"], "format": "tflite", "path": path,
                "filename": _lite_name(view), "bytes": size, "signature": view["signature"],
                "source": view["deployment_uri"], "check": check}

    def _convert(self, view: VersionView, work: Path) -> tuple[Path, LiteCheck]:
        """Convert the version's SavedModel in `work` and check the file: refused unless it answers as the SavedModel
        does on the check's instances, within lite_check.TOLERANCE."""
        model, version = view["model"], view["name"]
        signature = view["signature"] or {}
        instances, on = self._check_instances(model, signature)
        saved = work / "saved_model"
        self._download(view, self._saved_model_files(view), saved)
        conversion = self.converter.convert(saved, work / _lite_name(view), instances, f"{model} {version}")
        result = lite_check.compare(conversion.saved, conversion.lite, signature.get("outputs") or {})
        if not result["ok"]:
            raise Refused(f"the TensorFlow Lite copy of {model} {version} does not answer as its SavedModel: "
                          f"{result['worst']['why']}, over {result['instances']} instances of {on} "
                          f"(tolerance: {lite_check.TOLERANCE_TEXT})",
                          f"nothing was written; pull the SavedModel instead (`pull {model} {version} --format "
                          "savedmodel`)", reason="copy_differs")
        check: LiteCheck = {"instances": result["instances"], "on": on, "max_abs_diff": result["max_abs_diff"],
                            "tolerance": lite_check.TOLERANCE_TEXT, "outputs": result["outputs"]}
        return conversion.path, check

    def _check_instances(self, model: str, signature: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        inputs = signature.get("inputs") or {}
        evaluation = self.config.policy(model).evaluation
        if evaluation is None:
            return lite_check.probe_instances(inputs), PROBED
        outputs = signature.get("outputs") or {}
        if evaluation.output not in outputs:
            raise InvalidInput(f"`evaluation.output` of {model} names {evaluation.output!r}, which the version's "
                               f"signature does not give (its outputs: {', '.join(sorted(outputs)) or 'none'})",
                               "fix `evaluation.output` in starchart.yaml")
        return evaluation_instances(evaluation, inputs, self.backend.storage), evaluation.data

    # ---------------------------------------------------------------- signed URLs

    def signed_urls(self, model: str, version: str | None = None, format: str = "savedmodel",
                    lifetime: timedelta = URL_LIFETIME, now: Callable[[], datetime] | None = None) -> SignedUrls:
        """Time-limited URLs to the version's files in Cloud Storage, in place of a download.

        savedmodel: one URL per file of the SavedModel. tflite: the checked .tflite, converted and uploaded beside
        the version's model/ folder first (TRAIN_PATH/tflite/), or reused when it is there already.
        """
        _check_format(format)
        store = self.backend.storage
        if not isinstance(store, SignsUrls):
            raise Refused(f"signed URLs are for models kept in Cloud Storage; this backend ({self.backend.name}) "
                          "keeps them on this machine", f"pull {model} --to DIR instead")
        view = self._version(model, version)
        uploaded, check = False, None
        if format == "savedmodel":
            files = [(name, store.join(view["deployment_uri"], name)) for name in self._saved_model_files(view)]
        else:
            folder = store.join(_train_path(view["deployment_uri"]), TFLITE_FOLDER)
            uri, record = store.join(folder, _lite_name(view)), store.join(folder, "check.json")
            if store.exists(record) and store.exists(uri):  # check.json is written last: the file is whole
                check = json.loads(store.read_bytes(record))
            else:
                with tempfile.TemporaryDirectory(prefix="starchart-tflite-") as tmp:
                    path, check = self._convert(view, Path(tmp))
                    store.upload_file(path, uri)
                store.write_bytes(record, json.dumps(check, sort_keys=True).encode())
                uploaded = True
            files = [(_lite_name(view), uri)]
        start = (now or (lambda: datetime.now(timezone.utc)))()
        urls = [{"path": name, "uri": uri, "url": store.signed_url(uri, lifetime, filename=Path(name).name)}
                for name, uri in files]
        answer: SignedUrls = {"model": model, "version": view["name"], "format": format,
                              "expires_in": int(lifetime.total_seconds()),
                              "expires_at": (start + lifetime).strftime("%Y-%m-%dT%H:%M:%SZ"), "urls": urls,
                              "uploaded": uploaded}
        if check is not None:
            answer["check"] = check
        return answer


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise InvalidInput(f"unknown format {format!r}", f"use one of: {', '.join(FORMATS)}")


def _lite_name(view: VersionView) -> str:
    return f"{view['model']}-{view['name']}.tflite"


def _train_path(deployment_uri: str) -> str:
    """TRAIN_PATH of a version whose SavedModel is TRAIN_PATH/model/."""
    return deployment_uri.rstrip("/").rsplit("/", 1)[0]


def _fits_a_message(model: str, version: str, size: int) -> None:
    if size > MAX_ARCHIVE:
        raise Refused(f"{model} {version} is {size / 2**20:.0f} MB, too large to send here "
                      f"(at most {MAX_ARCHIVE // 2**20} MB)",
                      f"run `starchart pull {model} {version}` where you need it")


def _filled(target: Path, fill: Callable[[Path], None]) -> None:
    """`fill` a temporary folder beside `target`, then rename it to `target` (absent or empty, checked before)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        fill(partial)
        if target.exists():
            target.rmdir()
        os.replace(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def evaluation_instances(evaluation: Evaluation, inputs: dict[str, Any], storage: Any,
                         limit: int = lite_check.MAX_ROWS) -> list[dict[str, Any]]:
    """The first `limit` rows of a model's evaluation data as instances of a signature's inputs."""
    uri = evaluation.data
    if "://" not in uri:
        raw = LocalStorage().read_bytes(uri)
    elif isinstance(storage, LocalStorage):
        raise InvalidInput(f"the evaluation data {uri} is in cloud storage, which the local backend does not read",
                           "copy it to this machine and point `evaluation.data` at the local file")
    else:
        raw = storage.read_bytes(uri)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidInput(f"the evaluation data {uri} is not UTF-8 text", "give a CSV file with a header row") from None
    return lite_check.csv_instances(text, inputs, evaluation.label, uri, limit)
