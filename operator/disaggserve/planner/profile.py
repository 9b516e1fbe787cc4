"""Latency profiles: how long a prefill batch and a decode step take, per model, GPU and tensor size.

The form is DistServe's (docs/planner-method.md): prefill `T = a + b·Σl + c·Σl²`, decode
`T = a + b·Σctx + c·B` with one coefficient set below `decode_batch_threshold` and one above,
times in ms. The same JSON comes from three places — the worker's `profile` command, a
ConfigMap holding that output, and the profiles shipped in `disaggserve/data/profiles/` — so
there is one parser and one error style for all of them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from disaggserve.planner.facts import Facts

# Per pipeline-stage hand-off cost (activation send between GPUs of one node), in ms, used when
# a profile was measured at pipeline size 1 and a plan needs more stages.
DEFAULT_STAGE_OVERHEAD_MS = 0.3


class ProfileError(ValueError):
    """A profile document that cannot be used; the message names the field and the fix."""


class Coefficients(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    a: float = Field(ge=0)
    b: float = Field(ge=0)
    c: float = Field(ge=0)


class ProfileEntry(BaseModel):
    """Coefficients for one (tensor, pipeline) shape of an instance."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor: int = Field(ge=1, le=64)
    pipeline: int = Field(1, ge=1, le=64)
    prefill: Coefficients
    decode_small: Coefficients
    decode_large: Coefficients
    decode_batch_threshold: int = Field(95, ge=1)


class ProfileFacts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    layers: int = Field(ge=1)
    attention_heads: int = Field(ge=1)
    kv_heads: int | None = Field(None, ge=1)
    hidden_size: int = Field(ge=1)
    parameters: int = Field(ge=1)
    dtype_bytes: int = Field(2, ge=1, le=8)

    def to_facts(self) -> Facts:
        return Facts(
            layers=self.layers,
            attention_heads=self.attention_heads,
            kv_heads=self.kv_heads or self.attention_heads,
            hidden_size=self.hidden_size,
            parameters=self.parameters,
            dtype_bytes=self.dtype_bytes,
        )


class ProcessCost(BaseModel):
    """CPU a process spends outside the model's forward passes (HTTP, tokenising, streaming, KV
    send/receive, scheduling), measured on the real workers; the forward passes are the entries."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_request_ms: float = Field(0.0, ge=0)
    per_token_ms: float = Field(0.0, ge=0, description="per generated token")
    per_step_ms: float = Field(0.0, ge=0, description="per decode iteration, whatever its batch (the engine "
                               "loop's own work: scheduling, sampling, waking the streams)")


class KvLink(BaseModel):
    """The KV-cache link as measured between a prefill and a decode worker (not the data sheet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gbps: float = Field(gt=0)
    latency_ms: float = Field(0.0, ge=0)


class Overheads(BaseModel):
    """Per-request and per-token costs outside the model, per process, and the measured KV link.

    prefill/decode/colocated costs are serial with the forward passes of that worker (one
    Python event loop drives both), so they lengthen its iterations; the router's are latency
    added to each request (it runs on its own process and overlaps everything else)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    router: ProcessCost = Field(default_factory=ProcessCost)
    prefill: ProcessCost = Field(default_factory=ProcessCost)
    decode: ProcessCost = Field(default_factory=ProcessCost)
    colocated: ProcessCost = Field(default_factory=ProcessCost)
    kv_link: KvLink | None = None
    prefill_stall_ms: float = Field(
        0.0, ge=0, description="mean of the exponentially distributed extra time of a prefill iteration "
        "(scheduling, GC, neighbours on shared cores), from the spread of unloaded TTFT: (p90 - p50) / ln 5")
    client: ProcessCost = Field(default_factory=ProcessCost, description="a load generator on the workers' host "
                                "(benchmarks, a laptop): CPU it takes from shared cores")
    shared_cores: int = Field(0, ge=0, description="cores the workers share with the router and the client (0: "
                              "those run on CPUs of their own, as in a cluster); see PhaseLatency.sharing")


class Measurement(BaseModel):
    """One timed step the entries were fitted on (the worker's `profile` writes them)."""

    model_config = ConfigDict(extra="ignore")

    tensor: int = Field(1, ge=1)
    phase: Literal["prefill", "decode"]
    batch: int = Field(ge=1)
    length: int = Field(ge=1, description="prompt length (prefill) or context per sequence (decode)")
    ms: float = Field(gt=0, description="the time the fit used (thread CPU time on CPU, wall on GPU)")


# A fit may miss its own measurements by this much (median over the samples at one batch size)
# before the planner refuses it: beyond that the simulator's capacity is wrong by as much.
MAX_FIT_ERROR = 0.10


class LatencyProfile(BaseModel):
    """A whole profile document. Unknown top-level keys are ignored so that the worker may add
    provenance fields (host, date) without breaking older operators; inside entries, unknown
    keys are refused because a misspelt coefficient would silently plan with wrong numbers."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    gpu: str = Field(min_length=1)
    dtype: str = "float16"
    source: str = ""
    model_aliases: list[str] = Field(default_factory=list)
    gpu_products: list[str] = Field(default_factory=list)
    model_facts: ProfileFacts | None = None
    stage_overhead_ms: float = Field(DEFAULT_STAGE_OVERHEAD_MS, ge=0)
    entries: list[ProfileEntry] = Field(min_length=1)
    colocated: list[ProfileEntry] = Field(default_factory=list)
    overheads: Overheads = Field(default_factory=Overheads)
    measurements: list[Measurement] = Field(default_factory=list)

    def entry(self, tensor: int, *, colocated: bool = False) -> ProfileEntry | None:
        """The measured entry for a tensor size at pipeline 1 (stages are derived from it)."""
        table = self.colocated if colocated and self.colocated else self.entries
        for e in table:
            if e.tensor == tensor and e.pipeline == 1:
                return e
        return None

    def tensor_sizes(self, *, colocated: bool = False) -> list[int]:
        table = self.colocated if colocated and self.colocated else self.entries
        return sorted({e.tensor for e in table if e.pipeline == 1})

    def scaled(self, prefill: float, decode: float) -> LatencyProfile:
        """The profile with prefill and decode times multiplied by measured/predicted ratios.

        The autoscaler corrects a profile this way when the live system runs slower (or
        faster) than it predicted: other hardware, other software versions, noisy neighbours.
        The measured costs outside the model scale with the phase whose latency they add to.
        """

        def entry(e: ProfileEntry) -> ProfileEntry:
            def times(c: Coefficients, k: float) -> Coefficients:
                return Coefficients(a=c.a * k, b=c.b * k, c=c.c * k)

            return e.model_copy(
                update={
                    "prefill": times(e.prefill, prefill),
                    "decode_small": times(e.decode_small, decode),
                    "decode_large": times(e.decode_large, decode),
                }
            )

        def cost(c: ProcessCost, per_request: float, per_token: float) -> ProcessCost:
            return ProcessCost(per_request_ms=c.per_request_ms * per_request, per_token_ms=c.per_token_ms * per_token,
                               per_step_ms=c.per_step_ms * per_token)

        # The ratios are measured on whole latencies (TTFT, TPOT), which include the work outside
        # the model: scaling only the forward passes would under-correct a profile whose overheads
        # are a large share. Per-request costs land in TTFT, per-token and per-step ones in TPOT.
        o = self.overheads
        overheads = o.model_copy(
            update={
                "router": cost(o.router, prefill, decode),
                "prefill": cost(o.prefill, prefill, prefill),
                "decode": cost(o.decode, decode, decode),
                "colocated": cost(o.colocated, prefill, decode),
                "prefill_stall_ms": o.prefill_stall_ms * prefill,
            }
        )
        measured = [
            m.model_copy(update={"ms": m.ms * (prefill if m.phase == "prefill" else decode)}) for m in self.measurements
        ]
        return self.model_copy(
            update={
                "entries": [entry(e) for e in self.entries],
                "colocated": [entry(e) for e in self.colocated],
                "measurements": measured,
                "overheads": overheads,
            }
        )

    def matches(self, model_name: str, gpu_product: str | None) -> bool:
        names = {normalise_model_name(n) for n in [self.model, *self.model_aliases]}
        if normalise_model_name(model_name) not in names:
            return False
        if gpu_product is None:
            return True
        products = {p.lower() for p in [self.gpu, *self.gpu_products]}
        return gpu_product.lower() in products


def normalise_model_name(name: str) -> str:
    """`facebook/opt-13b`, `OPT-13B` and `opt-13b` name the same weights; `builtin:tiny-llama`
    (the worker's `--model` spelling) and `tiny-llama` the same built-in model."""
    return name.removeprefix("builtin:").rsplit("/", 1)[-1].lower()


@dataclass(frozen=True)
class PhaseLatency:
    """Latency of one instance shape (tensor × pipeline), ready for the simulator.

    `prefill_ms` is the time a batch takes from entering the first stage to leaving the last;
    `prefill_stage_ms` is how long it occupies each stage, so a new batch may enter that much
    later (T/pp plus the stage hand-off). Decode steps likewise take the full-pipeline time
    for a request, while `pipeline` micro-batches are in flight at once.
    """

    tensor: int
    pipeline: int
    prefill: Coefficients
    decode_small: Coefficients
    decode_large: Coefficients
    decode_batch_threshold: int
    stage_overhead_ms: float
    # Outside the forward passes (Overheads): serial with this instance's iterations, except the
    # router's, which are latency. Zero for profiles without measured overheads.
    prefill_request_ms: float = 0.0
    decode_request_ms: float = 0.0
    decode_token_ms: float = 0.0
    decode_iteration_ms: float = 0.0
    router_request_ms: float = 0.0
    router_token_ms: float = 0.0
    # Mean of the exponential stall a prefill iteration suffers (simulator.prefill_stalls).
    prefill_stall_ms: float = 0.0
    # CPU the router and a client take per request and per generated token from `shared_cores`
    # cores the workers also run on (0 cores: nothing shared).
    shared_request_ms: float = 0.0
    shared_token_ms: float = 0.0
    shared_cores: int = 0

    @property
    def gpus(self) -> int:
        return self.tensor * self.pipeline

    def prefill_ms(self, sum_len: float, sum_len_sq: float) -> float:
        p = self.prefill
        return p.a + p.b * sum_len + p.c * sum_len_sq + self.pipeline * self.stage_overhead_ms

    def prefill_stage_ms(self, sum_len: float, sum_len_sq: float) -> float:
        p = self.prefill
        return (p.a + p.b * sum_len + p.c * sum_len_sq) / self.pipeline + self.stage_overhead_ms

    def decode_coefficients(self, batch: int) -> Coefficients:
        return self.decode_small if batch < self.decode_batch_threshold else self.decode_large

    def decode_step_ms(self, batch: int, sum_ctx: float) -> float:
        d = self.decode_coefficients(batch)
        return (d.a + self.decode_iteration_ms + d.b * sum_ctx + (d.c + self.decode_token_ms) * batch
                + self.pipeline * self.stage_overhead_ms)

    def sharing(self, rate: float, mean_output_tokens: float) -> PhaseLatency:
        """The worker's times at `rate` requests/s when it shares its cores with the router and a
        client: their CPU, which grows with the rate, is taken from the workers' cores, so each
        worker runs 1 + demand/cores times slower (demand in cores, fair sharing).

        Why: on one host (the 2-core bench, `disaggserve up` on a laptop) the pinned workers own
        every core and the router and the load generator float over them; near the knee they take
        a tenth of the cores or more, and a simulator that gives each worker a whole core predicted
        every point from 0.8x the knee up too high (bench/planner_vs_measured.py). In a cluster the
        router runs on CPUs of its own (`shared_cores` 0) and nothing changes.
        """
        if not self.shared_cores or rate <= 0:
            return self
        demand = rate * (self.shared_request_ms + self.shared_token_ms * mean_output_tokens) / 1000
        k = 1 + demand / self.shared_cores

        def times(c: Coefficients) -> Coefficients:
            return Coefficients(a=c.a * k, b=c.b * k, c=c.c * k)

        return dataclasses.replace(
            self, prefill=times(self.prefill), decode_small=times(self.decode_small),
            decode_large=times(self.decode_large), prefill_request_ms=self.prefill_request_ms * k,
            decode_request_ms=self.decode_request_ms * k, decode_token_ms=self.decode_token_ms * k,
            decode_iteration_ms=self.decode_iteration_ms * k, shared_cores=0)


def phase_latency(
    profile: LatencyProfile, tensor: int, pipeline: int, *, colocated: bool = False
) -> PhaseLatency | None:
    e = profile.entry(tensor, colocated=colocated)
    if e is None:
        return None
    overhead = profile.stage_overhead_ms if pipeline > 1 else 0.0
    costs = profile.overheads
    p_cost = costs.colocated if colocated else costs.prefill
    d_cost = costs.colocated if colocated else costs.decode
    return PhaseLatency(
        tensor=tensor,
        pipeline=pipeline,
        prefill=e.prefill,
        decode_small=e.decode_small,
        decode_large=e.decode_large,
        decode_batch_threshold=e.decode_batch_threshold,
        stage_overhead_ms=overhead,
        prefill_request_ms=p_cost.per_request_ms,
        decode_request_ms=0.0 if colocated else d_cost.per_request_ms,
        decode_token_ms=d_cost.per_token_ms,
        decode_iteration_ms=d_cost.per_step_ms,
        router_request_ms=costs.router.per_request_ms,
        router_token_ms=costs.router.per_token_ms,
        prefill_stall_ms=costs.prefill_stall_ms,
        shared_request_ms=costs.router.per_request_ms + costs.client.per_request_ms,
        shared_token_ms=costs.router.per_token_ms + costs.client.per_token_ms,
        shared_cores=costs.shared_cores,
    )


def parse_profile(doc: Any, *, origin: str = "profile") -> LatencyProfile:
    """Validate a profile from a dict or a JSON string; errors name the field and the source."""
    if isinstance(doc, str | bytes):
        try:
            doc = json.loads(doc)
        except json.JSONDecodeError as e:
            raise ProfileError(
                f"{origin}: not valid JSON ({e.msg} at line {e.lineno}); expected the "
                "output of `disaggserve-worker profile`"
            ) from None
    if not isinstance(doc, dict):
        raise ProfileError(f"{origin}: expected a JSON object with model, gpu and entries, got {type(doc).__name__}")
    try:
        return LatencyProfile.model_validate(doc)
    except ValidationError as e:
        problems = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()]
        raise ProfileError(f"{origin}: " + "; ".join(problems)) from None


def profile_from_configmap(configmap: dict[str, Any], key: str = "profile.json") -> LatencyProfile:
    """A ConfigMap object (as the API returns it) whose `data[key]` holds profile JSON."""
    name = (configmap.get("metadata") or {}).get("name", "<unnamed>")
    data = configmap.get("data") or {}
    if key not in data:
        keys = ", ".join(sorted(data)) or "none"
        raise ProfileError(
            f"ConfigMap {name}: no key {key!r} (keys: {keys}); set "
            "spec.profile.configMapRef.key to the key holding the profile JSON"
        )
    return parse_profile(data[key], origin=f"ConfigMap {name} key {key}")


def load_profile_input(doc: dict[str, Any]) -> LatencyProfile:
    """Accept either a profile document or a ConfigMap wrapping one (what the operator passes)."""
    if doc.get("kind") == "ConfigMap" or ("data" in doc and "entries" not in doc):
        return profile_from_configmap(doc)
    return parse_profile(doc)


@lru_cache(maxsize=1)
def builtin_profiles() -> dict[str, LatencyProfile]:
    """Profiles shipped with the operator, by file stem (what `spec.profile.builtin` names)."""
    found: dict[str, LatencyProfile] = {}
    folder = resources.files("disaggserve") / "data" / "profiles"
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            stem = item.name.removesuffix(".json")
            found[stem] = parse_profile(item.read_text(), origin=f"built-in profile {stem}")
    return found


def find_builtin(model_name: str, gpu_product: str | None) -> LatencyProfile | None:
    for prof in builtin_profiles().values():
        if prof.matches(model_name, gpu_product):
            return prof
    return None


def fit_problems(profile: LatencyProfile, *, max_decode_batch: int, max_prefill_tokens: int) -> list[str]:
    """Where a profile's coefficients miss its own measurements by more than MAX_FIT_ERROR, at
    the batch sizes a plan can use (decode batches up to `max_decode_batch`, prefill batches up
    to `max_prefill_tokens` tokens). The error at one batch size is the median over its samples
    (contexts, lengths), so one noisy sample does not reject a profile, a missed knee does."""
    problems = []
    groups: dict[tuple[int, str, int], list[float]] = {}
    for m in profile.measurements:
        e = profile.entry(m.tensor)
        if e is None:
            continue
        if m.phase == "prefill":
            if m.batch * m.length > max_prefill_tokens:
                continue
            c = e.prefill
            predicted = c.a + c.b * m.batch * m.length + c.c * m.batch * m.length**2
        else:
            if m.batch > max_decode_batch:
                continue
            c = e.decode_small if m.batch < e.decode_batch_threshold else e.decode_large
            predicted = c.a + c.b * m.batch * m.length + c.c * m.batch
        groups.setdefault((m.tensor, m.phase, m.batch), []).append((predicted - m.ms) / m.ms)
    for (tensor, phase, batch), errors in sorted(groups.items()):
        errors.sort()
        median = errors[len(errors) // 2]
        if abs(median) > MAX_FIT_ERROR:
            problems.append(
                f"{phase} at tensor {tensor}, batch {batch}: the fit is {abs(median):.0%} "
                f"{'above' if median > 0 else 'below'} the measured times"
            )
    return problems
