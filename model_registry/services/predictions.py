"""Predictions from a model's served versions: the local model server, or the backend's endpoint."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Mapping

from cachetools import LRUCache, TTLCache

from model_registry.adapters.backends.base import Backend, Relay
from model_registry.adapters.db import Database
from model_registry.adapters.records import ModelRecord
from model_registry.config import ProjectConfig
from model_registry.domain import answers, instances, names
from model_registry.domain.errors import InvalidInput, NotFound, StarchartError
from model_registry.services.catalog import Catalog
from model_registry.services.copies import evaluation_instances
from model_registry.services.views import Compared, Served, Side

MAX_INSTANCES = instances.MAX_INSTANCES
DEFAULT_TTL = 1.0  # seconds a model's default, as the database names it, is reused by predictions of this process
log = logging.getLogger("starchart.predictions")
BODY_HINT = ('give instances as JSON: one object {"input": value, ...}, a list of them, '
             'or TF Serving\'s {"instances": [...]} / {"inputs": {...}}')


def predict_body(payload: Any) -> dict[str, Any]:
    """TF Serving's request body from what a person typed: a JSON text, an instance, a list, or a body.

    Only the JSON is checked here; the body, against the answering version's signature, by `check_instances`.
    """
    if isinstance(payload, (str, bytes)):
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
        if not text.strip():
            raise InvalidInput("no instances to predict", BODY_HINT)
        try:
            payload = json.loads(text)
        except RecursionError:  # the parser's own limit, far above ours: the same refusal as below
            raise InvalidInput(f"the instances are nested more than {instances.MAX_DEPTH} levels deep",
                               BODY_HINT) from None
        except ValueError as exc:
            raise InvalidInput(f"the instances are not valid JSON: {exc}", BODY_HINT) from None
    if isinstance(payload, dict) and ("instances" in payload or "inputs" in payload):
        body = payload
    elif isinstance(payload, list):
        body = {"instances": payload}
    elif isinstance(payload, dict):
        body = {"instances": [payload]}
    else:
        raise InvalidInput(f"cannot predict from a bare {type(payload).__name__}", BODY_HINT)
    return body


def check_instances(body: dict[str, Any], inputs: Mapping[str, Any], allow_non_finite: bool = False) -> int:
    """The number of instances in `body`, refused with InvalidInput unless it fits the signature's `inputs`."""
    try:
        return instances.check_body(body, inputs, MAX_INSTANCES, allow_non_finite)
    except instances.InstancesRefused as exc:
        message = exc.message
        if "instances in one request" in exc.message:
            hint = "split them into several requests"
        elif inputs:
            hint = "the signature's inputs: " + ", ".join(
                f"{name} ({instances.dtype_name(str(spec.get('dtype')))}, shape {spec.get('shape')})"
                for name, spec in sorted(inputs.items()))
            message = exc.without_names  # the hint names them, with their dtypes and shapes
        else:
            hint = BODY_HINT
        raise InvalidInput(message, hint) from None


class Predictions:
    """Answers of a model's served versions (copies of a version for use elsewhere: services/copies.py)."""

    def __init__(self, db: Database, catalog: Catalog, backend: Backend, config: ProjectConfig | None = None) -> None:
        self.db, self.catalog, self.backend, self.config = db, catalog, backend, config
        # a prediction's checks without a database read: a version's signature never changes once registered;
        # the default is read again after DEFAULT_TTL. For that long after a switch made by another process the
        # instances are checked against the previous default's signature; the version that answers checks them
        # again against its own (the local model server, Vertex AI's endpoint)
        self._signatures: LRUCache[tuple[str, str], dict[str, Any]] = LRUCache(maxsize=1024)
        self._defaults: TTLCache[str, str] = TTLCache(maxsize=1024, ttl=DEFAULT_TTL)
        self._cache_lock = threading.Lock()

    def _cached_inputs(self, model: str, version: str | None) -> dict[str, Any] | None:
        """`_inputs` as this process knows them already, or None (not known, or the default's name expired)."""
        with self._cache_lock:
            name = version or self._defaults.get(model)
            return self._signatures.get((model, name)) if name else None

    def _inputs(self, model: str, version: str | None) -> dict[str, Any]:
        """The signature inputs the instances must fit: `version`'s, or the default's (none without a default)."""
        cached = self._cached_inputs(model, version)
        if cached is not None:
            return cached
        name = version
        with self.db.reads() as s:
            self.catalog.require_model(model, s)
            if version is None:  # the version that will answer: its signature is what the instances must fit
                record = s.get(ModelRecord, model)
                name = record.default_version if record else None
            target = self.catalog.version(s, model, name) if name else None
            inputs = dict((target.signature or {}).get("inputs") or {}) if target is not None else {}
        if target is not None and name:
            with self._cache_lock:
                self._signatures[(model, name)] = inputs
                if version is None:
                    self._defaults[model] = name
        return inputs

    def predict(self, model: str, payload: Any, version: str | None = None) -> dict[str, Any]:
        """Predictions of `model`'s default version (or `version`) for the given instances.

        The answer is TF Serving's ({"predictions": [...]} or, for a columnar request, {"outputs": ...}) with
        the model and the version that answered.
        """
        names.validate_model_name(model)
        body = predict_body(payload)
        self._check(model, body, self._inputs(model, version))
        answered, answer = self.backend.predict(model, version, body)
        return {"model": model, "version": answered, **answer}

    def relay(self, model: str, payload: Any, version: str | None = None) -> Relay | None:
        """`predict` as the backend's Relay, for a caller that does its own waiting (the web worker's loop): the
        same checks, with nothing read from the database; None where that or the backend would have to wait
        (then `predict`). The Relay's answer is the backend's (version, answer)."""
        names.validate_model_name(model)
        body = predict_body(payload)
        inputs = self._cached_inputs(model, version)
        if inputs is None:
            return None
        self._check(model, body, inputs)
        return self.backend.relay(model, version, body)

    def _check(self, model: str, body: dict[str, Any], inputs: Mapping[str, Any]) -> None:
        non_finite = self.config.policy(model).non_finite_inputs if self.config is not None else False
        check_instances(body, inputs, non_finite)

    def compare(self, model: str, payload: Any, version: str) -> Compared:
        """The instances answered by `version` and by the model's default, side by side, with their agreement.

        Each side is checked against its own signature: a side the instances do not fit (a breaking change)
        says why instead of answering, and the other side still answers.
        """
        names.validate_model_name(model)
        with self.db.reads() as s:
            self.catalog.require_model(model, s)
            self.catalog.version(s, model, version)
            record = s.get(ModelRecord, model)
            default = record.default_version if record else None
        body = predict_body(payload)
        if not isinstance(body.get("instances"), list):
            raise InvalidInput("a comparison takes instances, not columnar inputs", BODY_HINT)
        sides: list[Side] = []
        for role, name in (("candidate", version), ("default", default)):
            side: Side = {"role": role}
            if name is None:
                side["error"] = f"{model} has no default version yet"
            else:
                side["version"] = name
                try:
                    side["predictions"] = self.predict(model, body, version=name)["predictions"]
                except StarchartError as exc:
                    side["error"] = exc.message
            sides.append(side)
        candidate, base = sides
        together = "predictions" in candidate and "predictions" in base
        return {"model": model, "instances": list(body["instances"]), "candidate": candidate, "base": base,
                "agreement": answers.agreement(candidate["predictions"], base["predictions"]) if together else None}

    def inputs(self, model: str, version: str) -> dict[str, Any]:
        """`version`'s signature inputs: {name: {"dtype": …, "shape": […]}}."""
        names.validate_model_name(model)
        with self.db.reads() as s:
            signature = dict(self.catalog.version(s, model, version).signature or {})
        inputs = dict(signature.get("inputs") or {})
        if not inputs:
            raise NotFound(f"{model} {version} has no recorded signature inputs",
                           "expose it again from a job whose SavedModel has a serving signature")
        return inputs

    def example(self, model: str, version: str) -> dict[str, Any]:
        """An instance to start from (the Try form's first values): the first row of the model's evaluation data
        when it is configured and readable, else one built from `version`'s signature."""
        inputs = self.inputs(model, version)
        evaluation = self.config.policy(model).evaluation if self.config is not None else None
        if evaluation is not None:
            try:
                rows = evaluation_instances(evaluation, inputs, self.backend.storage, limit=1)
            except StarchartError as exc:  # the card's evaluation says what is wrong with the data
                log.info("no example row from %s's evaluation data: %s", model, exc.message)
            else:
                if rows:
                    return rows[0]
        return instances.example_instance(inputs)

    def served(self, model: str, version: str | None = None) -> Served:
        """Which version answers `model`'s predictions: the serving side's default, or `version` if it exists."""
        names.validate_model_name(model)
        with self.db.reads() as s:
            self.catalog.require_model(model, s)
            if version is not None:
                return {"model": model, "version": self.catalog.version(s, model, version).name}
        default = self.backend.current_default(model)
        if default is None:
            raise NotFound(f"{model} has no default version yet", f"expose a version of {model}, then apply it")
        return {"model": model, "version": default}
