"""Training progress from TensorBoard event files written by real Keras runs: the TFRecord reader (checksums, a torn
last record, corrupt files), locally and from Cloud Storage, and a running job's message in Slack (`epoch k/N`)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import pytest
from conftest import replay_args
from fakes.gcs_emulator import new_bucket, shared_gcs_emulator
from fakes.slack_fake import SlackFake

from bot.delivery import JobWatch, Sender, sender_client
from bot.text import fmt_number, progress_line
from model_registry.adapters import event_files
from model_registry.adapters.event_files import EventFileError, masked_crc32c, read_log_dir, records
from model_registry.adapters.storage import LocalStorage
from model_registry.config import SlackSettings
from model_registry.domain.progress import TrainingCurves
from model_registry.services import jobs as jobs_service

CHANNEL, PERSON = "C0MLPROG", "U0ADA"


def _event_file(logs: Path, run: str = "train") -> Path:
    (found,) = (logs / run).glob("events.out.tfevents.*")
    return found


def _frame(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


# ---------------------------------------------------------------- the reader, on a real Keras run's files


def test_a_real_keras_runs_event_files_give_its_curves_and_planned_epochs(trained: dict[str, Path]) -> None:
    curves = read_log_dir(LocalStorage(), str(trained["iris_b"] / "logs"))  # iris trained with --epochs=4
    assert curves is not None and curves.planned_epochs == 4 and curves.epochs_done == 4
    assert set(curves.runs) == {"train", "validation"} and curves.metrics() == ["loss", "accuracy"]
    for run in ("train", "validation"):
        for metric in ("loss", "accuracy"):
            assert [epoch for epoch, _ in curves.runs[run][metric]] == [0, 1, 2, 3], (run, metric)
    held_out = json.loads((trained["iris_b"] / "metrics.json").read_text())  # the last epoch's validation
    assert curves.last("validation", "loss") == pytest.approx(held_out["loss"], rel=1e-5)
    assert curves.last("validation", "accuracy") == pytest.approx(held_out["accuracy"], rel=1e-5)
    assert curves.progress() == {"epoch": 4, "planned": 4, "loss": curves.last("train", "loss")}


def test_the_sentiment_trainers_fit_logs_its_plan_and_epochs(trained_sentiment: Path) -> None:
    curves = read_log_dir(LocalStorage(), str(trained_sentiment / "logs"))  # Keras fit, --epochs=1
    assert curves is not None and (curves.planned_epochs, curves.epochs_done) == (1, 1)
    assert {"loss", "accuracy"} <= set(curves.runs["train"]) and {"loss", "accuracy"} <= set(curves.runs["validation"])


def test_a_torn_last_record_is_left_for_the_next_read(trained: dict[str, Path], tmp_path: Path) -> None:
    whole = _event_file(trained["iris_b"] / "logs").read_bytes()
    complete = list(records(whole))
    # file version, planned epochs, then loss and accuracy of each epoch
    assert len(complete) == 2 + 2 * 4
    cut = sum(12 + len(r) + 4 for r in complete[:4])  # up to the end of epoch 1
    # cut after epoch 1, in the next record's header, in its data; the last record (epoch 4's accuracy) torn
    for torn, done in ((whole[:cut], 1), (whole[:cut + 5], 1), (whole[:cut + 12 + 3], 1), (whole[:-1], 4)):
        logs = tmp_path / "logs"
        shutil.rmtree(logs, ignore_errors=True)
        (logs / "train").mkdir(parents=True)
        (logs / "train" / "events.out.tfevents.1.host.1.0.v2").write_bytes(torn)
        curves = read_log_dir(LocalStorage(), str(logs))
        assert curves is not None and (curves.epochs_done, curves.planned_epochs) == (done, 4), len(torn)
    assert len(curves.runs["train"]["accuracy"]) == 3 and len(curves.runs["train"]["loss"]) == 4


@pytest.mark.parametrize("where", ["length", "data", "footer"])
def test_a_damaged_record_makes_the_file_corrupt(trained: dict[str, Path], where: str) -> None:
    data = bytearray(_event_file(trained["iris_b"] / "logs").read_bytes())
    first = 12 + struct.unpack("<Q", data[:8])[0] + 4  # the second record starts here
    length = struct.unpack("<Q", data[first:first + 8])[0]
    at = {"length": first + 1, "data": first + 12 + length // 2, "footer": first + 12 + length + 1}[where]
    data[at] ^= 0x20
    with pytest.raises(EventFileError, match=f"at byte {first}"):
        list(event_files.scalars(bytes(data)))


def test_a_record_that_is_not_an_event_or_no_event_file_at_all(tmp_path: Path) -> None:
    with pytest.raises(EventFileError, match="not an Event"):
        list(event_files.scalars(_frame(b"\x0a\xff\xff\xff\x0fnot an event")))
    with pytest.raises(EventFileError, match="fails its checksum"):
        list(event_files.scalars(os.urandom(64)))
    (tmp_path / "logs" / "train").mkdir(parents=True)
    (tmp_path / "logs" / "train" / "notes.txt").write_text("no events here")
    assert read_log_dir(LocalStorage(), str(tmp_path / "logs")) is None
    assert read_log_dir(LocalStorage(), str(tmp_path / "nowhere")) is None
    assert TrainingCurves().progress() is None, "nothing logged and no plan: no progress line"


def test_event_files_in_cloud_storage_read_through_the_storage_adapter(trained: dict[str, Path]) -> None:
    from model_registry.adapters.gcs import GcsStorage

    url = shared_gcs_emulator()
    store = GcsStorage(project="starchart-test", emulator_host=url)
    logs = store.join(new_bucket(url), "iris", "20261208100000", "logs")
    for run in ("train", "validation"):
        source = _event_file(trained["iris_b"] / "logs", run)
        store.upload_file(source, store.join(logs, run, source.name))
    assert read_log_dir(store, logs) == read_log_dir(LocalStorage(), str(trained["iris_b"] / "logs"))


def test_a_vertex_jobs_curves_come_from_its_train_path_in_cloud_storage(
        make_registry: Any, sqlite_url: str, trained: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from fakes.vertex_fake import VertexFake, fast_backend, replay_runner, vertex_env

    url = shared_gcs_emulator()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    bucket = new_bucket(url)
    with VertexFake() as fake:
        fake.runner = replay_runner(url)
        reg = make_registry(sqlite_url, backend=fast_backend(fake, bucket), env=vertex_env(bucket))
        job = reg.jobs.wait(reg.jobs.train("iris", PERSON, args=replay_args(trained["iris_a"]))["job_id"], timeout=60)
        assert job["state"] == "SUCCEEDED" and job["train_path"].startswith(bucket)
        curves = reg.jobs.curves(job["job_id"])
    assert curves == read_log_dir(LocalStorage(), str(trained["iris_a"] / "logs"))
    assert curves is not None and curves.progress() == {"epoch": 2, "planned": 2, "loss": curves.last("train", "loss")}


TF_EVENT_SCRIPT = textwrap.dedent("""
    import json, sys
    from google.protobuf import descriptor_pb2
    from tensorflow.core.util import event_pb2
    mine = descriptor_pb2.FileDescriptorProto.FromString(open(sys.argv[1], "rb").read())
    pool = event_pb2.DESCRIPTOR.pool
    def walk(messages, prefix):
        for m in messages:
            yield prefix + m.name
            yield from walk(m.nested_type, prefix + m.name + ".")
    out = {}
    for name in walk(mine.message_type, mine.package + "."):
        d = pool.FindMessageTypeByName(name)
        out[name] = {f.name: [f.number, f.type, f.is_repeated, f.message_type and f.message_type.full_name,
                              f.containing_oneof and f.containing_oneof.name] for f in d.fields}
    print(json.dumps(out))
""")


def test_the_event_subset_is_tensorflows_schema(tmp_path: Path) -> None:
    """Every field of the subset has TensorFlow's number, type and oneof (dtype: its enum read as int32)."""
    from google.protobuf import descriptor_pool, message_factory

    schema = event_files.event_schema()
    (tmp_path / "subset.pb").write_bytes(schema.SerializeToString())
    proc = subprocess.run([sys.executable, "-c", TF_EVENT_SCRIPT, str(tmp_path / "subset.pb")],
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    for name, fields in theirs.items():
        mine = message_factory.GetMessageClass(pool.FindMessageTypeByName(name)).DESCRIPTOR
        for field in mine.fields:
            number, kind, repeated, message, oneof = fields[field.name]
            enum_as_int32 = kind == 14 and field.type == 5  # TYPE_ENUM read as TYPE_INT32: the same varint
            assert (field.number, field.type if not enum_as_int32 else kind, field.is_repeated) == \
                (number, kind, repeated), f"{name}.{field.name}"
            assert (field.message_type and field.message_type.full_name) == message, f"{name}.{field.name}"
            assert (field.containing_oneof and field.containing_oneof.name) == oneof, f"{name}.{field.name}"


def test_the_progress_line() -> None:
    assert progress_line({"epoch": 2, "planned": 4, "loss": 0.51234}) == \
        "epoch 2/4 " + "█" * 10 + "░" * 10 + " · loss 0.5123"
    assert progress_line({"epoch": 0, "planned": 30, "loss": None}) == "epoch 0/30 " + "░" * 20
    assert progress_line({"epoch": 1, "planned": None, "loss": 2.0}) == "1 epoch done · loss 2.0000"
    assert progress_line({"epoch": 3, "planned": None, "loss": None}) == "3 epochs done"


# ---------------------------------------------------------------- a running job's message in Slack


@pytest.fixture
def slack() -> Iterator[SlackFake]:
    fake = SlackFake(channels={CHANNEL: "ml"})
    fake.add_user(PERSON, "ada")
    with fake:
        yield fake


@pytest.fixture
def delivering(make_registry: Any, sqlite_url: str, slack: SlackFake,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A registry whose training messages go to the Slack fake, running ones refreshed every 0.2 s."""
    monkeypatch.setattr(jobs_service, "RUNNING_MESSAGE_EVERY", timedelta(seconds=0.2))
    reg = make_registry(sqlite_url)
    client = sender_client(SlackSettings.from_env({"SLACK_API_URL": slack.base_url, "SLACK_BOT_TOKEN": slack.token}))
    sender = Sender(reg, client, backoff=0.05, poll=0.05).start()
    watch = JobWatch(reg, interval=0.05).start()
    try:
        yield reg
    finally:
        sender.stop()
        watch.stop()


def _message_of(slack: SlackFake, job_id: str) -> str:
    shown = [json.dumps(m, ensure_ascii=False) for m in slack.messages.values() if job_id in json.dumps(m)]
    return shown[0] if len(shown) == 1 else ""


def test_a_running_jobs_message_shows_epoch_k_of_n_and_the_last_loss(delivering: Any, slack: SlackFake,
                                                                      trained: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    reg, release = delivering, tmp_path / "release"
    # iris_b's train run cut after 6 records: file version, planned epochs (4), loss and accuracy of 2 epochs
    job = reg.jobs.train("iris", PERSON, args=replay_args(trained["iris_b"], f"--hold={release}", "--hold-records=6"),
                         message_channel=CHANNEL)
    source = read_log_dir(LocalStorage(), str(trained["iris_b"] / "logs"))
    assert source is not None
    loss = fmt_number(source.runs["train"]["loss"][1][1])
    expected = f"epoch 2/4 {'█' * 10}{'░' * 10} · loss {loss}"
    slack.wait_for(lambda: expected in _message_of(slack, job["job_id"]), timeout=60)
    assert "*running*" in _message_of(slack, job["job_id"])
    release.touch()
    slack.wait_for(lambda: "*succeeded*" in _message_of(slack, job["job_id"]), timeout=60)
    assert "epoch " not in _message_of(slack, job["job_id"]), "a finished training shows its metrics instead"


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_damaged_or_missing_event_files_show_no_progress_and_change_nothing_else(
        delivering: Any, slack: SlackFake, trained: dict[str, Path], tmp_path: Path, damage: str) -> None:
    reg, release = delivering, tmp_path / "release"
    job = reg.jobs.train("iris", PERSON, args=replay_args(trained["iris_b"], f"--hold={release}", "--hold-records=6"),
                         message_channel=CHANNEL)
    slack.wait_for(lambda: "epoch 2/4" in _message_of(slack, job["job_id"]), timeout=60)
    logs = Path(reg.jobs.get(job["job_id"])["train_path"]) / "logs"
    if damage == "corrupt":
        events = _event_file(logs)
        data = bytearray(events.read_bytes())
        data[len(data) // 2] ^= 0xFF
        events.write_bytes(bytes(data))
    else:
        shutil.rmtree(logs)
    seen = len(slack.calls_to("chat.update"))
    slack.wait_for(lambda: len(slack.calls_to("chat.update")) >= seen + 2, timeout=60)  # one rendered after it
    shown = _message_of(slack, job["job_id"])
    assert "*running*" in shown and "epoch " not in shown and "loss" not in shown, shown
    release.touch()
    slack.wait_for(lambda: "*succeeded*" in _message_of(slack, job["job_id"]), timeout=60)
    assert reg.jobs.get(job["job_id"])["state"] == "SUCCEEDED"
    assert reg.jobs.metrics(job["job_id"]) == json.loads((trained["iris_b"] / "metrics.json").read_text())
