"""`spec.gateway`: an InferencePool (Gateway API Inference Extension, inference.networking.k8s.io/v1).

A Gateway whose HTTPRoute names the pool as backend asks the pool's endpoint picker (an ext-proc
service) which pod gets each request, then sends it there. Two pickers fit a disaggregated model:

- `disaggserve` (default, any engine): the pool holds this resource's router pods. Each router
  already pairs a prefill and a decode worker per request and moves the KV cache; the picker only
  balances the routers, reading each router's queue and in-flight gauges. Every pool endpoint
  speaks OpenAI, whatever the engine.
- `llm-d`: the pool holds the serving pods (decode, or colocated when the plan colocates) on the
  worker port, which must speak OpenAI and export vLLM's metrics: engine vllm. llm-d's picker then
  chooses a prefill pod per request and names it in the `x-prefiller-host-port` header, which the
  decode side's routing sidecar honours.

Pure: spec + plan in, one object out.
"""

from __future__ import annotations

from typing import Any

from disaggserve.api.plan import Plan
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.contract import ROUTER_PORT, WORKER_PORT
from disaggserve.resources.names import component_labels, pod_selector

API_VERSION = "inference.networking.k8s.io/v1"
KIND = "InferencePool"
DEFAULT_PICKER_PORT = 9002


class GatewayError(ValueError):
    """spec.gateway asks for something this resource cannot be served with (message says how to fix)."""


def pool_name(name: str) -> str:
    return name


def picker_service(name: str) -> str:
    return f"{name}-epp"


def serving_component(plan: Plan) -> str:
    """Which worker pods answer clients: decode, or colocated when the plan runs both phases in one."""
    colocated = getattr(plan, "colocated", False) or getattr(plan, "placement", None) == "colocated"
    return "colocated" if colocated else "decode"


def engine_kind(spec: DisaggServeSpec) -> str:
    engine = getattr(spec, "engine", None)
    return str(getattr(engine, "kind", "builtin") or "builtin")


def inference_pool(spec: DisaggServeSpec, plan: Plan, name: str, namespace: str) -> dict[str, Any]:
    gateway = spec.gateway
    if gateway is None:
        raise GatewayError("spec.gateway is not set")
    if gateway.picker == "llm-d":
        if engine_kind(spec) != "vllm":
            raise GatewayError(
                "spec.gateway.picker llm-d sends clients straight to the serving pods, which must be vLLM "
                "servers: set spec.engine.kind to vllm, or use picker disaggserve (the pool then holds the routers)")
        selector, port, component = pod_selector(name, serving_component(plan)), WORKER_PORT, "serving"
    else:
        selector, port, component = pod_selector(name, "router"), ROUTER_PORT, "router"
    ref = gateway.endpoint_picker
    picker: dict[str, Any] = {
        "kind": "Service",
        "name": ref.name if ref else picker_service(name),
        "port": {"number": ref.port if ref else DEFAULT_PICKER_PORT},
        "failureMode": ref.failure_mode if ref else "FailClose",
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": pool_name(name),
            "namespace": namespace,
            "labels": component_labels(name, f"gateway-{component}"),
            "annotations": {"disaggserve.io/picker": gateway.picker},
        },
        "spec": {
            "selector": {"matchLabels": dict(selector)},
            "targetPorts": [{"number": port}],
            "appProtocol": "http",
            "endpointPickerRef": picker,
        },
    }
