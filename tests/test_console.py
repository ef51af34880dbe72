"""`starchart console` drives exactly the Slack handlers; here the whole review flow, typed as in Slack."""

from __future__ import annotations

from typing import Any

from conftest import with_backend

from bot.console import Console


def _console(reg: Any, user: str, answers: list[str] | None = None) -> tuple[Console, list[str]]:
    out: list[str] = []
    answers = list(answers or [])
    console = Console(reg, user, write=out.append, ask=lambda _p: answers.pop(0), follow_interval=0.05)
    return console, out


def test_console_review_flow(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = make_registry(sqlite_url, defaults={"approvers": ["U_ALICE", "U_BOB", "U_CAROL"], "required_approvals": 1})
    console, out = _console(reg, "U_ALICE", answers=["loss is worse"])
    for src in (trained["iris_a"], trained["iris_b"]):
        console.handle(f"/ml train iris — —source={src}")
    text = "\n".join(out)
    assert text.count("succeeded") >= 2 and "accuracy" in text
    console.handle("/ml expose iris")
    newest = reg.versions.of_model("iris")["versions"][0]["name"]
    out.clear()
    console.handle(f"/ml promote iris {newest} --reason “better”")
    card = "\n".join(out)
    assert "== Review: iris" in card and "[1] Approve" in card and "[2] Reject" in card
    out.clear()
    console.handle("1")  # Alice clicks Approve on her own request
    assert "may not approve" in "\n".join(out)
    console.handle("/as U_MALLORY")
    out.clear()
    console.handle("1")
    assert "not an approver" in "\n".join(out)
    console.handle("/as U_BOB")
    out.clear()
    console.handle("2")  # Reject opens the form, Bob gives a reason
    after = "\n".join(out)
    assert "rejected by @U_BOB" in after and "loss is worse" in after
    assert reg.promotions.get(1)["state"] == "rejected"
    out.clear()
    console.handle(f"/ml promote iris {newest}")
    console.handle("/as U_CAROL")
    approve = max(i for i, b in enumerate(console.buttons, start=1) if b[0] == "review.approve")
    console.handle(str(approve))  # Approve on the new card
    assert reg.versions.default("iris") == newest
    assert "applied" in "\n".join(out)
    out.clear()
    console.handle("/ml audit iris --action approval.refused")
    refused = "\n".join(out)
    assert refused.count("approval.refused") == 2
    out.clear()
    console.handle("/ml nonsense")
    assert "unknown command 'nonsense'" in "\n".join(out)
    assert console.handle("/quit") is False


def test_console_retry_after_a_failed_apply_and_audit_pages(make_registry: Any, sqlite_url: str,
                                                            trained: dict) -> None:
    from test_workflow import FailingBackend

    reg = make_registry(sqlite_url, defaults={"approvers": ["U_BOB"], "required_approvals": 1})
    for src in (trained["iris_a"], trained["iris_b"]):
        job = reg.jobs.train("iris", "U_ALICE", args=[f"--source={src}"])
        reg.jobs.wait(job["job_id"])
    reg.versions.expose("iris", "U_ALICE")
    reg = with_backend(reg, FailingBackend(reg.backend))
    console, out = _console(reg, "U_ALICE")
    newest = reg.versions.of_model("iris")["versions"][0]["name"]
    console.handle(f"/ml promote iris {newest}")
    console.handle("/as U_BOB")
    out.clear()
    console.handle("1")  # Approve: the backend fails half way
    failed = "\n".join(out)
    assert "apply failed: RuntimeError: 503 backend unavailable" in failed and "] Retry" in failed
    retry = next(i for i, b in enumerate(console.buttons, start=1) if b[0] == "review.retry")
    console.handle("/as U_ALICE")
    out.clear()
    console.handle(str(retry))
    assert "not an approver" in "\n".join(out), "only an approver may retry"
    reg.backend.fail = False
    console.handle("/as U_BOB")
    out.clear()
    console.handle(str(retry))
    assert ":rocket: applied" in "\n".join(out) and reg.versions.default("iris") == newest
    out.clear()
    console.handle("/ml audit iris --limit 3")
    first = "\n".join(out)
    assert "] Next" in first
    out.clear()
    console.handle(str(next(i for i, b in enumerate(console.buttons, start=1) if b[0] == "audit.next")))
    assert "Audit events of iris" in "\n".join(out)
    out.clear()
    console.handle("/ml audit iris --csv")
    assert "[file audit.csv" in "\n".join(out) and "promotion.applied" in "\n".join(out)
    out.clear()
    from datetime import timedelta

    from model_registry.domain.names import utcnow

    console.handle(f"/ml audit iris --at {(utcnow() + timedelta(seconds=2)).isoformat(timespec='seconds')}")
    assert "approved by U_BOB" in "\n".join(out)


def test_console_job_and_version_commands(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = make_registry(sqlite_url)
    console, out = _console(reg, "U_ALICE")
    console.handle(f"/ml train iris — —source={trained['iris_a']}")
    job_id = reg.jobs.state("iris")[0]["job_id"]
    for line, expected in ((f"/ml logs {job_id}", "replay trainer: job"), ("/ml jobs iris", "SUCCEEDED"),
                           ("/ml expose iris", "exposed `v"), ("/ml versions iris", "(default v"),
                           ("/ml requests iris", "(none)"), ("/ml logs nope", "invalid job id"),
                           ("/ml cancel " + job_id, "already ended"), ("/ml diff iris", "nothing to compare it with"),
                           ("/ml show 99", "no promotion request #99"), ("/ml help promote", "--reason"),
                           ("/ml", "usage: /ml")):
        out.clear()
        console.handle(line)
        assert expected in "\n".join(out), (line, out)


def test_console_try_answers_both_versions(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = make_registry(sqlite_url, defaults={"approvers": ["U_BOB"]})
    flower = '{"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3}'
    console, out = _console(reg, "U_BOB", answers=["", "{\"sepal_length\": \"long\"}", "-", flower])
    for src in (trained["iris_a"], trained["iris_b"]):
        console.handle(f"/ml train iris — —source={src}")
    console.handle("/ml expose iris")
    default = reg.versions.default("iris")
    newest = reg.versions.of_model("iris")["versions"][0]["name"]
    console.handle(f"/ml promote iris {newest}")
    try_button = str(max(i for i, b in enumerate(console.buttons, start=1) if b[0] == "review.try"))
    try:
        out.clear()
        console.handle(try_button)  # Enter: the example instance, built from the signature
        shown = "\n".join(out)
        assert f"Try iris {newest}" in shown and "sepal_length (" in shown
        assert f"iris: {newest} vs the default {default}" in shown and "agreement:" in shown
        out.clear()
        console.handle(try_button)  # a wrong value is refused, naming the field
        assert "error: sepal_length: type a number (float32), not 'long'" in "\n".join(out)
        console.handle(try_button)
        assert "(cancelled)" in out[-1]
        out.clear()
        console.handle(try_button)
        shown = "\n".join(out)
        assert f"candidate {newest}:" in shown and f"default {default}:" in shown and "class_ids" in shown
        assert reg.promotions.get(1)["state"] == "open", "trying decides nothing"
    finally:
        reg.backend.stop_server()
