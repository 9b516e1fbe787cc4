"""The framed KV stream over a blocking socket: `type (u8) | length (u64, big-endian) | payload`.

A connection starts with a handshake: the server sends HELLO {version, nonce, auth}; the
client's first frame is AUTH {mac} (HMAC-SHA256 of the nonce under the worker token,
`kv.auth`); the server answers READY, or ERROR and closes. Then the connection serves pulls
one after another (it is kept per peer and reused): decode sends REQUEST (`PullRequest`:
handle, request id, flags); prefill answers HEADER (`ReplyHeader`: dtype, layers, tokens,
heads, head size, and for a same-host peer the slot runs) or ERROR {type, message,
retryable}, then one LAYER frame per layer (`layer index (u32) | K bytes | V bytes`, full
heads, token-major), then END (the layer bytes, u64); decode answers ACK (the same), and only
then does prefill free the cache — a decode worker that dies mid-pull can be retried.

The handshake and ERROR frames are JSON (rare, and read before sizes matter); the frames of a
pull are fixed binary structs. Why: on the 2-core bench host, JSON-encoding the REQUEST and
decoding the HEADER on a vCPU woken cold took 30 and 30-100 us of a ~0.9 ms 1 MB pull
(bench/kv_transfer.py), and a fixed-size END lets the receiver read every layer and the END in
one scatter-read.

Why blocking sockets (each side runs them on its own thread, off the event loop and off the
engine thread): layer payloads go out with `sendmsg` straight from the pool's memory and come
in with `recvmsg_into` straight into the receiver's pool blocks — no stream-reader buffer, no
join, no per-frame copies. The timeouts are the kernel's (`set_timeout`: SO_RCVTIMEO and
SO_SNDTIMEO on a blocking socket) rather than Python's `settimeout`, which makes the socket
non-blocking and polls before every call: so a reply's layers come in with one `recvmsg_into`
(MSG_WAITALL) however many segments they arrive in, and a 12 MB reply goes out in six
`sendmsg` calls of a socket buffer each however often the buffer fills — a few syscalls and GIL
rounds instead of dozens. Every read is bounded before anything is allocated: control frames
by `MAX_CONTROL_FRAME` (`MAX_HANDSHAKE_FRAME` before authentication), layer frames by the exact
size the header announced, which the receiver checks against its model and reservation.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

HEADER = struct.Struct("!BQ")
LAYER_INDEX = struct.Struct("!I")
LAYER_HEAD_SIZE = HEADER.size + LAYER_INDEX.size
BYTE_COUNT = struct.Struct("!Q")  # the payload of END and ACK: the layer bytes of the pull
COUNT_FRAME_SIZE = HEADER.size + BYTE_COUNT.size
_REQUEST = struct.Struct("!BH")  # flags, handle length; then the handle and the request id (UTF-8)
_REPLY = struct.Struct("!BIIIII")  # dtype, layers, tokens, kv heads, head size, slot runs; then the runs
_RUN = struct.Struct("!II")  # first slot, slots
_SHM, _COPIED = 1, 2  # REQUEST flags
WIRE_DTYPES = ("float32", "bfloat16", "float16")  # a dtype's wire code is its index
PROTOCOL_VERSION = 3
# The previous release's frames (JSON REQUEST/HEADER/END/ACK), still spoken to a peer that knows
# no other: prefill and decode StatefulSets roll one pod at a time and independently, so during
# an upgrade old and new workers pull from each other, and a refused pull is a failed request.
# The handshake settles the version (`VERSIONS` in HELLO, the choice in AUTH). Drop it in the
# release after the next.
LEGACY_VERSION = 2
VERSIONS = (LEGACY_VERSION, PROTOCOL_VERSION)
MAX_HANDSHAKE_FRAME = 1024  # HELLO/AUTH/READY, read before the peer is trusted
MAX_CONTROL_FRAME = 64 * 1024  # REQUEST, HEADER, END, ACK, ERROR
IOV_MAX = 1024  # buffers per sendmsg/recvmsg call (Linux's UIO_MAXIOV)
# Socket buffers big enough that a typical cache (~1 MB) crosses in one send and one wake-up of
# the receiver instead of a ping-pong of 128 KB windows (the kernel doubles it for bookkeeping
# and caps it at [rw]mem_max). Not bigger: a cache several times this size should still stream
# layer by layer rather than sit in kernel buffers.
SOCKET_BUFFER = 2 << 20


class FrameType(IntEnum):
    REQUEST = 1
    HEADER = 2
    LAYER = 3
    END = 4
    ERROR = 5
    ACK = 6
    HELLO = 7
    AUTH = 8
    READY = 9


_REQUEST_TYPE = int(FrameType.REQUEST)
_FRAME_TYPES = {int(kind): kind for kind in FrameType}


class KVTransferError(RuntimeError):
    """A pull that failed; `kind` and `retryable` go to the router verbatim."""

    def __init__(self, kind: str, message: str, retryable: bool):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable

    def wire(self) -> dict[str, Any]:
        return {"type": self.kind, "message": str(self), "retryable": self.retryable}


class PeerClosed(KVTransferError):
    """The peer closed or reset the connection (a stale pooled connection looks like this)."""

    def __init__(self, message: str):
        super().__init__("kv_unavailable", message, True)


def encode_json(kind: FrameType, obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj).encode()
    return HEADER.pack(int(kind), len(data)) + data


def encode_count(kind: FrameType, count: int, version: int = PROTOCOL_VERSION) -> bytes:
    """END or ACK: a fixed-size frame carrying the pull's layer bytes."""
    if version == LEGACY_VERSION:
        return encode_json(kind, {"bytes": count})
    return HEADER.pack(int(kind), BYTE_COUNT.size) + BYTE_COUNT.pack(count)


def _malformed(what: str, error: Exception) -> KVTransferError:
    return KVTransferError("kv_protocol", f"malformed KV {what}: {error}", False)


@dataclass(frozen=True)
class PullRequest:
    """What a decode worker asks of a KV port: a held cache's bytes, its slot runs in the port's
    shared pool (`shm`, a same-host peer that mapped it), or to free one it copied under its
    lease without asking (`copied`: not answered)."""

    handle: str
    request_id: str
    shm: bool = False
    copied: bool = False

    def encode(self, version: int = PROTOCOL_VERSION) -> bytes:
        return encode_request(self.handle, self.request_id, self.shm, self.copied, version)

    @classmethod
    def decode(cls, payload: bytes | bytearray, version: int = PROTOCOL_VERSION) -> PullRequest:
        return cls(*decode_request(payload, version))


def decode_request(payload: bytes | bytearray, version: int = PROTOCOL_VERSION) -> tuple[str, str, bool, bool]:
    """A REQUEST's payload as (handle, request id, shm, copied), checked as `PullRequest.decode`
    checks it, without the frozen object: the port reads one per pull on a thread woken cold,
    where making that object took a noticeable share of the wait before the reply."""
    if version == LEGACY_VERSION:
        obj = decode_json(payload)
        return (str(obj.get("handle", "")), str(obj.get("request_id", "")), bool(obj.get("shm")),
                obj.get("copied") is True)
    try:
        flags, length = _REQUEST.unpack_from(payload)
        start = _REQUEST.size
        if start + length > len(payload):
            raise ValueError(f"a handle of {length} bytes in a request of {len(payload)}")
        handle = payload[start:start + length].decode()
        request_id = payload[start + length:].decode()
    except (struct.error, ValueError) as error:
        raise _malformed("request", error) from None
    return handle, request_id, bool(flags & _SHM), bool(flags & _COPIED)


def encode_request(handle: str, request_id: str, shm: bool = False, copied: bool = False,
                   version: int = PROTOCOL_VERSION) -> bytes:
    """A `PullRequest`'s frame, made without the object: a pull makes one on its way to the
    socket, where on a vCPU woken cold every object and call counts (`kv.client`)."""
    if version == LEGACY_VERSION:
        legacy: dict[str, object] = {"handle": handle, "request_id": request_id}
        legacy |= {"shm": True} if shm else {}
        return encode_json(FrameType.REQUEST, legacy | ({"copied": True} if copied else {}))
    encoded = handle.encode()
    rest = _REQUEST.pack(_SHM * shm | _COPIED * copied, len(encoded)) + encoded + request_id.encode()
    return HEADER.pack(_REQUEST_TYPE, len(rest)) + rest


@dataclass(frozen=True)
class ReplyHeader:
    """The HEADER that answers a REQUEST: the cache's shape (full heads, whatever the sender's
    tensor size) and, for a same-host peer that asked, where its blocks lie in the shared pool
    (`runs`: (first slot, slots) pairs; empty: the layers follow on the stream)."""

    dtype: str
    layers: int
    tokens: int
    kv_heads: int
    head_dim: int
    runs: tuple[tuple[int, int], ...] = ()

    def encode(self, version: int = PROTOCOL_VERSION) -> bytes:
        if version == LEGACY_VERSION:
            legacy: dict[str, object] = {"dtype": self.dtype, "layers": self.layers,
                                         "shape": [2, self.tokens, self.kv_heads, self.head_dim]}
            return encode_json(FrameType.HEADER, legacy | ({"runs": [list(r) for r in self.runs]} if self.runs else {}))
        payload = _REPLY.pack(WIRE_DTYPES.index(self.dtype), self.layers, self.tokens, self.kv_heads,
                              self.head_dim, len(self.runs)) + b"".join(_RUN.pack(*run) for run in self.runs)
        return HEADER.pack(int(FrameType.HEADER), len(payload)) + payload

    @classmethod
    def decode(cls, payload: bytes | bytearray, version: int = PROTOCOL_VERSION) -> ReplyHeader:
        if version == LEGACY_VERSION:
            return cls._decode_legacy(decode_json(payload))
        try:
            code, layers, tokens, kv_heads, head_dim, count = _REPLY.unpack_from(payload)
            if len(payload) != _REPLY.size + count * _RUN.size:
                raise ValueError(f"{count} slot runs in a header of {len(payload)} bytes")
            if code >= len(WIRE_DTYPES):
                raise ValueError(f"unknown dtype code {code}")
            runs = tuple(_RUN.unpack_from(payload, _REPLY.size + i * _RUN.size) for i in range(count))
        except (struct.error, ValueError) as error:
            raise _malformed("header", error) from None
        return cls(WIRE_DTYPES[code], layers, tokens, kv_heads, head_dim, runs)

    @classmethod
    def _decode_legacy(cls, obj: dict[str, Any]) -> ReplyHeader:
        try:
            two, tokens, kv_heads, head_dim = (int(x) for x in obj["shape"])
            if two != 2:
                raise ValueError(f"shape {obj['shape']} is not K and V")
            runs = tuple((int(start), int(n)) for start, n in obj.get("runs", []))
            return cls(str(obj["dtype"]), int(obj["layers"]), tokens, kv_heads, head_dim, runs)
        except (KeyError, TypeError, ValueError) as error:
            raise _malformed("header", error) from None


def decode_json(payload: bytes | bytearray) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError as error:
        raise KVTransferError("kv_protocol", f"bad JSON in KV frame: {error}", False) from None
    if not isinstance(obj, dict):
        raise KVTransferError("kv_protocol", "KV control frame is not a JSON object", False)
    return obj


_TIMEVAL = struct.Struct("@ll")


def set_timeout(sock: socket.socket, seconds: float) -> None:
    """Make `sock` blocking, each read and write bounded by `seconds` (kernel-enforced)."""
    sock.settimeout(None)
    set_read_timeout(sock, seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))


def set_read_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound each read of a blocking `sock` by `seconds`; writes keep their bound. Why apart:
    a KV port waits for the next REQUEST under its idle timeout and sends under the frame
    timeout; switching only the read bound, and only off the path from REQUEST to reply, keeps
    three syscalls out of each pull's latency."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))


def make_blocking(sock: socket.socket) -> None:
    """Blocking again after a loop pull (the kernel timeouts `set_timeout` set still hold): a
    syscall only when it is needed."""
    if not sock.getblocking():
        sock.setblocking(True)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return _TIMEVAL.pack(whole, int((seconds - whole) * 1e6))


def _timeout_of(sock: socket.socket) -> float:
    timeout = sock.gettimeout()
    if timeout is not None:
        return timeout
    whole, micros = _TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.size))
    return whole + micros / 1e6


def translate(error: BaseException, sock: socket.socket) -> KVTransferError:
    # A kernel timeout (`set_timeout`) surfaces as EAGAIN, Python's own as TimeoutError.
    if isinstance(error, TimeoutError | BlockingIOError):
        return KVTransferError("kv_timeout", f"no KV data within {_timeout_of(sock):g} s", True)
    return PeerClosed(f"KV peer closed the stream: {error!r}")


def _consume(pending: list[memoryview], done: int) -> None:
    """Drop the first `done` bytes of the pending buffers (what one scatter/gather call moved)."""
    while done:
        head = pending[0]
        if done >= head.nbytes:
            done -= head.nbytes
            pending.pop(0)
        else:
            pending[0] = head[done:]
            done = 0


def recv_into_buffers(sock: socket.socket, buffers: Sequence[memoryview]) -> None:
    """Fill every buffer, in order (scatter-read: one syscall per up to IOV_MAX buffers, which on
    a blocking socket waits for all of them)."""
    pending = [b for b in buffers if b.nbytes]
    while pending:
        try:
            got = sock.recvmsg_into(pending[:IOV_MAX], 0, socket.MSG_WAITALL)[0]
        except OSError as error:
            raise translate(error, sock) from None
        if got == 0:
            raise PeerClosed("KV peer closed the stream mid-frame")
        _consume(pending, got)


def recv_exact(sock: socket.socket, size: int) -> bytearray:
    buf = bytearray(size)
    recv_into_buffers(sock, [memoryview(buf)])
    return buf


def send_buffers(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> None:
    """Send every buffer, in order, without joining them (gather-write), at most SOCKET_BUFFER
    bytes a call. Why the cap: with sender and receiver on their own cores (as pods are), a 12 MB
    reply sent as one `sendmsg` moved at 2.1-2.2 GB/s against raw TCP's 2.8-3.0; in calls of at
    most the socket buffer, 2.8-3.3 GB/s, on par (bench/kv_transfer.py --pin; smaller calls,
    0.25-0.5 MB, were slower again)."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        batch, size = [], 0
        for buffer in pending[:IOV_MAX]:
            batch.append(buffer)
            size += buffer.nbytes
            if size >= SOCKET_BUFFER:
                batch[-1] = buffer[:buffer.nbytes - (size - SOCKET_BUFFER)]
                break
        try:
            sent = sock.sendmsg(batch)
        except OSError as error:
            raise translate(error, sock) from None
        _consume(pending, sent)


def recv_frame_head(sock: socket.socket) -> tuple[FrameType, int]:
    """The next frame's type and payload length (the payload is not read)."""
    return frame_head(recv_exact(sock, HEADER.size))


def frame_head(head: bytes | bytearray) -> tuple[FrameType, int]:
    kind_value, length = HEADER.unpack(head)
    # A dict look-up rather than `FrameType(kind_value)`, whose Enum machinery is Python: on a
    # port thread woken cold it was a noticeable share of the wait between a REQUEST's arrival
    # and the reply (bench/kv_transfer.py, unpinned).
    kind = _FRAME_TYPES.get(kind_value)
    if kind is None:
        raise KVTransferError("kv_protocol", f"unknown KV frame type {kind_value}", False)
    return kind, length


def check_control(kind: FrameType, length: int, limit: int) -> None:
    if kind is FrameType.LAYER:
        raise KVTransferError("kv_protocol", "unexpected KV layer frame", False)
    if length > limit:
        raise KVTransferError("kv_protocol", f"KV {kind.name} frame of {length} bytes exceeds {limit}", False)


def recv_control(sock: socket.socket, limit: int = MAX_CONTROL_FRAME) -> tuple[FrameType, bytearray]:
    """One whole control frame; a LAYER frame or one longer than `limit` is refused unread."""
    kind, length = recv_frame_head(sock)
    check_control(kind, length, limit)
    return kind, recv_exact(sock, length)


class LoopStream:
    """The same framed stream read and written from an event loop, on the socket made
    non-blocking: each read takes what has arrived and waits for readability only when nothing
    has (no thread hand-off, no stream-reader buffer); each wait is bounded by `timeout`.

    Why a second way to drive the stream: a transfer thread costs two hand-offs per pull, and on a
    small host the woken thread can queue behind the very sender it waits for (a 1 MB pull on
    the 2-core bench host started receiving only once the whole send was done, bench/kv_transfer.py)."""

    def __init__(self, sock: socket.socket, timeout: float):
        self.sock = sock
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        if sock.getblocking():  # a syscall: made only when a transfer thread last used the socket
            sock.setblocking(False)

    async def wait_readable(self) -> None:
        ready = self._loop.create_future()
        fd = self.sock.fileno()
        self._loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            async with asyncio.timeout(self.timeout):
                await ready
        except TimeoutError:
            raise KVTransferError("kv_timeout", f"no KV data within {self.timeout:g} s", True) from None
        finally:
            self._loop.remove_reader(fd)

    async def recv_into(self, buffers: Sequence[memoryview]) -> None:
        pending = [b for b in buffers if b.nbytes]
        while pending:
            try:
                got = self.sock.recvmsg_into(pending[:IOV_MAX])[0]
            except (BlockingIOError, InterruptedError):
                await self.wait_readable()
                continue
            except OSError as error:
                raise translate(error, self.sock) from None
            if got == 0:
                raise PeerClosed("KV peer closed the stream mid-frame")
            _consume(pending, got)

    async def control(self, limit: int = MAX_CONTROL_FRAME) -> tuple[FrameType, bytearray]:
        head = bytearray(HEADER.size)
        await self.recv_into([memoryview(head)])
        kind, length = frame_head(head)
        check_control(kind, length, limit)
        payload = bytearray(length)
        await self.recv_into([memoryview(payload)])
        return kind, payload

    async def send(self, data: bytes) -> None:
        if not data:
            return
        try:
            # A REQUEST fits an idle socket's buffer: one non-blocking send, no timeout scope and no
            # loop round (those were ~0.1 ms of a ~1 ms 1 MB pull, bench/kv_transfer.py --pin).
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            raise translate(error, self.sock) from None
        if sent == len(data):
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self._loop.sock_sendall(self.sock, memoryview(data)[sent:])
        except TimeoutError:
            raise KVTransferError("kv_timeout", f"KV peer took no data within {self.timeout:g} s", True) from None
        except OSError as error:
            raise translate(error, self.sock) from None


def send_json(sock: socket.socket, kind: FrameType, obj: dict[str, Any]) -> None:
    send_buffers(sock, [encode_json(kind, obj)])


def raise_if_error(kind: FrameType, payload: bytearray) -> None:
    if kind is FrameType.ERROR:
        err = decode_json(payload)
        raise KVTransferError(str(err.get("type", "kv_unavailable")), str(err.get("message")),
                              bool(err.get("retryable", True)))
