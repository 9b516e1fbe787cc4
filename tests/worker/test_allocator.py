"""Step-sized buffers freed at the end of a step are reused by the next, not faulted in again."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from disaggserve_worker.model.allocator import keep_step_memory

# A fresh process, as a worker is: tune (as `load_model` does), then run "steps" on a thread (as
# the engine does) whose live set spans more than one 64 MiB thread heap.
STEPS = textwrap.dedent("""
    import resource, sys, threading, torch
    from disaggserve_worker.model.allocator import keep_step_memory
    if sys.argv[1] == "tuned":
        assert keep_step_memory()

    def step():
        buffers = [torch.empty(20 << 20, dtype=torch.uint8) for _ in range(4)]
        for buffer in buffers:
            buffer.fill_(1)  # touch every page

    def run():
        for _ in range(4):  # the heaps settle into their working shape
            step()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(8):
            step()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 8)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
""")
PAGES = 80 * (1 << 20) // 4096


def _faults_per_step(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_an_engine_threads_step_buffers_are_reused_without_page_faults() -> None:
    if not keep_step_memory():
        pytest.skip("not glibc: the allocator is left as it is")
    # untuned glibc unmaps or trims an emptied heap each step: ~5k faults, a quarter of the pages
    assert _faults_per_step("tuned") < PAGES / 100
