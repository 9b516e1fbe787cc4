"""Bearer-token auth for the OpenAI endpoints.

Keys come from a file mounted from a Kubernetes Secret (one key per line) and are re-read when the
file changes, so rotating the Secret needs no restart. Comparison is constant-time.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from .errors import APIError


class ApiKeys:
    """Bearer keys from a Secret-mounted file (one per line), re-read when the file changes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._keys: list[bytes] = []

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def check(self, header: str | None) -> None:
        if self.path is None:
            return
        if not header or not header.startswith("Bearer "):
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        given = header.removeprefix("Bearer ").strip().encode()
        if not any(hmac.compare_digest(given, key) for key in self._current()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _current(self) -> list[bytes]:
        assert self.path is not None
        stat = self.path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp != self._stamp:
            lines = self.path.read_text().splitlines()
            self._keys = [line.strip().encode() for line in lines if line.strip()]
            self._stamp = stamp
        return self._keys
