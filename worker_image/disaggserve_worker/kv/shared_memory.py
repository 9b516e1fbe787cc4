"""Same-host KV transfers through shared memory: the prefill pool lives in a file on a tmpfs.

Why: on one host a pull over loopback TCP still moves every byte through the kernel twice
(send buffer, then receive buffer) and wakes both processes per segment; the decode worker
can instead copy the held blocks straight out of the prefill worker's pool. The prefill
engine's pool (a single-shard CPU pool) is then a view of a file in `DISAGGSERVE_KV_SHM_DIR`
(default /dev/shm), which the KV port names to a peer only after the peer proved the worker
token. A decode worker that can open and map that file (same host, same user, same /dev/shm:
`disaggserve up`, or pods that share one) pulls by asking for the held blocks' slot runs and
copying them; any other peer keeps pulling the bytes over TCP. The blocks stay pinned until
the decode worker's ACK, exactly as for a TCP pull.

`DISAGGSERVE_KV_SHM`: `auto` (default: a prefill pool goes to shared memory when the folder
has room for it, with a quarter to spare; a container's default 64 MiB /dev/shm does not, so
pods keep private memory unless they mount a bigger one), `on` (fail if it cannot), `off`.

The file starts with one page holding a magic, the segment's random id and its pool geometry;
a reader checks them before trusting a mapping. A lease table follows (one 64-bit word per
block, page-aligned), then the pool. When the engine holds a prompt's cache it writes a random
lease into its blocks' words and hands the lease and the blocks' slot runs out with the KV
handle (`kv.shm` in the prefill reply); it zeroes the words before the blocks can be reused
(delivered, released, expired). A decode worker that has the segment mapped can then copy the
blocks without asking first and check afterwards that every word still holds the lease: if it
does, nothing reused the blocks while they were copied (the prefill writes the zero before it
writes new KV, and on x86-64, whose stores and loads keep program order between cores, the
copy's reads cannot see the new KV without the check's read seeing the zero). Elsewhere the
decode worker asks the KV port first, as before. Files are removed when their pool is
collected or the process exits; files of dead processes (a SIGKILLed worker) are swept when
the next pool is made in that folder. "Dead" is judged in this process's PID namespace: where
containers with their own PID namespaces share one folder, a sweep can unlink another worker's
live segment; its pool keeps working (the mapping outlives the name), and peers that have not
mapped it yet pull over TCP.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import mmap
import os
import platform
import secrets
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from disaggserve_worker import switches
from disaggserve_worker.model.kv_pool import KVPool

log = logging.getLogger(__name__)

ENV_MODE = "DISAGGSERVE_KV_SHM"
ENV_DIR = "DISAGGSERVE_KV_SHM_DIR"
MODES = ("auto", "on", "off")
PREFIX = "disaggserve-kv-"
MAGIC = b"DISAGGSERVE-KV\x00\x02"
HEADER_BYTES = 4096  # one page: the pool that follows stays page-aligned
HEADROOM = 1.25  # `auto` wants this much free space per pool byte
LEASE = np.dtype("<u8")  # one word per block: 0 free, else the lease of the held cache on it
# Copying before checking relies on loads and stores keeping program order between cores (x86
# TSO); other machines ask the KV port for the runs first (one round trip more).
COPY_BEFORE_CHECK = platform.machine().lower() in ("x86_64", "amd64")


class SharedMemoryUnavailable(RuntimeError):
    """`DISAGGSERVE_KV_SHM=on` and the pool could not be put in shared memory."""


def mode() -> str:
    return switches.choice(ENV_MODE, MODES)


def folder() -> Path:
    return Path(os.environ.get(ENV_DIR) or "/dev/shm")


@dataclass(frozen=True)
class SegmentInfo:
    """What the KV port tells an authenticated peer about its pool's segment."""

    path: str
    id: str
    layers: int
    slots: int
    token_bytes: int  # one token's K (or V) in one layer
    block_size: int  # slots per block: one lease word each

    @property
    def layer_bytes(self) -> int:
        return 2 * self.slots * self.token_bytes

    @property
    def blocks(self) -> int:
        return -(-self.slots // self.block_size)

    @property
    def pool_offset(self) -> int:
        """Where the pool starts: after the header page and the page-rounded lease table."""
        return HEADER_BYTES + -(-self.blocks * LEASE.itemsize // HEADER_BYTES) * HEADER_BYTES

    @property
    def size(self) -> int:
        return self.pool_offset + self.layers * self.layer_bytes

    def wire(self) -> dict[str, object]:
        return {"path": self.path, "id": self.id, "layers": self.layers, "slots": self.slots,
                "token_bytes": self.token_bytes, "block_size": self.block_size}

    @classmethod
    def parse(cls, obj: object) -> SegmentInfo:
        if not isinstance(obj, dict):
            raise ValueError(f"segment description is {type(obj).__name__}, not an object")
        info = cls(str(obj["path"]), str(obj["id"]), int(obj["layers"]), int(obj["slots"]), int(obj["token_bytes"]),
                   int(obj["block_size"]))
        if min(info.layers, info.slots, info.token_bytes, info.block_size) <= 0:
            raise ValueError(f"segment geometry {info} is not positive")
        return info


class HeldLocation(Protocol):
    """Where a held cache lies in a segment, and its lease (the prefill reply's `kv.shm`)."""

    segment: str
    lease: int
    runs: list[tuple[int, int]]


class Leases:
    """The writer's lease table: which held cache each block belongs to (see the module's doc)."""

    def __init__(self, words: np.ndarray):
        self.words = words

    def grant(self, blocks: list[int]) -> int:
        """Mark `blocks` as held under a new random lease (never 0); the lease."""
        lease = secrets.randbits(63) | 1
        self.words[blocks] = lease
        return lease

    def revoke(self, blocks: list[int]) -> None:
        """Before `blocks` can be reused: a copy in flight then fails its check."""
        self.words[blocks] = 0


@dataclass
class SharedPool:
    pool: KVPool
    info: SegmentInfo
    leases: Leases


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_stale(where: Path) -> int:
    """Remove segments whose creating process is gone; the number removed."""
    removed = 0
    with contextlib.suppress(OSError):
        for path in where.glob(PREFIX + "*"):
            pid = path.name[len(PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
    return removed


def _unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def shared_pool(layers: int, slots: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                wanted: str | None = None, block_size: int = 16) -> SharedPool | None:
    """A single-shard CPU pool (per layer (2, slots, kv_heads, head_dim), zeroed) in a shared-memory
    file, its description and lease table; None when `auto` finds no room or the folder is unusable."""
    wanted = wanted or mode()
    if wanted == "off":
        return None
    where = folder()
    token_bytes = kv_heads * head_dim * dtype.itemsize
    info = SegmentInfo(str(where / f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}"), secrets.token_hex(16),
                       layers, slots, token_bytes, block_size)
    try:
        sweep_stale(where)
        stat = os.statvfs(where)
        free = stat.f_bavail * stat.f_frsize
        if free < info.size * HEADROOM:
            raise OSError(f"{where} has {free >> 20} MiB free, the pool needs {info.size >> 20} MiB "
                          f"(+{int((HEADROOM - 1) * 100)} %)")
        fd = os.open(info.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as error:
        if wanted == "on":
            raise SharedMemoryUnavailable(f"{ENV_MODE}=on but the KV pool cannot go to {where}: {error}") from error
        log.info("KV pool in private memory (same-host pulls go over TCP): %s", error)
        return None
    try:
        os.ftruncate(fd, info.size)  # a sparse tmpfs file: pages are allocated as the pool is written
        header = MAGIC + json.dumps(info.wire()).encode()
        os.pwrite(fd, header.ljust(HEADER_BYTES, b"\0"), 0)
        flat = torch.from_file(info.path, shared=True, size=info.size, dtype=torch.uint8)
    except BaseException:
        _unlink(info.path)
        raise
    finally:
        os.close(fd)
    pool_bytes = flat[info.pool_offset:]
    leases = Leases(flat[HEADER_BYTES:HEADER_BYTES + info.blocks * LEASE.itemsize].numpy().view(LEASE))
    pool = KVPool([[pool_bytes[i * info.layer_bytes:(i + 1) * info.layer_bytes].view(dtype)
                    .view(2, slots, kv_heads, head_dim)] for i in range(layers)])
    # The file goes with the pool (or the process); its mapping lives as long as any view of it.
    weakref.finalize(pool, _unlink, info.path)
    atexit.register(_unlink, info.path)
    log.info("KV pool in shared memory: %s (%d MiB)", info.path, info.size >> 20)
    return SharedPool(pool, info, leases)


class SegmentReader:
    """A read-only mapping of a peer's pool segment, checked against what its KV port said."""

    def __init__(self, info: SegmentInfo):
        self.info = info
        fd = os.open(info.path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != info.size:
                raise OSError(f"{info.path} is {os.fstat(fd).st_size} bytes, the peer announced {info.size}")
            self._map = mmap.mmap(fd, info.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        header = self._map[:HEADER_BYTES]
        if not header.startswith(MAGIC):
            self.close()
            raise OSError(f"{info.path} is not a DisaggServe KV segment")
        described = json.loads(header[len(MAGIC):].rstrip(b"\0"))
        if described != info.wire():
            self.close()
            raise OSError(f"{info.path} describes {described}, the peer announced {info.wire()} (another segment)")
        self.view = memoryview(self._map)

    def layer_regions(self, layer: int, runs: list[tuple[int, int]]) -> list[memoryview]:
        """The K then V regions of slot `runs` in layer `layer` (the order of a TCP layer frame)."""
        info, tb = self.info, self.info.token_bytes
        base = info.pool_offset + layer * info.layer_bytes
        out = []
        for kv in (0, 1):
            half = base + kv * info.slots * tb
            out.extend(self.view[half + s * tb:half + (s + n) * tb] for s, n in runs)
        return out

    def check_runs(self, runs: object, tokens: int) -> list[tuple[int, int]]:
        """The slot runs a peer sent, validated against this segment and the announced tokens."""
        if not isinstance(runs, list):
            raise ValueError("runs is not a list")
        out = []
        for run in runs:
            start, n = (int(x) for x in run)
            if start < 0 or n <= 0 or start + n > self.info.slots:
                raise ValueError(f"slot run {start}+{n} is outside the segment's {self.info.slots} slots")
            out.append((start, n))
        if sum(n for _, n in out) != tokens:
            raise ValueError(f"slot runs cover {sum(n for _, n in out)} tokens, the header says {tokens}")
        return out

    def leased(self, runs: list[tuple[int, int]], lease: int) -> bool:
        """Whether every block the (checked) runs touch still holds `lease`: read after a copy,
        True means the copy saw the held cache (see the module's doc)."""
        bs, word = self.info.block_size, lease.to_bytes(LEASE.itemsize, "little")
        for start, n in runs:  # compared as bytes: numpy's per-call overhead was ~0.1 ms a 1 MB pull
            first, last = start // bs, (start + n - 1) // bs
            at = HEADER_BYTES + first * LEASE.itemsize
            if self._map[at:at + (last - first + 1) * LEASE.itemsize] != word * (last - first + 1):
                return False
        return True

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            if hasattr(self, "view"):
                self.view.release()
            self._map.close()


def copy_regions(sources: list[memoryview], targets: list[memoryview]) -> int:
    """Copy consecutive source regions into consecutive target regions of the same total size
    (their boundaries may differ: the peer's blocks against this pool's); bytes copied."""
    total = sum(len(s) for s in sources)
    if total != sum(len(t) for t in targets):
        raise ValueError(f"sources hold {total} bytes, targets {sum(len(t) for t in targets)}")
    si = ti = so = to = 0
    while si < len(sources):
        src, dst = sources[si], targets[ti]
        n = min(len(src) - so, len(dst) - to)
        dst[to:to + n] = src[so:so + n]
        so, to = so + n, to + n
        if so == len(src):
            si, so = si + 1, 0
        if to == len(dst):
            ti, to = ti + 1, 0
    return total
