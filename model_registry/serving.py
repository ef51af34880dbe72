"""Predictions from a model's served versions: the local model server, or the backend's endpoint."""

from __future__ import annotations

import json
from typing import Any

from model_registry import names
from model_registry.errors import InvalidInput, NotFound
from model_registry.service import Service

MAX_INSTANCES = 1000
BODY_HINT = ('give instances as JSON: one object {"input": value, ...}, a list of them, '
             'or TF Serving\'s {"instances": [...]} / {"inputs": {...}}')


def predict_body(payload: Any) -> dict[str, Any]:
    """TF Serving's request body from what a person typed: a JSON text, an instance, a list, or a body."""
    if isinstance(payload, (str, bytes)):
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
        if not text.strip():
            raise InvalidInput("no instances to predict", BODY_HINT)
        try:
            payload = json.loads(text)
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
    instances = body.get("instances")
    if instances is not None and (not isinstance(instances, list) or not instances):
        raise InvalidInput('"instances" must be a non-empty list', BODY_HINT)
    if isinstance(instances, list) and len(instances) > MAX_INSTANCES:
        raise InvalidInput(f"{len(instances)} instances in one request; at most {MAX_INSTANCES}",
                           "split them into several requests")
    return body


class Serving(Service):
    def predict(self, model: str, payload: Any, version: str | None = None) -> dict[str, Any]:
        """Predictions of `model`'s default version (or `version`) for the given instances.

        The answer is TF Serving's ({"predictions": [...]} or, for a columnar request, {"outputs": ...}) with
        the model and the version that answered.
        """
        names.validate_model_name(model)
        body = predict_body(payload)
        with self.reads() as s:
            self._require_model(model, s)
            if version is not None:
                self._version(s, model, version)
        answered, answer = self.backend.predict(model, version, body)
        return {"model": model, "version": answered, **answer}

    def served(self, model: str, version: str | None = None) -> dict[str, Any]:
        """Which version answers `model`'s predictions: the serving side's default, or `version` if it exists."""
        names.validate_model_name(model)
        with self.reads() as s:
            self._require_model(model, s)
            if version is not None:
                return {"model": model, "version": self._version(s, model, version).name}
        default = self.backend.current_default(model)
        if default is None:
            raise NotFound(f"{model} has no default version yet", f"expose a version of {model}, then apply it")
        return {"model": model, "version": default}
