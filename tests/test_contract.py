"""The wire contract: pods the operator renders start a worker/router that accepts them.

The control plane and the worker keep separate copies of the contract (they never import each
other); this test is what keeps the copies equal and the rendered command lines valid.
"""

from __future__ import annotations

import copy

import pytest

import disaggserve.contract as cp
import disaggserve_worker.contract as wk
from disaggserve.api import parse_spec
from disaggserve.planner import plan_for
from disaggserve.resources import Owner, build_children
from disaggserve_worker.cli import build_parser, validate_serve_args
from helpers import example

SHARED = [
    "ROUTER_PORT",
    "WORKER_PORT",
    "KV_PORT",
    "ENV_POD_NAME",
    "ENV_POD_IP",
    "ENV_NAMESPACE",
    "ENV_UNIT",
    "ENV_WORKER_TOKEN",
    "ENV_KERNEL_CACHE",
    "HEADER_WORKER_TOKEN",
    "PATH_HEALTH",
    "PATH_READY",
    "PATH_METRICS",
    "PATH_DRAIN",
    "LABEL_INSTANCE",
    "LABEL_COMPONENT",
    "LABEL_UNIT",
    "METRIC_TTFT",
    "METRIC_TPOT",
    "METRIC_E2E",
    "METRIC_REQUESTS",
    "METRIC_PROMPT_TOKENS",
    "METRIC_GENERATION_TOKENS",
    "METRIC_SLO_MET",
    "METRIC_KV_TRANSFER_BYTES",
    "METRIC_KV_TRANSFER_SECONDS",
    "METRIC_ENGINE_WAITING",
    "METRIC_ENGINE_RUNNING",
    "METRIC_ENGINE_KV_USAGE",
    "METRIC_ENGINE_TTFT",
    "METRIC_ENGINE_ITL",
    "METRIC_ENGINE_E2E",
    "METRIC_ENGINE_PROMPT_TOKENS",
    "METRIC_ENGINE_GENERATION_TOKENS",
    "ROLES",
    "MAX_SPECULATIVE_TOKENS",
]


def test_engine_metric_names_are_what_the_worker_exports():
    from disaggserve_worker.server.worker_metrics import VLLM_METRICS

    for name, value in vars(wk).items():
        if name.startswith("METRIC_ENGINE_"):
            family = value.removesuffix("_total")
            assert family in VLLM_METRICS, f"{name}={value} is not exported by the worker"


@pytest.mark.parametrize("name", SHARED)
def test_both_copies_agree(name):
    assert getattr(cp, name) == getattr(wk, name)


def bodies():
    cpu = example()
    gpu = example("opt", file="opt-13b-low-affinity.yaml")
    high = copy.deepcopy(gpu)
    high["spec"]["placement"] = "high-affinity"
    keyed = copy.deepcopy(cpu)
    keyed["spec"]["router"] = {"apiKeySecretRef": {"name": "k"}}
    keyed["spec"]["model"]["maxModelLen"] = 2048
    ngram = copy.deepcopy(cpu)
    ngram["spec"]["speculation"] = {"mode": "adaptive", "proposer": "ngram", "numSpeculativeTokens": 6}
    draft = copy.deepcopy(cpu)
    draft["spec"]["speculation"] = {"mode": "fixed", "proposer": "draft", "draftModel": {"builtin": "tiny-llama-draft"}}
    return {"cpu": cpu, "gpu-low": gpu, "gpu-high": high, "api-key": keyed, "spec-ngram": ngram, "spec-draft": draft}


@pytest.mark.parametrize("case", ["cpu", "gpu-low", "gpu-high", "api-key", "spec-ngram", "spec-draft"])
def test_every_rendered_container_is_accepted_by_the_worker(case):
    body = bodies()[case]
    spec = parse_spec(body["spec"])
    objs = build_children(Owner(body["metadata"]["name"], "ns", "u"), spec, plan_for(spec))
    parser = build_parser()
    checked = 0
    for obj in objs:
        if obj["kind"] not in ("StatefulSet", "Deployment"):
            continue
        (container,) = obj["spec"]["template"]["spec"]["containers"]
        assert container["command"] == [cp.WORKER_BINARY]
        args = parser.parse_args(container["args"])
        if args.command == "serve":
            assert validate_serve_args(args) == [], container["args"]
            speculating = args.speculation_mode != "off"
            assert speculating == (
                args.role == "decode" and body["spec"].get("speculation", {}).get("mode", "off") != "off"
            )
            assert args.port == wk.WORKER_PORT and args.kv_port == wk.KV_PORT
        else:
            assert args.command == "router" and args.port == wk.ROUTER_PORT
        env = {e["name"] for e in container["env"]}
        assert {wk.ENV_POD_NAME, wk.ENV_POD_IP, wk.ENV_NAMESPACE} <= env
        probe_paths = {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
        assert probe_paths == {wk.PATH_READY, wk.PATH_HEALTH}
        checked += 1
    assert checked >= 3


def test_the_builtin_models_the_schema_admits_are_the_ones_the_worker_builds():
    from disaggserve.api.spec import BUILTIN_MODELS
    from disaggserve_worker.model.builtin_configs import BUILTIN_CONFIGS

    assert set(BUILTIN_MODELS) == set(BUILTIN_CONFIGS)
