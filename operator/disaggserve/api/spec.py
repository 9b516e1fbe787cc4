"""`DisaggServe.spec`: what a user asks for (docs/architecture.md §2).

Defaults are the ones a first-time user on a GPU cluster wants; every bound has a message
that says which field is wrong and what would be accepted.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator

from disaggserve.api.base import ApiModel, CelRule
from disaggserve.api.constants import (
    K8S_LABEL_VALUE_PATTERN,
    MAX_LABEL_VALUE_LENGTH,
    MAX_REPLICAS,
    MAX_REQUEST_RATE,
    MAX_TOKENS_PER_REQUEST,
    MIN_REQUEST_RATE,
    QUALIFIED_NAME_PATTERN,
)
from disaggserve.contract import MAX_SPECULATIVE_TOKENS

# A Kubernetes label value (what GPU feature discovery writes to nvidia.com/gpu.product),
# e.g. NVIDIA-H100-80GB-HBM3. Spaces or slashes mean the product name was copied from
# nvidia-smi rather than from the node label.
LABEL_VALUE_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$"
DNS_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
BUILTIN_MODELS = ("tiny-llama", "tiny-llama-draft", "small-llama", "medium-llama")  # the worker's BUILTIN_CONFIGS

Tensor = Annotated[int, Field(ge=1, le=8, description="Tensor-parallel size: 1, 2, 4 or 8.")]


class ModelSource(ApiModel):
    """Where the worker loads weights from: exactly one of builtin, path or hf."""

    cel_rules = (
        CelRule(
            "(has(self.builtin) ? 1 : 0) + (has(self.path) ? 1 : 0) + (has(self.hf) ? 1 : 0) == 1",
            "model source: set exactly one of builtin, path or hf",
        ),
        CelRule("!has(self.pvc) || has(self.path)", "model source: pvc is the volume that holds `path`; set path too"),
        CelRule("!has(self.revision) || has(self.hf)", "model source: revision pins an hf repository; set hf too"),
    )

    builtin: Literal[BUILTIN_MODELS] | None = Field(  # type: ignore[valid-type]
        None, description="A built-in random-weight model that runs on a CPU (tiny-llama)."
    )
    path: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        pattern=r"^/",
        description="Absolute path of a checkpoint folder inside the pod.",
    )
    pvc: str | None = Field(
        None, pattern=DNS_NAME_PATTERN, description="PersistentVolumeClaim mounted read-only at `path`'s root."
    )
    hf: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9._-]+$",
        description="Hugging Face repository id (org/name), downloaded by the worker.",
    )
    revision: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$",
        description="The hf revision to download: a commit hash (pins the exact files every worker "
        "gets), or a tag or branch. Without it each worker fetches the repository's current main.",
    )

    def worker_arg(self) -> str:
        """The `--model` value of the worker contract (`hf:org/name@revision` when pinned)."""
        if self.builtin:
            return f"builtin:{self.builtin}"
        if self.path:
            return self.path
        return f"hf:{self.hf}@{self.revision}" if self.revision else f"hf:{self.hf}"


class ModelFacts(ApiModel):
    """Architecture facts the planner needs when it cannot look the model up by name."""

    layers: int = Field(ge=1, le=1024)
    attention_heads: int = Field(ge=1, le=1024)
    kv_heads: int | None = Field(None, ge=1, le=1024)
    hidden_size: int = Field(ge=1, le=1_000_000)
    parameters: int = Field(ge=1, description="Parameter count (not bytes).")
    dtype_bytes: Literal[1, 2, 4] = Field(
        2,
        description="Bytes per weight and KV-cache element. Unset: those of spec.model.dtype (float32 4, "
        "bfloat16 and float16 2; 2 for auto). Set it for quantized weights narrower than the dtype.",
    )


class ModelSpec(ApiModel):
    name: str = Field(pattern=MODEL_NAME_PATTERN, description="Name clients send in the OpenAI `model` field.")
    source: ModelSource
    max_model_len: int | None = Field(
        None, ge=16, le=MAX_TOKENS_PER_REQUEST, description="Longest prompt + completion, in tokens."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Weights and KV cache of every worker, both phases alike (they must agree to pass KV "
        "caches). auto: the engine's default (built-in: bfloat16 on GPUs that have it, float32 on CPUs; "
        "vLLM: its own). bfloat16 is the faster choice on CPUs with AMX. For vLLM an --dtype in "
        "engine.extraArgs overrides it. The planner fits weights and KV cache at this dtype's width.",
    )
    facts: ModelFacts | None = None


class Slo(ApiModel):
    """The latency targets: the one SLO type, read by the planner's search as well (hashable)."""

    model_config = ConfigDict(frozen=True)

    cel_rules = (
        CelRule(
            "self.attainment > 0.0 && self.attainment <= 1.0",
            "slo.attainment must be in (0, 1], e.g. 0.9 for 90 % of requests",
        ),
    )

    ttft_ms: float = Field(gt=0, le=600_000, description="Time-to-first-token target, milliseconds.")
    tpot_ms: float = Field(gt=0, le=60_000, description="Time-per-output-token target, milliseconds.")
    attainment: float = Field(0.9, description="Share of requests that must meet both targets.")


class Workload(ApiModel):
    request_rate: float = Field(
        ge=MIN_REQUEST_RATE,
        le=MAX_REQUEST_RATE,
        description=f"Expected requests per second, {MIN_REQUEST_RATE:g} to {MAX_REQUEST_RATE:g}.",
    )
    input_tokens: int = Field(ge=1, le=MAX_TOKENS_PER_REQUEST, description="Mean prompt length.")
    output_tokens: int = Field(ge=1, le=MAX_TOKENS_PER_REQUEST, description="Mean completion length.")
    distribution: Literal["fixed", "lognormal"] = "fixed"
    sigma: float = Field(0.5, gt=0, le=4, description="Log-space spread for lognormal lengths.")


LabelValue = Annotated[str, Field(pattern=K8S_LABEL_VALUE_PATTERN, max_length=MAX_LABEL_VALUE_LENGTH)]


class Toleration(ApiModel):
    """A pod toleration, with the key and value syntax the API server checks on pods."""

    cel_rules = (
        CelRule(
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || self.value == ''",
            "a toleration with operator Exists matches any value: leave value empty",
        ),
        CelRule(
            "has(self.key) || (has(self.operator) && self.operator == 'Exists')",
            "a toleration without a key must use operator Exists (it then tolerates every taint)",
        ),
    )

    key: str | None = Field(None, pattern=QUALIFIED_NAME_PATTERN, max_length=317)
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0, le=31_536_000)


class WorkerResources(ApiModel):
    cpu: str | None = Field(None, pattern=QUANTITY_PATTERN)
    memory: str | None = Field(None, pattern=QUANTITY_PATTERN)


class Hardware(ApiModel):
    cel_rules = (
        CelRule(
            "self.device != 'gpu' || has(self.gpuProduct)",
            "hardware.gpuProduct is required on GPUs: the node label nvidia.com/gpu.product, "
            "e.g. NVIDIA-H100-80GB-HBM3 (or set device: cpu)",
        ),
    )

    device: Literal["gpu", "cpu"] = Field(
        "gpu", description="cpu runs workers without GPU requests (local clusters, kind)."
    )
    gpu_product: str | None = Field(
        None, pattern=LABEL_VALUE_PATTERN, description="Value of the node label nvidia.com/gpu.product."
    )
    gpu_memory_gib: float = Field(80, gt=0, le=1024, alias="gpuMemoryGiB")
    gpus_per_node: int = Field(8, ge=1, le=16)
    cross_node_gbps: float | None = Field(
        None, gt=0, description="Bandwidth between nodes when nodes do not carry the label."
    )
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    worker_resources: WorkerResources | None = None

    @field_validator("node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str]) -> dict[str, str]:
        # Checked by the operator, not by CEL: a rule over map keys of unbounded length would
        # exceed the API server's CEL cost budget. Values are checked by the schema.
        for key in value:
            if len(key) > 317 or not re.match(QUALIFIED_NAME_PATTERN, key):
                raise ValueError(
                    f"hardware.nodeSelector key {key!r} is not a label key: an optional DNS prefix and '/', "
                    "then up to 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit "
                    "(e.g. node.kubernetes.io/instance-type)"
                )
        return value


class PhaseParallelism(ApiModel):
    cel_rules = (
        CelRule("self.tensor in [1, 2, 4, 8]", "tensor size must be a power of two no larger than 8 (1, 2, 4 or 8)"),
    )

    tensor: Tensor = 1
    pipeline: int = Field(1, ge=1, le=64)
    replicas: int | None = Field(
        None, ge=0, le=MAX_REPLICAS, description="Instances of this phase; absent: chosen by the planner."
    )


class Parallelism(ApiModel):
    prefill: PhaseParallelism
    decode: PhaseParallelism


class PhaseBounds(ApiModel):
    prefill: int = Field(ge=0, le=MAX_REPLICAS)
    decode: int = Field(ge=0, le=MAX_REPLICAS)
    colocated: int | None = Field(
        None,
        ge=1,
        le=MAX_REPLICAS,
        description="Colocated instances, when the plan is colocated (each runs both phases). "
        "Absent: at least 1, at most maxReplicas.prefill + maxReplicas.decode.",
    )


class MetricsSource(ApiModel):
    prometheus_url: str | None = Field(None, pattern=r"^https?://[^\s]+$")
    window_seconds: int = Field(120, ge=15, le=86_400)


class Autoscaling(ApiModel):
    # Guarded by has(): when a bound is missing the schema's own "Required value" error says so,
    # instead of this rule failing too with a message about an order the user never wrote.
    cel_rules = (
        CelRule(
            "!has(self.minReplicas) || !has(self.maxReplicas) || !has(self.minReplicas.prefill) || "
            "!has(self.maxReplicas.prefill) || self.minReplicas.prefill <= self.maxReplicas.prefill",
            "autoscaling.minReplicas.prefill must not exceed autoscaling.maxReplicas.prefill",
        ),
        CelRule(
            "!has(self.minReplicas) || !has(self.maxReplicas) || !has(self.minReplicas.decode) || "
            "!has(self.maxReplicas.decode) || self.minReplicas.decode <= self.maxReplicas.decode",
            "autoscaling.minReplicas.decode must not exceed autoscaling.maxReplicas.decode",
        ),
        CelRule(
            "!has(self.minReplicas) || !has(self.maxReplicas) || !has(self.minReplicas.colocated) || "
            "(has(self.maxReplicas.colocated) ? self.minReplicas.colocated <= self.maxReplicas.colocated : "
            "(!has(self.maxReplicas.prefill) || !has(self.maxReplicas.decode) || "
            "self.minReplicas.colocated <= self.maxReplicas.prefill + self.maxReplicas.decode))",
            "autoscaling.minReplicas.colocated must not exceed autoscaling.maxReplicas.colocated "
            "(or, when that is absent, maxReplicas.prefill + maxReplicas.decode)",
        ),
    )

    enabled: bool = False
    interval_seconds: int = Field(30, ge=5, le=3600)
    # The defaults are also written into the CRD (json_schema_extra), so the API server fills
    # them in: `autoscaling: {enabled: true}` alone is valid, as the pydantic model says.
    min_replicas: PhaseBounds = Field(
        default_factory=lambda: PhaseBounds(prefill=1, decode=1),
        json_schema_extra={"default": {"prefill": 1, "decode": 1}},
    )
    max_replicas: PhaseBounds = Field(
        default_factory=lambda: PhaseBounds(prefill=16, decode=16),
        json_schema_extra={"default": {"prefill": 16, "decode": 16}},
    )
    max_gpus: int | None = Field(None, ge=1, le=100_000)
    scale_down_stabilization_seconds: int = Field(300, ge=0, le=86_400)
    metrics: MetricsSource = Field(default_factory=MetricsSource)

    @property
    def min_colocated(self) -> int:
        """Fewest colocated instances (a colocated plan): minReplicas.colocated, else 1."""
        return self.min_replicas.colocated or 1

    @property
    def max_colocated(self) -> int:
        """Most colocated instances: maxReplicas.colocated, else the instances the prefill and
        decode maxima allow together (a colocated instance does what one of each does)."""
        return self.max_replicas.colocated or max(1, self.max_replicas.prefill + self.max_replicas.decode)


class Speculation(ApiModel):
    cel_rules = (
        CelRule(
            "self.mode == 'off' || self.proposer != 'draft' || has(self.draftModel)",
            "speculation.draftModel is required when proposer is draft",
        ),
        CelRule("self.ngramMin <= self.ngramMax", "speculation.ngramMin must not exceed speculation.ngramMax"),
    )

    mode: Literal["off", "fixed", "adaptive"] = "off"
    proposer: Literal["ngram", "draft"] = "ngram"
    num_speculative_tokens: int = Field(
        4, ge=1, le=MAX_SPECULATIVE_TOKENS,
        description="Most tokens proposed per step (vLLM's speculative-config num_speculative_tokens).")
    ngram_min: int = Field(1, ge=1, le=16)
    ngram_max: int = Field(3, ge=1, le=16)
    draft_model: ModelSource | None = None


class ConfigMapKeyRef(ApiModel):
    name: str = Field(pattern=DNS_NAME_PATTERN)
    key: str = Field("profile.json", pattern=r"^[-._a-zA-Z0-9]+$")


class SecretKeyRef(ApiModel):
    name: str = Field(pattern=DNS_NAME_PATTERN)
    key: str = Field("api-key", pattern=r"^[-._a-zA-Z0-9]+$")


class ProfileRef(ApiModel):
    config_map_ref: ConfigMapKeyRef | None = None
    builtin: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]+$", description="Name of a profile shipped with the operator."
    )


class Image(ApiModel):
    repository: str = Field("ghcr.io/disaggserve/worker", pattern=r"^[a-z0-9][a-z0-9._/:-]*$")
    tag: str = Field("0.1.0", pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
    digest: str | None = Field(
        None,
        pattern=r"^sha256:[a-f0-9]{64}$",
        description="Pin the image by content (sha256:<64 hex>); when set it is used instead of the tag.",
    )
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"


# Flags the vLLM renderer sets from the plan and the spec; `engine.extraArgs` may not set them,
# or the pod would run something other than what status.plan says.
VLLM_RESERVED_FLAGS = (
    "--model",
    "--served-model-name",
    "--host",
    "--port",
    "--tensor-parallel-size",
    "--pipeline-parallel-size",
    "--max-num-seqs",
    "--max-num-batched-tokens",
    "--max-model-len",
    "--kv-transfer-config",
    "--speculative-config",
    "--shutdown-timeout",
)
_RESERVED_CEL = "[" + ", ".join(f"'{f}'" for f in VLLM_RESERVED_FLAGS) + "]"


class Engine(ApiModel):
    """What runs in the worker pods: the built-in plain-torch worker, or vLLM's OpenAI server."""

    cel_rules = (
        CelRule(
            "self.kind == 'vllm' || !has(self.extraArgs) || size(self.extraArgs) == 0",
            "engine.extraArgs are passed to vLLM: they need engine.kind: vllm "
            "(the built-in worker takes its settings from the spec)",
        ),
        CelRule(
            "self.kind == 'vllm' || !has(self.image)",
            "engine.image is the vLLM image: it needs engine.kind: vllm "
            "(the built-in worker runs spec.image)",
        ),
        CelRule(
            "!has(self.extraArgs) || !self.extraArgs.exists(a, "
            + _RESERVED_CEL
            + ".exists(f, a == f || a.startsWith(f + '=')))",
            "engine.extraArgs must not set flags the operator renders from the plan and the spec ("
            + ", ".join(VLLM_RESERVED_FLAGS)
            + "): change spec.model, spec.parallelism or spec.speculation instead",
        ),
    )

    kind: Literal["builtin", "vllm"] = Field(
        "builtin", description="builtin: DisaggServe's own worker; vllm: vLLM's OpenAI server with its KV connectors."
    )
    image: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9._/:@-]*$",
        max_length=512,
        description="vLLM image (default vllm/vllm-openai on GPUs; a vllm-cpu image on CPU).",
    )
    extra_args: list[Annotated[str, Field(min_length=1, max_length=4096)]] | None = Field(
        None, max_length=64, description="Further vLLM server flags, e.g. ['--enforce-eager']."
    )


class Router(ApiModel):
    replicas: int = Field(1, ge=1, le=100)
    api_key_secret_ref: SecretKeyRef | None = None
    token_timeout_seconds: float | None = Field(
        None, gt=0, le=3600,
        description="Longest silence between two tokens of a stream before the router gives up on the worker "
        "(the client gets a retryable error). Absent: 30. Raise it for slow CPU deployments, where a decode "
        "waiting on its KV pull under heavy load can be silent for longer.")
    prefill_timeout_seconds: float | None = Field(
        None, gt=0, le=3600,
        description="Longest wait for a prefill worker's first token (queueing included). Absent: 120.")


class EndpointPickerRef(ApiModel):
    """The endpoint picker (ext-proc) Service a Gateway asks which pod serves each request."""

    name: str = Field(pattern=DNS_NAME_PATTERN, description="Service of the endpoint picker, in this namespace.")
    port: int = Field(9002, ge=1, le=65535, description="Its ext-proc (gRPC) port.")
    failure_mode: Literal["FailOpen", "FailClose"] = Field(
        "FailClose", description="FailOpen: the Gateway picks an endpoint itself when the picker does not answer.")


class Gateway(ApiModel):
    """Expose the model through the Gateway API Inference Extension: an InferencePool
    (inference.networking.k8s.io/v1) a Gateway's HTTPRoute can name as its backend."""

    picker: Literal["disaggserve", "llm-d"] = Field(
        "disaggserve",
        description="disaggserve: the pool holds the routers, which pair prefill and decode themselves (any "
        "engine; the picker balances routers). llm-d: the pool holds the serving pods (decode, or colocated) "
        "and llm-d's picker chooses the prefill pod per request (x-prefiller-host-port); engine vllm only.")
    endpoint_picker: EndpointPickerRef | None = Field(
        None, description="The picker's Service; default <name>-epp on port 9002.")


class DisaggServeSpec(ApiModel):
    cel_rules = (
        CelRule(
            "!has(self.parallelism) || !has(self.hardware) || self.hardware.device != 'gpu' || "
            "(self.parallelism.prefill.tensor * self.parallelism.prefill.pipeline <= "
            "self.hardware.gpusPerNode && self.parallelism.decode.tensor * "
            "self.parallelism.decode.pipeline <= self.hardware.gpusPerNode)",
            "an instance (tensor x pipeline GPUs) must fit on one node: "
            "tensor * pipeline must not exceed hardware.gpusPerNode",
        ),
        CelRule(
            "!has(self.parallelism) || (has(self.hardware) && self.hardware.device == 'gpu') || "
            "(self.parallelism.prefill.tensor == 1 && self.parallelism.prefill.pipeline == 1 && "
            "self.parallelism.decode.tensor == 1 && self.parallelism.decode.pipeline == 1)",
            "a CPU worker (hardware.device: cpu, the default without hardware) is one process on one device: "
            "set spec.parallelism.*.tensor and .pipeline to 1 and scale with replicas, or run on GPUs "
            "(hardware.device: gpu)",
        ),
        CelRule(
            "!has(self.engine) || self.engine.kind != 'vllm' || !has(self.model.source.builtin)",
            "engine.kind vllm loads Hugging Face checkpoints: set model.source.path or model.source.hf "
            "(builtin models exist only in the built-in worker; `disaggserve up` turns builtin tiny-llama "
            "into a checkpoint folder for you)",
        ),
        CelRule(
            "!has(self.engine) || self.engine.kind != 'vllm' || !has(self.speculation) || "
            "self.speculation.mode != 'adaptive'",
            "speculation.mode adaptive (SmartSpec: a proposal length chosen per step from goodput) "
            "runs only on the built-in engine; vLLM proposes a fixed number of tokens: use mode fixed "
            "with engine.kind vllm, or engine.kind builtin",
        ),
        CelRule(
            "!has(self.engine) || self.engine.kind != 'vllm' || !has(self.speculation) || "
            "self.speculation.mode == 'off' || "
            "self.speculation.proposer != 'draft' || !has(self.speculation.draftModel) || "
            "!has(self.speculation.draftModel.builtin)",
            "speculation.draftModel: vLLM loads a draft model from a checkpoint, set draftModel.path or "
            "draftModel.hf (builtin draft models run only on the built-in engine)",
        ),
        CelRule(
            "!has(self.parallelism) || !has(self.placement) || self.placement != 'colocated'",
            "placement colocated is planned automatically: remove spec.parallelism, or keep it with "
            "placement high-affinity or low-affinity",
        ),
    )

    model: ModelSpec
    slo: Slo
    workload: Workload
    hardware: Hardware = Field(default_factory=lambda: Hardware(device="cpu"))
    parallelism: Parallelism | None = None
    placement: Literal["auto", "high-affinity", "low-affinity", "colocated"] = Field(
        "auto",
        description="auto: the planner chooses disaggregated (high- or low-affinity, by the cross-node "
        "bandwidth) or colocated, whichever carries the workload on fewer GPUs; colocated: instances "
        "that run both phases behind the same router (no KV transfer).",
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    speculation: Speculation = Field(default_factory=Speculation)
    profile: ProfileRef | None = None
    image: Image = Field(default_factory=Image)
    router: Router = Field(default_factory=Router)
    engine: Engine = Field(default_factory=Engine)
    gateway: Gateway | None = Field(None, description="Opt-in: render an InferencePool for a Gateway.")


class SpecError(ValueError):
    """A spec that cannot be served, with one line per problem naming the field."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def describe_validation_error(error: ValidationError, root: str = "spec") -> list[str]:
    """Turn pydantic's errors into lines that name the wire field path (camelCase)."""
    lines = []
    for item in error.errors():
        path = ".".join([root, *(str(p) for p in item["loc"])])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against `disaggserve crd` or the docs"
        lines.append(f"{path}: {message}")
    return lines


def parse_spec(raw: dict[str, Any] | None) -> DisaggServeSpec:
    """Validate a spec as it comes from the API server or a file; raise SpecError on bad input."""
    try:
        return DisaggServeSpec.model_validate(raw or {})
    except ValidationError as e:
        raise SpecError(describe_validation_error(e)) from None
