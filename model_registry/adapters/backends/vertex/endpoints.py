"""Endpoints: a model's default served from dedicated machines (optional per model, off by default: a deployed
model bills per node hour).

With `endpoint: {enabled: true, machine_type: n1-standard-2, min_replicas: 1, max_replicas: 1}` in the
model's policy, a switch of the default also serves the new default from an endpoint (display name = the
model, label model=<model>), in an order where the `default` alias is the commit point:

    1. find or create the endpoint                       (an empty endpoint costs nothing)
    2. deploy the version with no traffic                (or all of it, if the endpoint serves nothing)
    3. move all the traffic to it                        (one UpdateEndpoint: atomic, undoable)
    4. move the `default` alias                          <- commit
    5. undeploy the other deployments (none has traffic) (clean-up: a failure is logged, not raised)

A failure in 1-2 changes nothing that serves; a failure in 3-4 puts the previous traffic split back
and undeploys the new deployment; so a failed promotion leaves the alias, the traffic and the
deployments as they were, and Retry starts over. A deployment of the version that is already there
(an earlier attempt that timed out) is used rather than deployed again, and step 5 also removes
deployments left behind by earlier failures.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from google.api_core import exceptions as gexc
from google.cloud import aiplatform_v1 as aip
from google.protobuf import field_mask_pb2, json_format, struct_pb2

from model_registry.adapters.backends.vertex.clients import VertexApi, label_value, labels
from model_registry.adapters.backends.vertex.errors import server_message
from model_registry.adapters.backends.vertex.monitoring import CanarySides
from model_registry.adapters.backends.vertex.versions import Versions
from model_registry.adapters.backends.vertex_settings import (
    ENDPOINT_EXAMPLE,
    EndpointSettings,
    endpoint_settings,
    parse_accelerator,
)
from model_registry.domain.errors import InvalidInput, NotFound, Refused, StarchartError

log = logging.getLogger(__name__)

EndpointPolicy = Mapping[str, Any] | Callable[[str], Any] | None


def traffic(endpoint: aip.Endpoint) -> dict[str, int]:
    """An endpoint's traffic split without the deployments that get nothing."""
    return {k: int(v) for k, v in endpoint.traffic_split.items() if int(v)}


def deployment_of(endpoint: aip.Endpoint, model: str, version_id: str) -> aip.DeployedModel | None:
    """A deployment of models/<model>@<version_id> on the endpoint, the one with the most traffic first."""
    split = traffic(endpoint)
    found = [d for d in endpoint.deployed_models
             if d.model.rsplit("/", 1)[-1].split("@")[0] == model and d.model_version_id == version_id]
    return max(found, key=lambda d: split.get(d.id, 0), default=None)


class Endpoints:
    """Which models are served from an endpoint, the switch of a served default, and predictions."""

    def __init__(self, api: VertexApi, versions: Versions, policy: EndpointPolicy = None) -> None:
        self.api = api
        self.versions = versions
        if policy is None or callable(policy):
            self._policy: Callable[[str], Any] = policy or (lambda model: None)
        else:  # a mapping is checked now, so a typo in starchart.yaml is found at start, not at a promotion
            checked = {str(m): endpoint_settings(str(m), raw) for m, raw in policy.items()}
            self._policy = checked.get

    def settings(self, model: str) -> EndpointSettings | None:
        """How `model`'s default is served from an endpoint; None (the default) when it is not."""
        raw = self._policy(model)
        return raw if isinstance(raw, EndpointSettings) or raw is None else endpoint_settings(model, raw)

    # ---------------------------------------------------------------- the switch

    def serve_and_move_alias(self, model: str, version: str, ref: str | None, settings: EndpointSettings) -> None:
        """Steps 1-5 of the module's docstring: deploy, move the traffic, move the alias (commit), clean up."""
        api = self.api
        version_name = self.versions.version_name(model, version, ref)
        endpoint = self.find(model) or self._create(model)
        before = traffic(endpoint)
        deployed = self._deploy(model, version, version_name, endpoint, settings)
        try:
            with api.errors(f"read endpoint {endpoint.name}", f"endpoint {endpoint.name}"):
                current = api.endpoints().get_endpoint(name=endpoint.name, retry=api.retry, timeout=api.rpc_timeout)
            if traffic(current) != {deployed: 100}:
                self._set_traffic(endpoint.name, {deployed: 100}, f"move the traffic of endpoint {endpoint.name} "
                                                                  f"to {model} {version}")
            self.versions.move_alias(model, version, ref)
        except StarchartError as exc:
            undo = self._undo_deploy(endpoint.name, deployed, before)
            if undo:
                raise type(exc)(f"{exc.message}; {undo}", exc.hint) from exc
            raise
        for other in current.deployed_models:  # after the commit: clean-up, not part of the promotion
            if other.id != deployed:
                try:
                    self._undeploy(endpoint.name, other.id, f"undeploy {other.display_name or other.id} from "
                                                            f"endpoint {endpoint.name}")
                except StarchartError as exc:
                    log.warning("%s is the default of %s, served by endpoint %s, but %s; that deployment has no "
                                "traffic and is billed until the next promotion of %s removes it",
                                version, model, endpoint.name, exc.message, model)

    # ---------------------------------------------------------------- canaries: the endpoint's traffic_split

    def start_canary(self, model: str, version: str, ref: str | None, percent: int,
                     settings: EndpointSettings) -> None:
        """Deploy the candidate beside the default (no traffic), then give it `percent` of the traffic in one
        UpdateEndpoint; a failure in either puts the endpoint back as it was. The `default` alias does not move."""
        version_name = self.versions.version_name(model, version, ref)
        endpoint = self.find(model)
        before = traffic(endpoint) if endpoint is not None else {}
        if endpoint is None or not before:
            raise Refused(f"no endpoint serves the default of {model} yet: a canary splits its traffic",
                          f"apply a version of {model} first (without --canary)")
        deployed = self._deploy(model, version, version_name, endpoint, settings)
        others = {k: v for k, v in before.items() if k != deployed}
        if not others:
            raise Refused(f"the endpoint of {model} already sends all its traffic to {version}",
                          "nothing to split: the candidate is what the endpoint serves")
        base = max(others, key=lambda k: others[k])
        try:
            self._set_traffic(endpoint.name, {base: 100 - percent, deployed: percent},
                              f"give {model} {version} {percent}% of the traffic of endpoint {endpoint.name}")
        except StarchartError as exc:
            undo = self._undo_deploy(endpoint.name, deployed, before)
            if undo:
                raise type(exc)(f"{exc.message}; {undo}", exc.hint) from exc
            raise

    def end_canary(self, model: str, default: str | None) -> None:
        """All the traffic back to the deployment of `default` (one UpdateEndpoint), then the other deployments
        undeployed (clean-up: a failure is logged, not raised)."""
        endpoint = self.find(model)
        if endpoint is None:
            return
        keep = [d.id for d in endpoint.deployed_models if d.display_name == default]
        if not keep:
            raise NotFound(f"the endpoint of {model} has no deployment of its default {default}",
                           f"check endpoint {endpoint.name} in the Vertex AI console")
        if traffic(endpoint) != {keep[0]: 100}:
            self._set_traffic(endpoint.name, {keep[0]: 100}, f"give all the traffic of endpoint {endpoint.name} "
                                                             f"back to {model} {default}")
        for other in endpoint.deployed_models:
            if other.id != keep[0]:
                try:
                    self._undeploy(endpoint.name, other.id, f"undeploy {other.display_name or other.id} from "
                                                            f"endpoint {endpoint.name}")
                except StarchartError as exc:
                    log.warning("the canary of %s ended but %s; that deployment has no traffic and is billed until "
                                "the next promotion of %s removes it", model, exc.message, model)

    def split(self, model: str) -> dict[str, int]:
        """The endpoint's traffic split by version (deployments' display names)."""
        endpoint = self.find(model)
        if endpoint is None:
            return {}
        names = {d.id: d.display_name or d.id for d in endpoint.deployed_models}
        return {names.get(k, k): v for k, v in traffic(endpoint).items()}

    def canary_sides(self, model: str, default: str | None) -> CanarySides | None:
        """The running canary's deployed models (the default's and the candidate's, the other one with traffic) and
        when the candidate was deployed; None when the endpoint sends all its traffic to one deployment."""
        endpoint = self.find(model)
        split = traffic(endpoint) if endpoint is not None else {}
        if endpoint is None or len(split) < 2:
            return None
        deployed = {d.id: d for d in endpoint.deployed_models}
        base = [i for i in split if i in deployed and deployed[i].display_name == default]
        others = [i for i in split if i in deployed and i not in base]
        if not base or len(others) != 1:
            raise NotFound(f"the endpoint of {model} splits its traffic as {split}, which is no canary of its "
                           f"default {default} against one candidate",
                           f"check endpoint {endpoint.name} in the Vertex AI console")
        candidate = deployed[others[0]]
        return CanarySides(endpoint.name.rsplit("/", 1)[1], candidate.display_name or candidate.id, candidate.id,
                           base[0], candidate.create_time)

    def find(self, model: str) -> aip.Endpoint | None:
        """The endpoint that serves `model` (labelled model=<model>, displayed as the model), oldest first."""
        api = self.api
        request = aip.ListEndpointsRequest(parent=api.parent(), filter=f'labels.model="{label_value(model)}"',
                                           order_by="create_time", page_size=api.page_size)
        with api.errors(f"look up the endpoint of {model}", f"project {api.project} in region {api.region}"):
            for page in api.endpoints().list_endpoints(request=request, retry=api.retry,
                                                       timeout=api.rpc_timeout).pages:
                for endpoint in page.endpoints:
                    if endpoint.display_name == model:
                        return endpoint
        return None

    def _create(self, model: str) -> aip.Endpoint:
        api = self.api
        body = aip.Endpoint(display_name=model, labels=labels({"model": model}),
                            description=f"StarChart: serves the default version of {model}")
        client = api.endpoints()

        def create() -> Any:
            return client.create_endpoint(parent=api.parent(), endpoint=body, retry=None, timeout=api.rpc_timeout)

        action = f"create the endpoint of {model}"
        with api.errors(action, f"project {api.project} in region {api.region}"):
            started = api.idempotent(create, lambda: self.find(model))
        if isinstance(started, aip.Endpoint):
            return started
        return api.wait(started, action, "retry the request; the default did not move")

    def _deploy(self, model: str, version: str, version_name: str, endpoint: aip.Endpoint,
                settings: EndpointSettings) -> str:
        """Deploy the version to the endpoint without taking traffic from what it serves; its deployed id."""
        api = self.api
        version_id = version_name.rsplit("@", 1)[1]
        existing = deployment_of(endpoint, model, version_id)
        if existing is not None:  # an earlier attempt deployed it (and timed out, or failed later)
            return existing.id
        machine = aip.MachineSpec(machine_type=settings.machine_type)
        if settings.accelerator:
            kind, count = parse_accelerator(settings.accelerator)
            machine.accelerator_type = aip.AcceleratorType[kind]  # type: ignore[misc]  # looked up by name
            machine.accelerator_count = count
        before = traffic(endpoint)
        request = aip.DeployModelRequest(
            endpoint=endpoint.name,
            deployed_model=aip.DeployedModel(
                model=version_name, display_name=version,
                dedicated_resources=aip.DedicatedResources(machine_spec=machine,
                                                           min_replica_count=settings.min_replicas,
                                                           max_replica_count=settings.max_replicas)),
            # "0" is the new deployment: no traffic while the endpoint serves something, else all of it
            traffic_split={**before, "0": 0} if before else {"0": 100},
        )
        client = api.endpoints()

        def create() -> Any:
            return client.deploy_model(request=request, retry=None, timeout=api.rpc_timeout)

        def find() -> aip.DeployedModel | None:
            current = client.get_endpoint(name=endpoint.name, retry=None, timeout=api.rpc_timeout)
            return deployment_of(current, model, version_id)

        action = f"deploy {model} {version} to endpoint {endpoint.name}"
        with api.errors(action, f"endpoint {endpoint.name} or version {version_name}"):
            started = api.idempotent(create, find)
        if isinstance(started, aip.DeployedModel):
            return started.id
        result = api.wait(started, action,
                          f"check {settings.machine_type} and the serving image in region {api.region}, and the "
                          f"serving quota; the default did not move, retry the request")
        return result.deployed_model.id

    def _set_traffic(self, endpoint_name: str, split: dict[str, int], action: str) -> None:
        api = self.api
        with api.errors(action, f"endpoint {endpoint_name}"):
            api.endpoints().update_endpoint(endpoint=aip.Endpoint(name=endpoint_name, traffic_split=split),
                                            update_mask=field_mask_pb2.FieldMask(paths=["traffic_split"]),
                                            retry=api.retry, timeout=api.rpc_timeout)

    def _undeploy(self, endpoint_name: str, deployed_id: str, action: str) -> None:
        api = self.api
        request = aip.UndeployModelRequest(endpoint=endpoint_name, deployed_model_id=deployed_id)
        with api.errors(action, f"endpoint {endpoint_name}"):
            try:
                started = api.endpoints().undeploy_model(request=request, retry=api.retry, timeout=api.rpc_timeout)
            except gexc.NotFound:  # already gone (an earlier attempt's reply was lost)
                return
        api.wait(started, action, f"undeploy it in the Vertex AI console (endpoint {endpoint_name})")

    def _undo_deploy(self, endpoint_name: str, deployed: str, before: dict[str, int]) -> str:
        """Put the endpoint back as it was before `_deploy`; '' when done, else what is left (best effort)."""
        api = self.api
        try:
            with api.errors(f"read endpoint {endpoint_name}", f"endpoint {endpoint_name}"):
                current = api.endpoints().get_endpoint(name=endpoint_name, retry=api.retry, timeout=api.rpc_timeout)
            last = [d.id for d in current.deployed_models] == [deployed]
            if traffic(current) != before and not (last and not before):  # undeploying the last one empties it
                self._set_traffic(endpoint_name, before, f"put back the traffic split of endpoint {endpoint_name}")
            if before.get(deployed, 0) == 0 and any(d.id == deployed for d in current.deployed_models):
                self._undeploy(endpoint_name, deployed, f"undeploy the new deployment {deployed} from "
                                                        f"endpoint {endpoint_name}")
        except StarchartError as exc:
            return (f"and putting endpoint {endpoint_name} back failed too ({exc.message}): check its traffic "
                    f"split in the Vertex AI console (it was {before or 'empty'}) before you retry")
        return ""

    # ---------------------------------------------------------------- predictions

    def predict(self, model: str, version: str | None, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Predictions from the endpoint that serves `model`'s default (see the module's docstring).

        Vertex AI answers with the deployment its traffic split picks; a named version is accepted when it is
        the one the endpoint serves (any other version: pull it and load it locally)."""
        api = self.api
        if "instances" not in body:
            raise InvalidInput("Vertex AI endpoints take a list of instances, not TF Serving's columnar inputs",
                               'send {"instances": [{INPUT: VALUE, ...}, ...]}')
        if self.settings(model) is None:
            raise Refused(f"{model} is not served from a Vertex AI endpoint",
                          f"enable one in starchart.yaml (models.{model}.{ENDPOINT_EXAMPLE}) and apply a version; "
                          f"or `pull {model}` and load the SavedModel locally")
        endpoint = self.find(model)
        serving = {d.id: d.display_name for d in endpoint.deployed_models} if endpoint else {}
        live = [serving.get(i, i) for i in traffic(endpoint)] if endpoint else []
        if endpoint is None or not live:
            raise NotFound(f"no endpoint serves {model} yet", f"apply a version of {model}: it deploys the default")
        if version is not None and version not in live:
            raise Refused(f"the endpoint of {model} serves {', '.join(live)}, not {version}",
                          f"`pull {model} {version}` and load it locally, or promote it")
        instances = [json_format.ParseDict(i, struct_pb2.Value()) for i in body["instances"]]
        with api.errors(f"predict with {model}", f"endpoint {endpoint.name}"):
            try:
                answer = api.predictions().predict(endpoint=endpoint.name, instances=instances, retry=api.retry,
                                                   timeout=api.rpc_timeout)
            except gexc.BadRequest as exc:
                raise InvalidInput(f"the endpoint of {model} refused the instances: {server_message(exc)}",
                                   f"`diff {model}` shows the signature's inputs") from exc
        response = json_format.MessageToDict(type(answer).pb(answer))
        return (serving.get(answer.deployed_model_id) or version or live[0],
                {"predictions": response.get("predictions", [])})
