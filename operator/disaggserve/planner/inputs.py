"""The planner's inputs resolved: spec (+ nodes, profile, measured rate) → a ready `Searcher`.

Which latency profile (given, ConfigMap, built-in, or a roofline estimate for a GPU product the
table knows), which model facts, which topology and which workload; every planner entry point
(first plan, autoscaler re-plan, CLI, benches) goes through `build_search`, so they all see the
same inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from disaggserve.api.spec import DisaggServeSpec
from disaggserve.planner.errors import PlanningError
from disaggserve.planner.facts import Facts, builtin_facts, from_spec, with_dtype
from disaggserve.planner.gpus import find_gpu, known_products
from disaggserve.planner.profile import (
    MAX_FIT_ERROR,
    KvLink,
    LatencyProfile,
    ProfileError,
    builtin_profiles,
    find_builtin,
    fit_problems,
    load_profile_input,
)
from disaggserve.planner.roofline import ESTIMATED_SOURCE, estimated_profile, is_estimated
from disaggserve.planner.search import TENSOR_SIZES, HardwareView, Searcher, shared_goodputs
from disaggserve.planner.simulator import DEFAULT_MAX_BATCH
from disaggserve.planner.workload import (
    DEFAULT_REQUESTS,
    DEFAULT_SEED,
    MAX_REQUESTS,
    LengthDistribution,
    WorkloadModel,
    sample_requests,
)
from disaggserve.topology import Topology, build_topology, hardware_only


def resolve_profile(spec: DisaggServeSpec, doc: dict[str, Any] | None) -> tuple[LatencyProfile, str]:
    if doc is not None:
        try:
            prof = load_profile_input(doc)
        except ProfileError as e:
            raise PlanningError("ProfileInvalid", str(e)) from None
        return prof, f"given profile ({prof.model} on {prof.gpu})"
    if spec.profile and spec.profile.builtin:
        found = builtin_profiles()
        if spec.profile.builtin not in found:
            raise PlanningError(
                "ProfileMissing",
                f"spec.profile.builtin {spec.profile.builtin!r} is not a "
                f"built-in profile; choose one of {', '.join(sorted(found))}",
            )
        return found[spec.profile.builtin], f"built-in profile {spec.profile.builtin}"
    if spec.profile and spec.profile.config_map_ref:
        raise PlanningError(
            "ProfileMissing",
            f"ConfigMap {spec.profile.config_map_ref.name} was not passed to "
            "the planner; the operator reads it and passes its data as `profile`",
        )
    source = spec.model.source
    product = "cpu" if spec.hardware.device == "cpu" else spec.hardware.gpu_product
    names = [spec.model.name] + ([source.builtin] if source.builtin else [])
    for name in names:
        prof = find_builtin(name, product)
        if prof is not None:
            return prof, f"built-in profile for {prof.model} on {prof.gpu}"
    estimate = estimate_profile(spec)
    if estimate is not None:
        return estimate, f"{ESTIMATED_SOURCE} profile for {spec.model.name} on {spec.hardware.gpu_product}"
    known = ""
    if product != "cpu" and not find_gpu(product):
        known = f" (GPU products with estimates: {', '.join(known_products())})"
    raise PlanningError(
        "ProfileMissing",
        f"no latency profile for model {spec.model.name!r} on {product}{known}: run `disaggserve-worker profile "
        f"--model {source.worker_arg()} --out profile.json` on one such node, then `kubectl create "
        "configmap <name> --from-file=profile.json` and set spec.profile.configMapRef.name "
        "(or set spec.parallelism to plan by hand)",
    )


def estimate_profile(spec: DisaggServeSpec) -> LatencyProfile | None:
    """A roofline profile when nothing measured exists: a GPU the product table knows and a
    model whose facts are known (spec.model.facts or a published architecture). None on CPU
    workers (the roofline is calibrated on GPUs only) or when either is unknown."""
    if spec.hardware.device == "cpu":
        return None
    gpu = find_gpu(spec.hardware.gpu_product)
    if gpu is None:
        return None
    if spec.model.facts is not None:
        facts = from_spec(spec.model.facts)
    else:
        names = [spec.model.name] + ([spec.model.source.builtin] if spec.model.source.builtin else [])
        facts = next((f for f in map(builtin_facts, names) if f is not None), None)
    if facts is None:
        return None
    return estimated_profile(spec.model.name, with_dtype(facts, spec.model), spec.hardware.gpu_product or gpu.name,
                             gpu)


def resolve_facts(spec: DisaggServeSpec, profile: LatencyProfile) -> Facts:
    if spec.model.facts is not None:
        return with_dtype(from_spec(spec.model.facts), spec.model)
    if profile.model_facts is not None:
        return with_dtype(profile.model_facts.to_facts(), spec.model)
    for name in (spec.model.name, profile.model):
        found = builtin_facts(name)
        if found:
            return with_dtype(found, spec.model)
    raise PlanningError(
        "ModelFactsMissing",
        f"the planner does not know the architecture of "
        f"{spec.model.name!r}: set spec.model.facts (layers, attentionHeads, kvHeads, "
        "hiddenSize, parameters, dtypeBytes)",
    )


def workload_model(
    spec: DisaggServeSpec,
    rate: float | None,
    lengths: tuple[LengthDistribution, LengthDistribution] | None = None,
) -> WorkloadModel:
    w = spec.workload
    limit = spec.model.max_model_len
    if lengths is None:
        lengths = (
            LengthDistribution(kind=w.distribution, mean=w.input_tokens, sigma=w.sigma, maximum=limit),
            LengthDistribution(kind=w.distribution, mean=w.output_tokens, sigma=w.sigma, maximum=limit),
        )
    return WorkloadModel(rate=rate if rate is not None else w.request_rate, input=lengths[0], output=lengths[1])


def resolve_topology(
    spec: DisaggServeSpec, nodes: list[dict[str, Any]] | None, used: dict[str, int] | None
) -> Topology:
    # CPU workers take no GPUs: Node GPU labels say nothing about where they fit.
    if nodes is None or spec.hardware.device == "cpu":
        return hardware_only(spec.hardware)
    topo = build_topology(nodes, spec.hardware, used)
    if not topo.nodes:
        why = "; ".join(f"{k}: {v}" for k, v in sorted(topo.excluded.items())[:5]) or "the cluster has no nodes"
        raise PlanningError(
            "NoCapacity",
            f"no node can run this resource's GPU pods ({why}); check "
            "spec.hardware.gpuProduct, nodeSelector and tolerations",
        )
    if topo.free_total == 0:
        raise PlanningError(
            "NoCapacity",
            f"all {sum(n.gpus for n in topo.nodes)} GPUs of the {len(topo.nodes)} eligible node(s) are in use",
        )
    return topo


@dataclass
class SearchSetup:
    searcher: Searcher
    topology: Topology
    rate: float
    profile_source: str
    estimated: bool = False  # the profile is a roofline estimate, not a measurement


def build_search(
    spec: DisaggServeSpec,
    *,
    nodes: list[dict[str, Any]] | None = None,
    profile: dict[str, Any] | None = None,
    rate: float | None = None,
    used_gpus: dict[str, int] | None = None,
    lengths: tuple[LengthDistribution, LengthDistribution] | None = None,
    requests: int = DEFAULT_REQUESTS,
    seed: int = DEFAULT_SEED,
    max_tensor: int | None = None,
    profile_scale: tuple[float, float] | None = None,
    check_fit: bool = True,
    kv_link: KvLink | None = None,
) -> SearchSetup:
    """Resolve the inputs (profile, model facts, topology, workload) into a Searcher.

    `profile_scale` multiplies the profile's (prefill, decode) times: the autoscaler's
    correction from measured/predicted latency. `check_fit=False` skips refusing a profile whose
    fit misses its own measurements (benchmarks that report that themselves). `kv_link` replaces
    the profile's KV link (the autoscaler's live measurement, `replan.live_link`).
    """
    prof, prof_source = resolve_profile(spec, profile)
    if kv_link is not None:
        prof = prof.model_copy(update={"overheads": prof.overheads.model_copy(update={"kv_link": kv_link})})
        prof_source += f"; KV link {kv_link.gbps:.3g} Gbit/s + {kv_link.latency_ms:.2g} ms measured live"
    if profile_scale is not None:
        prof = prof.scaled(*profile_scale)
        prof_source += f" x ({profile_scale[0]:.2f} prefill, {profile_scale[1]:.2f} decode) measured"
    facts = resolve_facts(spec, prof)
    topo = resolve_topology(spec, nodes, used_gpus)
    work = workload_model(spec, rate, lengths)
    slo = spec.slo
    hw = HardwareView(topo.gpus_per_node, topo.gpu_memory_bytes, topo.intra_gbps, topo.cross_gbps)
    memo = shared_goodputs((prof.model_dump_json(), facts, work.input, work.output, seed, requests, slo, hw))
    searcher = Searcher(
        prof,
        facts,
        sample_requests(work, MAX_REQUESTS, seed),
        slo,
        hw,
        work.rate,
        min_requests=requests,
        max_tensor=max_tensor or max(TENSOR_SIZES),
        _goodputs=memo,
    )
    if check_fit:
        check_profile_fit(searcher, prof_source)
    return SearchSetup(searcher, topo, work.rate, prof_source, estimated=is_estimated(prof))


def check_profile_fit(searcher: Searcher, source: str) -> None:
    """Refuse a profile whose fit misses its own measurements where this plan will run it: a
    capacity predicted from a line that misses the knee is wrong by as much (see fit_problems)."""
    shapes = searcher.shapes() + searcher.shapes(colocated=True)
    per_request = float(np.mean(searcher.sample.input_tokens + searcher.sample.output_tokens))
    lane = max((searcher.capacity_tokens(x) // x.pipeline for x in shapes), default=0)
    batch = int(min(DEFAULT_MAX_BATCH, max(1, lane // max(per_request, 1))))
    # Prefill batches reach the colocated budget or a prefill shape's L_m, whichever is larger.
    prefill_tokens = max([searcher.budget_tokens, *(searcher.prefill_budget(x) for x in searcher.shapes())])
    problems = fit_problems(searcher.profile, max_decode_batch=batch, max_prefill_tokens=prefill_tokens)
    if problems:
        raise PlanningError(
            "ProfileInvalid",
            f"{source}: the fitted step times miss the profile's own measurements by more than "
            f"{MAX_FIT_ERROR:.0%} at batch sizes this plan uses ({'; '.join(problems[:4])}"
            f"{'; ...' if len(problems) > 4 else ''}); re-run `disaggserve-worker profile` (its fit splits "
            "decode at the knee) on an idle node, or remove the measurements a hand-edited profile no longer matches",
        )
