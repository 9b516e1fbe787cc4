"""Who may use a KV port: peers that know the DisaggServe's worker token.

The operator puts a per-DisaggServe secret into every worker's environment
(`DISAGGSERVE_WORKER_TOKEN`). When it is set, a KV server sends a fresh random nonce and
accepts the connection only if the client's first frame carries HMAC-SHA256(token, nonce)
(compared in constant time); anything else is refused and the connection closed at once. The
token itself never crosses the wire and a recorded handshake cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import os

ENV_WORKER_TOKEN = "DISAGGSERVE_WORKER_TOKEN"
_CONTEXT = b"disaggserve-kv-v2\0"


def worker_token() -> str | None:
    """The worker token from the environment; None (no authentication) when unset or empty."""
    return os.environ.get(ENV_WORKER_TOKEN) or None


def new_nonce() -> bytes:
    return os.urandom(32)


def prove(token: str | None, nonce: bytes) -> str:
    """The client's proof for `nonce` ("" without a token)."""
    if not token:
        return ""
    return hmac.new(token.encode(), _CONTEXT + nonce, hashlib.sha256).hexdigest()


def verify(token: str | None, nonce: bytes, proof: object) -> bool:
    """True when no token is required, or `proof` is the right HMAC (constant-time compare)."""
    if not token:
        return True
    if not isinstance(proof, str):
        return False
    return hmac.compare_digest(prove(token, nonce).encode(), proof.encode("utf-8", "replace"))
