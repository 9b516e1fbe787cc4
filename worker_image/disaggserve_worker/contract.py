"""The wire contract with the operator, worker side (mirror of `disaggserve.contract`).

The worker never imports the control plane; `tests/test_contract.py` checks that pods the
operator renders start a worker that accepts their flags and environment.

Internal HTTP protocol between router and workers (JSON bodies, NDJSON streams). When
`DISAGGSERVE_WORKER_TOKEN` is set, every endpoint below except /healthz, /readyz and /metrics
wants it in `X-DisaggServe-Token` (else 401 `invalid_worker_token`); the prefill worker then adds
`kv.signature` (HMAC of address and handle, `disaggserve_worker.auth.sign`) and a decode worker
pulls only from a `kv` whose signature checks (else 403 `kv_untrusted`):

- prefill worker   POST /internal/prefill   {request_id, prompt_token_ids, sampling}
    -> 200 {request_id, first_token_id, text, finish_reason|null, prompt_tokens,
            kv: {address: "ip:kv_port", handle, bytes, shm?: {segment, lease, runs}} | null}
    The KV cache stays on the prefill worker (with a TTL, `--kv-ttl-s`) until a decode worker
    pulls it. `kv.shm` (a pool in shared memory, `kv.shared_memory`) says where the cache lies
    in it and under which lease: a decode worker on the same host copies it without asking the
    KV port first. `kv` is null when the first token already finished the request (EOS, stop,
    max_tokens 1): nothing is held and no decode call is needed.
- prefill worker   POST /internal/release   {handle}  -> 200 {released: bool}
    The router gave the request up before a decode worker pulled its cache (the client left,
    no decode worker took it): the cache is freed now instead of at its TTL.
- decode worker    POST /internal/decode    {request_id, prompt_token_ids, first_token_id,
                                             sampling, kv: {address, handle, shm?}}
    -> 200 NDJSON stream of {token_id, text, finish_reason|null} events (tokens after the
       first); an event {"error": {"type": "kv_unavailable" | "kv_timeout" | "overloaded" |
       "kv_mismatch" | "engine_error" | ..., "message", "retryable"}} ends a failed stream.
       The decode worker admits the request (room for prompt + max_tokens in its KV cache,
       waiting up to `--admission-timeout-s`, else "overloaded"), pulls the KV cache over TCP
       (framed, layer by layer; `disaggserve_worker.kv.framing`) and joins its continuous
       batch. `sampling.max_tokens` counts the first token too, so it must be >= 2 here.
- colocated worker POST /internal/generate  {request_id, prompt_token_ids, sampling}
    -> 200 NDJSON stream, the first event carries the first token.
- every worker     GET /internal/load -> {role, model (--model-name), queued_tokens,
                                          queued_requests, running, free_kv_tokens,
                                          held_caches, draining}
                   POST /internal/drain  (stop admitting; readiness turns false; a prefill
                                          worker keeps serving pulls of caches it holds)
                   GET /healthz, /readyz, /metrics

`sampling` (all optional, unknown keys refused): max_tokens (16), temperature (1.0; 0 is
greedy), top_p (1.0), top_k (0 = off), min_p (0), seed, stop (string or list of strings),
stop_token_ids, ignore_eos (false), and vLLM's extensions: min_tokens (0), repetition_penalty (1),
presence_penalty and frequency_penalty (0), logit_bias ({token id: bias}), allowed_token_ids, logprobs
(null, or how many top logprobs to return besides the sampled token's). With logprobs, each token
event (and the prefill reply) carries "logprobs": {"logprob", "top": [[id, logprob], ...]} of the
raw model output. A speculating worker refuses (400) the knobs it cannot apply (penalties,
logit_bias, allowed_token_ids, min_tokens, logprobs).

Status codes: 400 {"error": {type: "invalid_request" | "invalid_json", message, retryable:
false}} for a body that is wrong (the message names the field); 409 "wrong_role" for an
endpoint of another role; 503 {"error": {type: "draining", retryable: true}} while draining;
a prefill that fails inside the engine answers 503 (retryable) or 500 with the same shape.

Worker metrics, vLLM's names where vLLM has the concept (labels `model_name` = --model-name and
`engine` = "0", vLLM's types and histogram edges; the list is `server.worker_metrics.VLLM_METRICS`):
vllm:num_requests_running, vllm:num_requests_waiting (engine queue + decode requests waiting for
KV room), vllm:kv_cache_usage_perc (0..1), vllm:cache_config_info{block_size, num_gpu_blocks}
(gauges); vllm:prompt_tokens_total, vllm:generation_tokens_total (tokens this worker emitted: a
prefill worker's first token, a decode worker's later ones), vllm:request_success_total
{finished_reason} (counters); vllm:time_to_first_token_seconds, vllm:inter_token_latency_seconds,
vllm:request_time_per_output_token_seconds, vllm:e2e_request_latency_seconds,
vllm:request_prompt_tokens, vllm:request_generation_tokens (histograms, timed on this worker from
arrival; a decode worker's TTFT includes its KV pull). Ours, with a `role` label, where vLLM has no
series: disaggserve_queued_tokens, disaggserve_held_kv_caches (gauges),
disaggserve_kv_transfer_bytes, disaggserve_kv_transfer_seconds,
disaggserve_prefill_iteration_seconds, disaggserve_decode_iteration_seconds (histograms),
disaggserve_worker_requests_total{outcome} (counter). The router's client-side SLO series stay
`disaggserve_*` (they span prefill and decode, which no single vLLM server sees).

Speculation (decode and colocated workers; a prefill worker refuses it): `--speculation-mode
off|fixed|adaptive`, `--speculation-proposer ngram|draft`, `--speculation-num-speculative-tokens` (1-16),
`--speculation-ngram-min/-max`, `--speculation-draft-model` (builtin:<name> or a checkpoint
folder; same tokenizer as the target). Metrics: disaggserve_spec_proposed_tokens_total,
disaggserve_spec_accepted_tokens_total (counters), disaggserve_spec_chosen_k (histogram, per
request and step), disaggserve_spec_tokens_per_step (gauge: moving average of tokens emitted per
sequence per decode step — divide the decode step time by it for TPOT),
disaggserve_spec_goodput_tokens_per_second and disaggserve_spec_acceptance_rate (gauges).

Parallelism flags: `--tensor-parallel T` (1, 2, 4 or 8) shards each layer's attention (by
heads) and MLP over T local GPUs; `--pipeline-parallel P` splits the layers into P stages. A pod
needs T x P GPUs (nvidia.com/gpu: T*P); stage s runs on cuda:s*T .. cuda:s*T+T-1. The model's
attention heads, KV heads and intermediate size must divide by T (else the worker exits 2 naming
the sizes that work). With `--device cpu` both must be 1. The KV wire format is full-head
whatever T is, so prefill and decode workers may use different tensor sizes.
`disaggserve-worker profile` takes the same two flags and records them in its profile entry.

Note to the router engineer: the tokenizer of any `--model` value comes from
`disaggserve_worker.model.source.load_tokenizer`; the `router` subcommand is registered by
`disaggserve_worker.cli` calling `disaggserve_worker.router.cli.register(subparsers)`, whose
parser must `set_defaults(handler=<callable(args) -> int>)`.
"""

from __future__ import annotations

ROUTER_PORT = 8000
WORKER_PORT = 8100
KV_PORT = 8101

# Most tokens speculation may propose per step (acceptance decays geometrically, so longer
# proposals only cost verification work); the CRD, the worker flag and its config share it.
MAX_SPECULATIVE_TOKENS = 16

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

PATH_HEALTH = "/healthz"
PATH_READY = "/readyz"
PATH_METRICS = "/metrics"
PATH_DRAIN = "/internal/drain"
PATH_LOAD = "/internal/load"
PATH_PREFILL = "/internal/prefill"
PATH_DECODE = "/internal/decode"
PATH_GENERATE = "/internal/generate"
PATH_RELEASE = "/internal/release"  # prefill: free a held KV cache whose request was given up

LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_UNIT = "disaggserve.io/unit"

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
# Router-only: its own load and fault handling (the autoscaler may read queue depth).
METRIC_ROUTER_INFLIGHT = "disaggserve_router_inflight_requests"
METRIC_ROUTER_QUEUED = "disaggserve_router_queued_requests"
METRIC_ROUTER_RETRIES = "disaggserve_router_retries_total"
METRIC_ROUTER_RESUMED = "disaggserve_router_resumed_total"
METRIC_ROUTER_WORKERS = "disaggserve_router_workers"

ROLES = ("prefill", "decode", "colocated")

# The operator's CRD admits these tensor sizes (powers of two up to a node's 8 GPUs); the worker
# refuses others up front instead of failing later on a model whose heads happen not to split.
TENSOR_SIZES = (1, 2, 4, 8)
