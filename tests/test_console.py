"""`starchart console` drives exactly the Slack handlers; here the whole review flow, typed as in Slack."""

from __future__ import annotations

from typing import Any

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
    newest = reg.versions("iris")["versions"][0]["name"]
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
    assert reg.request(1)["state"] == "rejected"
    out.clear()
    console.handle(f"/ml promote iris {newest}")
    console.handle("/as U_CAROL")
    console.handle(str(len(console.buttons) - 1))  # Approve on the new card
    assert reg.default_version("iris") == newest
    assert "applied" in "\n".join(out)
    out.clear()
    console.handle("/ml audit iris --action approval.refused")
    refused = "\n".join(out)
    assert refused.count("approval.refused") == 2
    out.clear()
    console.handle("/ml nonsense")
    assert "unknown command 'nonsense'" in "\n".join(out)
    assert console.handle("/quit") is False
