"""Which versions the local model server keeps loaded, and giving their memory back when they are unloaded.
Standard library only (the model server may run in another Python); local_serving.py's Models loads them.

The policy is TF Serving's: the versions a pointer file names (SERVING_DIR/<model>.json: its default and a running
canary's candidate) stay loaded; a version asked for by name stays KEEP_NAMED seconds after its last such request;
any other loaded version is unloaded as soon as the pointer file stops naming it (a switch of the default, a
canary ended). Asking by name for a version the pointer file names (a warm before a switch, a mirrored
request) does not count. Requests that already hold an unloaded version finish on it, and its memory goes with the last of
them: the collector breaks the SavedModel's reference cycles and glibc's malloc_trim returns the freed pages
(without it the RSS stays where it was, measured). At most LOADED_VERSIONS are loaded at once.

The pointer file is read again only when it changed (its inode, mtime and size: the backend replaces it whole;
and until it has been read once RACY_NS after its mtime), so a request costs one stat, and a switch is seen by the
first request after it (or the sweep, at the latest).
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import ctypes.util
import gc
import json
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

LOADED_VERSIONS = int(os.environ.get("STARCHART_SERVING_LOADED", "4"))  # SavedModels in memory at most
KEEP_NAMED = float(os.environ.get("STARCHART_SERVING_KEEP_NAMED", "300"))  # seconds a version asked for by name
# (neither the default nor a canary's candidate) stays loaded after its last such request
SWEEP_SECONDS = max(0.2, min(5.0, KEEP_NAMED / 4))  # how often the loaded versions are checked against that
# A file written again within the file system's clock tick (a few ms; the kernel stamps files from a coarse clock)
# can keep its stamp: a reading is trusted only when it began this long after the mtime it was read for
RACY_NS = 100_000_000


class _Reading(NamedTuple):
    """A pointer file as read: its stamp (inode, mtime, size), its content, and when the reading began."""

    stamp: tuple[int, int, int]
    data: dict[str, Any]
    began: int


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class Versions(abc.ABC):
    """Versions resolved through the local backend's pointer files, loaded on first use, unloaded when unused.

    A loaded version is what `load` returns: an object with `fn`, the model, which its memory goes with (it holds no
    thread: requests that already hold it finish on it)."""

    def __init__(self, serving_dir: Path) -> None:
        self.serving_dir = serving_dir
        self.loaded: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.lock = threading.Lock()  # guards the dicts below; never held while a model loads
        self._loading: dict[tuple[str, str], threading.Lock] = {}  # one load per version at a time
        self._named: dict[tuple[str, str], float] = {}  # when a version was last asked for by name
        self._pointers: dict[str, _Reading] = {}  # the pointer files as last read, by model
        self._paths: dict[str, Path] = {}  # the pointer files' paths, by model
        self._unloaded: list[weakref.ref[Any]] = []  # unloaded models, until the collector has freed them
        # what exists now (TensorFlow's modules: the server imports it first) is left out of the collector's
        # full passes, so the one after an unload holds the GIL ~8 ms instead of ~300 ms (measured, iris)
        gc.collect()
        gc.freeze()
        threading.Thread(target=self._sweep_loop, name="unloader", daemon=True).start()

    @abc.abstractmethod
    def load(self, model: str, name: str, uri: str, options: dict[str, Any]) -> Any:
        """Load one version (local_serving.Models does, with TensorFlow); RequestError if it cannot."""

    def pointer(self, model: str) -> dict[str, Any]:
        """The model's pointer file as last written (shared between requests: do not modify it)."""
        stat = self._stat(model)  # a system call, which lets other threads run: not while holding the lock
        with self.lock:
            return self._pointer(model, stat)

    def _path(self, model: str) -> Path:
        path = self._paths.get(model)
        if path is None:  # made once per model: a request costs no path arithmetic
            path = self._paths[model] = self.serving_dir / f"{model}.json"
        return path

    def _stat(self, model: str) -> os.stat_result | None:
        try:
            return os.stat(self._path(model))
        except OSError:
            return None

    def _pointer(self, model: str, st: os.stat_result | None) -> dict[str, Any]:  # self.lock held
        path = self._path(model)
        try:
            if st is None:
                raise OSError(f"no {path}")
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            cached = self._pointers.get(model)
            # A reading that began within RACY_NS of the mtime may miss a write of the same clock tick (the same
            # stamp): the file is read again until a reading began later than that, as git does with racily clean
            # files. Once one has, a later write cannot carry this stamp. (It was "until the file is a second old":
            # every request of the second after a switch read the file under the lock, and their p99 doubled.)
            if cached is not None and cached.stamp == stamp and cached.began - st.st_mtime_ns > RACY_NS:
                return cached.data
            began = time.time_ns()
            data = json.loads(path.read_text())  # read after the stat: at worst newer than its stamp, read again
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError):
            self._pointers.pop(model, None)
            raise RequestError(404, f"Servable not found for request: Latest({model})") from None
        self._pointers[model] = _Reading(stamp, data, began)
        for name in self._pinned(model):  # named by the pointer file now: kept for that reason alone
            self._named.pop((model, name), None)
        self._unload_unused(model, data)
        return data

    def resolve(self, model: str, version: str | None) -> tuple[str, str]:
        """The version that answers (the default unless named) and where its SavedModel is."""
        return self._resolve(self.pointer(model), model, version)

    @staticmethod
    def _resolve(data: dict[str, Any], model: str, version: str | None) -> tuple[str, str]:
        name = version or data.get("default")
        if not name:
            raise RequestError(404, f"{model} has no default version yet: apply one, or name a version")
        uri = (data.get("versions") or {}).get(name)
        if not uri:
            raise RequestError(404, f"Servable not found for request: Specific({model}, {name})")
        return name, uri

    def signature_if_loaded(self, model: str, version: str | None) -> tuple[str, Any] | None:
        """What `signature` gives when the version is loaded already; None when it would have to load it (which
        takes seconds: a caller on an event loop does that on another thread)."""
        stat = self._stat(model)
        with self.lock:
            name, _, loaded, _ = self._look_up(model, version, stat)
        return None if loaded is None else (name, loaded)

    def signature(self, model: str, version: str | None) -> tuple[str, Any]:
        """The version that answers (the default unless named) and its model calls, loading it on first use."""
        stat = self._stat(model)
        with self.lock:  # the name and what answers from one reading of the pointer file: no unload in between
            name, uri, loaded, data = self._look_up(model, version, stat)
            if loaded is not None:
                return name, loaded
            key = (model, name)
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:  # requests to the versions already loaded go on meanwhile
            with self.lock:
                loaded = self.loaded.get(key)
            if loaded is None:
                try:
                    loaded = self.load(model, name, uri, data.get("serving") or {})
                except BaseException:
                    with self.lock:
                        self._loading.pop(key, None)
                    raise
                with self.lock:
                    self.loaded[key] = loaded
                    self._loading.pop(key, None)
                    self._evict()
        return name, loaded

    def _look_up(self, model: str, version: str | None, stat: os.stat_result | None
                 ) -> tuple[str, str, Any, dict[str, Any]]:  # self.lock held
        """The version that answers, its SavedModel's URI, its model calls if loaded (else None), and the pointer
        file read for it."""
        data = self._pointer(model, stat)
        name, uri = self._resolve(data, model, version)
        key = (model, name)
        if version is not None and name not in self._pinned(model):  # not the warm's or a mirror's
            self._named[key] = time.monotonic()
        loaded = self.loaded.get(key)
        if loaded is not None:
            self.loaded.move_to_end(key)
        return name, uri, loaded, data

    def _pinned(self, model: str) -> set[str]:  # self.lock held: the versions the pointer file names
        reading = self._pointers.get(model)
        data = reading.data if reading is not None else {}
        canary = data.get("canary")
        return {v for v in (data.get("default"), canary.get("version") if isinstance(canary, dict) else None) if v}

    def _evict(self) -> None:  # self.lock held: the least recently used first, the pointer files' versions last
        while len(self.loaded) > LOADED_VERSIONS:
            keys = list(self.loaded)
            unpinned = [k for k in keys if k[1] not in self._pinned(k[0])]
            self._unload((unpinned or keys)[0], f"more than {LOADED_VERSIONS} versions loaded")

    def _unload_unused(self, model: str, data: dict[str, Any] | None) -> None:  # self.lock held
        if data is None:  # the pointer file is gone: none of the model's versions is named by it any more
            self._pointers.pop(model, None)
        pinned, now = self._pinned(model), time.monotonic()
        for key in [k for k in self.loaded if k[0] == model and k[1] not in pinned]:
            if now - self._named.get(key, -KEEP_NAMED) >= KEEP_NAMED:
                named = f", nor asked for by name in {KEEP_NAMED:g}s" if key in self._named else ""
                self._unload(key, f"neither the default nor a canary's candidate{named}")

    def _unload(self, key: tuple[str, str], why: str) -> None:  # self.lock held
        loaded = self.loaded.pop(key)
        self._named.pop(key, None)
        self._unloaded.append(weakref.ref(loaded.fn))
        sys.stderr.write(f"unloaded {key[0]} {key[1]}: {why}\n")
        sys.stderr.flush()

    def _sweep_loop(self) -> None:
        while True:
            time.sleep(SWEEP_SECONDS)
            self.sweep()

    def sweep(self) -> None:
        """Unload what the policy no longer keeps (named versions time out; a switch nobody asked for since is seen
        here), then give back the memory of the unloaded models no request holds any more."""
        with self.lock:
            for model in {k[0] for k in self.loaded}:
                try:
                    data: dict[str, Any] | None = self._pointer(model, self._stat(model))
                except RequestError:
                    data = None
                self._unload_unused(model, data)
            if not self._unloaded:
                return
        gc.collect()  # outside the lock: requests go on
        with self.lock:
            freed = sum(r() is None for r in self._unloaded)
            self._unloaded = [r for r in self._unloaded if r() is not None]
        if freed:
            before = rss_mb()
            malloc_trim()
            sys.stderr.write(f"released {freed} unloaded model(s): RSS {before:.1f} MB -> {rss_mb():.1f} MB\n")
            sys.stderr.flush()


def rss_mb(pid: int | str = "self") -> float:
    """A process's resident memory (VmRSS in /proc/PID/status), in MB; 0.0 where it cannot be read."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


M_ARENA_MAX = -8  # glibc's malloc.h


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def malloc_trim() -> bool:
    """Have glibc return the free pages at the top and inside its heaps to the system; False where it is not
    glibc (musl, macOS: freed memory stays with the process until reused)."""
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False


def limit_arenas(most: int) -> bool:
    """At most `most` glibc malloc arenas. Threads that allocate at once otherwise get heaps of their own (up to
    eight per core), each keeping its own free space (MALLOC_ARENA_MAX, as Heroku advises); False where not glibc."""
    try:
        return bool(_libc().mallopt(M_ARENA_MAX, most))
    except (OSError, AttributeError):
        return False
