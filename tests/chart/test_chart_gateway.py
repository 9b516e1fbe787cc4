"""rbac.inferencePools grants the operator exactly what it does with InferencePools (spec.gateway)."""

from __future__ import annotations

import pytest

from chart.chartlib import documents, template
from chart.rbaclib import Call, denied, grants_for, unused

SA = "disaggserve"
OPERATOR_NS = "disaggserve-system"


def _pool_calls(namespace: str) -> list[Call]:
    from disaggserve.controller import kube as kube_module
    from disaggserve.controller.reconcile import GATEWAY_KINDS

    calls = []
    for api_version, kind in GATEWAY_KINDS:  # listed, applied (patch) and pruned like every owned kind
        plural, _ = kube_module.KINDS[(api_version, kind)]
        calls += [Call(v, api_version.rpartition("/")[0], plural, None, namespace) for v in ("get", "list", "patch",
                                                                                              "delete")]
    return calls


@pytest.mark.parametrize("watch", [{"namespaces": ["team-a"]}, {"scope": "cluster"}], ids=["namespaced", "cluster"])
def test_inference_pool_grants_follow_the_value(helm_bin: str, watch: dict) -> None:
    on = grants_for(documents(template({"watch": watch, "rbac": {"inferencePools": True}})), SA, OPERATOR_NS)
    assert not denied(_pool_calls("team-a"), on)
    off = grants_for(documents(template({"watch": watch})), SA, OPERATOR_NS)
    assert denied(_pool_calls("team-a"), off), "off by default: clusters without the CRDs need no grant"
    assert ("inference.networking.k8s.io", "inferencepools") not in unused(_pool_calls("team-a"), on)
