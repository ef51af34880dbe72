"""Model versions in the Vertex AI Model Registry.

A model is one Vertex AI Model (model_id = the model name); each exposed version is a model version
carrying its version name (v<TS>) as a version alias. The default version is the `default` alias,
moved with merge_version_aliases (Vertex AI takes it from the previous default); `current_default`
reads the alias. Registering a version is idempotent: a version already carrying its name's alias is
found rather than uploaded again.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

from google.api_core import exceptions as gexc
from google.cloud import aiplatform_v1 as aip

from model_registry.adapters.backends.vertex.clients import VertexApi, labels
from model_registry.adapters.backends.vertex.errors import VertexNotFound
from model_registry.domain.errors import BackendError, StarchartError

DEFAULT_SERVING_IMAGE = "us-docker.pkg.dev/vertex-ai/prediction/tf2-cpu.2-15:latest"
DEFAULT_ALIAS = "default"
VERSION_ALIAS = re.compile(r"^v\d{14}$")
VERSION_REF = re.compile(r"^projects/[^/]+/locations/[^/]+/models/[^/@]+@\d+$")
log = logging.getLogger(__name__)


class Versions:
    """Register versions, read and move the `default` alias."""

    def __init__(self, api: VertexApi, serving_image: str = DEFAULT_SERVING_IMAGE) -> None:
        self.api = api
        self.serving_image = serving_image

    def get_model(self, name: str) -> aip.Model | None:
        """The model version `name` (models/<model>@<alias or id>), None when there is none."""
        try:
            return self.api.models().get_model(name=name, retry=self.api.retry, timeout=self.api.rpc_timeout)
        except gexc.NotFound:
            return None

    def register_version(self, model: str, version: Mapping[str, Any], first: bool) -> str | None:
        """Upload the version (model_id for a new model, parent_model after) and await the operation."""
        api = self.api
        name, model_path = version["name"], api.model_path(model)
        metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in sorted((version.get("metrics") or {}).items()))
        text = (f"{model} {name}: job {version.get('job_id')}, trained by {version.get('trained_by')}"
                + (f"; {metrics}" if metrics else "") + f"; digest {str(version.get('digest'))[:12]}")
        body = aip.Model(
            display_name=model, description=text, version_description=text,
            artifact_uri=version["deployment_uri"],
            container_spec=aip.ModelContainerSpec(image_uri=self.serving_image),
            labels=labels({"model": model, "version": name, "job": str(version.get("job_id") or "")}),
            version_aliases=[name],
        )
        client = api.models()

        def upload(as_new_model: bool) -> Any:
            target = {"model_id": model} if as_new_model else {"parent_model": model_path}
            request = aip.UploadModelRequest(parent=api.parent(), model=body, **target)
            return client.upload_model(request=request, retry=None, timeout=api.rpc_timeout)

        def create() -> Any:
            try:
                return upload(first)
            except (gexc.Conflict, gexc.NotFound) as exc:
                # the model exists after all (409 on model_id), or not yet (404 on parent_model)
                if isinstance(exc, gexc.Conflict if first else gexc.NotFound):
                    return upload(not first)
                raise

        action = f"register {model} {name}"
        with api.errors(action, f"model {model_path} (or project {api.project} in region {api.region})"):
            existing = self.get_model(f"{model_path}@{name}")  # an earlier, interrupted expose registered it
            if existing is not None:
                return f"{existing.name}@{existing.version_id}"
            started = api.idempotent(create, lambda: self.get_model(f"{model_path}@{name}"))
            if isinstance(started, aip.Model):
                return f"{started.name}@{started.version_id}"
        late = BackendError(f"Vertex AI is still registering {model} {name} after {api.operation_timeout:.0f}s",
                            f"run `expose {model}` again later; it finds the version once it is ready")
        result = api.wait(started, action, f"check that {version['deployment_uri']} holds a SavedModel and that the "
                                           f"Vertex AI service agent may read {api.bucket}", late=late)
        return f"{result.model}@{result.model_version_id}"

    def current_default(self, model: str) -> str | None:
        with self.api.errors(f"read the default of {model}", f"model {model}"):
            found = self.get_model(f"{self.api.model_path(model)}@{DEFAULT_ALIAS}")
        if found is None:
            return None
        return next((a for a in found.version_aliases if VERSION_ALIAS.match(a)), None)

    def move_alias(self, model: str, version: str, ref: str | None) -> None:
        """Move the `default` alias to the version: the commit point of a switch. A move whose every reply was
        lost (Vertex AI made it, the answers never came back) is read back: done, not an error."""
        name = ref or f"{self.api.model_path(model)}@{version}"
        try:
            with self.api.errors(f"make {version} the default of {model}", f"version {name}"):
                updated = self.api.models().merge_version_aliases(name=name, version_aliases=[DEFAULT_ALIAS],
                                                                  retry=self.api.retry, timeout=self.api.rpc_timeout)
        except StarchartError as exc:
            if self._is_default(model, version):
                log.info("%s is the default of %s although moving the alias answered: %s", version, model, exc.message)
                return
            raise
        if DEFAULT_ALIAS not in updated.version_aliases:
            raise BackendError(f"Vertex AI did not move the default alias of {model} to {version}",
                               "check the model's versions in the Vertex AI console")

    def _is_default(self, model: str, version: str) -> bool:
        try:
            return self.current_default(model) == version
        except StarchartError:  # unknown: the move's own error is the one to report
            return False

    def version_name(self, model: str, version: str, ref: str | None) -> str:
        """models/<model>@<version id>: a deployment names a version by its id."""
        if ref and VERSION_REF.match(ref):
            return ref
        model_path = self.api.model_path(model)
        with self.api.errors(f"look up {model} {version}", f"model {model_path}"):
            found = self.get_model(f"{model_path}@{version}")
        if found is None:
            raise VertexNotFound(f"Vertex AI has no version {version} of {model}",
                                 f"expose it first: `expose {model}`")
        return f"{found.name}@{found.version_id}"
