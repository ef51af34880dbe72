"""Runs one local training job, detached from whoever started it (stdlib only: no TensorFlow here).

`python -m model_registry.adapters.backends.local_runner JOB_DIR` reads JOB_DIR/spec.json, unpacks the staged
sdist, starts the trainer's worker processes with the environment Vertex AI sets, and records the
outcome in JOB_DIR/status.json, so a restarted bot finds the job again.

The runner re-executes itself with a clean environment before anything else (`trainer_environment`): a
trainer runs as the bot's user and could read its parent's environment, so the bot's secrets never reach either.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

BASE_ENV = ("PATH", "HOME", "PYTHONPATH", "LANG", "LC_ALL", "TMPDIR")  # what any Python program expects to find
CLEAN = "--clean"  # argv marker: this runner already runs in the clean environment


def trainer_environment(environ: dict[str, str], extra: list[str]) -> dict[str, str]:
    """The runner's (and so the trainer's) environment: BASE_ENV and the names `trainer_env` lists, nothing else."""
    return {name: environ[name] for name in (*BASE_ENV, *extra) if name in environ}


def write_status(job_dir: Path, status: dict[str, Any]) -> None:
    tmp = job_dir / f".status.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(status))
    os.replace(tmp, job_dir / "status.json")


def proc_start_time(pid: int) -> str | None:
    """The kernel's start time of a live process, to tell a running runner from a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else fields[19]  # a zombie has finished: not alive


class ProcessWatch:
    """Whether one process, known by its pid and its start time (proc_start_time), still runs: asked on every
    prediction, so it must cost next to nothing. Through a pidfd (Linux 5.3 and later), which becomes readable when
    the process ends: a poll of it, where reading /proc/PID/stat took 0.1 ms of CPU. A pid reused after the
    process ended is never taken for it (the pidfd stays with the process it was opened for, and the start time
    is checked once it is open). Without pidfds the start time is read on each question.
    """

    def __init__(self, pid: int, start: str | None) -> None:
        self.pid, self.start = pid, start
        self._lock = threading.Lock()  # threads ask at once; the pidfd is closed under it, never while polled
        self._fd: int | None = None
        self._poll: select.poll | None = None
        self._gone = start is None
        pidfd_open = getattr(os, "pidfd_open", None)
        if self._gone or pidfd_open is None:
            return
        try:
            fd = pidfd_open(pid)
        except ProcessLookupError:
            self._gone = True
            return
        except OSError:  # no pidfds here (an old kernel, a sandbox refusing the call): the start time each time
            return
        if proc_start_time(pid) != start:  # the pid was reused before it was opened: the process is gone
            os.close(fd)
            self._gone = True
            return
        self._fd, self._poll = fd, select.poll()
        self._poll.register(fd, select.POLLIN)

    @property
    def uses_pidfd(self) -> bool:
        return self._poll is not None

    def alive(self) -> bool:
        with self._lock:
            if self._gone:
                return False
            if self._poll is None:
                self._gone = proc_start_time(self.pid) != self.start
            elif self._poll.poll(0):  # readable: the process has ended
                self._gone = True
                self._release()
            return not self._gone

    def close(self) -> None:
        with self._lock:
            self._gone = True
            self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._poll = None


def unpack(package: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(package) as tar:
        tar.extractall(dest, filter="data")
    tops = [p for p in dest.iterdir() if p.is_dir()]
    return tops[0] if len(tops) == 1 else dest


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def cluster_env(workers: int, index: int, ports: list[int]) -> dict[str, str]:
    """TF_CONFIG and CLUSTER_SPEC as Vertex AI sets them: pool 0 is the chief, pool 1 the workers."""
    hosts = [f"127.0.0.1:{p}" for p in ports]
    cluster: dict[str, list[str]] = {"chief": hosts[:1]}
    pools: dict[str, list[str]] = {"workerpool0": hosts[:1]}
    if workers > 1:
        cluster["worker"] = hosts[1:]
        pools["workerpool1"] = hosts[1:]
    task_type, task_index = ("chief", 0) if index == 0 else ("worker", index - 1)
    pool = "workerpool0" if index == 0 else "workerpool1"
    tf_config = {"cluster": cluster, "task": {"type": task_type, "index": task_index}, "environment": "cloud"}
    spec = {"cluster": pools, "environment": "cloud", "task": {"type": pool, "index": task_index}}
    return {"TF_CONFIG": json.dumps(tf_config), "CLUSTER_SPEC": json.dumps(spec)}


def run(job_dir: Path) -> int:
    spec = json.loads((job_dir / "spec.json").read_text())
    started = time.time()
    status: dict[str, Any] = {
        "state": "RUNNING", "pid": os.getpid(), "pid_start": proc_start_time(os.getpid()), "started_at": started,
    }
    write_status(job_dir, status)
    children: list[subprocess.Popen[bytes]] = []
    cancelled = False

    def on_term(_sig: int, _frame: Any) -> None:
        nonlocal cancelled
        cancelled = True
        for child in children:
            if child.poll() is None:
                child.terminate()

    signal.signal(signal.SIGTERM, on_term)
    try:
        src = unpack(Path(spec["package"]), job_dir / "package")
        workers = int(spec.get("workers", 1))
        ports = free_ports(workers)
        for i in range(workers):
            if cancelled or (job_dir / "cancel").exists():  # cancelled before its trainer started
                cancelled = True
                break
            env = {**os.environ, **spec["env"], **cluster_env(workers, i, ports)}  # os.environ is clean (main)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
            log = open(job_dir / ("train.log" if i == 0 else f"worker-{i}.log"), "ab")
            argv = [spec["python"], "-m", spec["module"], *spec["args"]]
            children.append(subprocess.Popen(argv, cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT))
            log.close()
            if cancelled:  # SIGTERM arrived while this child was starting
                children[-1].terminate()
        codes = [child.wait() for child in children]
    except Exception as exc:  # a broken package or spec: the job fails with the reason, never stays RUNNING
        status.update(state="FAILED", ended_at=time.time(), error=f"runner failed: {exc!r}")
        write_status(job_dir, status)
        return 1
    if cancelled or (job_dir / "cancel").exists():
        status.update(state="CANCELLED", ended_at=time.time(), exit_codes=codes)
    elif all(code == 0 for code in codes):
        status.update(state="SUCCEEDED", ended_at=time.time(), exit_codes=codes)
    else:
        bad = next(i for i, c in enumerate(codes) if c != 0)
        status.update(state="FAILED", ended_at=time.time(), exit_codes=codes,
                      error=f"trainer exited with code {codes[bad]}" + (f" (worker {bad})" if bad else ""))
    write_status(job_dir, status)
    return 0


def main() -> None:
    job_dir = Path(sys.argv[1])
    if sys.argv[2:] == [CLEAN]:
        sys.exit(run(job_dir))
    if os.fork():  # detach: the starter reaps the parent at once; the job outlives the bot process
        os._exit(0)
    os.setsid()
    try:
        extra = [str(name) for name in json.loads((job_dir / "spec.json").read_text()).get("trainer_env") or []]
    except (OSError, ValueError) as exc:
        write_status(job_dir, {"state": "FAILED", "ended_at": time.time(), "error": f"runner failed: {exc!r}"})
        os._exit(1)
    # exec keeps the pid (and its start time), so status.json names the same process
    os.execve(sys.executable, [sys.executable, "-S", __file__, str(job_dir), CLEAN],
              trainer_environment(dict(os.environ), extra))


if __name__ == "__main__":
    main()
