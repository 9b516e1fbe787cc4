"""The receiving half of a loop pull in C (`kv_io.c`), where it builds; Python's own path otherwise.

Why: with sender and receiver on their own cores, as prefill and decode pods are, a 1 MB pull over
loopback spent ~0.1-0.15 ms in Python between the reply's first byte and the scatter-read of its
layers (read and check the HEADER, build each layer's target regions in the reserved blocks),
on a vCPU woken cold while the sender kept filling the socket: that delay was most of what a pull
cost over raw TCP (0.63x, bench/kv_transfer.py --pin). `kv_pull_step` takes the same steps in a
few microseconds and never blocks: when nothing has arrived it returns AGAIN, and the caller
waits for readability on its event loop (with its timeout and cancellation) and steps again.

It handles the common reply only: protocol 3, a stream HEADER (no slot runs) of the shape this
worker expects, into a direct pool sink. Anything else (an ERROR frame, a shape that does not
fit, slot runs) it declines after reading just that frame's head, or head and header, and the
caller's Python path reads on from there and reports it as it always did, so both paths answer
every reply the same way (tests run both). Built with the CPU kernels' machinery
(`model.cpu_kernels`: cached per source, compiler and CPU) and under the same switch,
`DISAGGSERVE_CPU_KERNELS`: `off`, or no C compiler (the CUDA image), means the Python path.
"""

from __future__ import annotations

import array
import ctypes
import functools
import os
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from disaggserve_worker.kv.framing import (
    COUNT_FRAME_SIZE,
    HEADER,
    LAYER_HEAD_SIZE,
    MAX_CONTROL_FRAME,
    SOCKET_BUFFER,
    WIRE_DTYPES,
    FrameType,
    KVTransferError,
    PeerClosed,
    check_control,
    frame_head,
    recv_control,
    translate,
)
from disaggserve_worker.kv.layout import DTYPE_NAMES, KVLayout, PoolSink
from disaggserve_worker.model import cpu_kernels

SOURCE = Path(__file__).with_name("kv_io.c")
COMPILE_FLAGS = ("-O2", "-fPIC", "-c")  # no fast-math, no OpenMP: socket reads and integer sums
LINK_FLAGS = ("-shared",)

# kv_pull_step's answers (kv_io.c)
DONE, AGAIN, DECLINED_HEAD, DECLINED_HEADER, BAD_FRAMES = 0, 1, 2, 3, 4
CLOSED, ERRNO, BAD_STATE, TOO_LONG = -1, -2, -3, -4
REPLY_SIZE = 21  # a HEADER payload without slot runs (`framing._REPLY`)
# Once the layers flow, how long a read keeps trying without progress before the event loop waits
# (kv_io.c says why): a 64 KB loopback segment every ~20 us at the bench host's pace, so 50 us
# rides out gaps between segments and gives up on a sender that has really stalled.
SPIN_NS = 50_000
# How long the first read of a reply keeps trying before the event loop waits for it (a pull with
# no other in flight, `TcpKVTransport`): the port's answer on loopback came 0.1-0.2 ms after the
# REQUEST, and a receiver that slept through it woke ~0.1 ms after its first bytes, while the
# sender streamed on. Pinned 1 MB pulls: 548-590 us with 0.3 ms vs 591-695 us without, 4 rounds
# each, interleaved (bench/kv_transfer.py's measure). The cost: up to this long on the loop, its
# core busy (yielded to any thread that shares it) when a peer answers slowly.
FIRST_SPIN_NS = 300_000

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class PullState(ctypes.Structure):
    """kv_io.c's `kv_pull_state`, field for field (all 8 bytes wide: one layout on every 64-bit ABI)."""

    _fields_ = [("fd", _i64), ("layers", _i64), ("dtype", _i64), ("kv_heads", _i64), ("head_dim", _i64),
                ("max_tokens", _i64), ("token_bytes", _i64), ("pool_slots", _i64), ("layer_base", _ptr),
                ("blocks", _ptr), ("nblocks", _i64), ("block_size", _i64), ("iov", _ptr), ("iov_cap", _i64),
                ("frames", _ptr), ("spin_ns", _i64), ("first_spin_ns", _i64),
                ("phase", _i64), ("got", _i64), ("tokens", _i64),
                ("iov_count", _i64), ("iov_at", _i64), ("error", _i64)]


_lock = threading.Lock()
_resolved: list[ctypes.CDLL | None] = []


def library() -> ctypes.CDLL | None:
    """kv_io.c, built and loaded on the first call of the process; None: the Python path."""
    if _resolved:
        return _resolved[0]
    with _lock:
        if not _resolved:
            _resolved.append(cpu_kernels.resolve_library(
                cpu_kernels.mode(), "native KV receive", "KV pulls are read in Python, which is slower", _load))
    return _resolved[0]


def reset() -> None:
    """Forget the resolved library, so the next `library()` reads the mode again (tests)."""
    with _lock:
        _resolved.clear()


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(cpu_kernels.build_library(SOURCE, COMPILE_FLAGS, LINK_FLAGS)))
    lib.kv_pull_step.argtypes = [ctypes.POINTER(PullState)]
    lib.kv_pull_step.restype = ctypes.c_int
    lib.kv_pull_begin.argtypes = [ctypes.POINTER(PullState), _i64, _i64, _i64, _i64, _i64]
    lib.kv_pull_begin.restype = ctypes.c_int
    lib.kv_recv_frame.argtypes = [_i64, _ptr, _i64, ctypes.POINTER(_i64)]
    lib.kv_recv_frame.restype = _i64
    lib.kv_send_iov.argtypes = [_i64, _ptr, _i64, _i64, ctypes.POINTER(_i64)]
    lib.kv_send_iov.restype = _i64
    lib.kv_table_new.argtypes = []
    lib.kv_table_new.restype = _ptr
    lib.kv_table_release.argtypes = [_ptr]
    lib.kv_table_release.restype = None
    lib.kv_table_add.argtypes = [_ptr, _ptr]
    lib.kv_table_add.restype = None
    lib.kv_table_revoke.argtypes = [_ptr, _ptr]
    lib.kv_table_revoke.restype = _i64
    lib.kv_table_finish.argtypes = [_ptr, _ptr, _i64]
    lib.kv_table_finish.restype = None
    lib.kv_port_step_run.argtypes = [_ptr]
    lib.kv_port_step_run.restype = _i64
    return lib


class _Iovec(ctypes.Structure):
    _fields_ = [("base", _ptr), ("len", ctypes.c_size_t)]


class Gather:
    """A prepared reply's buffers as the `struct iovec` list `kv_send_iov` sends (made once per
    held cache, when the engine holds it); it keeps every buffer it points into alive."""

    def __init__(self, lib: ctypes.CDLL, buffers: Sequence[bytes | memoryview]):
        self._lib = lib
        self._keep: list[ctypes.Array[ctypes.c_char]] = []
        views = [memoryview(bytearray(b) if isinstance(b, bytes) else b).cast("B") for b in buffers]
        views = [v for v in views if v.nbytes]
        self._iov = (_Iovec * len(views))()
        for entry, view in zip(self._iov, views, strict=True):
            chars = (ctypes.c_char * view.nbytes).from_buffer(view)  # writable: pool memory, bytearrays
            self._keep.append(chars)
            entry.base, entry.len = ctypes.addressof(chars), view.nbytes
        self._error = _i64()
        # Everything the send passes, worked out once (the port's thread runs it woken cold).
        self._args = ctypes.addressof(self._iov), len(self._iov), SOCKET_BUFFER, ctypes.byref(self._error)

    def send(self, sock: socket.socket) -> None:
        """Send it all on blocking `sock` (its SO_SNDTIMEO bounds each wait): as
        `framing.send_buffers` does, with the same errors."""
        status = self._lib.kv_send_iov(sock.fileno(), *self._args)
        if status != 0:
            error = int(self._error.value)
            raise translate(OSError(error, os.strerror(error)), sock)

    @property
    def iov(self) -> tuple[int, int]:
        """(address, entries) of its `struct iovec` list."""
        return self._args[0], self._args[1]


def gather(buffers: Sequence[bytes | memoryview]) -> Gather | None:
    """`buffers` ready for `Gather.send`; None where the library does not build, or a buffer
    cannot be pointed into (read-only memory): the caller then sends with `framing.send_buffers`."""
    lib = library()
    if lib is None:
        return None
    try:
        return Gather(lib, buffers)
    except (TypeError, ValueError, BufferError):
        return None


def frame_reader(sock: socket.socket) -> Callable[[int], tuple[FrameType, bytearray]]:
    """Reads whole control frames of blocking `sock`, each bounded by the limit it is called with
    (at most MAX_CONTROL_FRAME): `kv_recv_frame` where the library builds, else
    `framing.recv_control`; the same frames and the same errors either way."""
    lib = library()
    if lib is None or sock.gettimeout() is not None:  # C waits only on a blocking socket (`set_timeout`)
        return functools.partial(recv_control, sock)
    return _FrameReader(lib, sock)


def _read_failure(got: int, head: bytearray, limit: int, error: int, sock: socket.socket) -> KVTransferError:
    """What `kv_recv_frame`'s failure `got` means, as `framing.recv_control` reports it (`head`:
    the frame head it read, for a frame it refused)."""
    if got == TOO_LONG:
        kind, length = frame_head(head)
        check_control(kind, length, limit)  # raises
    if got == CLOSED:
        return PeerClosed("KV peer closed the stream mid-frame")
    if got == ERRNO:
        return translate(OSError(error, os.strerror(error)), sock)
    return KVTransferError("kv_protocol", f"native KV frame read failed (status {got})", False)


class _FrameReader:
    def __init__(self, lib: ctypes.CDLL, sock: socket.socket):
        self._lib, self._sock = lib, sock
        self._buf = bytearray(HEADER.size + MAX_CONTROL_FRAME)  # one per connection, reused
        self._address = ctypes.addressof((ctypes.c_char * len(self._buf)).from_buffer(self._buf))
        self._error = _i64()
        self._error_ref = ctypes.byref(self._error)

    def __call__(self, limit: int = MAX_CONTROL_FRAME) -> tuple[FrameType, bytearray]:
        limit = min(limit, MAX_CONTROL_FRAME)
        got = int(self._lib.kv_recv_frame(self._sock.fileno(), self._address, limit, self._error_ref))
        if got >= 0:
            return frame_head(self._buf[:HEADER.size])[0], self._buf[HEADER.size:HEADER.size + got]
        raise _read_failure(got, self._buf[:HEADER.size], limit, int(self._error.value), self._sock)


# ---- the port's whole REQUEST -> reply -> ACK step (kv_io.c's kv_port_step_run) ----------------

# kv_port_step_run's answers, beside the frame read's (CLOSED, ERRNO, TOO_LONG)
SENT, FALLBACK, SEND_FAILED, ACK_FAILED = 2, 1, 3, 4


class _Entry(ctypes.Structure):
    """kv_io.c's `kv_entry`, field for field."""

    _fields_ = [("key", _ptr), ("key_len", _i64), ("iov", _ptr), ("iov_count", _i64), ("expires_ns", _i64),
                ("state", _i64), ("next", _ptr), ("linked", _i64)]


class PortTable:
    """A KV port's table of prepared replies by handle, which `PortStep` answers REQUESTs from
    without Python (kv_io.c says why). One per port; freed when neither the port nor an entry
    refers to it any more."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        self.address = lib.kv_table_new()
        if not self.address:
            raise MemoryError("kv_table_new")

    def __del__(self) -> None:
        if getattr(self, "address", None):
            self._lib.kv_table_release(self.address)  # freed once every entry has released it too
            self.address = None

    def register(self, handle: str, reply: Gather, expires_at: float) -> HeldEntry:
        """Make `reply` (a held cache's prepared reply) what a REQUEST for `handle` gets from
        `PortStep` until `expires_at` (time.monotonic), or until revoked."""
        return HeldEntry(self, handle, reply, expires_at)


_in_flight_at_exit: list[object] = []  # entries dropped while a send was in flight (never expected)


class HeldEntry:
    """A held cache's entry in a `PortTable` (`HeldCache.native`): a native step's take of it
    counts as a pin, which the engine asks about before it frees the cache (`revoke`). Keeps
    the key and the reply's buffers alive as long as the cache holds it, and the table (a counted
    reference in C) until it has left it."""

    def __init__(self, table: PortTable, handle: str, reply: Gather, expires_at: float):
        self._lib, self._table_address, self._reply = table._lib, table.address, reply
        key = handle.encode()
        self._key = ctypes.create_string_buffer(key, len(key) or 1)
        iov, count = reply.iov
        entry = self._entry = _Entry(key=ctypes.addressof(self._key), key_len=len(key), iov=iov,
                                     iov_count=count, expires_ns=int(expires_at * 1e9))
        self.address = ctypes.addressof(entry)
        self._lib.kv_table_add(self._table_address, self.address)  # holds a reference to the table

    def __del__(self) -> None:
        # Out of the table before its memory goes (a cache dropped without `revoke`, a test's
        # entry); one still being sent (nobody drops a pinned cache) is kept alive instead.
        try:
            if self.revoke():
                self._lib.kv_table_release(self._table_address)
            else:
                _in_flight_at_exit.append((self._entry, self._key, self._reply))
        except (AttributeError, TypeError):  # half made, or the interpreter is going
            pass

    def revoke(self) -> bool:
        """No more native takes; False while one is in flight (the cache is then pinned)."""
        return bool(self._lib.kv_table_revoke(self._table_address, self.address))

    def finish(self, keep: bool) -> None:
        """End a native take: takeable again if `keep`, else never again."""
        self._lib.kv_table_finish(self._table_address, self.address, int(keep))

    @property
    def state(self) -> int:
        """0 takeable, 1 taken (a send in flight), 2 revoked (tests)."""
        return int(self._entry.state)


class _StepArgs(ctypes.Structure):
    """kv_io.c's `kv_port_step`, field for field."""

    _fields_ = [("fd", _i64), ("table", _ptr), ("buf", _ptr), ("ack_buf", _ptr), ("limit", _i64), ("cap", _i64),
                ("frame_sec", _i64), ("frame_usec", _i64), ("idle_sec", _i64), ("idle_usec", _i64),
                ("length", _i64), ("ack_length", _i64), ("ack_status", _i64), ("error", _i64),
                ("entry", _ptr), ("elapsed_ns", _i64)]


def _seconds(seconds: float) -> tuple[int, int]:
    whole = int(seconds)
    return whole, int((seconds - whole) * 1e6)


class PortStep:
    """One port connection's `kv_port_step_run`, its arguments and buffers made once. `run`
    serves a REQUEST for a registered reply wholly in C (reply, ACK and the read timeouts'
    switch included) and says how it went; the rest of a step's outcome is read from here."""

    def __init__(self, lib: ctypes.CDLL, table: PortTable, sock: socket.socket, frame_timeout: float,
                 idle_timeout: float):
        self._lib, self._sock, self.table = lib, sock, table
        self._buf = bytearray(HEADER.size + MAX_CONTROL_FRAME)
        self._ack = bytearray(HEADER.size + MAX_CONTROL_FRAME)
        args = self._args = _StepArgs(fd=sock.fileno(), table=table.address, limit=MAX_CONTROL_FRAME,
                                      cap=SOCKET_BUFFER)
        args.buf = ctypes.addressof((ctypes.c_char * len(self._buf)).from_buffer(self._buf))
        args.ack_buf = ctypes.addressof((ctypes.c_char * len(self._ack)).from_buffer(self._ack))
        args.frame_sec, args.frame_usec = _seconds(frame_timeout)
        args.idle_sec, args.idle_usec = _seconds(idle_timeout)
        self._pointer = ctypes.byref(args)

    def run(self) -> int:
        """Serve the next REQUEST: SENT (the ACK frame is in: `ack`), FALLBACK (the frame is
        Python's: `frame`), SEND_FAILED or ACK_FAILED (`failure` says why), or the REQUEST's read
        failed (`frame` raises). On SENT and both failures the entry is taken: `handle` names it,
        and the caller ends the take (`Engine.finish_native`)."""
        return int(self._lib.kv_port_step_run(self._pointer))

    def frame(self, status: int) -> tuple[FrameType, bytearray]:
        """The frame a FALLBACK left to Python; for a read failure, its error (raised)."""
        if status == FALLBACK:
            return frame_head(self._buf[:HEADER.size])[0], self._buf[HEADER.size:HEADER.size + self._args.length]
        raise _read_failure(status, self._buf[:HEADER.size], MAX_CONTROL_FRAME, int(self._args.error), self._sock)

    def handle(self) -> str:
        """The handle of the REQUEST whose entry was taken."""
        length = int.from_bytes(self._buf[HEADER.size + 1:HEADER.size + 3])
        return self._buf[HEADER.size + 3:HEADER.size + 3 + length].decode()

    def ack(self) -> tuple[FrameType, bytearray]:
        """The frame that came after a SENT reply (an ACK, or whatever the peer sent)."""
        return frame_head(self._ack[:HEADER.size])[0], self._ack[HEADER.size:HEADER.size + self._args.ack_length]

    def failure(self, status: int) -> KVTransferError:
        """Why a taken step failed: the send (SEND_FAILED) or the read after it (ACK_FAILED)."""
        args = self._args
        if status == SEND_FAILED:
            return translate(OSError(int(args.error), os.strerror(int(args.error))), self._sock)
        try:
            return _read_failure(int(args.ack_status), self._ack[:HEADER.size], MAX_CONTROL_FRAME, int(args.error),
                                 self._sock)
        except KVTransferError as error:  # a frame it refused (too long, a layer)
            return error

    @property
    def elapsed(self) -> float:
        """Seconds from the take to the ACK's arrival (a SENT step)."""
        return self._args.elapsed_ns / 1e9


def _layout_key(expect: KVLayout) -> tuple[object, ...]:
    return expect.dtype, expect.layers, expect.kv_heads, expect.head_dim, expect.max_tokens


class NativePull:
    """A connection's reply reader for `kv_pull_step`, made once per connection and layout and
    re-armed for each pull (`begin`) with the pull's reservation in a direct sink.

    Why once: made afresh for each pull (the state, its frame and scatter buffers, the pool's
    addresses) it cost ~5 us warm but tens of microseconds on a vCPU woken cold, in the middle of
    a 1 MB pull, where on a 2-vCPU host the port's thread waited for that very vCPU
    (bench/kv_transfer.py, unpinned). Holds every buffer the C code writes through, so they live
    as long as the state that points at them."""

    def __init__(self, lib: ctypes.CDLL, fd: int, expect: KVLayout):
        self._lib = lib
        self.expect = expect  # the layout it was made for (`serves`)
        self._key = _layout_key(expect)
        self.layers = expect.layers
        self.max_tokens = expect.max_tokens
        self._iov_cap = 0
        self.frames = bytearray(HEADER.size + REPLY_SIZE + expect.layers * LAYER_HEAD_SIZE + COUNT_FRAME_SIZE)
        self._frames = (ctypes.c_char * len(self.frames)).from_buffer(self.frames)
        self._iov: ctypes.Array[ctypes.c_char] | None = None
        self._regions: object = None  # the pool whose addresses the state holds
        self._blocks: array.array[int] | None = None  # the reservation the state points into
        name = DTYPE_NAMES.get(expect.dtype)
        state = self.state = PullState()
        state.fd, state.layers = fd, expect.layers
        state.dtype = WIRE_DTYPES.index(name) if name in WIRE_DTYPES else -1  # -1: never matches
        state.kv_heads, state.head_dim = expect.kv_heads, expect.head_dim
        state.frames = ctypes.addressof(self._frames)
        state.spin_ns = SPIN_NS
        self._pointer = ctypes.pointer(state)

    def serves(self, expect: KVLayout) -> bool:
        """Whether pulls of layout `expect` (an equal one made apart) can use this reader."""
        if _layout_key(expect) != self._key:
            return False
        self.expect = expect
        return True

    def begin(self, sink: PoolSink, first_spin_ns: int = 0) -> int:
        """Re-arm for a pull into `sink` (after its REQUEST is out) and take the first step: that
        step's answer (see the answers above). The first bytes may be waited for spinning up to
        `first_spin_ns`."""
        regions = sink.regions
        assert regions is not None, "a direct sink"
        state = self.state
        if regions is not self._regions:  # another pool (a restarted engine): its addresses
            state.token_bytes, state.pool_slots = regions.token_bytes, regions.slots
            state.layer_base = ctypes.addressof(regions.bases)
            self._regions = regions
        blocks, block_size = sink.blocks_for_native()
        need = self.layers * (1 + 2 * len(blocks)) + 1  # each layer's head, K and V runs; the END
        if need > self._iov_cap:  # grown for a reservation of more blocks than any before
            self._iov = ctypes.create_string_buffer(16 * need)  # struct iovec: pointer, size
            state.iov, state.iov_cap = ctypes.addressof(self._iov), need
            self._iov_cap = need
        self._blocks = blocks
        return int(self._lib.kv_pull_begin(self._pointer, blocks.buffer_info()[0], len(blocks), block_size,
                                           min(self.max_tokens, sink.capacity), first_spin_ns))

    def step(self) -> int:
        """Read what has arrived (see the answers above)."""
        return int(self._lib.kv_pull_step(self._pointer))

    @property
    def untouched(self) -> bool:
        """Whether nothing of the reply has been read (a stale pooled connection shows so)."""
        return self.state.phase == 0 and self.state.got == 0

    def frame_head(self) -> bytes:
        return bytes(self.frames[:HEADER.size])

    def header_payload(self) -> bytearray:
        return self.frames[HEADER.size:HEADER.size + REPLY_SIZE]

    def layer_frames(self) -> tuple[list[bytearray], bytearray]:
        """The layer frame heads and the END as read (to report a wrong one the Python way)."""
        start = HEADER.size + REPLY_SIZE
        heads = [self.frames[start + i * LAYER_HEAD_SIZE:start + (i + 1) * LAYER_HEAD_SIZE]
                 for i in range(self.state.layers)]
        return heads, self.frames[start + self.state.layers * LAYER_HEAD_SIZE:]

