"""`spec.engine: vllm`: what the operator renders, what the CRD refuses, and that vLLM's own
argument parser accepts every flag the operator renders (the contract with the vLLM image)."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from disaggserve.api.plan import Plan
from disaggserve.api.spec import SpecError, parse_spec
from disaggserve.resources.children import Owner, build_children
from disaggserve.resources.engines.vllm import batch_limits
from disaggserve.resources.workers import worker_objects
from vllm_engine.vllm_env import run_in_vllm, skip_reason, vllm_python

BASE = {
    "model": {"name": "tiny", "source": {"path": "/models/tiny"}},
    "slo": {"ttftMs": 500, "tpotMs": 100},
    "workload": {"requestRate": 2, "inputTokens": 64, "outputTokens": 32},
}
CPU_PLAN = Plan.model_validate({"prefill": {"tensor": 1, "replicas": 1}, "decode": {"tensor": 1, "replicas": 2}})
GPU_PLAN = Plan.model_validate(
    {"prefill": {"tensor": 2, "pipeline": 1, "replicas": 1}, "decode": {"tensor": 1, "pipeline": 2, "replicas": 3}}
)
GPU_HARDWARE = {"device": "gpu", "gpuProduct": "NVIDIA-H100-80GB-HBM3"}


def vllm_spec(**extra):
    return parse_spec({**BASE, "engine": {"kind": "vllm"}, **extra})


def containers(spec, plan):
    sets = [o for o in worker_objects(spec, plan, "tiny", "ns") if o["kind"] == "StatefulSet"]
    return {o["metadata"]["labels"]["app.kubernetes.io/component"]: o["spec"]["template"]["spec"] for o in sets}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_vllm_pods_run_vllm_with_the_plan_and_a_nixl_connector_per_role():
    pods = containers(vllm_spec(hardware=GPU_HARDWARE), GPU_PLAN)
    prefill, decode = pods["prefill"]["containers"][0], pods["decode"]["containers"][0]
    assert prefill["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert prefill["image"].startswith("vllm/vllm-openai:")
    assert flag(prefill["args"], "--model") == "/models/tiny"
    assert flag(prefill["args"], "--served-model-name") == "tiny"
    assert (flag(prefill["args"], "--tensor-parallel-size"), flag(prefill["args"], "--pipeline-parallel-size")) == (
        "2", "1")
    assert (flag(decode["args"], "--tensor-parallel-size"), flag(decode["args"], "--pipeline-parallel-size")) == (
        "1", "2")
    assert json.loads(flag(prefill["args"], "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector", "kv_role": "kv_producer"}
    assert json.loads(flag(decode["args"], "--kv-transfer-config")) == {
        "kv_connector": "NixlConnector", "kv_role": "kv_consumer"}
    env = {e["name"]: e for e in prefill["env"]}
    assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert {p["name"]: p["containerPort"] for p in prefill["ports"]} == {"http": 8100, "nixl": 5600}
    assert prefill["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert decode["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert prefill["readinessProbe"]["httpGet"]["path"] == "/health"
    # vLLM aborts in-flight requests on SIGTERM unless told to drain, within the pod's grace period.
    assert 0 < int(flag(decode["args"], "--shutdown-timeout")) < pods["decode"]["terminationGracePeriodSeconds"]


def test_cpu_pods_keep_kv_in_host_memory_and_size_the_cpu_kv_cache():
    spec = vllm_spec(hardware={"device": "cpu", "workerResources": {"cpu": "2", "memory": "8Gi"}})
    pods = containers(spec, CPU_PLAN)
    decode = pods["decode"]["containers"][0]
    assert json.loads(flag(decode["args"], "--kv-transfer-config"))["kv_buffer_device"] == "cpu"
    env = {e["name"]: e.get("value") for e in decode["env"]}
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert "nvidia.com/gpu" not in decode["resources"]["limits"]
    # One OpenMP thread per requested core, not vLLM's default of binding every core of the node.
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    omp = next(e for e in decode["env"] if e["name"] == "OMP_NUM_THREADS")
    assert omp["valueFrom"]["resourceFieldRef"] == {"resource": "requests.cpu", "divisor": "1"}
    assert decode["resources"]["requests"]["cpu"] == "2"
    # One rank: the worker runs in vLLM's engine-core process, not a spinning worker process.
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"


def test_gpu_vllm_pods_leave_thread_binding_to_vllm():
    env = {e["name"] for e in containers(vllm_spec(hardware=GPU_HARDWARE), GPU_PLAN)["decode"]["containers"][0]["env"]}
    assert not env & {"VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE",
                      "VLLM_ENABLE_V1_MULTIPROCESSING"}


def test_batch_limits_follow_the_workload_and_not_the_replica_count():
    busy = vllm_spec(workload={"requestRate": 40, "inputTokens": 3000, "outputTokens": 200})
    plan = Plan.model_validate({"prefill": {"tensor": 1, "replicas": 2}, "decode": {"tensor": 1, "replicas": 2}})
    seqs, tokens = batch_limits(busy, plan, "decode")
    assert seqs == 256 and tokens >= seqs  # 40 rps x 200 tokens x 0.1 s = 800 in flight, capped
    _, prefill_tokens = batch_limits(busy, plan, "prefill")
    assert prefill_tokens == 3000  # one mean prompt fits a batch
    quiet = vllm_spec(workload={"requestRate": 1, "inputTokens": 64, "outputTokens": 100})
    assert batch_limits(quiet, plan, "decode")[0] == 32  # 1 x 100 x 0.1 = 10 in flight, x2 -> 32
    # Scaling (the autoscaler changes replicas) must not change the pod template: no rolling restart.
    scaled = Plan.model_validate({"prefill": {"tensor": 1, "replicas": 2}, "decode": {"tensor": 1, "replicas": 7}})
    before = containers(quiet, plan)["decode"]["containers"][0]
    after = containers(quiet, scaled)["decode"]["containers"][0]
    assert before == after


def test_prefill_batches_up_to_the_plan_l_m():
    """The plan's prefill budget (DistServe's L_m from the profile) replaces max(2048, mean prompt); vLLM
    chunks longer prompts. Its constraints still hold: never below max_num_seqs, and with chunked
    prefill turned off never below max_model_len (or, unknown, left to vLLM)."""
    plan = Plan.model_validate({"prefill": {"tensor": 1, "replicas": 2, "maxBatchTokens": 1536},
                                "decode": {"tensor": 1, "replicas": 2}})
    spec = vllm_spec(workload={"requestRate": 2, "inputTokens": 3000, "outputTokens": 200})
    seqs, tokens = batch_limits(spec, plan, "prefill")
    assert tokens == 1536
    assert batch_limits(spec, plan, "decode")[1] == 2048  # decode and colocated keep theirs
    assert flag(containers(spec, plan)["prefill"]["containers"][0]["args"], "--max-num-batched-tokens") == "1536"
    busy = vllm_spec(workload={"requestRate": 400, "inputTokens": 64, "outputTokens": 32})
    tiny_budget = plan.model_copy(update={"prefill": plan.prefill.model_copy(update={"max_batch_tokens": 100})})
    seqs, tokens = batch_limits(busy, tiny_budget, "prefill")
    assert seqs == 256 and tokens == 256  # vLLM refuses max_num_batched_tokens < max_num_seqs
    short = vllm_spec(model={**BASE["model"], "maxModelLen": 1024})
    assert batch_limits(short, plan, "prefill")[1] == 1536  # within max(maxModelLen, 2048)
    long = vllm_spec(model={**BASE["model"], "maxModelLen": 8192},
                     engine={"kind": "vllm", "extraArgs": ["--no-enable-chunked-prefill"]})
    assert batch_limits(long, plan, "prefill")[1] == 8192  # a whole prompt must fit one batch
    flip = ["--no-enable-chunked-prefill", "--enable-chunked-prefill"]  # the last one wins, as in vLLM
    back_on = vllm_spec(model={**BASE["model"], "maxModelLen": 8192}, engine={"kind": "vllm", "extraArgs": flip})
    assert batch_limits(back_on, plan, "prefill")[1] == 1536
    unknown = vllm_spec(engine={"kind": "vllm", "extraArgs": ["--no-enable-chunked-prefill"]})
    assert "--max-num-batched-tokens" not in containers(unknown, plan)["prefill"]["containers"][0]["args"]


def test_fixed_speculation_maps_to_speculative_config_on_decode_only():
    spec = vllm_spec(speculation={"mode": "fixed", "proposer": "ngram", "numSpeculativeTokens": 3,
                                  "ngramMin": 2, "ngramMax": 4})
    pods = containers(spec, CPU_PLAN)
    decode_args = pods["decode"]["containers"][0]["args"]
    assert json.loads(flag(decode_args, "--speculative-config")) == {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    assert "--speculative-config" not in pods["prefill"]["containers"][0]["args"]


def test_extra_args_are_appended():
    spec = vllm_spec(engine={"kind": "vllm", "extraArgs": ["--enforce-eager", "--dtype=float32"],
                             "image": "registry.example/vllm:1"})
    container = containers(spec, CPU_PLAN)["prefill"]["containers"][0]
    assert container["args"][-2:] == ["--enforce-eager", "--dtype=float32"]
    assert container["image"] == "registry.example/vllm:1"


def test_model_dtype_reaches_both_phases_and_extra_args_still_win():
    spec = vllm_spec(model={**BASE["model"], "dtype": "bfloat16"},
                     engine={"kind": "vllm", "extraArgs": ["--dtype=float32"]})
    pods = containers(spec, CPU_PLAN)
    for phase in ("prefill", "decode"):
        args = pods[phase]["containers"][0]["args"]
        assert flag(args, "--dtype") == "bfloat16" and args[-1] == "--dtype=float32"  # the later flag wins in vLLM
    assert "--dtype" not in containers(vllm_spec(), CPU_PLAN)["decode"]["containers"][0]["args"]  # auto: vLLM's own


def test_router_is_told_the_engine():
    spec = vllm_spec()
    router = next(o for o in build_children(Owner("tiny", "ns"), spec, CPU_PLAN) if o["kind"] == "Deployment")
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    assert flag(args, "--engine") == "vllm"


def test_builtin_stays_the_default_and_renders_as_before():
    spec = parse_spec(BASE)
    assert spec.engine.kind == "builtin"
    container = containers(spec, CPU_PLAN)["decode"]["containers"][0]
    assert container["command"] == ["disaggserve-worker"]
    assert "--engine" not in container["args"]


@pytest.mark.parametrize("hardware,plan", [(GPU_HARDWARE, GPU_PLAN), ({"device": "cpu"}, CPU_PLAN)])
def test_rendered_vllm_objects_pass_kubernetes_validate_strict(hardware, plan):
    spec = vllm_spec(hardware=hardware)
    for obj in build_children(Owner("tiny", "ns"), spec, plan):
        kubernetes_validate.validate(obj, "1.30.0", strict=True)


@pytest.mark.parametrize(
    "extra,needle",
    [
        ({"engine": {"kind": "vllm"}, "model": {"name": "t", "source": {"builtin": "tiny-llama"}}},
         "engine.kind vllm loads Hugging Face checkpoints"),
        ({"engine": {"kind": "vllm"}, "speculation": {"mode": "adaptive"}},
         "speculation.mode adaptive"),
        ({"engine": {"kind": "vllm"}, "speculation": {"mode": "fixed", "proposer": "draft",
                                                      "draftModel": {"builtin": "tiny-llama-draft"}}},
         "speculation.draftModel: vLLM loads a draft model from a checkpoint"),
        ({"engine": {"extraArgs": ["--enforce-eager"]}}, "engine.extraArgs are passed to vLLM"),
        ({"engine": {"image": "vllm/vllm-openai:v1"}}, "engine.image is the vLLM image"),
        ({"engine": {"kind": "vllm", "extraArgs": ["--tensor-parallel-size=4"]}}, "must not set flags"),
        ({"engine": {"kind": "vllm", "extraArgs": ["--kv-transfer-config", "{}"]}}, "must not set flags"),
        ({"engine": {"kind": "tgi"}}, "spec.engine.kind"),
    ],
)
def test_what_does_not_combine_is_refused_with_a_reason(extra, needle):
    with pytest.raises(SpecError) as error:
        parse_spec({**BASE, **extra})
    assert needle in str(error.value)


# ---- contract with vLLM's own argument parser ---------------------------------------------------------

PARSE = r"""
import json, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
from vllm.engine.arg_utils import AsyncEngineArgs
out = []
for argv, build in json.loads(sys.argv[1]):
    try:
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(argv)
        validate_parsed_serve_args(args)
        engine = AsyncEngineArgs.from_cli_args(args)
        result = {"ok": True, "tp": engine.tensor_parallel_size, "pp": engine.pipeline_parallel_size,
                  "max_num_seqs": engine.max_num_seqs, "batched": engine.max_num_batched_tokens,
                  "served": engine.served_model_name, "host": args.host, "port": args.port,
                  "shutdown_timeout": engine.shutdown_timeout,
                  "kv": engine.kv_transfer_config.kv_connector if engine.kv_transfer_config else None,
                  "kv_role": engine.kv_transfer_config.kv_role if engine.kv_transfer_config else None,
                  "spec": (engine.speculative_config or {}).get("method")
                          if isinstance(engine.speculative_config, dict) else None}
        if build:  # the whole engine config, as the server builds it before loading weights
            config = engine.create_engine_config()
            result["kv_buffer_device"] = config.kv_transfer_config.kv_buffer_device
            result["spec_tokens"] = (config.speculative_config.num_speculative_tokens
                                     if config.speculative_config else None)
    except BaseException as exc:
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
    out.append(result)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def vllm_py():
    python = vllm_python()
    if python is None:
        pytest.skip(skip_reason())
    return python


def parse_with_vllm(python, cases):
    proc = run_in_vllm(python, PARSE, json.dumps(cases))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"vLLM parser script failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_vllm_argument_parser_accepts_every_rendered_command_line(vllm_py, tmp_path):
    from disaggserve_worker.model.export import export_builtin

    checkpoint = export_builtin("tiny-llama", tmp_path / "tiny")
    cpu = parse_spec({**BASE, "model": {"name": "tiny", "source": {"path": str(checkpoint)}},
                      "engine": {"kind": "vllm"}, "hardware": {"device": "cpu"},
                      "speculation": {"mode": "fixed", "proposer": "ngram", "numSpeculativeTokens": 2}})
    gpu = vllm_spec(hardware=GPU_HARDWARE, model={"name": "tiny", "source": {"hf": "org/model"}})
    cases, expected = [], []
    # Plans as the planner writes them: the prefill phase carries its L_m.
    cpu_plan = CPU_PLAN.model_copy(update={"prefill": CPU_PLAN.prefill.model_copy(update={"max_batch_tokens": 768})})
    gpu_plan = GPU_PLAN.model_copy(update={"prefill": GPU_PLAN.prefill.model_copy(update={"max_batch_tokens": 3456})})
    for spec, plan, build in [(cpu, cpu_plan, True), (gpu, gpu_plan, False)]:
        for phase, pod in containers(spec, plan).items():
            args = pod["containers"][0]["args"]
            cases.append([args, build])
            expected.append((phase, plan.phase(phase), args, build))
    cases.append([["--model", str(checkpoint), "--no-such-flag-for-the-negative-control"], False])
    results = parse_with_vllm(vllm_py, cases)
    for (phase, phase_plan, args, build), result in zip(expected, results[:-1], strict=True):
        assert result["ok"], f"vLLM refused the {phase} command line {args}: {result.get('error')}"
        assert (result["tp"], result["pp"]) == (phase_plan.tensor, phase_plan.pipeline)
        assert result["max_num_seqs"] == int(flag(args, "--max-num-seqs"))
        assert result["batched"] == int(flag(args, "--max-num-batched-tokens"))
        if phase == "prefill":
            assert result["batched"] == phase_plan.max_batch_tokens
        assert result["served"] == ["tiny"] and result["port"] == 8100 and result["host"] == "0.0.0.0"
        assert result["kv"] == "NixlConnector"
        assert result["kv_role"] == ("kv_producer" if phase == "prefill" else "kv_consumer")
        assert result["shutdown_timeout"] == int(flag(args, "--shutdown-timeout"))
        if build:
            assert result["kv_buffer_device"] == "cpu"
            assert result["spec_tokens"] == (2 if phase == "decode" else None)
    assert not results[-1]["ok"], "the negative control (an unknown flag) must be refused by vLLM's parser"


def test_vllm_pods_take_the_worker_token_and_peers_reach_every_port():
    spec = vllm_spec()
    children = build_children(Owner("tiny", "ns"), spec, CPU_PLAN)
    decode = next(o for o in children if o["kind"] == "StatefulSet" and "decode" in o["metadata"]["name"])
    env = {e["name"]: e for e in decode["spec"]["template"]["spec"]["containers"][0]["env"]}
    token_ref = env["DISAGGSERVE_WORKER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == token_ref
    policy = next(o for o in children if o["kind"] == "NetworkPolicy")
    peers, others = policy["spec"]["ingress"]
    assert "ports" not in peers  # NIXL side channel and UCX's ephemeral ports, own pods only
    assert peers["from"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "tiny"}}}]
    assert others["ports"] == [{"protocol": "TCP", "port": 8100}]
    builtin = build_children(Owner("tiny", "ns"), parse_spec(BASE), CPU_PLAN)
    builtin_peers = next(o for o in builtin if o["kind"] == "NetworkPolicy")["spec"]["ingress"][0]
    assert {p["port"] for p in builtin_peers["ports"]} == {8100, 8101}
