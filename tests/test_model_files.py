"""StarChart's model file: expose writes `isDefault` inside `version`; apply reads that, this project's earlier
files (`isDefault` beside `version`) and a `models/<model>.json` StarChart wrote with Cloud ML's version fields."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import FIXTURES, ROOT, expose_two_versions, replay_args, write_config

from model_registry.domain.errors import ArtifactError, InvalidInput, NotFound, StarchartError

STARCHART_FILE = FIXTURES / "starchart" / "iris.json"
# the versions the fixture names, as StarChart named them on the day; a test gives them the names its trainings got
FIXTURE_FIRST, FIXTURE_SECOND = "v20170614093012", "v20170615093008"


def starchart_json(first: str, second: str) -> str:
    text = STARCHART_FILE.read_text()
    assert text.count(FIXTURE_FIRST) > 0 and text.count(FIXTURE_SECOND) > 0
    return text.replace(FIXTURE_FIRST, first).replace(FIXTURE_SECOND, second)


@pytest.fixture
def reg(make_registry: Any, sqlite_url: str, trained: dict) -> Any:
    """iris with two versions, the first the default; models/iris.yaml as expose wrote it."""
    return expose_two_versions(make_registry(sqlite_url), trained)


def oldest_and_newest(reg: Any) -> tuple[str, str]:
    names = sorted(v["name"] for v in reg.versions.of_model("iris")["versions"])
    return names[0], names[-1]


def test_expose_writes_is_default_inside_each_version(reg: Any) -> None:
    first, second = oldest_and_newest(reg)
    doc = yaml.safe_load((reg.config.model_files / "iris.yaml").read_text())
    assert doc["model"] == "iris"
    assert [set(entry) for entry in doc["versions"]] == [{"version"}, {"version"}], "nothing beside `version`"
    marks = {e["version"]["name"]: e["version"]["isDefault"] for e in doc["versions"]}
    assert marks == {first: True, second: False}
    version = doc["versions"][0]["version"]
    assert {"name", "deploymentUri", "createTime", "job", "isDefault"} <= set(version)
    assert set(version["job"]) >= {"jobId", "trainingInput", "state"}


def test_a_switch_rewrites_the_file_in_the_same_shape(reg: Any) -> None:
    first, second = oldest_and_newest(reg)
    req = reg.promotions.promote("iris", second, "U_REQ")
    reg.promotions.decide(req["id"], "U_OK", True)
    assert reg.promotions.apply_request(req["id"])["state"] == "applied"
    doc = yaml.safe_load((reg.config.model_files / "iris.yaml").read_text())
    assert {e["version"]["name"]: e["version"]["isDefault"] for e in doc["versions"]} == {first: False, second: True}
    assert all(set(e) == {"version"} for e in doc["versions"])


def test_apply_reads_the_new_form_and_names_the_file(reg: Any) -> None:
    _first, second = oldest_and_newest(reg)
    path = reg.config.model_files / "iris.yaml"
    doc = yaml.safe_load(path.read_text())
    for entry in doc["versions"]:
        entry["version"]["isDefault"] = entry["version"]["name"] == second
    path.write_text(yaml.safe_dump(doc))
    req = reg.promotions.apply("iris", "U_REQ")
    assert (req["kind"], req["candidate"], req["model_files"]) == ("apply", second, [str(path)])


def test_apply_still_reads_this_projects_earlier_files(reg: Any) -> None:
    """Written before isDefault moved inside `version`: {version: {...}, isDefault: ...}."""
    first, second = oldest_and_newest(reg)
    path = reg.config.model_files / "iris.yaml"
    path.write_text(yaml.safe_dump({"model": "iris", "versions": [
        {"version": {"name": first, "deploymentUri": "/t/1/model/"}, "isDefault": False},
        {"version": {"name": second, "deploymentUri": "/t/2/model/"}, "isDefault": True}]}))
    assert reg.promotions.apply("iris", "U_REQ")["candidate"] == second


def test_a_starchart_json_with_short_names_is_read(reg: Any) -> None:
    first, second = oldest_and_newest(reg)
    (reg.config.model_files / "iris.yaml").unlink()
    doc = json.loads(starchart_json(first, second))
    for entry in doc["versions"]:
        entry["version"]["name"] = entry["version"]["name"].rsplit("/", 1)[-1]
    path = reg.config.model_files / "iris.json"
    path.write_text(json.dumps(doc, indent=2))
    assert reg.promotions.apply("iris", "U_REQ")["model_files"] == [str(path)]


def test_both_files_agreeing_are_both_named(reg: Any) -> None:
    first, second = oldest_and_newest(reg)
    folder = reg.config.model_files
    json_file = folder / "iris.json"
    json_file.write_text(starchart_json(first, second))
    yaml_file = folder / "iris.yaml"
    doc = yaml.safe_load(yaml_file.read_text())
    for entry in doc["versions"]:
        entry["version"]["isDefault"] = entry["version"]["name"] == second
    yaml_file.write_text(yaml.safe_dump(doc))
    req = reg.promotions.apply("iris", "U_REQ")
    assert req["candidate"] == second and req["model_files"] == [str(yaml_file), str(json_file)]


def refused(reg: Any, kind: type[StarchartError]) -> StarchartError:
    """apply refuses with `kind`, and nothing changed: no promotion request, no audit event."""
    before = (len(reg.promotions.of_model("iris")), len(reg.audit.events(limit=1000)), reg.versions.default("iris"))
    with pytest.raises(kind) as exc:
        reg.promotions.apply("iris", "U_REQ")
    after = (len(reg.promotions.of_model("iris")), len(reg.audit.events(limit=1000)), reg.versions.default("iris"))
    assert after == before
    assert exc.value.hint, exc.value.message
    return exc.value


def entries(*marks: tuple[str, Any]) -> list[dict[str, Any]]:
    return [{"version": {"name": name, "isDefault": mark}} for name, mark in marks]


def test_bad_model_files_are_refused_clearly_and_change_nothing(reg: Any) -> None:
    first, second = oldest_and_newest(reg)
    folder = reg.config.model_files
    yaml_file, json_file = folder / "iris.yaml", folder / "iris.json"

    def yaml_doc(doc: Any) -> None:
        yaml_file.write_text(yaml.safe_dump(doc))

    yaml_doc({"model": "iris", "versions": entries((first, False), (second, False))})
    err = refused(reg, ArtifactError)
    assert f"{yaml_file} marks 0 versions isDefault: true" in err.message and "exactly one" in err.hint
    yaml_doc({"model": "iris", "versions": entries((first, True), (second, True))})
    err = refused(reg, ArtifactError)
    assert f"marks 2 versions isDefault: true ({first}, {second})" in err.message
    yaml_doc({"model": "iris", "versions": entries((first, False), ("v20990101000000", True))})
    err = refused(reg, NotFound)
    assert f"{yaml_file} marks v20990101000000 isDefault, but iris has no version v20990101000000" in err.message
    assert first in err.hint and second in err.hint, "the hint lists the versions there are"
    yaml_doc({"model": "iris", "versions": entries((first, False),
                                                   (f"projects/p/models/other/versions/{second}", True))})
    err = refused(reg, InvalidInput)
    assert f"names projects/p/models/other/versions/{second}, a version of the model other, not of iris" \
           in err.message
    yaml_doc({"model": "iris", "versions": entries((first, "yes"), (second, False))})
    assert f"isDefault of {first} is 'yes', not true or false" in refused(reg, ArtifactError).message
    yaml_doc({"model": "iris", "versions": [{"version": {"name": first, "isDefault": True}, "isDefault": False}]})
    assert "inside `version` and False beside it" in refused(reg, ArtifactError).message
    yaml_doc({"model": "iris", "versions": [{"version": {"deploymentUri": "/t"}, "isDefault": True}]})
    assert f"{yaml_file}: versions[0] has no version name" in refused(reg, ArtifactError).message
    yaml_doc({"model": "iris", "versions": entries(("latest!", True))})
    assert "names 'latest!', which is not a version name" in refused(reg, InvalidInput).message
    yaml_doc({"model": "other", "versions": entries((first, True))})
    assert f"{yaml_file} is the model file of 'other', not of iris" in refused(reg, InvalidInput).message
    yaml_file.write_text("model: iris\nversions:\n  - version: {name: v1\n")
    err = refused(reg, ArtifactError)
    assert f"{yaml_file} is not valid YAML: line 4, column 1" in err.message, err.message
    yaml_file.unlink()
    json_file.write_text('{"model": "iris",\n "versions": [\n   {"version": {"name": "v1"}}\n   {"version": {}}]}')
    err = refused(reg, ArtifactError)
    assert f"{json_file} is not valid JSON: line 4, column 4: Expecting ',' delimiter" in err.message, err.message
    json_file.unlink()
    err = refused(reg, NotFound)
    assert "no model file for iris" in err.message and "expose iris" in err.hint


def test_a_yaml_and_a_json_that_disagree_are_both_named(reg: Any) -> None:
    first, second = oldest_and_newest(reg)
    folder = reg.config.model_files
    (folder / "iris.json").write_text(starchart_json(first, second))  # marks the second; the yaml marks the first
    err = refused(reg, InvalidInput)
    assert err.message == (f"{folder / 'iris.yaml'} marks {first} and {folder / 'iris.json'} marks {second} "
                           "isDefault: apply does not guess which file you mean")
    assert "delete the one you do not mean" in err.hint


def test_a_long_name_in_another_project_is_refused(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = expose_two_versions(make_registry(sqlite_url, env={"GCP_PROJECT_ID": "ours"}), trained)
    first, second = oldest_and_newest(reg)
    (reg.config.model_files / "iris.yaml").unlink()
    (reg.config.model_files / "iris.json").write_text(starchart_json(first, second))
    err = refused(reg, InvalidInput)
    assert "a version in the project starchart-demo, but GCP_PROJECT_ID is ours" in err.message
    text = starchart_json(first, second).replace("projects/starchart-demo/", "projects/ours/")
    (reg.config.model_files / "iris.json").write_text(text)
    assert reg.promotions.apply("iris", "U_REQ")["candidate"] == second


# ---------------------------------------------------------------- through the command line


@pytest.fixture
def cli(tmp_path: Path, replay_trainers: Path) -> Any:
    home = tmp_path / "home"
    home.mkdir()
    config = write_config(home, replay_trainers)
    env = {**os.environ, "STARCHART_HOME": str(home), "STARCHART_CONFIG": str(config),
           "DATABASE_URL": f"sqlite:///{home / 'db.sqlite'}"}
    env.pop("GCP_PROJECT_ID", None)

    def run(*args: str, user: str = "U_T") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bot.cli", "--user", user, *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    run.models = home / "models"  # type: ignore[attr-defined]
    return run


def test_starchart_apply_of_a_starchart_json_opens_a_request(cli: Any, trained: dict) -> None:
    for src in (trained["iris_a"], trained["iris_b"]):
        assert cli("train", "-m", "iris", "--wait", "--", *replay_args(src)).returncode == 0
    assert cli("expose", "-m", "iris").returncode == 0
    versions = json.loads(cli("--json", "versions", "iris").stdout)
    newest, oldest = (v["name"] for v in versions["versions"])
    assert versions["default"] == oldest
    models: Path = cli.models
    (models / "iris.yaml").unlink()  # the project carries on from StarChart: its file alone
    (models / "iris.json").write_text(starchart_json(oldest, newest))

    said = cli("apply", "-m", "iris", "--reason", "as StarChart marked it", user="U_REQ")
    assert said.returncode == 0, said.stderr
    assert said.stdout.splitlines()[0].startswith("Promotion request #")
    assert f"{newest} is marked isDefault in {models / 'iris.json'}" in said.stdout
    request = json.loads(cli("--json", "show", said.stdout.split("#")[1].split()[0]).stdout)
    assert (request["kind"], request["candidate"], request["base"], request["state"]) == (
        "apply", newest, oldest, "open")
    assert json.loads(cli("--json", "versions", "iris").stdout)["default"] == oldest, "only a request, no switch"
    assert "applied" in cli("approve", str(request["id"]), user="U_OK").stdout
    assert json.loads(cli("--json", "versions", "iris").stdout)["default"] == newest
    written = yaml.safe_load((models / "iris.yaml").read_text())  # the switch writes this project's file again
    assert {e["version"]["name"]: e["version"]["isDefault"] for e in written["versions"]} == {
        oldest: False, newest: True}
    assert json.loads((models / "iris.json").read_text()) == json.loads(starchart_json(oldest, newest)), \
        "StarChart's file is read, never rewritten"


def test_starchart_apply_of_a_broken_file_says_what_and_where(cli: Any, trained: dict) -> None:
    assert cli("train", "-m", "iris", "--wait", "--", *replay_args(trained["iris_a"])).returncode == 0
    assert cli("expose", "-m", "iris").returncode == 0
    models: Path = cli.models
    (models / "iris.yaml").unlink()
    (models / "iris.json").write_text('{"model": "iris", "versions": [\n  {"version": {"name": "v1",}}\n]}\n')
    said = cli("apply", "-m", "iris", user="U_REQ")
    assert said.returncode == 1 and "Traceback" not in said.stderr
    assert said.stderr.splitlines()[0] == (f"error: {models / 'iris.json'} is not valid JSON: line 2, column 29: "
                                           "Expecting property name enclosed in double quotes")
    assert said.stderr.splitlines()[1].startswith("  hint: fix the file there")
    assert json.loads(cli("--json", "requests", "iris").stdout) == []


def test_the_chat_answer_names_the_version_and_the_file() -> None:
    from bot.blocks import render
    from handlers.results import CardPosted

    said = render(CardPosted({"id": 7, "channel": "C0ML", "candidate": "v20261201120000",
                              "model_files": ["/srv/models/iris.json"]})).text
    assert said == ("Promotion request #7 is open for review in <#C0ML>. It asks for `v20261201120000`, marked "
                    "isDefault in `/srv/models/iris.json`.")
    plain = render(CardPosted({"id": 8, "channel": "C0ML", "candidate": "v20261201120000"})).text
    assert plain == "Promotion request #8 is open for review in <#C0ML>."
