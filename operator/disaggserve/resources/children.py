"""Everything one DisaggServe owns, in apply order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from disaggserve.api.constants import API_VERSION, KIND
from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.resources.configmap import build_plan_configmap
from disaggserve.resources.engines import renderer_for
from disaggserve.resources.gateway import GatewayError, inference_pool
from disaggserve.resources.names import name_problem
from disaggserve.resources.policy import build_pdb
from disaggserve.resources.router import router_objects
from disaggserve.resources.security import NetworkAccess, new_token, security_objects
from disaggserve.resources.workers import worker_objects


class RenderError(ValueError):
    """The resource cannot be turned into valid children (the message says how to fix it)."""


@dataclass(frozen=True)
class Owner:
    name: str
    namespace: str
    uid: str | None = None  # None when rendering offline (`disaggserve render`)

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def build_children(
    owner: Owner,
    spec: DisaggServeSpec,
    plan: Plan,
    profile: dict[str, Any] | None = None,
    *,
    worker_token: str | None = None,
    access: NetworkAccess | None = None,
) -> list[dict[str, Any]]:
    """`worker_token`: the token the existing Secret holds, so a reconcile never rotates it; None
    makes a new one (first reconcile, offline render)."""
    if problem := name_problem(owner.name):
        raise RenderError(problem)
    if plan.placement == "low-affinity" and any(plan.phase(p).replicas % plan.units for p in ("prefill", "decode")):
        raise RenderError(f"plan has {plan.units} units but replicas that do not divide evenly among them")
    name, ns = owner.name, owner.namespace
    objects = [
        # First: the pods read their token from it.
        *renderer_for(spec).network_objects(
            security_objects(name, ns, worker_token or new_token(), access or NetworkAccess())
        ),
        build_plan_configmap(name, ns, plan, profile),
        *worker_objects(spec, plan, name, ns),
        *(build_pdb(name, ns, role) for role in plan.roles),
        *router_objects(spec, name, ns),
    ]
    if spec.gateway is not None:
        try:
            objects.append(inference_pool(spec, plan, name, ns))
        except GatewayError as error:
            raise RenderError(str(error)) from None
    if owner.uid:
        for obj in objects:
            obj["metadata"]["ownerReferences"] = [owner.reference()]
    return objects
