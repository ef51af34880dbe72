"""One contract, two backends: what the workflow relies on holds for `local` and `vertex` alike.

`local` runs the replay trainer in real processes; `vertex` goes through the real GAPIC clients to the
Vertex AI fake, whose job runner does what the replay trainer does, on the GCS emulator; `vertex-endpoint`
is `vertex` with the model's endpoint enabled, so the default is also deployed (and must be served).
Both replay the iris SavedModels that TensorFlow trained once for the session (`trained`).
"""

from __future__ import annotations

import inspect
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import replay_args
from fakes.gcs_emulator import new_bucket, shared_gcs_emulator
from fakes.vertex_fake import VertexFake, fast_backend, replay_runner, vertex_env

from model_registry.adapters.records import TERMINAL, Job, Version

IRIS_INPUTS = {"sepal_length", "sepal_width", "petal_length", "petal_width"}


@dataclass
class World:
    kind: str
    registry: Any
    break_set_default: Callable[[str, str], None]  # (model, version): the next switch to it fails
    trainer_started: Callable[[str], bool]  # job id: its trainer code is running
    served: Callable[[str], list[str] | None] = field(default=lambda model: None)  # versions an endpoint serves


@pytest.fixture(params=["local", "vertex", "vertex-endpoint"])
def world(request: pytest.FixtureRequest, make_registry: Any, sqlite_url: str,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    if request.param == "local":
        reg = make_registry(sqlite_url)

        def lose_pointer_entry(model: str, version: str) -> None:  # the serving pointer forgot the version
            pointer = reg.backend.serving / f"{model}.json"
            data = json.loads(pointer.read_text())
            del data["versions"][version]
            pointer.write_text(json.dumps(data))

        def trainer_printed(job_id: str) -> bool:
            # the local runner reports RUNNING before it starts the trainer, and a cancel in between is
            # not seen until the trainer ends (local_runner.py): wait for the trainer's first line
            return "replay trainer: job" in reg.backend.logs(job_id, None)

        yield World("local", reg, lose_pointer_entry, trainer_printed)
        return
    url = shared_gcs_emulator()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    bucket = new_bucket(url)
    with VertexFake() as fake:
        fake.runner = replay_runner(url)
        endpoint = request.param == "vertex-endpoint"
        endpoints = {"iris": {"enabled": True, "machine_type": "n1-standard-2"}} if endpoint else None
        reg = make_registry(sqlite_url, backend=fast_backend(fake, bucket, endpoints=endpoints),
                            env=vertex_env(bucket))

        def deny_alias_merge(model: str, version: str) -> None:
            fake.fail_next("models.mergeVersionAliases", 403,
                           message="Permission 'aiplatform.models.update' denied on resource.")

        def fail_deploy(model: str, version: str) -> None:
            fake.fail_next_operation("The serving container did not start.", route="endpoints.deployModel")

        def served(model: str) -> list[str] | None:
            names = {vid: next(a for a in aliases if a != "default") for vid, aliases in fake.versions(model).items()}
            return [names[ref.split("@")[1]] for ref, _, traffic in fake.deployments(model) if traffic]

        def running(job_id: str) -> bool:
            reg.jobs.refresh("iris")
            return reg.jobs.get(job_id)["state"] == "RUNNING"

        if endpoint:
            yield World("vertex", reg, fail_deploy, running, served)
        else:
            yield World("vertex", reg, deny_alias_merge, running)


def backend_ref(reg: Any, job_id: str) -> str | None:
    with reg.db.sessions() as s:
        return s.get(Job, job_id).backend_ref


def train(reg: Any, *args: str) -> dict[str, Any]:
    job = reg.jobs.train("iris", "U_TRAINER", args=list(args))
    return reg.jobs.wait(job["job_id"], timeout=60)


def two_versions(world: World, trained: dict) -> tuple[str, str]:
    reg = world.registry
    for source in (trained["iris_a"], trained["iris_b"]):
        job = train(reg, *replay_args(source))
        assert job["state"] == "SUCCEEDED", job
        assert reg.backend.status(job["job_id"], backend_ref(reg, job["job_id"])).state == "SUCCEEDED"
    exposed = reg.versions.expose("iris", "U_TRAINER")
    assert len(exposed["exposed"]) == 2 and not exposed["errors"], exposed
    base, cand = sorted(v["name"] for v in exposed["exposed"])
    return base, cand


def test_train_expose_promote_apply(world: World, trained: dict) -> None:
    reg = world.registry
    base, cand = two_versions(world, trained)
    assert reg.versions.expose("iris", "U_TRAINER") == {"exposed": [], "errors": []}
    with reg.db.sessions() as s:
        versions = {v.name: v for v in s.query(Version).filter(Version.model == "iris")}
    for name, source in ((base, trained["iris_a"]), (cand, trained["iris_b"])):
        v = versions[name]
        assert set(v.signature["inputs"]) == IRIS_INPUTS and v.signature["inputs"]["sepal_length"]["dtype"] == "DT_FLOAT"
        expected = json.loads((source / "metrics.json").read_text())
        assert v.metrics == pytest.approx({k: expected[k] for k in ("accuracy", "loss")})
        assert v.deployment_uri.endswith("/model/") and v.deployment_uri.startswith(reg.settings.bucket)
        assert v.backend_ref
    assert reg.versions.default("iris") == base and reg.backend.current_default("iris") == base
    assert world.served("iris") in (None, [base])

    req = reg.promotions.promote("iris", cand, "U_REQ", reason="more hidden units")
    assert reg.promotions.decide(req["id"], "U_OK", True)["state"] == "approved"
    assert reg.backend.current_default("iris") == base, "approval alone switches nothing"
    applied = reg.promotions.apply_request(req["id"], actor="U_OK")
    assert applied["state"] == "applied", applied
    assert reg.versions.default("iris") == cand and reg.backend.current_default("iris") == cand
    assert world.served("iris") in (None, [cand])
    assert reg.promotions.reconcile() == []
    assert isinstance(reg.jobs.logs(versions[cand].job_id), str)


def settle(check: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a process-backed state change with short, growing pauses."""
    deadline, delay = time.monotonic() + timeout, 0.01
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def test_cancel_a_running_job(world: World, trained: dict) -> None:
    reg = world.registry
    job = reg.jobs.train("iris", "U_TRAINER", args=replay_args(trained["iris_a"], "--sleep=30"))
    settle(lambda: world.trainer_started(job["job_id"]))
    assert reg.jobs.cancel(job["job_id"], "U_TRAINER")["state"] == "CANCELLED"
    ref = backend_ref(reg, job["job_id"])
    settle(lambda: reg.backend.status(job["job_id"], ref).state in TERMINAL)
    assert reg.backend.status(job["job_id"], ref).state == "CANCELLED"
    assert reg.jobs.get(job["job_id"])["state"] == "CANCELLED"
    assert "training.cancelled" in [e["action"] for e in reg.audit.events(model="iris")]


def test_a_crashing_trainer_fails_the_job_with_a_reason(world: World) -> None:
    job = train(world.registry, "--crash")
    assert job["state"] == "FAILED" and job["error"]
    assert ("exited with code 3" if world.kind == "local" else "non-zero status of 3") in job["error"]


def test_a_failed_set_default_leaves_the_request_failed(world: World, trained: dict) -> None:
    reg = world.registry
    base, cand = two_versions(world, trained)
    req = reg.promotions.promote("iris", cand, "U_REQ")
    reg.promotions.decide(req["id"], "U_OK", True)
    world.break_set_default("iris", cand)
    failed = reg.promotions.apply_request(req["id"], actor="U_OK")
    assert failed["state"] == "failed" and failed["error"], failed
    assert reg.versions.default("iris") == base and reg.backend.current_default("iris") == base
    assert world.served("iris") in (None, [base])
    actions = [e["action"] for e in reg.audit.events(model="iris", limit=100)]
    assert "promotion.failed" in actions and "promotion.applied" not in actions


def protocol_members() -> dict[str, Any]:
    """The Backend protocol's attributes (annotations and read-only properties) and methods (with signatures)."""
    from model_registry.adapters.backends.base import Backend

    members: dict[str, Any] = {name: None for name in Backend.__annotations__}
    members.update({name: None for name, value in vars(Backend).items() if isinstance(value, property)})
    members.update({name: inspect.signature(fn) for name, fn in vars(Backend).items()
                    if inspect.isfunction(fn) and not name.startswith("_")})
    return members


def test_every_backend_has_every_member_of_the_protocol(tmp_path: Path) -> None:
    from model_registry.adapters.backends.local import LocalBackend
    from model_registry.adapters.backends.vertex import VertexBackend

    members = protocol_members()
    assert {"name", "storage", "poll_interval", "apply_timeout", "set_default", "current_default"} <= set(members)
    backends = [LocalBackend(tmp_path), VertexBackend("starchart-test", "us-central1", "gs://starchart-test-ml")]
    for backend in backends:
        for name, signature in members.items():
            assert hasattr(backend, name), f"{type(backend).__name__} lacks {name}"
            if signature is None:
                continue
            method = getattr(type(backend), name)
            assert callable(method), f"{type(backend).__name__}.{name} is not a method"
            ours = [(p.name, p.kind, p.default) for p in inspect.signature(method).parameters.values()]
            theirs = [(p.name, p.kind, p.default) for p in signature.parameters.values()]
            assert ours == theirs, f"{type(backend).__name__}.{name}{inspect.signature(method)} is not {signature}"
    assert backends[0].apply_timeout("iris") == 0.0, "a local switch is never long-running"


def test_the_protocol_declares_what_the_core_and_bot_use_of_a_backend() -> None:
    from conftest import ROOT

    used: dict[str, set[str]] = {}
    for folder in ("model_registry", "bot", "handlers"):
        for path in (ROOT / folder).rglob("*.py"):
            if "backends" not in path.parts:
                for name in re.findall(r"\bbackend\.([a-z_]+)", path.read_text()):
                    used.setdefault(name, set()).add(path.name)
    only_in_the_demo = {"stop_server"}  # the local model server's, called by the demo (always local)
    assert used.get("stop_server", set()) <= {"demo.py"}
    assert set(used) - only_in_the_demo <= set(protocol_members()), used
