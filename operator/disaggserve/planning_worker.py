"""The loop a planner worker process runs (controller/planning.py starts and kills these).

Its own small module so that a spawned worker imports only the planner, not the controller
package (kopf, the HTTP clients and handler registration have no business in it).
"""

from __future__ import annotations

import traceback
from multiprocessing.connection import Connection
from typing import Any

from disaggserve.planner.errors import PlanningError

PING = "ping"


def serve(conn: Connection) -> None:  # pragma: no cover - runs in the child process
    """Answer (function, args, kwargs) requests until the parent closes the pipe."""
    import disaggserve.planner  # noqa: F401  (import the planner now, not inside the first plan's budget)

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        if request == PING:
            conn.send(PING)
            continue
        fn, args, kwargs = request
        try:
            reply: tuple[Any, ...] = ("ok", fn(*args, **kwargs))
        except PlanningError as e:
            reply = ("planning", e.reason, str(e))
        except Exception as e:  # a planner bug: report it instead of killing the worker
            reply = ("error", f"{type(e).__name__}: {e}", traceback.format_exc(limit=5))
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result
            conn.send(("error", f"cannot return the plan: {type(e).__name__}: {e}", ""))
