"""The wire contract with the operator, worker side (mirror of `disaggserve.contract`).

The worker never imports the control plane; `tests/test_contract.py` checks that pods the
operator renders start a worker that accepts their flags and environment.

Internal HTTP protocol between router and workers (JSON bodies, NDJSON streams):

- prefill worker   POST /internal/prefill   {request_id, prompt_token_ids, sampling}
    -> 200 {request_id, first_token_id, text, finish_reason|null, prompt_tokens,
            kv: {address: "ip:kv_port", handle, bytes}}
    The KV cache stays on the prefill worker (with a TTL) until a decode worker pulls it.
- decode worker    POST /internal/decode    {request_id, prompt_token_ids, first_token_id,
                                             sampling, kv: {address, handle}}
    -> 200 NDJSON stream of {token_id, text, finish_reason|null} events; an event
       {"error": {"type": "kv_unavailable" | "overloaded" | ..., "message", "retryable"}}
       ends a failed stream. The decode worker admits the request (free KV memory), pulls the
       KV cache over TCP (framed, layer by layer) and joins its continuous batch.
- colocated worker POST /internal/generate  {request_id, prompt_token_ids, sampling}
    -> 200 NDJSON stream, the first event carries the first token.
- every worker     GET /internal/load -> {role, queued_tokens, running, free_kv_tokens, draining}
                   POST /internal/drain  (stop admitting; readiness turns false)
                   GET /healthz, /readyz, /metrics
"""

from __future__ import annotations

ROUTER_PORT = 8000
WORKER_PORT = 8100
KV_PORT = 8101

ENV_POD_NAME = "DISAGGSERVE_POD_NAME"
ENV_POD_IP = "DISAGGSERVE_POD_IP"
ENV_NAMESPACE = "DISAGGSERVE_NAMESPACE"
ENV_UNIT = "DISAGGSERVE_UNIT"

PATH_HEALTH = "/healthz"
PATH_READY = "/readyz"
PATH_METRICS = "/metrics"
PATH_DRAIN = "/internal/drain"
PATH_LOAD = "/internal/load"
PATH_PREFILL = "/internal/prefill"
PATH_DECODE = "/internal/decode"
PATH_GENERATE = "/internal/generate"

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

ROLES = ("prefill", "decode", "colocated")
