"""models/<model>.yaml: StarChart's model file, written by expose, read by apply."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from model_registry.domain.errors import ArtifactError, NotFound


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def version_entry(v: Mapping[str, Any], is_default: bool) -> dict[str, Any]:
    job = v.get("job") or {}
    return {
        "version": {
            "name": v["name"],
            "deploymentUri": v["deployment_uri"],
            "createTime": _iso(v.get("created_at")),
            "job": {
                "jobId": v["job_id"],
                "trainingInput": {
                    "packageUris": v["program"].get("package_uris", []),
                    "pythonModule": v["program"].get("module"),
                    "args": list(v.get("args", [])),
                    "region": job.get("region"),
                    "scaleTier": job.get("scale_tier"),
                },
                "createTime": _iso(job.get("created_at")),
                "startTime": _iso(job.get("started_at")),
                "endTime": _iso(job.get("ended_at")),
                "state": job.get("state", "SUCCEEDED"),
            },
            "packageSha256": v["program"].get("sha256"),
            "trainedBy": v.get("trained_by"),
            "metrics": v.get("metrics", {}),
            "signature": v.get("signature", {}),
        },
        "isDefault": is_default,
    }


def write_model_file(folder: Path, model: str, versions: Sequence[Mapping[str, Any]], default: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model}.yaml"
    doc = {"model": model, "versions": [version_entry(v, v["name"] == default) for v in versions]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)
    return path


def read_model_file(folder: Path, model: str) -> dict[str, Any]:
    """The model file as written (or a StarChart MODEL.json); refuses unreadable or malformed files."""
    for path in (folder / f"{model}.yaml", folder / f"{model}.yml", folder / f"{model}.json"):
        if path.exists():
            break
    else:
        raise NotFound(f"no model file for {model!r} in {folder}", f"run `expose {model}` first")
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}", "fix the file, or run expose again to rewrite it") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("versions"), list):
        raise ArtifactError(f"{path} is not a model file (no 'versions' list)", "run expose again to rewrite it")
    return doc


def marked_default(doc: dict[str, Any], path_hint: str) -> str:
    """The short name of the version marked isDefault: true."""
    marked = [e for e in doc["versions"] if isinstance(e, dict) and e.get("isDefault") is True]
    if len(marked) != 1:
        raise ArtifactError(
            f"{path_hint} marks {len(marked)} versions isDefault: true",
            "mark exactly one version with isDefault: true",
        )
    name = str((marked[0].get("version") or {}).get("name", ""))
    return name.rsplit("/", 1)[-1]  # StarChart stored projects/P/models/M/versions/V
