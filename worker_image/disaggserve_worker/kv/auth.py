"""Who may use a KV port: peers that know the DisaggServe's worker token.

The operator gives every worker of one DisaggServe the same secret (`DISAGGSERVE_WORKER_TOKEN`,
read by `disaggserve_worker.auth.worker_token`). When it is set, a KV server sends a fresh
random nonce and accepts the connection only if the client's first frame carries
HMAC-SHA256(token, nonce) (compared in constant time); anything else is refused and the
connection closed at once. The token itself never crosses the wire and a recorded handshake
cannot be replayed.
"""

from __future__ import annotations

import os

from disaggserve_worker.auth import sign, signature_matches, worker_token
from disaggserve_worker.contract import ENV_WORKER_TOKEN

__all__ = ["ENV_WORKER_TOKEN", "new_nonce", "prove", "verify", "worker_token"]
_CONTEXT = "disaggserve-kv-v2"


def new_nonce() -> bytes:
    return os.urandom(32)


def prove(token: str | None, nonce: bytes) -> str:
    """The client's proof for `nonce` ("" without a token)."""
    return sign(token, _CONTEXT, nonce.hex()) if token else ""


def verify(token: str | None, nonce: bytes, proof: object) -> bool:
    """True when no token is required, or `proof` is the right HMAC (constant-time compare)."""
    if not token:
        return True
    return isinstance(proof, str) and signature_matches(token, proof, _CONTEXT, nonce.hex())
