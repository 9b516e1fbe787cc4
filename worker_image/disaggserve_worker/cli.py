"""`disaggserve-worker`: serve one worker (prefill, decode, colocated), profile, or route.

The `serve` flags are the wire contract with the operator (`disaggserve.contract.worker_args`
renders them; `build_parser()` is what the contract test parses them with). Every subcommand
sets `handler` (args -> exit code) on its parser; the router subcommand is registered by
`disaggserve_worker.router.cli.register(subparsers)` when that module exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from disaggserve_worker import contract
from disaggserve_worker.contract import MAX_SPECULATIVE_TOKENS

log = logging.getLogger("disaggserve_worker")

SPECULATION_MODES = ("off", "fixed", "adaptive")
SPECULATION_PROPOSERS = ("ngram", "draft")


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return number


def _positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be greater than 0")
    return number


def _port(value: str) -> int:
    number = _positive_int(value) if value != "0" else 0
    if number > 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (0-65535)")
    return number


def _tensor_sizes(value: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in value.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected comma-separated sizes such as 1,2,4") from None
    wrong = [size for size in sizes if size not in contract.TENSOR_SIZES]
    if wrong:
        allowed = ", ".join(map(str, contract.TENSOR_SIZES))
        raise argparse.ArgumentTypeError(f"{value!r}: tensor sizes must be among {allowed}")
    return sizes


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="builtin:<tiny-llama|tiny-llama-draft|small-llama>, a checkpoint folder, "
                             "or hf:<org/name>[@revision]")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="auto: float32 on CPU, bfloat16 (or float16) on GPUs")
    parser.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")


def _add_parallel_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tensor-parallel", type=_positive_int, default=1,
                        help="shard each layer over this many local GPUs (1, 2, 4 or 8)")
    parser.add_argument("--pipeline-parallel", type=_positive_int, default=1,
                        help="split the layers into this many stages; the pod needs tensor x pipeline GPUs")


def parallel_problems(args: argparse.Namespace) -> list[str]:
    """Parallel sizes this worker cannot run, whatever the model."""
    problems = []
    if args.tensor_parallel not in contract.TENSOR_SIZES:
        problems.append(f"--tensor-parallel {args.tensor_parallel}: must be one of "
                        f"{', '.join(map(str, contract.TENSOR_SIZES))} (a power of two no larger than 8, as the "
                        "operator plans it); the model's attention heads, KV heads and intermediate size "
                        "must also divide by it")
    if args.tensor_parallel > 1 and args.device == "cpu":
        problems.append(f"--tensor-parallel {args.tensor_parallel} shards each layer over CUDA devices; "
                        "with --device cpu use --tensor-parallel 1")
    if args.pipeline_parallel > 1 and args.device == "cpu":
        problems.append(f"--pipeline-parallel {args.pipeline_parallel} splits layers over CUDA devices; "
                        "with --device cpu use --pipeline-parallel 1")
    return problems


def _add_serve(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="run one worker process")
    p.add_argument("--role", choices=contract.ROLES, required=True)
    _add_model_flags(p)
    p.add_argument("--model-name", default=None, help="name clients use (default: from --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=contract.WORKER_PORT)
    p.add_argument("--kv-port", type=_port, default=contract.KV_PORT)
    _add_parallel_flags(p)
    p.add_argument("--ttft-slo-ms", type=_positive_float, default=None)
    p.add_argument("--tpot-slo-ms", type=_positive_float, default=None)
    p.add_argument("--max-model-len", type=_positive_int, default=None)
    p.add_argument("--speculation-mode", choices=SPECULATION_MODES, default="off")
    p.add_argument("--speculation-proposer", choices=SPECULATION_PROPOSERS, default="ngram")
    p.add_argument("--speculation-num-speculative-tokens", type=_positive_int, default=4)
    p.add_argument("--speculation-ngram-min", type=_positive_int, default=1)
    p.add_argument("--speculation-ngram-max", type=_positive_int, default=3)
    p.add_argument("--speculation-draft-model", default=None)
    p.add_argument("--max-batch-tokens", type=_positive_int, default=2048,
                   help="token budget of one prefill (or mixed) iteration")
    p.add_argument("--kv-cache-tokens", type=_positive_int, default=None,
                   help="KV-cache slots (default: from free memory)")
    p.add_argument("--block-size", type=_positive_int, default=16)
    p.add_argument("--seed", type=int, default=None, help="seed for unseeded sampling")
    p.add_argument("--kv-ttl-s", type=_positive_float, default=60.0,
                   help="prefill: how long a computed KV cache waits for its pull")
    p.add_argument("--admission-timeout-s", type=_positive_float, default=30.0,
                   help="decode: how long a request waits for KV-cache room before 'overloaded'")
    p.add_argument("--drain-grace-s", type=_positive_float, default=60.0,
                   help="on SIGTERM: longest wait for in-flight work before exiting")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(handler=serve)


def _add_profile(subparsers: Any) -> None:
    p = subparsers.add_parser("profile", help="measure iteration latency and fit the DistServe model")
    _add_model_flags(p)
    p.add_argument("--out", default="profile.json")
    p.add_argument("--quick", action="store_true", help="small sweep (about 20 s on a laptop CPU)")
    p.add_argument("--repeats", type=_positive_int, default=None)
    p.add_argument("--tensor-sizes", type=_tensor_sizes, default=None,
                   help="comma-separated tensor-parallel sizes to profile, one entry each for the planner to "
                        "choose among, e.g. 1,2,4 (default: every size of 1, 2, 4, 8 that this machine's GPUs "
                        "hold and the model's heads divide by; 1 on a CPU)")
    p.set_defaults(handler=profile)


def _add_profile_vllm(subparsers: Any) -> None:
    p = subparsers.add_parser("profile-vllm", help="measure a running vLLM server into the planner's profile format")
    p.add_argument("--url", required=True, help="the vLLM server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model-name", required=True, help="its --served-model-name")
    p.add_argument("--checkpoint", help="the checkpoint folder it serves (model facts for the planner)")
    p.add_argument("--gpu", default="cpu", help="the node label nvidia.com/gpu.product of its GPUs, or cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--tensor", type=_positive_int, default=1, help="the server's --tensor-parallel-size")
    p.add_argument("--pipeline", type=_positive_int, default=1, help="the server's --pipeline-parallel-size")
    p.add_argument("--max-num-batched-tokens", type=_positive_int, default=2048,
                   help="the server's limit: larger prefill shapes would not fit one batch and are skipped")
    p.add_argument("--out", default="profile.json")
    p.add_argument("--quick", action="store_true")
    p.set_defaults(handler=profile_vllm)


def profile_vllm(args: argparse.Namespace) -> int:
    from disaggserve_worker.profile import vllm_http

    try:
        vllm_http.run(args.url, args.model_name, args.out, quick=args.quick, checkpoint=args.checkpoint,
                      gpu=args.gpu, dtype=args.dtype, tensor=args.tensor, pipeline=args.pipeline,
                      max_batched_tokens=args.max_num_batched_tokens)
    except (RuntimeError, OSError) as error:
        print(f"disaggserve-worker profile-vllm: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def _add_profile_link(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "profile-link", help="measure the KV link to a prefill worker into the profile's overheads.kv_link",
        description="Run in a decode pod (kubectl exec): prefill prompts of each --sizes on the prefill worker "
        "at --prefill, pull each KV cache over the workers' own transport as a decode worker does, and fit "
        "the link's bandwidth and per-transfer latency (the planner's overheads.kv_link).")
    p.add_argument("--prefill", required=True,
                   help="the prefill worker's URL, e.g. http://NAME-prefill-0.NAME-prefill:8100")
    _add_model_flags(p)
    p.add_argument("--max-model-len", type=_positive_int, default=None,
                   help="the workers' --max-model-len (default: the model's context)")
    p.add_argument("--sizes", default="128,1024", help="prompt sizes in tokens, at least two (default 128,1024)")
    p.add_argument("--repeats", type=_positive_int, default=5, help="timed pulls per size, after one warm-up each")
    p.add_argument("--profile", default=None,
                   help="a profile JSON: the link goes into its overheads.kv_link, the rest is kept "
                        "(without it the link and its samples are printed as JSON)")
    p.add_argument("--out", default=None,
                   help="where to write (default: over --profile; without --profile: the JSON instead of stdout)")
    p.set_defaults(handler=profile_link)


def profile_link(args: argparse.Namespace) -> int:
    from disaggserve_worker.model.loader import ModelLoadError
    from disaggserve_worker.profile import link

    _setup(args)
    destination = args.out or args.profile  # None: print the JSON
    try:
        profile = link.read_profile(args.profile) if args.profile else None  # a wrong file costs no measuring
        result = link.run(args.prefill, args.model, sizes=args.sizes, repeats=args.repeats, device=args.device,
                          dtype=args.dtype, max_model_len=args.max_model_len)
        if profile is not None:
            source = link.source_line(args.prefill, result)
            link.write_json(destination, link.with_link(profile, result["kv_link"], source))
        elif destination:
            link.write_json(destination, result)
    except (link.LinkError, ModelLoadError) as error:
        print(f"disaggserve-worker profile-link: {' '.join(str(error).split())}", file=sys.stderr)  # one line
        return 2
    if destination is None:
        print(json.dumps(result, indent=2))
    else:
        fitted = result["kv_link"]
        print(f"wrote {destination}: kv_link {fitted['gbps']} Gbit/s, {fitted['latency_ms']} ms per transfer "
              f"(from {len(result['samples'])} pulls)")
    return 0


def _add_export(subparsers: Any) -> None:
    p = subparsers.add_parser("export-checkpoint",
                              help="write a built-in model as a Hugging Face checkpoint folder (for vLLM)")
    p.add_argument("--model", default="tiny-llama", help="a built-in model name (tiny-llama, small-llama, ...)")
    p.add_argument("--out", required=True, help="folder to write (reused when it already holds this model)")
    p.set_defaults(handler=export_checkpoint)


def export_checkpoint(args: argparse.Namespace) -> int:
    from disaggserve_worker.model.export import export_builtin

    try:
        print(export_builtin(args.model, Path(args.out)))
    except ValueError as exc:
        print(f"disaggserve-worker export-checkpoint: {exc}", file=sys.stderr)
        return 2
    return 0


def _register_router(subparsers: Any) -> None:
    try:
        from disaggserve_worker.router import cli as router_cli
    except ModuleNotFoundError as error:
        if error.name in ("disaggserve_worker.router", "disaggserve_worker.router.cli"):
            return  # router not installed in this build
        raise
    router_cli.register(subparsers)


def _add_tokenizer(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tokenizer", help="write the model's tokenizer as a Hugging Face tokenizer folder",
        description="Write the tokenizer of --model as a Hugging Face tokenizer folder (tokenizer.json, "
        "tokenizer_config.json with the chat template the router applies), so benchmark clients such as "
        "guidellm or `vllm bench serve` count tokens as the server does: pass DIR as their tokenizer.")
    p.add_argument("--model", default="builtin:tiny-llama", help="builtin:<name> or a checkpoint folder")
    p.add_argument("--out", required=True, type=Path, help="folder to write (created if missing)")
    p.set_defaults(handler=export_tokenizer)


def export_tokenizer(args: argparse.Namespace) -> int:
    from disaggserve_worker.model.errors import ModelLoadError
    from disaggserve_worker.model.tokenizer_export import write_hf_tokenizer

    try:
        written = write_hf_tokenizer(args.model, args.out)
    except (ModelLoadError, ValueError, OSError) as error:
        print(f"disaggserve-worker tokenizer: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="disaggserve-worker", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_serve(subparsers)
    _add_profile(subparsers)
    _add_export(subparsers)
    _add_profile_vllm(subparsers)
    _add_profile_link(subparsers)
    _add_tokenizer(subparsers)
    _register_router(subparsers)
    return parser


def validate_serve_args(args: argparse.Namespace) -> list[str]:
    """Problems a flag parser cannot see; each line says what to change."""
    problems = []
    if args.speculation_mode != "off" and args.role == "prefill":
        problems.append(f"--speculation-mode {args.speculation_mode}: speculation runs on decode steps; "
                        "a prefill worker does none, so pass it to decode or colocated workers only")
    if args.speculation_num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
        problems.append(f"--speculation-num-speculative-tokens {args.speculation_num_speculative_tokens}: at most "
                        f"{MAX_SPECULATIVE_TOKENS} (acceptance "
                        "of long proposals is negligible and verification cost is not)")
    if args.speculation_ngram_min > args.speculation_ngram_max:
        problems.append("--speculation-ngram-min must not exceed --speculation-ngram-max")
    needs_draft = args.speculation_proposer == "draft" and args.speculation_mode != "off"
    if needs_draft and not args.speculation_draft_model:
        problems.append("--speculation-proposer draft needs --speculation-draft-model")
    return problems + parallel_problems(args)


def _setup(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    seed = getattr(args, "seed", None)
    if seed is not None:
        random.seed(seed)
        torch.manual_seed(seed)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    problems = validate_serve_args(args)
    if problems:
        for problem in problems:
            print(f"disaggserve-worker serve: {problem}", file=sys.stderr)
        return 2
    _setup(args)
    from disaggserve_worker.engine.engine import Engine, EngineConfig
    from disaggserve_worker.engine.memory import auto_kv_cache_tokens
    from disaggserve_worker.model.loader import ModelLoadError, load_model
    from disaggserve_worker.server.app import ServerConfig, WorkerServer
    from disaggserve_worker.server.worker_metrics import WorkerMetrics

    try:
        loaded = load_model(args.model, args.device, args.dtype, pipeline=args.pipeline_parallel,
                            tensor=args.tensor_parallel)
        draft = load_draft(args, loaded)
        kv_tokens = args.kv_cache_tokens or auto_kv_cache_tokens(kv_bytes_per_token(loaded, draft))
    except (ModelLoadError, MemoryError, ValueError) as error:
        print(f"disaggserve-worker serve: {error}", file=sys.stderr)
        return 2
    max_len = min(args.max_model_len or loaded.config.max_position_embeddings, kv_tokens)
    identity = {k: os.environ.get(k) for k in (contract.ENV_POD_NAME, contract.ENV_POD_IP,
                                               contract.ENV_NAMESPACE, contract.ENV_UNIT)}
    advertise = identity[contract.ENV_POD_IP] or (args.host if args.host not in ("0.0.0.0", "::", "") else
                                                  "127.0.0.1")
    metrics = WorkerMetrics(args.role, lambda: engine.load(), args.ttft_slo_ms and args.ttft_slo_ms / 1000,
                            args.tpot_slo_ms and args.tpot_slo_ms / 1000,
                            model_name=args.model_name or loaded.name, max_model_len=max_len)
    speculator = build_speculator(args, loaded, kv_tokens, metrics.registry, draft)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.eos_token_ids,
                    EngineConfig(role=args.role, kv_cache_tokens=kv_tokens, block_size=args.block_size,
                                 max_batch_tokens=args.max_batch_tokens, max_model_len=max_len,
                                 kv_ttl_seconds=args.kv_ttl_s, shared_kv=args.role == "prefill"),
                    observer=metrics.observe_iteration, speculator=speculator)
    server = WorkerServer(engine, ServerConfig(
        role=args.role, host=args.host, port=args.port, kv_port=args.kv_port, advertise_host=advertise,
        model_name=args.model_name or loaded.name, admission_timeout_s=args.admission_timeout_s), metrics)
    log.info("serving %s as %s on %s:%d (kv %s), devices %s (tensor %d x pipeline %d) %s, %d KV tokens, "
             "identity %s", args.model, args.role, args.host, args.port, server.kv_address,
             ",".join(map(str, loaded.model.devices)), args.tensor_parallel, args.pipeline_parallel,
             loaded.model.dtype, kv_tokens, identity)
    return asyncio.run(_serve(server, args.drain_grace_s))


def _speculation_config(args: argparse.Namespace) -> Any:
    from disaggserve_worker.speculation.config import SpeculationConfig

    return SpeculationConfig(mode=args.speculation_mode, proposer=args.speculation_proposer,
                             num_speculative_tokens=args.speculation_num_speculative_tokens,
                              ngram_min=args.speculation_ngram_min,
                             ngram_max=args.speculation_ngram_max, draft_model=args.speculation_draft_model)


def load_draft(args: argparse.Namespace, loaded: Any) -> Any:
    """The draft model when the flags ask for one (else None), checked against the target.

    Loaded before the KV pools are sized: its cache (as many slots as the target's) shares the
    target's first device, so `kv_bytes_per_token` must count it or the pools overrun memory.
    """
    config = _speculation_config(args)
    if not config.enabled or config.proposer != "draft":
        return None
    from disaggserve_worker.model.loader import load_model
    from disaggserve_worker.speculation.draft import check_compatible

    # The draft runs unsharded beside the target's first stage and shard, in the target's dtype.
    device = loaded.model.device
    draft = load_model(config.draft_model, "cuda" if device.type == "cuda" else "cpu", args.dtype)
    draft.model.to(device)
    check_compatible(loaded.config.vocab_size, draft.model,
                     draft.tokenizer.get_vocab() == loaded.tokenizer.get_vocab())
    return draft


def kv_bytes_per_token(loaded: Any, draft: Any = None) -> dict[Any, int]:
    """What one KV slot costs on each device: the target's stages and shards, plus the draft's cache."""
    out = dict(loaded.model.kv_bytes_per_token())
    if draft is not None:
        for device, size in draft.model.kv_bytes_per_token().items():
            out[device] = out.get(device, 0) + size
    return out


def build_speculator(args: argparse.Namespace, loaded: Any, kv_tokens: int, registry: Any,
                     draft_loaded: Any = None) -> Any:
    """The decode loop's speculator from the --speculation-* flags, or None when off (the draft
    model is loaded here unless `load_draft` already did)."""
    config = _speculation_config(args)
    if not config.enabled:
        return None
    from disaggserve_worker.speculation.draft import DraftProposer
    from disaggserve_worker.speculation.metrics import SpecMetrics
    from disaggserve_worker.speculation.speculator import Speculator

    draft = None
    if config.proposer == "draft":
        draft_loaded = draft_loaded or load_draft(args, loaded)
        draft = DraftProposer(draft_loaded.model, kv_tokens, args.block_size)
    log.info("speculation %s with %s proposer, up to %d tokens", config.mode, config.proposer,
             config.num_speculative_tokens)
    return Speculator(config, loaded.model, draft, SpecMetrics(registry, args.role))


async def _serve(server: Any, grace_s: float) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    await stop.wait()
    log.info("signal received: draining (grace %.0f s)", grace_s)
    drained = await server.drain_and_wait(grace_s)
    if not drained:
        log.warning("grace period over with work in flight; exiting anyway: %s", server.engine.load())
    await server.stop()
    return 0


def profile(args: argparse.Namespace) -> int:
    if args.device == "cpu" and args.tensor_sizes and max(args.tensor_sizes) > 1:
        print(f"disaggserve-worker profile: --tensor-sizes {','.join(map(str, args.tensor_sizes))}: tensor "
              "parallelism shards each layer over CUDA devices; with --device cpu use --tensor-sizes 1",
              file=sys.stderr)
        return 2
    _setup(args)
    from disaggserve_worker.model.loader import ModelLoadError
    from disaggserve_worker.profile.run import run_profile

    try:
        run_profile(args.model, device=args.device, dtype=args.dtype, out=args.out, quick=args.quick,
                    repeats=args.repeats, tensor_sizes=args.tensor_sizes)
    except ModelLoadError as error:
        print(f"disaggserve-worker profile: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
