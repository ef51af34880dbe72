"""The backend interface: what the workflow asks of `local` and `vertex` alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping, Protocol

from model_registry.adapters.packaging import Package
from model_registry.adapters.storage import Storage
from model_registry.domain.errors import StarchartError


@dataclass(frozen=True)
class TrainingSpec:
    job_id: str
    model: str
    ts: str
    module: str
    args: tuple[str, ...]  # TRAIN_PATH already replaced
    package_uri: str
    train_path: str
    region: str | None = None
    scale_tier: str | None = None
    machine_type: str | None = None
    workers: int = 1
    accelerator: str | None = None
    executor_image: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    trainer_env: tuple[str, ...] = ()  # names of the bot's environment variables a local trainer may see


@dataclass(frozen=True)
class JobStatus:
    state: str
    started_at: datetime | None = None
    ended_at: datetime | None = None
    error: str | None = None


class Exchange(Protocol):
    """A request whose waiting its caller does: watch `sock` for `events` (a selectors mask), then `step()`,
    which gives the answer once it is whole, else None (watch again); `finish()` once `sock` is no longer
    watched, whatever the outcome."""

    sock: Any
    events: int

    def step(self) -> Any: ...

    def finish(self) -> None: ...


@dataclass(frozen=True)
class Relay:
    """A predict whose I/O its caller drives without blocking (the web worker's loop): `exchange` until it gives
    an answer, then `answered(answer)` for (the version that answered, TF Serving's answer as JSON text, passed on
    as it is) or the StarchartError to answer instead; if `exchange` fails, `failed(exc)` is the error to answer
    (it may wait for a server that stops: call it where waiting is harmless). NotSent from `exchange`: nothing
    was sent, `predict` may run it."""

    exchange: Exchange
    answered: Callable[[Any], tuple[str, bytes]]
    failed: Callable[[OSError], StarchartError]
    timeout: float  # seconds the answer may take


class Backend(Protocol):
    """Everything the core asks of a backend. Extras only one backend has and only one adapter calls stay off it
    (the local model server's `stop_server`, used by the demo; Vertex AI's `preflight`, its live smoke check)."""

    name: str

    @property
    def storage(self) -> Storage:
        """Where the backend keeps train paths and models (local folders or Cloud Storage)."""

    poll_interval: tuple[float, float]  # seconds: first and longest wait between status checks

    def stage_package(self, package: Package, train_path: str) -> str:
        """Copy the sdist to TRAIN_PATH/packages/ and return its URI."""

    def submit(self, spec: TrainingSpec) -> str:
        """Start a training job; return the backend's reference to it."""

    def status(self, job_id: str, ref: str | None) -> JobStatus: ...

    def wait_for_change(self, job_id: str, seconds: float) -> None:
        """Block for up to `seconds` between status checks; may return early when the job has ended."""

    def cancel(self, job_id: str, ref: str | None) -> None: ...

    def logs(self, job_id: str, ref: str | None, tail: int = 40) -> str: ...

    def register_version(self, model: str, version: Mapping[str, Any], first: bool) -> str | None:
        """Make a version known to the serving side; return its reference there."""

    def set_default(self, model: str, version: str, ref: str | None) -> None:
        """Switch the version services use. Called only after the approvals are committed."""

    def apply_timeout(self, model: str) -> float:
        """The longest, in seconds, a set_default(model, ...) runs (its calls' deadlines and operations): the
        apply's lease is renewed no longer than this, so a switch hung past it stops holding its request; 0 when
        the first lease covers a switch."""

    def predict(self, model: str, version: str | None, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """TF Serving's predict (`body` has "instances" or "inputs") on the default or the given version;
        returns (the version that answered, the answer)."""

    def relay(self, model: str, version: str | None, body: dict[str, Any]) -> Relay | None:
        """The same predict as a Relay, for a caller that waits itself; None where starting it could wait (no
        server known to answer) or the backend has no such path (Vertex AI): `predict` then."""

    def start_canary(self, model: str, version: str, ref: str | None, percent: int, mirror: float) -> None:
        """Send `percent`% of the default's traffic to `version` (the default keeps the rest and stays the default);
        `mirror`: the share of the default's requests the candidate also answers, for agreement (where the backend
        can). Called only after the approvals are committed. Promoting it is `set_default` (which ends the split)."""

    def end_canary(self, model: str) -> None:
        """The default takes all its traffic back from a canary; nothing changes when none runs."""

    def canary_split(self, model: str) -> dict[str, int]:
        """The traffic split of the default's route by version, as the serving side has it now."""

    def canary_figures(self, model: str) -> dict[str, Any] | None:
        """The running canary's figures (domain/canary.py Figures.as_dict), or None when the backend has none."""

    def current_default(self, model: str) -> str | None:
        """The version the serving side uses now: an apply in progress whose candidate it is has happened, and is
        settled as applied whatever became of the process running it."""
