"""Bearer-token auth for the OpenAI endpoints.

Keys come from a file mounted from a Kubernetes Secret (one key per line) and are re-read when the
file changes, so rotating the Secret needs no restart. Comparison is constant-time.
"""

from __future__ import annotations

import hmac
import logging
from pathlib import Path

from .errors import APIError

log = logging.getLogger(__name__)


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
        scheme, _, credentials = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():  # the scheme is case-insensitive (RFC 9110)
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        given = credentials.strip().encode()
        if not any(hmac.compare_digest(given, key) for key in self._current()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def _current(self) -> list[bytes]:
        assert self.path is not None
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if stamp != self._stamp:
                lines = self.path.read_text().splitlines()
                self._keys = [line.strip().encode() for line in lines if line.strip()]
                self._stamp = stamp
        except (OSError, UnicodeDecodeError) as exc:
            # A Secret being re-mounted vanishes for a moment: keep the keys read last.
            if self._stamp is None:
                log.error("API key file %s cannot be read: %s", self.path, exc)
                raise APIError(500, f"The router cannot read its API key file ({self.path}); an operator must "
                               "fix the mounted Secret. Retry later.", type_="server_error",
                               code="api_keys_unavailable") from None
            log.warning("API key file %s cannot be read (%s); using the keys read before", self.path, exc)
        return self._keys
