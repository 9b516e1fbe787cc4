"""kopf settings the operator runs with, in one place (CLI, `kopf run` and tests share them)."""

from __future__ import annotations

import logging
import os

import kopf

PREFIX = "disaggserve.io"


def configure(settings: kopf.OperatorSettings) -> None:
    # Progress and the last handled spec live in our own annotations; status stays ours to shape.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{PREFIX}/finalizer"
    settings.posting.level = logging.INFO
    settings.networking.request_timeout = 30
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.reconnect_backoff = float(os.environ.get("DISAGGSERVE_WATCH_BACKOFF", "1.0"))
    settings.queueing.error_delays = [1, 2, 5, 10, 30]
    # How long a peer counts as alive without a heartbeat (kopf beats a few seconds before it
    # runs out); a standby takes over after about this long.
    settings.peering.lifetime = int(os.environ.get("DISAGGSERVE_PEERING_LIFETIME", "60"))
