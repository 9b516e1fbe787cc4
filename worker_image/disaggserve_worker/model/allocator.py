"""Keep the host allocator from returning step-sized buffers to the kernel after every step.

A CPU forward step allocates tensors of a few to tens of MB (activations, gathered attention
contexts) and frees them at the end of the step. glibc serves allocations above its mmap
threshold with a fresh mmap and unmaps them on free, and trims the heap top above its trim
threshold, so the next step page-faults the same memory in again: on the 2-core bench host a
decode step at batch 32 of ~1k-token contexts took ~49k minor faults, over half its time.
Pinning the mmap threshold at its 64-bit ceiling (32 MiB; it also stops glibc's dynamic
threshold, which starts at 128 KiB) and raising the trim threshold keeps that memory in the
heap, reused step after step. The engine allocates on its own thread, in a thread arena, which
unmaps any of its 64 MiB heaps that a step leaves empty unless the top pad covers a whole heap:
hence the 64 MiB pad (address space only; sbrk'd pages cost nothing until touched). The cost is
that the worker's RSS stays at its high-water mark, which a serving process reaches again at
its next large step anyway. The settings are process-wide and take effect at once, whichever
threads already exist.

vLLM's CPU backend gets the same effect by preloading tcmalloc; a pip-installed worker cannot
rely on one being present, so this uses glibc's own knobs and does nothing on other C libraries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the most glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20  # a thread arena's heap size (HEAP_MAX_SIZE): no emptied heap is unmapped

_lock = threading.Lock()
_done: bool | None = None


def keep_step_memory() -> bool:
    """Tune glibc malloc once per process; True if it took effect (False off glibc)."""
    global _done
    with _lock:
        if _done is None:
            _done = _tune()
        return _done


def _tune() -> bool:
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.debug("no glibc mallopt: host allocator left as it is")
        return False
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                (_M_TOP_PAD, TOP_PAD_BYTES))
    ok = all(mallopt(option, value) for option, value in settings)
    if not ok:
        log.warning("glibc refused the malloc thresholds: CPU steps will page-fault their buffers in")
    return ok
