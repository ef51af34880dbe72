"""Charts: PNGs of a metric across versions and of training curves read from real Keras event files, in a review
card's thread through the Slack fake, and on demand (`chart`, from chat and the CLI)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import ROOT, expose_two_versions
from fakes.slack_fake import SlackFake

from bot.console import Console
from bot.delivery import Sender, sender_client
from model_registry.adapters import charts
from model_registry.config import SlackSettings
from model_registry.domain.errors import InvalidInput, NotFound

CHANNEL, PERSON = "C0MLCHART", "U0ADA"


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's signature and IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


def decoded(data: bytes) -> Any:
    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(data), format="png")


@pytest.fixture
def two(make_registry: Any, sqlite_url: str, trained: dict[str, Path]) -> Any:
    """iris with two versions replayed from real Keras runs (2 and 4 epochs): the first is the default."""
    return expose_two_versions(make_registry(sqlite_url, defaults={"channel": CHANNEL}), trained)


def test_the_history_chart_marks_the_default_across_versions(two: Any, tmp_path: Path) -> None:
    listing = two.versions.of_model("iris")
    old, new = listing["versions"][1]["name"], listing["versions"][0]["name"]
    made = two.charts.history("iris", candidate=new, to=str(tmp_path))
    assert (made["metric"], made["versions"], made["kind"]) == ("accuracy", [old, new], "history")
    assert png_size(made["png"]) == (900, 450) and decoded(made["png"]).shape[:2] == (450, 900)
    assert Path(made["path"]) == tmp_path / "iris-accuracy-history.png"
    assert Path(made["path"]).read_bytes() == made["png"]
    assert two.charts.history("iris", "loss")["metric"] == "loss"


def test_an_unknown_metric_says_which_exist_and_a_model_without_versions_says_so(two: Any) -> None:
    with pytest.raises(InvalidInput, match="no version of iris has a metric 'f1'") as told:
        two.charts.history("iris", "f1")
    assert told.value.hint == "use one of: accuracy, loss"
    two.jobs.train("sentiment", PERSON, args=[])  # known, no versions
    with pytest.raises(NotFound, match="sentiment has no versions yet"):
        two.charts.history("sentiment")


def test_a_promotion_requests_charts_show_the_candidates_curves_beside_the_defaults(two: Any) -> None:
    new = two.versions.of_model("iris")["versions"][0]["name"]
    req = two.promotions.promote("iris", new, PERSON)
    history, curves = two.charts.for_request(req["id"])
    assert history["kind"] == "history" and new in history["versions"]
    assert curves["kind"] == "curves" and curves["versions"] == [new, req["base"]]
    # two metrics (loss, accuracy) by two versions: 2 x 4.5 in by 2 x 2.6 in at 100 dpi
    assert png_size(curves["png"]) == (900, 520) and decoded(curves["png"]).shape[:2] == (520, 900)


def test_curves_of_a_version_without_event_files_leave_its_panel_empty(trained: dict[str, Path]) -> None:
    from model_registry.adapters.event_files import read_log_dir
    from model_registry.adapters.storage import LocalStorage

    only = read_log_dir(LocalStorage(), str(trained["iris_a"] / "logs"))
    one = charts.curves_png("iris", [("candidate v1", only), ("default v0", None)])
    assert png_size(one) == (900, 520)
    image = decoded(one)
    left, right = image[60:480, 60:440], image[60:480, 510:890]
    assert left.std() > right.std(), "the candidate's panel has lines, the default's only its note"


@pytest.fixture
def slack() -> Iterator[SlackFake]:
    fake = SlackFake(channels={CHANNEL: "ml"})
    fake.add_user(PERSON, "ada")
    with fake:
        yield fake


def test_a_review_cards_charts_arrive_in_its_thread(two: Any, slack: SlackFake) -> None:
    new = two.versions.of_model("iris")["versions"][0]["name"]
    client = sender_client(SlackSettings.from_env({"SLACK_API_URL": slack.base_url, "SLACK_BOT_TOKEN": slack.token}))
    sender = Sender(two, client, backoff=0.05, poll=0.05).start()
    try:
        req = two.promotions.promote("iris", new, PERSON, card=True)
        uploads = slack.wait_for(lambda: [u for u in slack.uploads if u["filename"].endswith(".png")] or None,
                                 timeout=60)
    finally:
        sender.stop()
    card = two.promotions.get(req["id"])
    assert card["message_ts"] and {u["thread_ts"] for u in uploads} == {card["message_ts"]}
    row = two.outbox.about("card_charts", str(req["id"]))
    history, curves = f"iris-accuracy-history.outbox-{row['id']}.png", f"iris-{new}-curves.outbox-{row['id']}.png"
    assert sorted(u["filename"] for u in uploads) == [history, curves]
    sizes = {u["filename"]: png_size(u["content"]) for u in uploads}
    assert sizes == {curves: (900, 520), history: (900, 450)}
    assert row["state"] == "delivered"
    assert len(slack.calls_to("files.completeUploadExternal")) == 1, "both charts in one upload"


def test_charts_whose_upload_reply_was_lost_are_not_uploaded_again(two: Any, slack: SlackFake) -> None:
    new = two.versions.of_model("iris")["versions"][0]["name"]
    client = sender_client(SlackSettings.from_env({"SLACK_API_URL": slack.base_url, "SLACK_BOT_TOKEN": slack.token}))
    client.timeout = 2
    slack.lose_reply_next("files.completeUploadExternal", after=3.0)  # shared in the thread; the answer never comes
    sender = Sender(two, client, backoff=0.05, poll=0.05).start()
    try:
        req = two.promotions.promote("iris", new, PERSON, card=True)
        slack.wait_for(lambda: (two.outbox.about("card_charts", str(req["id"])) or {}).get("state") == "delivered",
                       timeout=60)
    finally:
        sender.stop()
    pngs = [u["filename"] for u in slack.uploads if u["filename"].endswith(".png")]
    assert len(pngs) == 2 and len(set(pngs)) == 2, pngs
    assert slack.calls_to("files.list"), "the retry looked for the first attempt's files"


def test_chart_in_chat_uploads_the_png_and_an_unknown_metric_is_told(two: Any) -> None:
    shown: list[str] = []
    console = Console(two, PERSON, write=shown.append, ask=lambda _p: "")
    uploaded: list[Any] = []
    console.out.upload = lambda channel, upload, thread_ts=None: uploaded.append(upload)  # type: ignore[method-assign]
    console.handle("/ml chart iris loss")
    (upload,) = uploaded
    assert upload.filename == "iris-loss-history.png" and png_size(upload.data) == (900, 450)
    shown.clear()
    console.handle("/ml chart iris f1")
    said = "\n".join(shown)
    assert "no version of iris has a metric 'f1'" in said and "accuracy, loss" in said


def test_starchart_chart_writes_the_png(two: Any, tmp_path: Path) -> None:
    env = {**os.environ, "STARCHART_HOME": str(two.settings.home), "STARCHART_CONFIG": str(two.settings.config_path),
           "DATABASE_URL": two.settings.database_url}
    target = tmp_path / "out.png"
    proc = subprocess.run([sys.executable, "-m", "bot.cli", "--json", "chart", "iris", "loss", "--to", str(target)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["path"] == str(target) and data["metric"] == "loss" and "png" not in data
    assert png_size(target.read_bytes()) == (900, 450)
    bad = subprocess.run([sys.executable, "-m", "bot.cli", "chart", "iris", "f1", "--to", str(target)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "use one of: accuracy, loss" in bad.stdout + bad.stderr


def test_the_gate_metric_is_charted_when_none_is_named(make_registry: Any, sqlite_url: str,
                                                        trained: dict[str, Path]) -> None:
    reg = expose_two_versions(make_registry(sqlite_url, defaults={"gate": {"metric": "loss"}}), trained)
    assert reg.charts.history("iris")["metric"] == "loss"

