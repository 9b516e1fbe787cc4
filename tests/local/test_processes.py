"""No process of the local cluster outlives the process that started it, even when that one is
SIGKILLed (no cleanup code runs) and the child ignores SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

STARTER = """
import signal, subprocess, sys
from disaggserve.local.processes import die_with_parent
child = subprocess.Popen(
    [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"],
    start_new_session=True,
    preexec_fn=die_with_parent,
)
print(child.pid, flush=True)
signal.pause()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (already dead, not yet reaped by init) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_children_die_with_a_killed_parent():
    starter = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True, env=os.environ)
    child = 0
    try:
        child = int(starter.stdout.readline())
        assert _alive(child)
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        for _ in range(600):  # the kernel delivers SIGKILL at once; allow a loaded machine its time
            if not _alive(child):
                break
            time.sleep(0.05)
        assert not _alive(child), "the child outlived its SIGKILLed parent"
    finally:
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)
        if starter.poll() is None:
            starter.kill()


def test_kill_all_takes_the_children_of_a_pod_whose_main_process_already_exited():
    """vLLM's engine core outlived its SIGKILLed API server (reparented to init, spinning a core)
    because the agent skipped pods whose main process was already reaped."""
    from types import SimpleNamespace

    from disaggserve.local.agent import NodeAgent

    main = subprocess.Popen(["sh", "-c", "sleep 600 & echo $!"], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    child = int(main.stdout.readline())
    main.wait()  # the pod's main process is gone and reaped; its child holds the process group
    try:
        assert main.returncode == 0 and _alive(child)
        NodeAgent.kill_all(SimpleNamespace(pods={("ns", "pod"): SimpleNamespace(proc=main)}))
        for _ in range(600):
            if not _alive(child):
                break
            time.sleep(0.05)
        assert not _alive(child), "a child of the pod outlived kill_all"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
