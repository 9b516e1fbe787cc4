"""The OpenAI-compatible router: validates and tokenizes requests, picks prefill/decode workers by
load, relays their tokens to clients, and measures what clients experience (TTFT, TPOT, SLOs)."""
