"""The wire contract with the worker image, control-plane side.

The worker package keeps its own copy (`disaggserve_worker.contract`): the two packages never
import each other. `tests/test_contract.py` renders pods with the operator and parses their
command lines with the worker's own argument parser, so a drift on either side fails a test.
"""

from __future__ import annotations

ROUTER_PORT = 8000
WORKER_PORT = 8100
KV_PORT = 8101

# Most tokens speculation may propose per step (acceptance decays geometrically, so longer
# proposals only cost verification work); the CRD, the worker flag and its config share it.
MAX_SPECULATIVE_TOKENS = 16

WORKER_BINARY = "disaggserve-worker"

# Identity of a pod, injected through the downward API (or by the local node agent).
ENV_POD_NAME = "DISAGGSERVE_POD_NAME"
ENV_POD_IP = "DISAGGSERVE_POD_IP"
ENV_NAMESPACE = "DISAGGSERVE_NAMESPACE"
ENV_UNIT = "DISAGGSERVE_UNIT"
# The per-DisaggServe shared secret (Secret `<name>-worker-token`, key `token`): every worker
# endpoint but the probes and /metrics wants it in the header below.
ENV_WORKER_TOKEN = "DISAGGSERVE_WORKER_TOKEN"
HEADER_WORKER_TOKEN = "X-DisaggServe-Token"
# Where a worker caches its compiled CPU kernels (default: the user's cache). The local node agent
# points every pod at one folder, as a node-level cache would be: a pod's HOME is its own.
ENV_KERNEL_CACHE = "DISAGGSERVE_KERNEL_CACHE"

# HTTP paths every worker and the router serve.
PATH_HEALTH = "/healthz"
PATH_READY = "/readyz"
PATH_METRICS = "/metrics"
PATH_DRAIN = "/internal/drain"

# Labels on every object the operator creates; the router discovers workers by them.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_UNIT = "disaggserve.io/unit"
LABEL_PLAN_HASH = "disaggserve.io/plan-hash"
APP_NAME = "disaggserve"
MANAGED_BY = "disaggserve-operator"

# Metric names (docs/architecture.md §5), read by the autoscaler from Prometheus or the router.
METRIC_TTFT = "disaggserve_ttft_seconds"
METRIC_TPOT = "disaggserve_tpot_seconds"
METRIC_E2E = "disaggserve_e2e_seconds"
METRIC_REQUESTS = "disaggserve_requests_total"
METRIC_PROMPT_TOKENS = "disaggserve_prompt_tokens_total"
METRIC_GENERATION_TOKENS = "disaggserve_generation_tokens_total"
METRIC_SLO_MET = "disaggserve_slo_met_total"
# Every KV-cache pull a decode worker makes (histograms, label role): the autoscaler's live KV link.
METRIC_KV_TRANSFER_BYTES = "disaggserve_kv_transfer_bytes"
METRIC_KV_TRANSFER_SECONDS = "disaggserve_kv_transfer_seconds"
# Engine series of every worker, in vLLM's names for both engines (labels model_name, engine):
# what the Gateway API Inference Extension's endpoint picker and vLLM dashboards read.
METRIC_ENGINE_WAITING = "vllm:num_requests_waiting"
METRIC_ENGINE_RUNNING = "vllm:num_requests_running"
METRIC_ENGINE_KV_USAGE = "vllm:kv_cache_usage_perc"
METRIC_ENGINE_TTFT = "vllm:time_to_first_token_seconds"
METRIC_ENGINE_ITL = "vllm:inter_token_latency_seconds"
METRIC_ENGINE_E2E = "vllm:e2e_request_latency_seconds"
METRIC_ENGINE_PROMPT_TOKENS = "vllm:prompt_tokens_total"
METRIC_ENGINE_GENERATION_TOKENS = "vllm:generation_tokens_total"

ROLES = ("prefill", "decode", "colocated")

# The worker shards each layer over the GPUs of its pod (tensor) and splits layers into stages
# (pipeline); a CPU worker has no devices to split over, so it runs size 1 of both.
WORKER_MAX_TENSOR_PARALLEL = 8


def max_tensor_parallel(device: str) -> int:
    """The largest tensor-parallel size the worker runs on `spec.hardware.device`."""
    return 1 if device == "cpu" else WORKER_MAX_TENSOR_PARALLEL


def worker_args(
    *,
    role: str,
    model: str,
    model_name: str,
    tensor: int,
    pipeline: int,
    device: str,
    ttft_slo_ms: float | None = None,
    tpot_slo_ms: float | None = None,
    max_model_len: int | None = None,
    dtype: str = "auto",
    speculation: dict[str, str | int] | None = None,
    max_batch_tokens: int | None = None,
) -> list[str]:
    """Command line of `disaggserve-worker serve` for one pod.

    `max_batch_tokens`: the token budget of one iteration (the plan's prefill L_m); None renders
    nothing and the worker keeps its default, so plans without one change no pod template.

    The operator passes no SLOs: workers bucket latencies with fixed edges, so an SLO edit
    changes no pod template and restarts no worker (the router and the autoscaler judge SLOs).
    The flags stay in the contract for workers run by hand.
    """
    if role not in ROLES:
        raise ValueError(f"unknown worker role {role!r}; expected one of {ROLES}")
    args = [
        "serve",
        "--role",
        role,
        "--model",
        model,
        "--model-name",
        model_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(WORKER_PORT),
        "--kv-port",
        str(KV_PORT),
        "--tensor-parallel",
        str(tensor),
        "--pipeline-parallel",
        str(pipeline),
        "--device",
        device,
    ]
    if ttft_slo_ms is not None:
        args += ["--ttft-slo-ms", f"{ttft_slo_ms:g}"]
    if tpot_slo_ms is not None:
        args += ["--tpot-slo-ms", f"{tpot_slo_ms:g}"]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    if dtype != "auto":  # auto renders nothing, as before the field existed: no pod template changes
        args += ["--dtype", dtype]
    if max_batch_tokens is not None:
        args += ["--max-batch-tokens", str(max_batch_tokens)]
    for key, value in (speculation or {}).items():
        args += [f"--speculation-{key}", str(value)]
    return args


def router_args(
    *,
    model: str,
    model_name: str,
    namespace: str,
    instance: str,
    ttft_slo_ms: float,
    tpot_slo_ms: float,
    api_key_file: str | None = None,
    engine: str = "builtin",
    token_timeout_s: float | None = None,
    prefill_timeout_s: float | None = None,
) -> list[str]:
    """Command line of `disaggserve-worker router`, discovering workers through the API."""
    args = [
        "router",
        "--model",
        model,
        "--model-name",
        model_name,
        "--host",
        "0.0.0.0",
        "--port",
        str(ROUTER_PORT),
        "--discovery",
        "kubernetes",
        "--namespace",
        namespace,
        "--selector",
        f"{LABEL_INSTANCE}={instance}",
        "--ttft-slo-ms",
        f"{ttft_slo_ms:g}",
        "--tpot-slo-ms",
        f"{tpot_slo_ms:g}",
    ]
    if api_key_file:
        args += ["--api-key-file", api_key_file]
    if engine != "builtin":
        args += ["--engine", engine]
    # Only when set: a default left out keeps existing routers' pod templates (no rollout on upgrade).
    if token_timeout_s is not None:
        args += ["--token-timeout-s", f"{token_timeout_s:g}"]
    if prefill_timeout_s is not None:
        args += ["--prefill-timeout-s", f"{prefill_timeout_s:g}"]
    return args
