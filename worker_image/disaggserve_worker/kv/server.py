"""The prefill side of the KV port: serves held caches to authenticated peers.

Each accepted connection gets a thread with a blocking socket (KV I/O stays off both the
event loop and the engine thread). Before the peer is trusted it can make the server read at
most `MAX_HANDSHAKE_FRAME` bytes, and it has `handshake_timeout` seconds to prove the worker
token; after that, control frames are bounded by `MAX_CONTROL_FRAME`. Nothing a peer sends is
buffered beyond those limits, so a hostile or broken client cannot grow this process.
Layers are sent with `sendmsg` straight from the pool's blocks (no gather copy) on a
single-shard CPU pool, as one gather-write prepared when the engine holds the cache
(`Engine.on_hold`), so a pull only sends it; other pools gather a layer with `KVPool.read` first.
Where `kv/kv_io.c` builds (`kv.native`), the control frames are read and the prepared reply is
sent in C: on a port thread woken cold, the Python between a REQUEST's arrival and the reply's
first byte was most of what delayed it. A protocol-3 REQUEST for a cache whose reply was
prepared is served wholly in C (`native.PortStep`: read it, take the cache from the port's
table by handle, send, wait for the ACK); Python then only releases the cache. Anything else
(flags, an unknown or expired handle, a cache another connection is sending, odd bytes) is
left to the Python path with the frame as read.
When the pool is in shared memory (`kv.shared_memory`), READY names its segment, and a peer that
mapped it asks with the `shm` flag: the reply is then the header with the held blocks' slot runs
and the end frame, no layers; the peer copies the blocks and ACKs, and the cache stays pinned
until then as for a TCP pull. A peer that copied a leased cache without asking (it knew the runs
from the prefill reply) sends a REQUEST flagged `copied` instead: the cache is freed, and
nothing is answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from disaggserve_worker.kv import auth, native
from disaggserve_worker.kv.framing import (
    HEADER,
    LAYER_INDEX,
    LEGACY_VERSION,
    MAX_CONTROL_FRAME,
    MAX_HANDSHAKE_FRAME,
    PROTOCOL_VERSION,
    SOCKET_BUFFER,
    VERSIONS,
    FrameType,
    KVTransferError,
    PeerClosed,
    ReplyHeader,
    decode_json,
    decode_request,
    encode_count,
    recv_control,
    send_buffers,
    send_json,
    set_read_timeout,
    set_timeout,
)
from disaggserve_worker.kv.layout import DTYPE_NAMES, PoolRegions, block_runs, regions_of
from disaggserve_worker.kv.native import PortStep, PortTable, frame_reader, gather

if TYPE_CHECKING:
    from disaggserve_worker.engine.engine import Engine, HeldCache

log = logging.getLogger(__name__)
_UNSET = object()


class KVServer:
    """Serves a prefill engine's held caches on the KV port."""

    def __init__(self, engine: Engine, frame_timeout: float = 30.0,
                 on_sent: Callable[[int, float], None] | None = None, token: str | object | None = _UNSET,
                 handshake_timeout: float = 5.0, idle_timeout: float = 300.0, max_connections: int = 64,
                 versions: tuple[int, ...] = VERSIONS):
        self.engine = engine
        self.versions = versions  # of the protocol this port speaks (`kv.framing.VERSIONS`)
        self.frame_timeout = frame_timeout
        self.on_sent = on_sent
        self.token: str | None = auth.worker_token() if token is _UNSET else token  # type: ignore[assignment]
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.port = 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closing = False
        self.accepted = 0  # connections admitted past the limit check (authenticated or not)
        self.shared_pulls = 0  # pulls answered with slot runs in the shared pool (same-host peers)
        self.copied_releases = 0  # caches a peer copied out of the shared pool without asking first
        self._regions: PoolRegions | None = None
        self._table: PortTable | None = None  # prepared replies the native step serves (`_prepare`)
        self.native_pulls = 0  # pulls served wholly in C (`native.PortStep`)

    @property
    def connections(self) -> int:
        """Open peer connections (what tests and load reports read)."""
        with self._lock:
            return len(self._conns)

    async def start(self, host: str, port: int) -> None:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, addr = infos[0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(addr)
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = int(listener.getsockname()[1])
        self._regions = regions_of(self.engine.kv_pool)
        if self._regions is not None:
            lib = native.library()
            self._table = PortTable(lib) if lib is not None else None
            self.engine.on_hold = self._prepare
        self._accept_thread = threading.Thread(target=self._accept_loop, name="kv-accept", daemon=True)
        self._accept_thread.start()

    async def stop(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop accepting, cut every connection (their held caches stay for a retry), join."""
        self._closing = True
        if self.engine.on_hold == self._prepare:
            self.engine.on_hold = None
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for thread in [self._accept_thread, *threads]:
            if thread is not None:
                thread.join(timeout=5)

    # ---- threads ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closing:
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: do not spin
                continue
            with self._lock:
                full = len(self._conns) >= self.max_connections
                if not full:
                    self._conns.add(conn)
                    self.accepted += 1
            if full:
                log.warning("KV port: refusing a connection beyond %d", self.max_connections)
                conn.close()
                continue
            thread = threading.Thread(target=self._serve, args=(conn,), name="kv-serve", daemon=True)
            with self._lock:
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            version = self._handshake(conn)
            if version is None:
                return
            set_timeout(conn, self.frame_timeout)  # every write from here on, and the wait for an ACK
            set_read_timeout(conn, self.idle_timeout)  # the wait for the next REQUEST
            read = frame_reader(conn)  # in C where it builds: see kv.native
            lib = native.library()
            # A REQUEST for a prepared reply wholly in C (the current protocol's replies are prepared)
            step = (PortStep(lib, self._table, conn, self.frame_timeout, self.idle_timeout)
                    if lib is not None and self._table is not None and version == PROTOCOL_VERSION else None)
            while not self._closing:
                if step is None:
                    kind, payload = read(MAX_CONTROL_FRAME)
                else:
                    status = step.run()
                    if status in (native.SENT, native.SEND_FAILED, native.ACK_FAILED):
                        self._finish_native(step, status)
                        continue
                    kind, payload = step.frame(status)  # the REQUEST left to Python (or its read's error)
                if kind is not FrameType.REQUEST:
                    raise KVTransferError("kv_protocol", f"expected a KV request, got {kind.name}", False)
                handle, _, shm, copied = decode_request(payload, version)
                self._serve_request(conn, handle, shm, copied, version, read)
        except PeerClosed:
            pass  # the peer is done with this connection (or died: its pull is retried)
        except KVTransferError as error:
            if error.kind != "kv_timeout":
                self._refuse(conn, error)
        except Exception:
            log.exception("KV port: connection failed")
        finally:
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(threading.current_thread())
            with contextlib.suppress(OSError):
                conn.close()

    def _handshake(self, conn: socket.socket) -> int | None:
        """The protocol version of an authenticated peer; None: refused or gone. HELLO names the
        oldest version this port speaks as `version` (a peer of version 2 checks only that) and
        all of them as `versions`; a newer peer names its choice in AUTH."""
        set_timeout(conn, self.handshake_timeout)
        nonce = auth.new_nonce()
        kind: FrameType | None = None
        proof: object = None
        chosen: object = LEGACY_VERSION  # what a peer of version 2, which names none, speaks
        send_json(conn, FrameType.HELLO, {"version": min(self.versions), "versions": list(self.versions),
                                          "nonce": nonce.hex(), "auth": self.token is not None})
        try:
            kind, payload = recv_control(conn, MAX_HANDSHAKE_FRAME)
            if kind is FrameType.AUTH:
                proof_frame = decode_json(payload)
                proof, chosen = proof_frame.get("mac"), proof_frame.get("version", LEGACY_VERSION)
        except KVTransferError as error:
            if error.kind == "kv_timeout" or isinstance(error, PeerClosed):
                return None
        if kind is not FrameType.AUTH or not auth.verify(self.token, nonce, proof):
            self._refuse(conn, KVTransferError(
                "kv_unauthorized", "the KV port needs the DisaggServe's worker token "
                f"({auth.ENV_WORKER_TOKEN}) proved in the first frame", False))
            return None
        if chosen not in self.versions:
            self._refuse(conn, KVTransferError(
                "kv_protocol", f"KV protocol version {chosen!r} is not one of this port's {list(self.versions)}: "
                "upgrade the older of the two worker images", False))
            return None
        segment = self.engine.kv_segment
        send_json(conn, FrameType.READY, {} if segment is None or self._regions is None else {"shm": segment.wire()})
        return int(chosen)  # type: ignore[call-overload]

    @staticmethod
    def _refuse(conn: socket.socket, error: KVTransferError) -> None:
        with contextlib.suppress(KVTransferError, OSError):
            set_timeout(conn, 1.0)
            send_json(conn, FrameType.ERROR, error.wire())

    def _serve_request(self, conn: socket.socket, handle: str, shm: bool, copied: bool, version: int,
                       read: Callable[[int], tuple[FrameType, bytearray]]) -> None:
        """One REQUEST (`framing.PullRequest`'s fields: the handle, and whether the peer asks for
        slot runs or says it copied the cache)."""
        if copied:  # a same-host peer copied it under its lease: free it
            if self.engine.release_held(handle):
                with self._lock:
                    self.copied_releases += 1
            return
        held = self.engine.pin_held(handle)
        if held is None:
            send_json(conn, FrameType.ERROR, KVTransferError(
                "kv_unavailable", f"KV cache {handle!r} is unknown or expired (TTL); run the prefill again",
                True).wire())
            return
        delivered = False
        try:
            start = time.perf_counter()
            shared = shm and self.engine.kv_segment is not None and self._regions is not None
            sent = self._send_runs(conn, held, version) if shared else self._send(conn, held, version)
            set_read_timeout(conn, self.frame_timeout)  # the reply is out: the ACK is due within a frame's time
            try:
                kind, _ = read(MAX_CONTROL_FRAME)
            finally:
                set_read_timeout(conn, self.idle_timeout)
            delivered = kind is FrameType.ACK
            if delivered and shared:
                with self._lock:
                    self.shared_pulls += 1
            if delivered and self.on_sent:
                self.on_sent(sent, time.perf_counter() - start)
        finally:
            self.engine.unpin_held(handle, release=delivered)

    def _finish_native(self, step: PortStep, status: int) -> None:
        """After a step that took a cache (`native.PortStep.run`): release it if the peer ACKed,
        else make it takeable again, and raise what failed."""
        delivered = False
        try:
            if status != native.SENT:
                raise step.failure(status)
            kind, _ = step.ack()  # an unknown frame kind raises, as on the Python path
            delivered = kind is FrameType.ACK
        finally:
            held = self.engine.finish_native(step.handle(), release=delivered)
        if delivered:
            with self._lock:
                self.native_pulls += 1
            if self.on_sent and held is not None:
                self.on_sent(held.wire[1], step.elapsed)  # type: ignore[index]

    def _prepare(self, held: HeldCache) -> None:
        """Build a held cache's whole reply (on the engine thread, as it holds the cache): on a
        pull the port then only sends it. Built on the pull instead, on a port thread woken from
        idle, it took ~0.5 ms of a ~2 ms 1 MB pull (bench/kv_transfer.py). Where the C code builds,
        the reply goes into the port's table under the handle, for `native.PortStep` to serve."""
        buffers, sent = self._direct_reply(held)
        prepared = gather(buffers)  # sent in C where it builds (`kv.native`)
        held.wire = buffers, sent, prepared
        if prepared is not None and self._table is not None:
            held.native = self._table.register(held.handle, prepared, held.expires_at)

    def _direct_reply(self, held: HeldCache, version: int = PROTOCOL_VERSION) -> tuple[list[bytes | memoryview], int]:
        """The reply as one gather-write from the pool's blocks (HEADER, each layer's frame head and
        K then V regions, END), and its layer bytes."""
        assert self._regions is not None
        pool = self.engine.kv_pool
        tokens = held.num_tokens
        layer_bytes = 2 * tokens * pool.kv_heads * pool.head_dim * pool.dtype.itemsize
        runs = block_runs(held.blocks, self.engine.allocator.block_size, tokens)
        buffers: list[bytes | memoryview] = [self._header(held, version)]
        for layer in range(len(pool)):
            buffers += [_layer_head(layer, layer_bytes), *self._regions.layer_regions(layer, runs)]
        buffers.append(encode_count(FrameType.END, layer_bytes * len(pool), version))
        return buffers, layer_bytes * len(pool)

    def _header(self, held: HeldCache, version: int, runs: list[tuple[int, int]] | None = None) -> bytes:
        # Full-head layers on the wire whatever this worker's tensor size: a receiver of another
        # tensor size splits them its own way.
        pool = self.engine.kv_pool
        return ReplyHeader(DTYPE_NAMES[pool.dtype], len(pool), held.num_tokens, pool.kv_heads, pool.head_dim,
                           tuple(runs or ())).encode(version)

    def _send_runs(self, conn: socket.socket, held: HeldCache, version: int) -> int:
        """A same-host pull: where the held blocks lie in the shared pool, for the peer to copy."""
        pool = self.engine.kv_pool
        tokens = held.num_tokens
        layer_bytes = 2 * tokens * pool.kv_heads * pool.head_dim * pool.dtype.itemsize
        header = self._header(held, version, block_runs(held.blocks, self.engine.allocator.block_size, tokens))
        if len(header) > MAX_CONTROL_FRAME:  # too scattered to list in one control frame: send the bytes
            return self._send(conn, held, version)
        send_buffers(conn, [header, encode_count(FrameType.END, layer_bytes * len(pool), version)])
        return layer_bytes * len(pool)

    def _send(self, conn: socket.socket, held: HeldCache, version: int) -> int:
        if self._regions is not None:
            prepared = held.wire if version == PROTOCOL_VERSION else None  # built for the current version
            if prepared is not None:
                buffers, sent, native_gather = prepared  # type: ignore[misc]
            else:
                (buffers, sent), native_gather = self._direct_reply(held, version), None
            if native_gather is not None:
                native_gather.send(conn)
            else:
                send_buffers(conn, buffers)
            return sent  # type: ignore[no-any-return]
        pool = self.engine.kv_pool  # sharded or on a GPU: gather each layer first
        tokens = held.num_tokens
        layer_bytes = 2 * tokens * pool.kv_heads * pool.head_dim * pool.dtype.itemsize
        send_buffers(conn, [self._header(held, version)])
        slots = held.slot_table[:tokens]
        for layer in range(len(pool)):
            gathered = pool.read(layer, slots, torch.device("cpu")).contiguous()
            send_buffers(conn, [_layer_head(layer, layer_bytes),
                                memoryview(gathered.view(torch.uint8).reshape(-1).numpy())])
        send_buffers(conn, [encode_count(FrameType.END, layer_bytes * len(pool), version)])
        return layer_bytes * len(pool)


def _layer_head(layer: int, layer_bytes: int) -> bytes:
    return HEADER.pack(int(FrameType.LAYER), LAYER_INDEX.size + layer_bytes) + LAYER_INDEX.pack(layer)
