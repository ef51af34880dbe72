"""Which versions the local model server keeps loaded (real TensorFlow, real HTTP, /healthz's list): after a switch
of the default the old one is unloaded and its memory released; a version asked for by name stays until it has not
been asked for a while; a canary's candidate stays while the canary runs. And the policy itself, on fake loads."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from conftest import replay_args, train_and_wait

from model_registry.adapters.backends import local_versions
from model_registry.adapters.backends.local_versions import RequestError, Versions

FLOWER = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
KEEP_NAMED = 3  # seconds, for the model servers these tests start


@pytest.fixture
def iris(make_registry: Callable[..., Any], sqlite_url: str, trained: dict,
         monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, list[str]]]:
    """iris with three versions (the first the default) and a model server that keeps named versions briefly."""
    monkeypatch.setenv("STARCHART_SERVING_KEEP_NAMED", str(KEEP_NAMED))  # read by the server the backend starts
    reg = make_registry(sqlite_url)
    for src in (trained["iris_a"], trained["iris_b"], trained["iris_a"]):
        assert train_and_wait(reg, "iris", "U_T", replay_args(src))["state"] == "SUCCEEDED"
        reg.versions.expose("iris", "U_T")
    names = [v["name"] for v in reversed(reg.versions.of_model("iris")["versions"])]
    assert len(names) == 3 and reg.versions.default("iris") == names[0]
    reg.predictions.predict("iris", [FLOWER])  # the server runs and has loaded the default
    yield reg, names
    reg.backend.stop_server()


def _loaded(reg: Any) -> set[str]:
    info = json.loads((reg.settings.home / "serving" / "server.json").read_text())
    req = urllib.request.Request(f"http://127.0.0.1:{info['port']}/healthz",
                                 headers={"Authorization": f"Bearer {info['secret']}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return {key.split("/")[1] for key in json.loads(resp.read())["model_calls"]}


def _log(reg: Any) -> str:
    return (reg.settings.home / "serving" / "server.log").read_text()


def _wait_until(condition: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return got


def test_a_switch_of_the_default_unloads_the_old_one_and_releases_its_memory(iris: tuple[Any, list[str]]) -> None:
    reg, (v1, v2, _v3) = iris
    assert _loaded(reg) == {v1}
    reg.backend.set_default("iris", v2, None)  # what an approved apply calls: warm v2, then move the pointer
    assert reg.predictions.predict("iris", [FLOWER])["version"] == v2
    _wait_until(lambda: _loaded(reg) == {v2})
    assert f"unloaded iris {v1}: neither the default nor a canary's candidate\n" in _log(reg)
    _wait_until(lambda: "released 1 unloaded model(s): RSS" in _log(reg))  # collected, and malloc_trim asked
    reg.backend.set_default("iris", v1, None)  # and back: v1 is loaded again, v2 goes
    _wait_until(lambda: _loaded(reg) == {v1})
    assert reg.predictions.predict("iris", [FLOWER])["version"] == v1


def test_a_version_asked_for_by_name_stays_until_it_is_not_asked_for(iris: tuple[Any, list[str]]) -> None:
    reg, (v1, v2, _v3) = iris
    assert reg.predictions.predict("iris", [FLOWER], version=v2)["version"] == v2
    assert _loaded(reg) == {v1, v2}
    _wait_until(lambda: _loaded(reg) == {v1})  # KEEP_NAMED seconds without a request naming it
    assert f"unloaded iris {v2}: neither the default nor a canary's candidate, nor asked for by name in " \
           f"{KEEP_NAMED}s" in _log(reg)
    assert reg.predictions.predict("iris", [FLOWER], version=v2)["version"] == v2, "it loads again when asked"


def test_a_canarys_candidate_stays_loaded_while_the_canary_runs(iris: tuple[Any, list[str]]) -> None:
    reg, (v1, v2, v3) = iris
    reg.backend.start_canary("iris", v2, None, percent=50, mirror=0.5)  # warms v2 (by name), then splits
    reg.predictions.predict("iris", [FLOWER], version=v3)
    assert _loaded(reg) == {v1, v2, v3}
    _wait_until(lambda: v3 not in _loaded(reg))  # the named one timed out; the candidate did not
    assert _loaded(reg) == {v1, v2}
    reg.backend.end_canary("iris")  # a rollback
    _wait_until(lambda: _loaded(reg) == {v1})
    assert f"unloaded iris {v2}: neither the default nor a canary's candidate\n" in _log(reg)


class _Loaded:
    def __init__(self, name: str) -> None:
        self.fn = lambda: name


class _Fake(Versions):
    def __init__(self, serving_dir: Path) -> None:
        super().__init__(serving_dir)
        self.loads: list[str] = []

    def load(self, model: str, name: str, uri: str, options: dict[str, Any]) -> _Loaded:
        if uri == "broken":
            raise RequestError(404, f"could not load {model} {name}")
        self.loads.append(name)
        return _Loaded(name)


def _write(path: Path, data: dict[str, Any]) -> None:  # as the backend writes it: a new file replaces the old
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)


def test_the_policy_on_fake_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_versions, "LOADED_VERSIONS", 3)
    pointer = tmp_path / "iris.json"
    versions = {f"v{i}": f"/m/{i}" for i in range(1, 6)} | {"v9": "broken"}
    _write(pointer, {"default": "v1", "versions": versions, "canary": {"version": "v2"}})
    fake = _Fake(tmp_path)
    assert fake.signature("iris", None)[0] == "v1" and fake.signature("iris", None)[0] == "v1"
    fake.signature("iris", "v2")
    fake.signature("iris", "v3")
    fake.signature("iris", "v4")  # one over the limit: v3, the least recently used that is neither pinned
    assert list(fake.loaded) == [("iris", "v1"), ("iris", "v2"), ("iris", "v4")] and fake.loads == ["v1", "v2", "v3",
                                                                                                       "v4"]
    with pytest.raises(RequestError, match="could not load"):
        fake.signature("iris", "v9")
    with pytest.raises(RequestError, match="could not load"):  # a failed load leaves nothing behind: tried again
        fake.signature("iris", "v9")
    v1 = fake.loaded[("iris", "v1")]
    _write(pointer, {"default": "v5", "versions": versions})  # a switch, and the canary ended
    name, _ = fake.signature("iris", None)
    assert name == "v5" and ("iris", "v1") not in fake.loaded and ("iris", "v2") not in fake.loaded
    assert any(ref() is v1.fn for ref in fake._unloaded), "the unloaded model is watched until its memory is freed"
    assert ("iris", "v4") in fake.loaded, "asked for by name lately: kept KEEP_NAMED seconds"
    pointer.unlink()
    with pytest.raises(RequestError, match="Servable not found"):
        fake.pointer("iris")


def test_the_pointer_file_is_read_once_it_can_be_trusted_and_a_rewrite_within_a_clock_tick_is_seen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pointer = tmp_path / "iris.json"
    versions = {"v1": "/m/1", "v2": "/m/2"}
    reads: list[Path] = []
    read_text = Path.read_text

    def counted(path: Path, *args: Any, **kwargs: Any) -> str:
        reads.append(path)
        return read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    fake = _Fake(tmp_path)
    _write(pointer, {"default": "v1", "versions": versions})
    assert fake.signature("iris", None)[0] == "v1"
    _write(pointer, {"default": "v2", "versions": versions})  # the same size, at once: maybe the same stamp
    assert fake.signature("iris", None)[0] == "v2", "a rewrite within the clock tick is seen by the next request"
    time.sleep(local_versions.RACY_NS / 1e9 + 0.05)
    fake.signature("iris", None)  # a reading that began long enough after the write: trusted from now on
    reads.clear()
    for _ in range(50):
        assert fake.signature("iris", None)[0] == "v2"
    # (it was read again by every request until the file was a second old: a switch's second doubled their p99)
    assert reads == [], f"read {len(reads)} times although it had not changed"


def test_the_malloc_arenas_can_be_limited_on_glibc() -> None:
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert local_versions.limit_arenas(2)
