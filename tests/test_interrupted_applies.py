"""Applies settled as soon as their outcome is known, on Vertex AI (the real GAPIC clients against the fake).

A process running an apply is killed while Vertex AI holds its call: after the `default` alias moved (its reply
is lost), or before. The next start or worker pass settles the request from what Vertex AI shows, at once; a
request whose owner still renews its lease, while a slow endpoint deploy runs, is left to it. Lease lengths are
a fraction of a second here (STARCHART_APPLY_LEASE); nothing waits for a fixed time or asserts one.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from datetime import datetime
from typing import Any, Callable

import pytest
import test_vertex_backend as vertex
from conftest import replay_args, with_backend
from fakes.gcs_emulator import new_bucket
from fakes.vertex_fake import Hold, VertexFake, fast_backend, replay_runner, vertex_env

from bot.worker import one_pass
from model_registry.adapters.model_files import marked_default
from model_registry.adapters.records import PromotionRequest
from model_registry.domain import names

ENDPOINT = {"enabled": True, "machine_type": "n1-standard-2", "min_replicas": 1, "max_replicas": 1}
PATIENCE = 60.0  # seconds a condition may take to come true on a busy machine before the test gives up


gcs, fake = vertex.gcs, vertex.fake  # the Vertex tests' fixtures: the emulator and the fake


def until(condition: Callable[[], Any], what: str, step: Callable[[], Any] = lambda: None) -> Any:
    """Run `step` until `condition` holds (its value is returned); fail saying `what` did not happen."""
    give_up = time.monotonic() + PATIENCE
    while time.monotonic() < give_up:
        step()
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    pytest.fail(f"{what} did not happen within {PATIENCE:.0f}s")


def approved_on_vertex(make_registry: Callable[..., Any], db_url: str, fake: VertexFake, gcs: str, trained: dict,
                       env: dict[str, str] | None = None, **backend: Any) -> tuple[Any, str, str, int]:
    """A vertex-backed registry with two exposed iris versions and an approved request for the newer one."""
    bucket = new_bucket(gcs)
    fake.runner = replay_runner(gcs)
    reg = make_registry(db_url, backend=fast_backend(fake, bucket, **backend), env={**vertex_env(bucket), **(env or {})})
    for source in (trained["iris_a"], trained["iris_b"]):
        job = reg.jobs.train("iris", "U_TRAINER", args=replay_args(source))
        assert reg.jobs.wait(job["job_id"], timeout=30)["state"] == "SUCCEEDED"
    exposed = reg.versions.expose("iris", "U_TRAINER")
    assert len(exposed["exposed"]) == 2 and not exposed["errors"], exposed
    base, cand = sorted(v["name"] for v in exposed["exposed"])
    req = reg.promotions.promote("iris", cand, "U_REQ")
    reg.promotions.decide(req["id"], "U_OK", True)
    return reg, base, cand, req["id"]


def process_env(reg: Any, fake: VertexFake, gcs: str, lease: str) -> dict[str, str]:
    """The environment of another StarChart process on the same records and the same Vertex AI."""
    return {"STARCHART_HOME": str(reg.settings.home), "DATABASE_URL": reg.settings.database_url,
            "STARCHART_CONFIG": str(reg.settings.config_path), "STARCHART_BACKEND": "vertex",
            "GCP_PROJECT_ID": fake.project, "GCP_REGION": "us-central1", "STARCHART_BUCKET": reg.settings.bucket,
            "VERTEX_API_ENDPOINT": fake.url, "STORAGE_EMULATOR_HOST": gcs, "STARCHART_APPLY_LEASE": lease}


def _apply(env: dict[str, str], request_id: int) -> None:
    """A StarChart process, wired from its environment as every process is, that applies one request."""
    from model_registry.bootstrap import bootstrap
    from model_registry.config import ProjectConfig, Settings

    settings = Settings.from_env(env)
    reg = bootstrap(settings, ProjectConfig.load(settings.config_path))
    reg.promotions.apply_request(request_id, actor="U_OK")


def killed_while_held(env: dict[str, str], request_id: int, hold: Hold) -> None:
    """Run the apply in another process and kill it while Vertex AI holds its alias move; then drop that call."""
    proc = mp.get_context("spawn").Process(target=_apply, args=(env, request_id), daemon=True)
    proc.start()
    try:
        assert hold.arrived.wait(PATIENCE), "the apply never reached Vertex AI's alias move"
    finally:
        proc.kill()
        proc.join()
        hold.release()


def request_row(reg: Any, request_id: int) -> PromotionRequest:
    with reg.db.reads() as s:
        row = s.get(PromotionRequest, request_id)
        assert row is not None
        return row


def actions(reg: Any, request_id: int) -> list[str]:
    return [e["action"] for e in reversed(reg.audit.events(model="iris", limit=200)) if e["request_id"] == request_id]


def test_a_lost_reply_after_the_alias_moved_is_applied_when_the_web_process_starts(
        make_registry: Any, db_url: str, fake: VertexFake, gcs: str, trained: dict,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lease is ten minutes and still live: the backend's answer settles the request, not the lease."""
    from bot.app import create_bot
    from model_registry.config import SlackSettings

    reg, base, cand, request_id = approved_on_vertex(make_registry, db_url, fake, gcs, trained)
    env = process_env(reg, fake, gcs, lease="600")
    killed_while_held(env, request_id, fake.hold_next("models.mergeVersionAliases", after=True))
    assert reg.backend.current_default("iris") == cand, "Vertex AI moved the alias; the process never heard"
    row = request_row(reg, request_id)
    assert row.state == "applying" and row.apply_owner and row.apply_lease_until is not None
    assert row.apply_lease_until > names.utcnow(), "the dead process's lease has not lapsed"
    assert reg.versions.default("iris") == base

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # no Slack here: its API URL is a closed local port, and the bot's background work is stopped at the end
    bot = create_bot(SlackSettings.from_env({"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": "s",
                                             "SLACK_API_URL": "http://127.0.0.1:9/api/"}))
    web = bot.registry.get(timeout=PATIENCE)  # the web process's core: built, then the interrupted apply settled
    try:
        settled = web.promotions.get(request_id)
        assert settled["state"] == "applied" and settled["error"] is None
        assert reg.versions.default("iris") == cand
        assert marked_default(reg.config.model_files, "iris").version == cand, \
            "the model file was rewritten with the new default"
        assert actions(reg, request_id)[-3:] == ["promotion.applying", "promotion.applied", "promotion.reconciled"]
        [reconciled] = reg.audit.events(action="promotion.reconciled")
        assert reconciled["details"]["backend_default"] == cand and reconciled["details"]["owner"] == row.apply_owner
        row = request_row(reg, request_id)
        assert row.apply_owner is None and row.apply_lease_until is None, "the lease ended with the apply"
        assert one_pass(reg)["reconciled"] == 0, "settled once: a worker pass finds nothing left"
        assert actions(reg, request_id).count("promotion.applied") == 1 and reg.audit.verify().ok
    finally:
        bot.stop()
        web.close()


def test_a_lapsed_lease_with_the_alias_not_moved_fails_at_a_worker_pass_and_the_retry_applies(
        make_registry: Any, db_url: str, fake: VertexFake, gcs: str, trained: dict) -> None:
    reg, base, cand, request_id = approved_on_vertex(make_registry, db_url, fake, gcs, trained)
    killed_while_held(process_env(reg, fake, gcs, lease="0.5"), request_id,
                      fake.hold_next("models.mergeVersionAliases", after=False))
    assert reg.backend.current_default("iris") == base, "the alias move never reached Vertex AI"
    owner = request_row(reg, request_id).apply_owner
    assert owner

    until(lambda: reg.promotions.get(request_id)["state"] != "applying", "settling the lapsed apply",
          step=lambda: one_pass(reg))
    failed = reg.promotions.get(request_id)
    assert failed["state"] == "failed", failed
    assert failed["error"].startswith(f"the process running it ({owner}) stopped before the backend switched the "
                                      f"default: its lease lapsed at ")
    assert failed["error"].endswith(f"and the backend's default is still {base}; retry to apply")
    assert reg.versions.default("iris") == base and reg.backend.current_default("iris") == base
    assert actions(reg, request_id)[-3:] == ["promotion.applying", "promotion.failed", "promotion.reconciled"]

    applied = reg.promotions.retry(request_id, "U_OK")
    assert applied["state"] == "applied" and reg.versions.default("iris") == cand
    assert reg.backend.current_default("iris") == cand and reg.audit.verify().ok


def test_a_live_lease_renewed_through_a_slow_endpoint_deploy_is_not_settled_by_worker_passes(
        make_registry: Any, db_url: str, fake: VertexFake, gcs: str, trained: dict) -> None:
    """The apply runs in a thread of one process (its deploy held by Vertex AI), worker passes in another core
    with a backend of its own; the lease is 1.5 s, so only its renewals keep the request from being settled."""
    options = dict(endpoints={"iris": ENDPOINT}, operation_timeout=300.0)
    reg, base, cand, request_id = approved_on_vertex(make_registry, db_url, fake, gcs, trained,
                                                     env={"STARCHART_APPLY_LEASE": "1.5"}, **options)
    worker = with_backend(reg, fast_backend(fake, reg.settings.bucket, **options))
    fake.operation_polls = 10**6  # the deploy runs until the test lets it finish
    deploys = fake.count("endpoints.deployModel")  # the first default's, when it was exposed
    result: dict[str, Any] = {}
    apply = threading.Thread(target=lambda: result.update(reg.promotions.apply_request(request_id, actor="U_OK")))
    apply.start()
    try:
        until(lambda: fake.count("endpoints.deployModel") > deploys, "the apply's deploy")
        first = request_row(reg, request_id).apply_lease_until
        assert first is not None
        seen: set[datetime | None] = set()

        def worker_pass() -> None:
            assert one_pass(worker)["reconciled"] == 0
            row = request_row(reg, request_id)
            assert row.state == "applying", f"settled under a live lease: {row.state} {row.error}"
            seen.add(row.apply_lease_until)

        until(lambda: len(seen) >= 4 and names.utcnow() > first, "renewals past the first lease's end",
              step=worker_pass)
        assert worker.backend.current_default("iris") == base, "the backend does not show the candidate yet"
    finally:
        fake.operation_polls = 1
        fake.finish_operations()
        apply.join(PATIENCE)
    assert not apply.is_alive() and result["state"] == "applied", result
    assert reg.backend.current_default("iris") == cand and reg.versions.default("iris") == cand
    assert actions(reg, request_id)[-2:] == ["promotion.applying", "promotion.applied"]
    row = request_row(reg, request_id)
    assert row.apply_owner is None and row.apply_lease_until is None, "the result ended the lease"
    assert not reg.audit.events(action="promotion.reconciled") and one_pass(worker)["reconciled"] == 0
    worker.close()
