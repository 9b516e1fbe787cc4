"""The decode side of the KV port: pulls over persistent, authenticated connections.

One connection per peer is kept open between pulls (a second one opens only while the first
is busy) and authenticated once, when it opens; a pull then costs one round trip: REQUEST out,
HEADER + layers + END back in one stream, ACK out.

The event loop opens the TCP connection (which it can cancel) and sends the REQUEST without
blocking; the rest of the exchange runs as one call on a transfer thread over a blocking socket
(`framing.set_timeout`): one hand-off from the loop and one back, however many frames the
transfer takes, and the hand-off overlaps the prefill worker preparing its reply. Each layer is
scatter-read (`recvmsg_into`) straight into the reserved pool blocks (`PoolSink.targets`).
Why not on the event loop: there every partial read of a layer is a readiness callback, a
future and a task step, and a 1 MB pull on loopback arrives in a dozen or more pieces; on the
2-core bench host that put the event-loop pull at 0.38x raw TCP (`bench/kv_transfer.py`).
A cancelled pull shuts its socket down, which ends the blocked read at once, and waits for
the thread: once `pull` returns or raises, nothing writes into the sink any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from disaggserve_worker.kv import auth
from disaggserve_worker.kv.framing import (
    HEADER,
    LAYER_INDEX,
    MAX_CONTROL_FRAME,
    MAX_HANDSHAKE_FRAME,
    PROTOCOL_VERSION,
    SOCKET_BUFFER,
    FrameType,
    KVTransferError,
    PeerClosed,
    decode_json,
    encode_json,
    raise_if_error,
    recv_control,
    recv_exact,
    recv_frame_head,
    recv_into_buffers,
    send_buffers,
    send_json,
    set_timeout,
)
from disaggserve_worker.kv.layout import DTYPES, KVLayout, LayerSink, PoolSink, TransferStats

_UNSET = object()
_T = TypeVar("_T")


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise KVTransferError("kv_bad_address", f"KV address {address!r} is not host:port", False)
    return host.strip("[]"), int(port)


@dataclass
class _Connection:
    """A connected socket (blocking with a per-read timeout) and whether it is authenticated."""

    sock: socket.socket
    address: str
    authenticated: bool = False
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send_now(self, data: bytes) -> int:
        """Send what the socket takes without waiting (from the event loop); bytes sent. An error
        is left for the transfer thread, whose send or read meets it again and reports it."""
        try:
            return self.sock.send(data, socket.MSG_DONTWAIT)
        except OSError:
            return 0

    def abort(self) -> None:
        """End a read or write blocked on another thread now (it sees the peer as gone)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class TcpKVTransport:
    """Pull KV caches from prefill workers' KV ports (see `kv.framing` for the protocol)."""

    def __init__(self, connect_timeout: float = 5.0, frame_timeout: float = 30.0,
                 token: str | object | None = _UNSET, idle_seconds: float = 60.0, max_threads: int = 32):
        self.connect_timeout = connect_timeout
        self.frame_timeout = frame_timeout
        self.token: str | None = auth.worker_token() if token is _UNSET else token  # type: ignore[assignment]
        self.idle_seconds = idle_seconds
        self.max_threads = max_threads
        self._idle: dict[str, list[_Connection]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    async def pull(self, address: str, handle: str, request_id: str, expect: KVLayout,
                   sink: LayerSink | PoolSink) -> TransferStats:
        """Pull `handle` into `sink`. Once it returns or raises (cancellation included) nothing
        writes into the sink any more."""
        start = time.perf_counter()
        for attempt in range(2):
            conn, reused = await self._checkout(address)
            request = encode_json(FrameType.REQUEST, {"handle": handle, "request_id": request_id})
            sent = conn.send_now(request) if conn.authenticated else 0
            exchange = functools.partial(self._exchange, conn, request[sent:], expect, sink,
                                         may_be_stale=reused and attempt == 0)
            try:
                total, tokens = await self._on_thread(conn, exchange)
            except _Stale:
                conn.close()
                continue  # the peer had closed the pooled connection: once more on a fresh one
            except _Refused:
                self._checkin(conn)  # a refused request leaves the stream in step
                raise
            except BaseException:
                conn.close()
                raise
            self._checkin(conn)
            return TransferStats(total, time.perf_counter() - start, tokens)
        raise KVTransferError("kv_unavailable", f"KV port {address} closed the connection", True)

    def close(self) -> None:
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    # ---- threads -----------------------------------------------------------------------------
    async def _on_thread(self, conn: _Connection, job: Callable[[], _T]) -> _T:
        """Run `job` (which uses `conn`) on a transfer thread; on cancellation, cut `conn` and
        wait until the job has stopped before letting the cancellation through."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_threads, thread_name_prefix="kv-pull")
            executor = self._executor
        future = asyncio.get_running_loop().run_in_executor(executor, job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            conn.abort()
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # retrieved: the cancellation is what the caller sees
            raise

    # ---- connections -----------------------------------------------------------------------
    async def _checkout(self, address: str) -> tuple[_Connection, bool]:
        now = time.monotonic()
        conns = self._idle.get(address, [])
        while conns:
            conn = conns.pop()
            if now - conn.last_used < self.idle_seconds:
                return conn, True
            conn.close()
        return await self._connect(address), False

    def _checkin(self, conn: _Connection) -> None:
        conn.last_used = time.monotonic()
        self._idle.setdefault(conn.address, []).append(conn)

    async def _connect(self, address: str) -> _Connection:
        """Open the TCP connection on the loop (cancellable); the handshake runs on the transfer
        thread with the first pull."""
        host, port = split_address(address)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                family, _, _, _, addr = infos[0]
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)  # before connect: window scale
                try:
                    await loop.sock_connect(sock, addr)
                except BaseException:
                    sock.close()
                    raise
        except (TimeoutError, OSError) as error:
            raise KVTransferError("kv_unavailable", f"cannot reach KV port {address}: {error!r}", True) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        set_timeout(sock, self.frame_timeout)  # blocking from here on, each read and write bounded
        return _Connection(sock, address)

    def _handshake(self, conn: _Connection) -> None:
        sock = conn.sock
        try:
            kind, payload = recv_control(sock, MAX_HANDSHAKE_FRAME)
            raise_if_error(kind, payload)
            if kind is not FrameType.HELLO:
                raise KVTransferError("kv_protocol", f"expected the KV port's HELLO, got {kind.name} "
                                      "(a worker of another version?)", False)
            hello = decode_json(payload)
            if hello.get("version") != PROTOCOL_VERSION:
                raise KVTransferError("kv_protocol", f"KV protocol version {hello.get('version')} is not "
                                      f"{PROTOCOL_VERSION}: run the same worker image on both sides", False)
            nonce = bytes.fromhex(str(hello.get("nonce", "")))
            send_json(sock, FrameType.AUTH, {"mac": auth.prove(self.token, nonce)})
            kind, payload = recv_control(sock, MAX_HANDSHAKE_FRAME)
            raise_if_error(kind, payload)
            if kind is not FrameType.READY:
                raise KVTransferError("kv_protocol", f"expected READY, got {kind.name}", False)
        except ValueError as error:
            raise KVTransferError("kv_protocol", f"malformed KV handshake: {error!r}", False) from None
        conn.authenticated = True

    # ---- one pull (on a transfer thread) -----------------------------------------------------
    def _exchange(self, conn: _Connection, unsent: bytes, expect: KVLayout, sink: LayerSink | PoolSink,
                  may_be_stale: bool) -> tuple[int, int]:
        """One pull on a transfer thread: the handshake on a new connection, whatever of the
        REQUEST frame the loop did not send, then the reply."""
        sock = conn.sock
        if not conn.authenticated:
            self._handshake(conn)
        try:
            send_buffers(sock, [unsent])
            kind, payload = recv_control(sock)
        except PeerClosed:
            if may_be_stale:
                raise _Stale() from None
            raise
        if kind is FrameType.ERROR:
            err = decode_json(payload)
            raise _Refused(str(err.get("type", "kv_unavailable")), str(err.get("message")),
                           bool(err.get("retryable", True)))
        if kind is not FrameType.HEADER:
            raise KVTransferError("kv_protocol", f"expected a KV header, got {kind.name}", False)
        tokens = self._check_header(decode_json(payload), expect, sink)
        layer_bytes = expect.layer_bytes(tokens)
        if isinstance(sink, PoolSink) and sink.direct:
            self._receive_direct(sock, expect, sink, tokens, layer_bytes)
        else:
            self._receive_staged(sock, expect, sink, tokens, layer_bytes)
        kind, payload = recv_control(sock)
        raise_if_error(kind, payload)
        if kind is not FrameType.END:
            raise KVTransferError("kv_protocol", f"expected the KV end frame, got {kind.name}", False)
        send_json(sock, FrameType.ACK, {"bytes": layer_bytes * expect.layers})
        return layer_bytes * expect.layers, tokens

    @staticmethod
    def _receive_direct(sock: socket.socket, expect: KVLayout, sink: PoolSink, tokens: int,
                        layer_bytes: int) -> None:
        """Each layer frame (head, index, K and V blocks) in one scatter-read straight into the
        reserved blocks. After the header only layer frames may come, each of exactly the size
        just checked, so the read is bounded by the reservation; a frame head that turns out
        wrong fails the pull (the caller frees the reservation it wrote into)."""
        head = bytearray(HEADER.size + LAYER_INDEX.size)
        want = (int(FrameType.LAYER), LAYER_INDEX.size + layer_bytes)
        for expected_layer in range(expect.layers):
            recv_into_buffers(sock, [memoryview(head), *sink.targets(expected_layer, tokens)])
            kind, length = HEADER.unpack_from(head)
            (layer,) = LAYER_INDEX.unpack_from(head, HEADER.size)
            if (kind, length) != want or layer != expected_layer:
                raise KVTransferError("kv_protocol", f"bad KV frame (type {kind}, {length} bytes, layer {layer}) "
                                      f"where layer {expected_layer} of {layer_bytes} bytes was due", False)

    @staticmethod
    def _receive_staged(sock: socket.socket, expect: KVLayout, sink: LayerSink | PoolSink, tokens: int,
                        layer_bytes: int) -> None:
        """Through one staging tensor (pools split over shards or on a GPU, plain callbacks):
        each frame head is checked before its payload is read."""
        staging: torch.Tensor | None = None
        for expected_layer in range(expect.layers):
            kind, length = recv_frame_head(sock)
            if kind is FrameType.ERROR:
                raise_if_error(kind, recv_exact(sock, min(length, MAX_CONTROL_FRAME)))
            if kind is not FrameType.LAYER or length != LAYER_INDEX.size + layer_bytes:
                raise KVTransferError("kv_protocol", f"bad KV frame {kind.name} of {length} bytes where layer "
                                      f"{expected_layer} of {layer_bytes} bytes was due", False)
            (layer,) = LAYER_INDEX.unpack(recv_exact(sock, LAYER_INDEX.size))
            if layer != expected_layer:
                raise KVTransferError("kv_protocol", f"KV layer {layer} arrived where {expected_layer} "
                                      "was due", False)
            if staging is None:  # one buffer for every layer, sized from the checked header
                staging = torch.empty(2, tokens, expect.kv_heads, expect.head_dim, dtype=expect.dtype)
            recv_into_buffers(sock, [memoryview(staging.view(torch.uint8).reshape(-1).numpy())])
            sink(layer, staging)

    @staticmethod
    def _check_header(header: dict[str, object], expect: KVLayout, sink: LayerSink | PoolSink) -> int:
        try:
            shape = [int(x) for x in header["shape"]]  # type: ignore[attr-defined]
            dtype = DTYPES.get(str(header["dtype"]))
            layers = int(header["layers"])  # type: ignore[call-overload]
        except (KeyError, ValueError, TypeError) as error:
            raise KVTransferError("kv_protocol", f"malformed KV header: {error!r}", False) from None
        if (dtype != expect.dtype or layers != expect.layers or len(shape) != 4 or shape[0] != 2
                or shape[2:] != [expect.kv_heads, expect.head_dim]):
            raise KVTransferError(
                "kv_mismatch", f"KV cache of {header} does not fit this worker ({expect}); prefill and "
                "decode must serve the same model and dtype", False)
        tokens = shape[1]
        limit = min(expect.max_tokens, sink.capacity) if isinstance(sink, PoolSink) else expect.max_tokens
        if not 0 < tokens <= limit:
            raise KVTransferError("kv_mismatch", f"KV cache of {tokens} tokens does not fit the {limit} "
                                  "this worker reserved (model length or reservation)", False)
        return tokens


class _Stale(Exception):
    """A pooled connection the peer had already closed."""


class _Refused(KVTransferError):
    """The server answered a request with ERROR (unknown handle...): the connection stays usable."""
