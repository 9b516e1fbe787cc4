"""The shared secret that lets a worker trust only its own router and peers.

Per DisaggServe the operator creates a Secret `<name>-worker-token` (32 random bytes, hex) and
gives it to the router and every worker as `DISAGGSERVE_WORKER_TOKEN`. Whoever holds it is part of
that one DisaggServe: the router sends it on every worker call (`X-DisaggServe-Token`), workers
refuse calls without it (probes and /metrics excepted), and a prefill worker signs the KV
reference it hands out with it, so a decode worker only ever connects to KV ports that a peer of
the same DisaggServe vouched for (never to an address a stranger names).

Without the variable (a worker started by hand, the unit tests) nothing is checked: the worker
then trusts its network, and says so in its log. Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping

from disaggserve_worker.contract import ENV_WORKER_TOKEN, HEADER_WORKER_TOKEN

__all__ = ["ENV_WORKER_TOKEN", "HEADER_WORKER_TOKEN", "auth_headers", "sign", "signature_matches",
           "token_matches", "worker_token"]


def worker_token(environ: Mapping[str, str] | None = None) -> str | None:
    """The token from the environment, or None when this deployment runs without one."""
    value = (os.environ if environ is None else environ).get(ENV_WORKER_TOKEN, "").strip()
    return value or None


def token_matches(expected: str | None, given: str | None) -> bool:
    """True when no token is configured, or `given` equals it (constant time)."""
    if expected is None:
        return True
    if not given:
        return False
    return hmac.compare_digest(given.strip().encode(), expected.encode())


def auth_headers(token: str | None) -> dict[str, str]:
    """Headers a caller (router, operator, peer) sends so a worker of the same DisaggServe accepts it."""
    return {HEADER_WORKER_TOKEN: token} if token else {}


def sign(token: str, *parts: str) -> str:
    """HMAC-SHA256 of the parts (joined unambiguously) under the token, hex."""
    message = b"\x00".join(part.encode() for part in parts)
    return hmac.new(token.encode(), message, hashlib.sha256).hexdigest()


def signature_matches(token: str, signature: str | None, *parts: str) -> bool:
    return bool(signature) and hmac.compare_digest(str(signature).encode(), sign(token, *parts).encode())
