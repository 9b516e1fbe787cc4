"""Process hygiene for the local cluster: no process it starts may outlive it.

The operator and pod processes run in their own sessions (so a signal to one process group
reaches a worker and its children, and a terminal's Ctrl-C does not bypass the graceful
drain). The orderly path stops them (SIGTERM, the pod's grace period, then SIGKILL). This is
the safety net for the disorderly one: if the process that started them dies without
cleaning up (SIGKILL, a crash, a test runner killed mid-run), Linux kills them too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn`: ask the kernel to SIGKILL this child when the thread that forked it exits.

    Linux only (elsewhere a no-op: the orderly shutdown still applies). The local cluster
    starts its processes from its event-loop thread, which lives as long as the cluster.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
