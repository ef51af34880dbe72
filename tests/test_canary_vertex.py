"""A canary on Vertex AI, through the local fake's endpoints: the candidate deployed beside the default with its
share of the endpoint's traffic_split, then promoted (all the traffic, the alias moved, the old deployment gone)
or rolled back (all the traffic back, the candidate undeployed); no figures, so people decide."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
import test_vertex_backend as vertex_tests
from fakes.vertex_fake import VertexFake, fast_backend
from test_vertex_backend import ENDPOINT, V1, V2, serving, versions_of

from model_registry.domain import canary as canary_rules
from model_registry.domain.errors import Refused

fake = vertex_tests.fake  # the Vertex tests' fixture: a fake of Vertex AI's endpoints on a local port


def test_a_canary_is_the_endpoints_traffic_split_and_ends_in_one_update(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml", endpoints={"iris": ENDPOINT})
    refs = versions_of(backend, V1, V2)
    with pytest.raises(Refused, match="no endpoint serves the default of iris yet"):
        backend.start_canary("iris", V2, refs[1], 10, 0.1)
    backend.set_default("iris", V1, refs[0])

    fake.reset_requests()
    backend.start_canary("iris", V2, refs[1], 10, 0.1)
    assert serving(fake) == [("iris@1", 90), ("iris@2", 10)]
    [deploy] = fake.calls("endpoints.deployModel")
    new_share = deploy.body["trafficSplit"].pop("0")
    assert new_share == 0 and list(deploy.body["trafficSplit"].values()) == [100], \
        "deployed beside the default with no traffic first"
    [patch] = fake.calls("endpoints.patch")
    assert sorted(patch.body["trafficSplit"].values()) == [10, 90], "then the split moved in one update"
    assert backend.canary_split("iris") == {V1: 90, V2: 10}
    assert backend.current_default("iris") == V1, "the alias does not move during a canary"
    assert backend.canary_figures("iris") is None

    backend.end_canary("iris")  # rollback
    assert serving(fake) == [("iris@1", 100)] and backend.canary_split("iris") == {V1: 100}
    assert fake.count("endpoints.undeployModel") == 1

    backend.start_canary("iris", V2, refs[1], 25, 0.1)
    assert backend.canary_split("iris") == {V1: 75, V2: 25}
    fake.reset_requests()
    backend.set_default("iris", V2, refs[1])  # promoted to 100%: the deployment already there takes it all
    assert fake.count("endpoints.deployModel") == 0
    assert serving(fake) == [("iris@2", 100)] and backend.current_default("iris") == V2


def test_a_vertex_canary_needs_an_endpoint_and_is_judged_by_people(fake: VertexFake) -> None:
    backend = fast_backend(fake, "gs://starchart-test-ml")  # no endpoint for iris
    refs = versions_of(backend, V1, V2)
    backend.set_default("iris", V1, refs[0])
    with pytest.raises(Refused, match="not served from an endpoint") as refused:
        backend.start_canary("iris", V2, refs[1], 10, 0.1)
    assert "endpoint" in refused.value.hint and "without --canary" in refused.value.hint
    assert backend.canary_split("iris") == {V1: 100}
    now = datetime(2026, 12, 20, 9, 0)
    verdict = canary_rules.judge(backend.canary_figures("iris"), canary_rules.CanaryPolicy(auto_promote=True),
                                 now, now + timedelta(seconds=1))
    assert verdict.action == canary_rules.WAIT, "no figures: the end of the bake waits for a click"
