"""models/<model>.yaml: StarChart's model file, written by expose (and after every switch), read by apply.

The shape is StarChart's (`files.dump`): `{model, versions: [{version: {name, deploymentUri, createTime, job,
isDefault, ...}}]}`, `isDefault` inside `version`. apply also reads this project's earlier files (`isDefault`
beside `version`) and a `models/<model>.json` StarChart wrote, with Cloud ML's version fields and names short
(`v<TS>`) or long (`projects/P/models/M/versions/v<TS>`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from model_registry.domain.errors import ArtifactError, InvalidInput, NotFound

LONG_NAME = re.compile(r"^projects/(?P<project>[^/]+)/models/(?P<model>[^/]+)/versions/(?P<version>[^/]+)$")
SHORT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,127}$")  # Cloud ML's rule for a version name
ENTRY_SHAPE = "each entry is {version: {name: v<TS>, isDefault: true|false, ...}}"


def _iso(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def version_entry(v: Mapping[str, Any], is_default: bool) -> dict[str, Any]:
    """One entry of `versions`, as StarChart's files.dump writes it: `isDefault` inside `version`."""
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
            "isDefault": is_default,
            "packageSha256": v["program"].get("sha256"),
            "trainedBy": v.get("trained_by"),
            "metrics": v.get("metrics", {}),
            "signature": v.get("signature", {}),
        },
    }


def write_model_file(folder: Path, model: str, versions: Sequence[Mapping[str, Any]], default: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model}.yaml"
    doc = {"model": model, "versions": [version_entry(v, v["name"] == default) for v in versions]}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Marked:
    """What apply asks for: the version a model file marks isDefault, and the file(s) that say so."""

    version: str
    files: tuple[Path, ...]


def marked_default(folder: Path, model: str, project: str | None = None) -> Marked:
    """The version `models/<model>.yaml` (or `.yml`) and StarChart's `models/<model>.json` mark isDefault.

    When both exist, both are read: they must mark the same version, else apply would have to guess which file
    is meant, and it refuses instead. `project`: the GCP project long names must name, when it is known.
    """
    yaml_file = next((p for p in (folder / f"{model}.yaml", folder / f"{model}.yml") if p.exists()), None)
    json_file = folder / f"{model}.json"
    files = [p for p in (yaml_file, json_file) if p is not None and p.exists()]
    if not files:
        raise NotFound(f"no model file for {model} in {folder} (looked for {model}.yaml, {model}.yml, {model}.json)",
                       f"run `expose {model}` to write {folder / (model + '.yaml')}, or put the {model}.json "
                       "StarChart wrote there")
    marked = {path: marked_version(read_model_file(path), path, model, project) for path in files}
    if len(set(marked.values())) > 1:
        said = " and ".join(f"{path} marks {name}" for path, name in marked.items())
        raise InvalidInput(f"{said} isDefault: apply does not guess which file you mean",
                           f"delete the one you do not mean, or mark the same version in both (expose rewrites "
                           f"{model}.yaml after every switch; {model}.json is StarChart's)")
    return Marked(marked[files[0]], tuple(files))


def read_model_file(path: Path) -> dict[str, Any]:
    """A model file parsed (JSON for .json, YAML otherwise); a malformed one is refused with its line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}", "make it a readable UTF-8 file, or run expose again "
                                                          "to rewrite the model's .yaml") from exc
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: line {exc.lineno}, column {exc.colno}: {exc.msg}",
                            "fix the file there (StarChart writes it with json.dump), or delete it") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ArtifactError(f"{path} is not valid YAML: {where}{problem}",
                            "fix the file there, or run expose again to rewrite it") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("versions"), list):
        raise ArtifactError(f"{path} is not a model file (no 'versions' list)",
                            f"a model file is {{model: NAME, versions: [...]}}; {ENTRY_SHAPE}")
    return doc


def marked_version(doc: dict[str, Any], path: Path, model: str, project: str | None = None) -> str:
    """The short name of the one version `doc` marks isDefault: true; every entry is checked on the way."""
    named = doc.get("model")
    if named is not None and _model_of(named) != model:
        raise InvalidInput(f"{path} is the model file of {named!r}, not of {model}",
                           f"apply {model} reads {path.name}: put {model}'s file there")
    marked = []
    for i, entry in enumerate(doc["versions"]):
        version = entry.get("version") if isinstance(entry, dict) else None
        if not isinstance(version, dict) or not isinstance(version.get("name"), str):
            raise ArtifactError(f"{path}: versions[{i}] has no version name", f"{ENTRY_SHAPE}; fix or remove it")
        name = _short_name(version["name"], path, model, project)
        if _is_default(entry, version, path, name):
            marked.append(name)
    if len(marked) != 1:
        which = f" ({', '.join(marked)})" if marked else ""
        raise ArtifactError(f"{path} marks {len(marked)} versions isDefault: true{which}",
                            "mark exactly one version, the one services should use, with isDefault: true "
                            "(inside its `version`)")
    return marked[0]


def _model_of(named: Any) -> str:
    """The model a file's `model` field names: `iris`, or Cloud ML's `projects/P/models/iris`."""
    text = str(named.get("name", "")) if isinstance(named, dict) else str(named)
    return text.rsplit("/", 1)[-1]


def _short_name(name: str, path: Path, model: str, project: str | None) -> str:
    long = LONG_NAME.match(name)
    if long:
        if long["model"] != model:
            raise InvalidInput(f"{path} names {name}, a version of the model {long['model']}, not of {model}",
                               f"list only {model}'s versions in {path.name} (or apply {long['model']})")
        if project and long["project"] != project:
            raise InvalidInput(f"{path} names {name}, a version in the project {long['project']}, but "
                               f"GCP_PROJECT_ID is {project}",
                               "apply the file of this project, or set GCP_PROJECT_ID to the project it names")
        name = long["version"]
    if not SHORT_NAME.match(name):
        raise InvalidInput(f"{path} names {name!r}, which is not a version name",
                           "a version is named v<TS> (or projects/P/models/M/versions/v<TS>); see `versions MODEL`")
    return name


def _is_default(entry: dict[str, Any], version: dict[str, Any], path: Path, name: str) -> bool:
    """`isDefault` inside `version` (StarChart's place), or beside it (this project's earlier files)."""
    said = {where: value for where, value in (("inside", version.get("isDefault")), ("beside", entry.get("isDefault")))
            if value is not None}
    for value in said.values():
        if not isinstance(value, bool):
            raise ArtifactError(f"{path}: isDefault of {name} is {value!r}, not true or false",
                                "write isDefault: true for the version services should use, false for the others")
    if len(set(said.values())) > 1:
        raise ArtifactError(f"{path}: {name} says isDefault {said['inside']} inside `version` and "
                            f"{said['beside']} beside it",
                            "keep the one inside `version` (where StarChart writes it) and remove the other")
    return any(said.values())
