"""The decode side of the KV port: pulls over persistent, authenticated connections.

One connection per peer is kept open between pulls (a second one opens only while the first
is busy), so a pull costs one round trip, not a TCP and authentication handshake. The pull
runs on the event loop over a non-blocking socket: layers are scatter-read (`recvmsg_into`)
straight into the reserved pool blocks (`PoolSink.targets`), never through a stream
buffer. Why not a thread: on a loaded host every thread handoff costs a scheduler slice, and
a 1 MB pull on loopback is shorter than one.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass, field

import torch

from disaggserve_worker.kv import auth
from disaggserve_worker.kv.framing import (
    HEADER,
    IOV_MAX,
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
)
from disaggserve_worker.kv.layout import DTYPES, KVLayout, LayerSink, PoolSink, TransferStats

_UNSET = object()


def split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise KVTransferError("kv_bad_address", f"KV address {address!r} is not host:port", False)
    return host.strip("[]"), int(port)


@dataclass
class _Connection:
    """A non-blocking socket on the event loop, with the framing reads the pull needs."""

    sock: socket.socket
    address: str
    timeout: float
    last_used: float = field(default_factory=time.monotonic)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    async def _readable(self) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.sock.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            async with asyncio.timeout(self.timeout):
                await ready
        except TimeoutError:
            raise KVTransferError("kv_timeout", f"no KV data within {self.timeout:g} s", True) from None
        finally:
            loop.remove_reader(fd)

    async def recv_into(self, buffers: list[memoryview]) -> None:
        """Fill every buffer in order (scatter-read; waits on the loop only when nothing is queued)."""
        pending = [b for b in buffers if b.nbytes]
        while pending:
            try:
                got = self.sock.recvmsg_into(pending[:IOV_MAX])[0]
            except BlockingIOError:
                await self._readable()
                continue
            except OSError as error:
                raise PeerClosed(f"KV peer closed the stream: {error!r}") from None
            if got == 0:
                raise PeerClosed("KV peer closed the stream mid-frame")
            while got:
                head = pending[0]
                if got >= head.nbytes:
                    got -= head.nbytes
                    pending.pop(0)
                else:
                    pending[0] = head[got:]
                    got = 0

    async def recv_exact(self, size: int) -> bytearray:
        buf = bytearray(size)
        await self.recv_into([memoryview(buf)])
        return buf

    async def recv_head(self) -> tuple[FrameType, int]:
        kind_value, length = HEADER.unpack(await self.recv_exact(HEADER.size))
        try:
            return FrameType(kind_value), length
        except ValueError:
            raise KVTransferError("kv_protocol", f"unknown KV frame type {kind_value}", False) from None

    async def recv_control(self, limit: int = MAX_CONTROL_FRAME) -> tuple[FrameType, bytearray]:
        kind, length = await self.recv_head()
        if kind is FrameType.LAYER:
            raise KVTransferError("kv_protocol", "unexpected KV layer frame", False)
        if length > limit:
            raise KVTransferError("kv_protocol", f"KV {kind.name} frame of {length} bytes exceeds {limit}", False)
        return kind, await self.recv_exact(length)

    async def send(self, data: bytes) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.get_running_loop().sock_sendall(self.sock, data)
        except TimeoutError:
            raise KVTransferError("kv_timeout", f"KV peer took no data within {self.timeout:g} s", True) from None
        except OSError as error:
            raise PeerClosed(f"KV peer closed the stream: {error!r}") from None


class TcpKVTransport:
    """Pull KV caches from prefill workers' KV ports (see `kv.framing` for the protocol)."""

    def __init__(self, connect_timeout: float = 5.0, frame_timeout: float = 30.0,
                 token: str | object | None = _UNSET, idle_seconds: float = 60.0):
        self.connect_timeout = connect_timeout
        self.frame_timeout = frame_timeout
        self.token: str | None = auth.worker_token() if token is _UNSET else token  # type: ignore[assignment]
        self.idle_seconds = idle_seconds
        self._idle: dict[str, list[_Connection]] = {}

    async def pull(self, address: str, handle: str, request_id: str, expect: KVLayout,
                   sink: LayerSink | PoolSink) -> TransferStats:
        """Pull `handle` into `sink`. Runs on the caller's loop: once it returns or raises
        (cancellation included) nothing writes into the sink any more."""
        start = time.perf_counter()
        for attempt in range(2):
            conn, reused = await self._checkout(address)
            try:
                total, tokens = await self._transfer(conn, handle, request_id, expect, sink,
                                                     may_be_stale=reused and attempt == 0)
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
        conn = _Connection(sock, address, self.frame_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            kind, payload = await conn.recv_control(MAX_HANDSHAKE_FRAME)
            raise_if_error(kind, payload)
            if kind is not FrameType.HELLO:
                raise KVTransferError("kv_protocol", f"expected the KV port's HELLO, got {kind.name} "
                                      "(a worker of another version?)", False)
            hello = decode_json(payload)
            if hello.get("version") != PROTOCOL_VERSION:
                raise KVTransferError("kv_protocol", f"KV protocol version {hello.get('version')} is not "
                                      f"{PROTOCOL_VERSION}: run the same worker image on both sides", False)
            nonce = bytes.fromhex(str(hello.get("nonce", "")))
            await conn.send(encode_json(FrameType.AUTH, {"mac": auth.prove(self.token, nonce)}))
            kind, payload = await conn.recv_control(MAX_HANDSHAKE_FRAME)
            raise_if_error(kind, payload)
            if kind is not FrameType.READY:
                raise KVTransferError("kv_protocol", f"expected READY, got {kind.name}", False)
        except ValueError as error:
            conn.close()
            raise KVTransferError("kv_protocol", f"malformed KV handshake: {error!r}", False) from None
        except BaseException:
            conn.close()
            raise
        return conn

    # ---- one pull --------------------------------------------------------------------------
    async def _transfer(self, conn: _Connection, handle: str, request_id: str, expect: KVLayout,
                        sink: LayerSink | PoolSink, may_be_stale: bool) -> tuple[int, int]:
        try:
            await conn.send(encode_json(FrameType.REQUEST, {"handle": handle, "request_id": request_id}))
            kind, payload = await conn.recv_control()
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
            await self._receive_direct(conn, expect, sink, tokens, layer_bytes)
        else:
            await self._receive_staged(conn, expect, sink, tokens, layer_bytes)
        kind, payload = await conn.recv_control()
        raise_if_error(kind, payload)
        if kind is not FrameType.END:
            raise KVTransferError("kv_protocol", f"expected the KV end frame, got {kind.name}", False)
        await conn.send(encode_json(FrameType.ACK, {"bytes": layer_bytes * expect.layers}))
        return layer_bytes * expect.layers, tokens

    @staticmethod
    async def _receive_direct(conn: _Connection, expect: KVLayout, sink: PoolSink, tokens: int,
                              layer_bytes: int) -> None:
        """Each layer frame (head, index, K and V blocks) in one scatter-read straight into the
        reserved blocks. After the header only layer frames may come, each of exactly the size
        just checked, so the read is bounded by the reservation; a frame head that turns out
        wrong fails the pull (the caller frees the reservation it wrote into)."""
        head = bytearray(HEADER.size + LAYER_INDEX.size)
        want = (int(FrameType.LAYER), LAYER_INDEX.size + layer_bytes)
        for expected_layer in range(expect.layers):
            await conn.recv_into([memoryview(head), *sink.targets(expected_layer, tokens)])
            kind, length = HEADER.unpack_from(head)
            (layer,) = LAYER_INDEX.unpack_from(head, HEADER.size)
            if (kind, length) != want or layer != expected_layer:
                raise KVTransferError("kv_protocol", f"bad KV frame (type {kind}, {length} bytes, layer {layer}) "
                                      f"where layer {expected_layer} of {layer_bytes} bytes was due", False)

    @staticmethod
    async def _receive_staged(conn: _Connection, expect: KVLayout, sink: LayerSink | PoolSink, tokens: int,
                              layer_bytes: int) -> None:
        """Through one staging tensor (pools split over shards or on a GPU, plain callbacks):
        each frame head is checked before its payload is read."""
        staging: torch.Tensor | None = None
        for expected_layer in range(expect.layers):
            kind, length = await conn.recv_head()
            if kind is FrameType.ERROR:
                raise_if_error(kind, await conn.recv_exact(min(length, MAX_CONTROL_FRAME)))
            if kind is not FrameType.LAYER or length != LAYER_INDEX.size + layer_bytes:
                raise KVTransferError("kv_protocol", f"bad KV frame {kind.name} of {length} bytes where layer "
                                      f"{expected_layer} of {layer_bytes} bytes was due", False)
            (layer,) = LAYER_INDEX.unpack(await conn.recv_exact(LAYER_INDEX.size))
            if layer != expected_layer:
                raise KVTransferError("kv_protocol", f"KV layer {layer} arrived where {expected_layer} "
                                      "was due", False)
            if staging is None:  # one buffer for every layer, sized from the checked header
                staging = torch.empty(2, tokens, expect.kv_heads, expect.head_dim, dtype=expect.dtype)
            await conn.recv_into([memoryview(staging.view(torch.uint8).reshape(-1).numpy())])
            if expect.on_gpu and layer_bytes >= 1 << 20:  # host-to-device: keep the loop free
                await asyncio.to_thread(sink, layer, staging)
            else:
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
