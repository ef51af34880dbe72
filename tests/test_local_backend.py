"""The local backend: staged sdist, Vertex environment, job states, logs, cancel, and surviving restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import read_json, replay_args, train_and_wait

from model_registry.adapters.backends.local_runner import ProcessWatch, proc_start_time
from model_registry.domain.errors import InvalidInput, NotFound


def test_job_runs_staged_sdist_with_vertex_environment(make_registry: Any, sqlite_url: str, trained: dict,
                                                       tmp_path: Path) -> None:
    reg = make_registry(sqlite_url)
    dump = tmp_path / "env.json"
    job = train_and_wait(reg, "iris", "U_T", replay_args(trained["iris_a"], f"--dump-env={dump}",
                                                         "--job-dir=TRAIN_PATH"))
    assert job["state"] == "SUCCEEDED"
    seen = read_json(dump)
    env, tp = seen["env"], job["train_path"]
    assert tp == f"{reg.settings.bucket}/iris/{job['job_id'].rsplit('_', 1)[1]}"
    assert env["AIP_MODEL_DIR"] == f"{tp}/model/"
    assert env["AIP_CHECKPOINT_DIR"] == f"{tp}/checkpoints/"
    assert env["AIP_TENSORBOARD_LOG_DIR"] == f"{tp}/logs/"
    assert env["CLOUD_ML_JOB_ID"] == job["job_id"]
    tf_config, cluster = json.loads(env["TF_CONFIG"]), json.loads(env["CLUSTER_SPEC"])
    assert tf_config["task"] == {"type": "chief", "index": 0} and len(tf_config["cluster"]["chief"]) == 1
    assert cluster["task"] == {"type": "workerpool0", "index": 0}
    assert f"--job-dir={tp}" in seen["argv"], "the literal TRAIN_PATH is replaced in trainer args"
    # the code that ran is the staged sdist, not the source folder
    assert str(reg.settings.home / "jobs" / job["job_id"]) in seen["file"]
    assert str(reg.config.trainer_base) not in seen["file"]
    package = Path(job["package_uris"][0])
    assert package.parent == Path(tp) / "packages" and package.name.endswith(".tar.gz")
    with tarfile.open(package) as tar:
        members = tar.getnames()
    assert any(m.endswith("trainer/task.py") for m in members)
    assert any(m.endswith("/setup.py") for m in members), "a minimal setup.py is generated when missing"
    assert not (reg.config.trainer_base / "iris" / "setup.py").exists(), "the source folder is left untouched"
    import hashlib

    assert job["package_sha256"] == hashlib.sha256(package.read_bytes()).hexdigest()
    assert "replay trainer: job" in reg.jobs.logs(job["job_id"])


def test_crashing_trainer_fails_with_log_tail(make_registry: Any, sqlite_url: str) -> None:
    reg = make_registry(sqlite_url)
    job = train_and_wait(reg, "iris", "U_T", ["--crash"])
    assert job["state"] == "FAILED"
    assert "exited with code 3" in job["error"] and "crashed on purpose" in job["error"]
    assert reg.audit.events(action="training.failed")[0]["job_id"] == job["job_id"]


def test_exit_zero_without_saved_model_fails(make_registry: Any, sqlite_url: str) -> None:
    reg = make_registry(sqlite_url)
    job = train_and_wait(reg, "iris", "U_T", ["--no-model"])
    assert job["state"] == "FAILED" and "no SavedModel" in job["error"]
    assert reg.versions.expose("iris", "U_T")["exposed"] == []


def test_cancel_running_job(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = make_registry(sqlite_url)
    job = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"], "--sleep=60"))
    _wait_state(reg, job["job_id"], "RUNNING")
    assert reg.jobs.cancel(job["job_id"], "U_T")["state"] == "CANCELLED"
    pid = json.loads((reg.settings.home / "jobs" / job["job_id"] / "status.json").read_text())["pid"]
    _wait_gone(pid)
    assert reg.jobs.get(job["job_id"])["state"] == "CANCELLED"
    with pytest.raises(InvalidInput):
        reg.jobs.cancel(job["job_id"], "U_T")
    assert "training.cancelled" in [e["action"] for e in reg.audit.events()]


def test_waiting_wakes_when_the_runner_exits(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    """`wait_for_change` sleeps on the runner's pidfd: it returns when the job ends, not at the end of its period."""
    reg = make_registry(sqlite_url)
    job = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"], "--sleep=1"))
    _wait_state(reg, job["job_id"], "RUNNING")
    t0 = time.monotonic()
    reg.backend.wait_for_change(job["job_id"], 600)
    assert time.monotonic() - t0 < 300, "slept the whole period instead of waking when the runner exited"
    assert reg.backend.status(job["job_id"], None).state == "SUCCEEDED"
    reg.backend.wait_for_change(job["job_id"], 600)  # an ended job: no runner to watch, returns at once
    assert reg.jobs.wait(job["job_id"])["state"] == "SUCCEEDED"


def test_job_survives_a_bot_restart(make_registry: Any, sqlite_url: str, trained: dict, tmp_path: Path) -> None:
    reg = make_registry(sqlite_url)
    job = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"], "--sleep=1.5"))
    reg.db.engine.dispose()
    del reg  # the bot process is gone; the job goes on
    again = make_registry(sqlite_url, home=tmp_path / "home")
    assert again.jobs.wait(job["job_id"])["state"] == "SUCCEEDED"


def test_killed_runner_is_marked_failed_not_stuck(make_registry: Any, sqlite_url: str, trained: dict) -> None:
    reg = make_registry(sqlite_url)
    job = reg.jobs.train("iris", "U_T", args=replay_args(trained["iris_a"], "--sleep=60"))
    _wait_state(reg, job["job_id"], "RUNNING")
    status = json.loads((reg.settings.home / "jobs" / job["job_id"] / "status.json").read_text())
    os.killpg(status["pid"], signal.SIGKILL)  # the machine "restarts": runner and trainer die at once
    _wait_gone(status["pid"])
    final = reg.jobs.wait(job["job_id"], timeout=30)
    assert final["state"] == "FAILED" and "stopped without a result" in final["error"]


def test_unknown_model_and_module_are_refused_before_anything_is_written(make_registry: Any,
                                                                         sqlite_url: str) -> None:
    reg = make_registry(sqlite_url)
    with pytest.raises(NotFound) as model:
        reg.jobs.train("irsi", "U_T")
    assert "did you mean iris" in model.value.hint
    with pytest.raises(NotFound) as module:
        reg.jobs.train("iris", "U_T", module="trainer.nope")
    assert "trainer.nope" in module.value.message
    with pytest.raises(InvalidInput):
        reg.jobs.train("iris", "U_T", module="trainer/task")
    for bad in ("IRIS", "../etc", "x" * 64):
        with pytest.raises(InvalidInput):
            reg.jobs.train(bad, "U_T")
    assert reg.audit.events() == []
    assert not (reg.settings.home / "jobs").exists()


def test_runner_pid_identity_uses_process_start_time() -> None:
    assert proc_start_time(os.getpid()) is not None
    assert proc_start_time(2 ** 22 + 12345) is None


@pytest.mark.parametrize("way", ["pidfd", "start-time"])
def test_a_process_watch_sees_the_end_of_the_process_it_was_made_for(way: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    if way == "start-time":
        monkeypatch.delattr(os, "pidfd_open", raising=False)  # a kernel or Python without pidfds
    elif not hasattr(os, "pidfd_open"):
        pytest.skip("this Python has no os.pidfd_open")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        watch = ProcessWatch(proc.pid, proc_start_time(proc.pid))
        assert watch.uses_pidfd == (way == "pidfd")
        assert watch.alive() and watch.alive()
        # the same pid with another start time: a process that reused the pid of one seen before
        assert not ProcessWatch(proc.pid, "1").alive()
        assert not ProcessWatch(proc.pid, None).alive()
        proc.kill()
        proc.wait()  # reaped: its pid may be given to another process from here on
        assert not watch.alive()
        assert not watch.alive()  # and stays so
        watch.close()
        assert not watch.alive()
    finally:
        proc.kill()
        proc.wait()
    gone = ProcessWatch(proc.pid, "1")
    assert not gone.alive()


def _wait_state(reg: Any, job_id: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reg.jobs.refresh()
        if reg.jobs.get(job_id)["state"] == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"{job_id} never reached {state}: {reg.jobs.get(job_id)}")


def _wait_gone(pid: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def test_a_runner_that_ends_while_its_status_is_read_is_not_called_killed(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The status file said RUNNING; the runner then wrote its result and exited before the liveness check."""
    import json
    import time

    from model_registry.adapters.backends.local import LocalBackend

    backend = LocalBackend(tmp_path / "home")
    job_dir = backend.jobs / "iris_20261201000000"
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(json.dumps({"submitted_at": time.time()}))
    running = {"state": "RUNNING", "pid": 999_999_999, "pid_start": "1", "started_at": time.time()}
    (job_dir / "status.json").write_text(json.dumps(running))

    def finished_meanwhile(status: dict) -> bool:
        (job_dir / "status.json").write_text(json.dumps({**running, "state": "SUCCEEDED", "ended_at": time.time()}))
        return False

    monkeypatch.setattr(backend, "_alive", finished_meanwhile)
    assert backend.status("iris_20261201000000", None).state == "SUCCEEDED"
    monkeypatch.setattr(backend, "_alive", lambda status: False)
    (job_dir / "status.json").write_text(json.dumps(running))
    gone = backend.status("iris_20261201000000", None)
    assert gone.state == "FAILED" and "stopped without a result" in (gone.error or "")


def test_the_model_servers_log_is_read_from_its_end_and_started_anew_when_large(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: server.log was opened in append mode forever and read whole for its last lines (it had a line per
    request). Now a starting model server finds it over SERVER_LOG_MAX and starts a new one, one old copy kept."""
    from model_registry.adapters.backends import local
    from model_registry.adapters.backends.local import LocalBackend

    log = tmp_path / "big.log"
    log.write_bytes(b"x" * 100_000 + b"\nnext to last\nlast words\n\n")
    assert local._last_lines(log, 64)[-2:] == ["next to last", "last words"]
    assert local._last_lines(tmp_path / "gone.log", 64) == []

    backend = LocalBackend(tmp_path / "home")
    backend.serving.mkdir(parents=True)
    old = b"an old server's line\n" * 8
    (backend.serving / "server.log").write_bytes(old)
    monkeypatch.setattr(local, "SERVER_LOG_MAX", len(old) - 1)
    try:
        backend.ensure_server()
        assert (backend.serving / "server.log.1").read_bytes() == old
        assert not (backend.serving / "server.log").read_bytes().startswith(b"an old server's line")
    finally:
        backend.stop_server()
