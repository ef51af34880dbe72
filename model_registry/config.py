"""Configuration: environment settings and starchart.yaml (project config and per-model policy)."""

from __future__ import annotations

import getpass
import os
import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

from model_registry.adapters.backends.vertex_settings import EndpointSettings, endpoint_settings
from model_registry.domain.canary import CanaryPolicy, canary_policy
from model_registry.domain.errors import InvalidInput
from model_registry.domain.names import parse_duration, validate_model_name

POLICY_KEYS = {
    "channel", "operators", "approvers", "required_approvals", "allow_self_approval", "request_expiry",
    "module", "args", "schedule", "auto_expose", "auto_review", "gate", "region", "scale_tier",
    "machine_type", "executor_image", "endpoint", "args_allowed", "data_roots", "trainer_env", "non_finite_inputs",
    "serving", "evaluation", "rules", "canary",
}
RULE_KINDS = ("breaking_signature", "metric_drop", "rollback", "canary")
_RULE_KEYS = {"when", "required_approvals", "approvers"}
_METRIC_RULE_KEYS = {"metric", "min_delta"}  # `when: metric_drop` only
# the bot's own secrets: never handed to a local trainer, even when `trainer_env` lists them
TRAINER_ENV_FORBIDDEN = frozenset({"SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN", "DATABASE_URL",
                                   "STARCHART_AUDIT_KEY", "STARCHART_PREDICT_TOKEN"})
DECLARED = "declared"  # `args_allowed: declared`: the trainer's own add_argument flags
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Settings:
    """Process environment, as DESIGN.md names it."""

    home: Path
    database_url: str
    backend: str
    config_path: Path
    bucket: str
    gcp_project: str | None
    gcp_region: str
    trainer_python: str | None = None  # STARCHART_TRAINER_PYTHON: runs local trainers and the model server
    audit_key: str | None = None  # signs audit checkpoints (STARCHART_AUDIT_KEY, else the Slack signing secret)
    apply_lease: timedelta = timedelta(seconds=60)  # STARCHART_APPLY_LEASE: an apply's lease, renewed while it runs
    predict_timeout: float = 120.0  # STARCHART_PREDICT_TIMEOUT: seconds a local prediction's answer may take
    # Vertex AI and Cloud Storage: handed to the vertex backend and GcsStorage (read in from_env's marked block)
    vertex_api_endpoint: str | None = None  # VERTEX_API_ENDPOINT; http://... means REST without TLS (a local fake)
    executor_image: str | None = None  # STARCHART_EXECUTOR_IMAGE: training container (default: the backend's)
    serving_image: str | None = None  # STARCHART_SERVING_IMAGE: serving container (default: the backend's)
    storage_emulator_host: str | None = None  # STORAGE_EMULATOR_HOST: a Cloud Storage emulator, no credentials

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        home = Path(env.get("STARCHART_HOME") or "./.starchart").resolve()
        backend = env.get("STARCHART_BACKEND") or "local"
        if backend not in ("local", "vertex"):
            raise InvalidInput(f"unknown STARCHART_BACKEND {backend!r}", "set it to 'local' or 'vertex'")
        project = env.get("GCP_PROJECT_ID") or None
        if env.get("STARCHART_BUCKET"):
            bucket = env["STARCHART_BUCKET"]
        elif backend == "vertex":
            bucket = f"gs://{project}-ml" if project else ""
        else:
            bucket = str(home / "bucket")
        # ---- Vertex AI and Cloud Storage: the vertex backend and GcsStorage receive these
        vertex_api_endpoint = env.get("VERTEX_API_ENDPOINT") or None
        executor_image = env.get("STARCHART_EXECUTOR_IMAGE") or None
        serving_image = env.get("STARCHART_SERVING_IMAGE") or None
        storage_emulator_host = env.get("STORAGE_EMULATOR_HOST") or None
        # ----
        return cls(
            home=home,
            database_url=env.get("DATABASE_URL") or f"sqlite:///{home / 'starchart.db'}",
            backend=backend,
            config_path=Path(env.get("STARCHART_CONFIG") or "./starchart.yaml").resolve(),
            bucket=bucket,
            gcp_project=project,
            gcp_region=env.get("GCP_REGION") or "us-central1",
            trainer_python=env.get("STARCHART_TRAINER_PYTHON") or None,
            audit_key=env.get("STARCHART_AUDIT_KEY") or env.get("SLACK_SIGNING_SECRET") or None,
            apply_lease=_apply_lease(env.get("STARCHART_APPLY_LEASE")),
            predict_timeout=_seconds("STARCHART_PREDICT_TIMEOUT", env.get("STARCHART_PREDICT_TIMEOUT"), 120, 3600,
                                     "set it to how long a prediction may wait for the local model server, e.g. "
                                     "120 (the default; a version's first load is in it)"),
            vertex_api_endpoint=vertex_api_endpoint, executor_image=executor_image, serving_image=serving_image,
            storage_emulator_host=storage_emulator_host,
        )


def _seconds(name: str, raw: str | None, default: float, most: float, hint: str) -> float:
    """A number of seconds from the environment variable `name`: `default` when unset, else over 0, at most `most`."""
    if raw is None or not raw.strip():
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds <= most:  # NaN fails this too
        raise InvalidInput(f"{name} {raw!r} is not a number of seconds between 0 and {most:g}", hint)
    return seconds


def _apply_lease(raw: str | None) -> timedelta:
    """STARCHART_APPLY_LEASE: seconds (default 60) an apply's owner holds it between two renewals."""
    return timedelta(seconds=_seconds(
        "STARCHART_APPLY_LEASE", raw, 60, 24 * 3600,
        "set it to how long an apply's process may go unheard before its apply is settled, "
        "e.g. 60 (the default); it is renewed every third of that while the backend works"))


GATE_ON = ("training", "evaluation")  # the metrics a nightly gate compares: metrics.json's, or the evaluation's


@dataclass(frozen=True)
class Gate:
    """`gate: {metric, min_delta, on}`: a nightly candidate is put up for review only when `metric` did not fall
    by more than `min_delta` against the default's, in its training metrics or (`on: evaluation`) on the
    evaluation data."""

    metric: str
    min_delta: float
    on: str = "training"


@dataclass(frozen=True)
class Evaluation:
    """`evaluation: {data, label, output}`: a CSV of the signature's inputs and the label, and the output to
    compare with it. `data` is a gs:// URI, or a local path (relative ones against starchart.yaml's folder)."""

    data: str
    label: str
    output: str


@dataclass(frozen=True)
class Rule:
    """A `rules:` entry: when it applies, and the approvals a request then needs (None: the model's own)."""

    when: str  # one of RULE_KINDS
    required_approvals: int | None = None
    approvers: tuple[str, ...] | None = None  # replaces the model's approvers for the request
    metric: str | None = None  # metric_drop: which metric, and how far it may fall
    min_delta: float = 0.0


@dataclass(frozen=True)
class ModelPolicy:
    """Who may do what to one model, and how it trains by default."""

    channel: str | None = None
    operators: tuple[str, ...] = ()
    approvers: tuple[str, ...] = ()
    required_approvals: int = 1
    allow_self_approval: bool = False
    request_expiry: timedelta = timedelta(hours=72)
    module: str = "trainer.task"
    args: tuple[str, ...] = ()
    schedule: dict[str, Any] | None = None
    auto_expose: bool = False
    auto_review: bool = False
    gate: Gate | None = None
    region: str | None = None
    scale_tier: str | None = None
    machine_type: str | None = None
    executor_image: str | None = None
    endpoint: EndpointSettings | None = None  # Vertex AI: deploy the default to an endpoint (off by default)
    args_allowed: tuple[str, ...] | None = None  # flags a person may pass; None: any (paths are checked all the same)
    args_declared: bool = False  # `args_allowed: declared`: the flags the trainer's module declares
    data_roots: tuple[str, ...] = ()  # where path-valued trainer arguments may point, besides the job's train path
    trainer_env: tuple[str, ...] = ()  # extra environment variable names a local trainer sees
    non_finite_inputs: bool = False  # predictions may send NaN and ±Infinity as float inputs
    serving: dict[str, int] | None = None  # the local model server's batching: max_batch_size, batch_timeout_micros
    evaluation: Evaluation | None = None  # evaluation data: e.g. the rows a TensorFlow Lite copy is checked on
    rules: tuple[Rule, ...] = ()  # approval rules by what changes; a model's list replaces the defaults' list
    canary: CanaryPolicy = field(default_factory=CanaryPolicy)  # `--canary`'s defaults and the limits it is judged by


POLICIES_KEPT = 1024  # models whose policy a ProjectConfig keeps once built


@dataclass(frozen=True)
class ProjectConfig:
    """starchart.yaml, with relative paths resolved against its folder."""

    path: Path | None
    trainer_base: Path
    model_files: Path
    defaults: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    usergroups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    audit_checkpoint: dict[str, Any] = field(default_factory=dict)
    # each model's policy once built: it is asked on every prediction (its NaN rule), and building it takes 0.1 ms
    _policies: dict[str, ModelPolicy] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def load(cls, path: Path) -> "ProjectConfig":
        import yaml  # here: the web process reads its settings from the environment before it listens, not this file

        base = path.parent
        if not path.exists():
            return cls(path=None, trainer_base=(base / "trainers").resolve(), model_files=(base / "models").resolve())
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"cannot read {path}: {exc}", "fix the YAML syntax of the configuration file") from exc
        return cls.from_dict(raw, base, path)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], base: Path, path: Path | None = None) -> "ProjectConfig":
        if not isinstance(raw, Mapping):
            raise InvalidInput(f"{path or 'configuration'} must be a mapping", "see starchart.yaml in the README")
        models = raw.get("models") or {}
        defaults = raw.get("defaults") or {}
        for name, entry in models.items():
            validate_model_name(str(name))
            _check_policy_keys(entry or {}, f"models.{name}")
        _check_policy_keys(defaults, "defaults")
        try:  # checked here too: a model without an entry takes these straight from `defaults`
            _args_allowed(defaults.get("args_allowed"))
            _data_roots(defaults.get("data_roots"), path)
            _trainer_env(defaults.get("trainer_env"))
            _rules(defaults.get("rules"))
        except ValueError as exc:
            raise InvalidInput(f"invalid defaults: {exc}", "check starchart.yaml against the README") from exc
        groups = {str(k): tuple(str(u) for u in v or ()) for k, v in (raw.get("usergroups") or {}).items()}
        cfg = cls(
            path=path,
            trainer_base=(base / str(raw.get("trainer_base", "trainers"))).resolve(),
            model_files=(base / str(raw.get("model_files", "models"))).resolve(),
            defaults=dict(defaults),
            models={str(k): dict(v or {}) for k, v in models.items()},
            usergroups=groups,
            audit_checkpoint=dict(raw.get("audit_checkpoint") or {}),
        )
        for name in cfg.models:
            cfg.policy(name)  # validate every model's policy up front
        return cfg

    def policy(self, model: str) -> ModelPolicy:
        """`model`'s policy: its entry over `defaults` (a refusal for one that is not valid, each time asked)."""
        policy = self._policies.get(model)
        if policy is None:
            policy = self._policy(model)
            if len(self._policies) < POLICIES_KEPT:  # names come from requests: the memo does not grow without end
                self._policies[model] = policy
        return policy

    def _policy(self, model: str) -> ModelPolicy:
        merged = {**self.defaults, **self.models.get(model, {})}
        try:
            gate = merged.get("gate")
            return ModelPolicy(
                channel=merged.get("channel"),
                operators=tuple(str(u) for u in merged.get("operators") or ()),
                approvers=tuple(str(u) for u in merged.get("approvers") or ()),
                required_approvals=max(1, int(merged.get("required_approvals", 1))),
                allow_self_approval=bool(merged.get("allow_self_approval", False)),
                request_expiry=parse_duration(str(merged.get("request_expiry", "72h"))),
                module=str(merged.get("module", "trainer.task")),
                args=tuple(str(a) for a in merged.get("args") or ()),
                schedule=merged.get("schedule"),
                auto_expose=bool(merged.get("auto_expose", False)),
                auto_review=bool(merged.get("auto_review", False)),
                non_finite_inputs=bool(merged.get("non_finite_inputs", False)),
                gate=_gate(gate),
                region=merged.get("region"),
                scale_tier=merged.get("scale_tier"),
                machine_type=merged.get("machine_type"),
                executor_image=merged.get("executor_image"),
                endpoint=endpoint_settings(model, merged.get("endpoint")),  # checked here: a bad one fails the load
                args_allowed=_args_allowed(merged.get("args_allowed")),
                args_declared=merged.get("args_allowed") == DECLARED,
                data_roots=_data_roots(merged.get("data_roots"), self.path),
                trainer_env=_trainer_env(merged.get("trainer_env")),
                serving=_serving(merged.get("serving")),
                evaluation=_evaluation(merged.get("evaluation"), self.path),
                rules=_rules(merged.get("rules")),
                canary=canary_policy(merged.get("canary")),
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise InvalidInput(f"invalid policy for model {model!r}: {exc}", "check starchart.yaml against the README") from exc


SERVING_LIMITS = {"max_batch_size": (1, 4096), "batch_timeout_micros": (0, 1_000_000)}


def _serving(value: Any) -> dict[str, int] | None:
    """`serving: {max_batch_size, batch_timeout_micros}`, as TF Serving's batching parameters are named."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("`serving` must be a mapping: {max_batch_size: 32, batch_timeout_micros: 0}")
    unknown = sorted(set(value) - set(SERVING_LIMITS))
    if unknown:
        raise ValueError(f"`serving` has no key {', '.join(unknown)} (known: {', '.join(SERVING_LIMITS)})")
    out = {}
    for key, raw in value.items():
        low, high = SERVING_LIMITS[key]
        if isinstance(raw, bool) or not isinstance(raw, int) or not low <= raw <= high:
            raise ValueError(f"`serving.{key}` must be a whole number from {low} to {high}, not {raw!r}")
        out[key] = raw
    return out


def _gate(value: Any) -> Gate | None:
    if value is None:
        return None
    if not isinstance(value, dict) or "metric" not in value or set(value) - {"metric", "min_delta", "on"}:
        raise ValueError("`gate` must be a mapping with the keys metric, min_delta and (optionally) on: "
                         "{metric: accuracy, min_delta: -0.01, on: evaluation}")
    on = str(value.get("on", "training"))
    if on not in GATE_ON:
        raise ValueError(f"`gate.on` must be one of {', '.join(GATE_ON)}, not {on!r}")
    return Gate(str(value["metric"]), float(value.get("min_delta", 0.0)), on)


def _evaluation(value: Any, config_path: Path | None) -> Evaluation | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"data", "label", "output"}:
        raise ValueError("`evaluation` must be a mapping with the keys data, label and output: "
                         "{data: gs://my-ml/iris/eval.csv, label: species, output: class_ids}")
    if not all(isinstance(v, str) and v.strip() for v in value.values()):
        raise ValueError("`evaluation`'s data, label and output must be non-empty text")
    data = value["data"]
    if "://" not in data:
        data = str(((config_path.parent if config_path else Path.cwd()) / data).resolve())
    return Evaluation(data=data, label=value["label"], output=value["output"])


def _rules(value: Any) -> tuple[Rule, ...]:
    """`rules: [{when, required_approvals, approvers}, ...]`; metric_drop also takes `metric` and `min_delta`."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError("`rules` must be a list, e.g. [{when: breaking_signature, required_approvals: 2}]")
    return tuple(_rule(entry, f"rules[{i}]") for i, entry in enumerate(value))


def _rule(entry: Any, where: str) -> Rule:
    if not isinstance(entry, dict):
        raise ValueError(f"`{where}` must be a mapping such as {{when: breaking_signature, required_approvals: 2}}")
    when = entry.get("when")
    if when not in RULE_KINDS:
        raise ValueError(f"`{where}.when` is {when!r}; it must be one of {', '.join(RULE_KINDS)}")
    allowed = _RULE_KEYS | (_METRIC_RULE_KEYS if when == "metric_drop" else set())
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"`{where}` (when: {when}) has no key {', '.join(unknown)} (known: {', '.join(sorted(allowed))})")
    if "required_approvals" not in entry and "approvers" not in entry:
        raise ValueError(f"`{where}` (when: {when}) changes nothing: give it `required_approvals`, `approvers` or both")
    count = entry.get("required_approvals")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 100):
        raise ValueError(f"`{where}.required_approvals` must be a whole number from 1 to 100, not {count!r}")
    approvers = entry.get("approvers")
    if approvers is not None:
        approvers = tuple(_strings(approvers, f"{where}.approvers"))
        if not approvers or not all(a.strip() for a in approvers):
            raise ValueError(f"`{where}.approvers` lists user or user-group ids (U…, W…, S…); leave it out to keep "
                             f"the model's approvers")
    metric, min_delta = entry.get("metric"), entry.get("min_delta", 0.0)
    if when == "metric_drop":
        if not isinstance(metric, str) or not metric.strip():
            raise ValueError(f"`{where}` (when: metric_drop) needs `metric`, the name of a metric in metrics.json")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or min_delta != min_delta:
            raise ValueError(f"`{where}.min_delta` must be a number such as -0.01, not {min_delta!r}")
    return Rule(when=when, required_approvals=count, approvers=approvers, metric=metric,
                min_delta=float(min_delta))


def _strings(value: Any, key: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ValueError(f"`{key}` must be a list")
    return [str(v) for v in value]


def _args_allowed(value: Any) -> tuple[str, ...] | None:
    if value is None or value == DECLARED:
        return None
    flags = _strings(value, "args_allowed")
    bad = [f for f in flags if not f.startswith("-") or "=" in f]
    if bad:
        raise ValueError(f"`args_allowed` lists flags such as --epochs, not {bad}")
    return tuple(flags)


def _data_roots(value: Any, config_path: Path | None) -> tuple[str, ...]:
    """Cloud roots as written; local roots absolute (relative ones against the configuration's folder)."""
    roots = []
    for root in _strings(value or [], "data_roots"):
        if "://" in root:
            if ".." in root.split("/"):
                raise ValueError(f"`data_roots` may not contain `..`: {root}")
            roots.append(root)
        else:
            base = config_path.parent if config_path else Path.cwd()
            roots.append(str((base / root).resolve()))
    return tuple(roots)


def _trainer_env(value: Any) -> tuple[str, ...]:
    names = _strings(value or [], "trainer_env")
    bad = [n for n in names if not _ENV_NAME.match(n)]
    if bad:
        raise ValueError(f"`trainer_env` lists environment variable names, not {bad}")
    secret = [n for n in names if n in TRAINER_ENV_FORBIDDEN or n.startswith("SLACK_")]
    if secret:
        raise ValueError(f"`trainer_env` may not hand the bot's secrets to a trainer: {secret}")
    return tuple(names)


def _check_policy_keys(entry: Mapping[str, Any], where: str) -> None:
    if not isinstance(entry, Mapping):
        raise InvalidInput(f"{where} must be a mapping", "see starchart.yaml in the README")
    unknown = set(entry) - POLICY_KEYS
    if unknown:
        raise InvalidInput(f"unknown key(s) {sorted(unknown)} in {where}", f"known keys: {', '.join(sorted(POLICY_KEYS))}")


def default_user(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    if env.get("STARCHART_USER"):
        return env["STARCHART_USER"]
    try:
        return f"local:{getpass.getuser()}"
    except (KeyError, OSError):
        return "local:unknown"


SLACK_API_DEFAULT = "https://slack.com/api/"


@dataclass(frozen=True)
class SlackSettings:
    """How the bot reaches Slack: tokens, the signing secret, and the Web API's base URL."""

    bot_token: str | None
    signing_secret: str | None
    app_token: str | None = None  # Socket Mode (xapp-…)
    api_url: str = SLACK_API_DEFAULT
    team_id: str | None = None  # SLACK_TEAM_ID: the workspace the app is installed in; others are refused
    outbox_lease: float = 120.0  # STARCHART_OUTBOX_LEASE: seconds a sender holds a message it is delivering

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "SlackSettings":
        env = os.environ if env is None else env
        try:
            lease = float(env.get("STARCHART_OUTBOX_LEASE") or 120.0)
        except ValueError:
            raise InvalidInput("STARCHART_OUTBOX_LEASE is not a number of seconds", "e.g. 120") from None
        if lease < 4:
            raise InvalidInput("STARCHART_OUTBOX_LEASE is under 4 seconds", "a delivery needs a few seconds; e.g. 120")
        return cls(bot_token=env.get("SLACK_BOT_TOKEN") or None, signing_secret=env.get("SLACK_SIGNING_SECRET") or None,
                   app_token=env.get("SLACK_APP_TOKEN") or None,
                   api_url=(env.get("SLACK_API_URL") or SLACK_API_DEFAULT).rstrip("/") + "/",
                   team_id=(env.get("SLACK_TEAM_ID") or "").strip() or None, outbox_lease=lease)


@dataclass(frozen=True)
class WebSettings:
    """The web process: port, gunicorn workers and threads, access log, training-message pace, prediction token,
    and how long a request may take to arrive."""

    port: int = 3000
    workers: int = 2
    threads: int = 8
    access_log: bool = False
    follow_interval: float = 2.0  # seconds between progress checks of followed training messages
    predict_token: str | None = None
    read_timeout: float = 10.0  # seconds a request's headers and body may take to arrive (slow clients)
    # seconds a prediction may wait, holding no thread, for one of a worker's `threads` (it has two more, which
    # predictions never take: Slack's and /healthz's) before it is answered 503
    predict_wait: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "WebSettings":
        env = os.environ if env is None else env
        try:
            return cls(port=int(env.get("PORT") or 3000), workers=int(env.get("WEB_CONCURRENCY") or 2),
                       threads=int(env.get("WEB_THREADS") or 8), access_log=bool(env.get("STARCHART_ACCESS_LOG")),
                       follow_interval=float(env.get("STARCHART_FOLLOW_INTERVAL") or 2.0),
                       predict_token=env.get("STARCHART_PREDICT_TOKEN") or None,
                       read_timeout=float(env.get("WEB_READ_TIMEOUT") or 10.0),
                       predict_wait=float(env.get("WEB_PREDICT_WAIT") or 30.0))
        except ValueError as exc:
            raise InvalidInput(f"invalid web setting: {exc}",
                               "PORT, WEB_CONCURRENCY and WEB_THREADS are integers; STARCHART_FOLLOW_INTERVAL, "
                               "WEB_READ_TIMEOUT and WEB_PREDICT_WAIT are seconds") from None
