"""The decode side of the KV port: pulls over persistent, authenticated connections.

One connection per peer is kept open between pulls (a second one opens only while the first
is busy) and authenticated once, when it opens; a pull then costs one round trip: REQUEST out,
HEADER + layers + END back in one stream, ACK out.

Two ways to drive the same frames, chosen per pull:
- On the event loop (`framing.LoopStream`), for a pooled connection pulling into a direct pool
  sink of up to LOOP_MAX_BYTES (16 MB: a long prompt's cache on a small model): each read takes what has arrived,
  every layer and the END are scatter-read (`recvmsg_into`, `_DirectReply`) straight into the
  reserved pool blocks, and the ACK
  goes out right after the pull has returned (`_acknowledge`). The REQUEST goes out before any
  other Python of the pull, and where `kv/kv_io.c` builds, the reply is read in C (`kv.native`:
  header, checks, scatter targets and reads in one call per wake-up); Python's path reads any
  reply the C code declines, and every reply when it cannot build. No thread hand-off: on the 2-core
  bench host the transfer thread woken for a 1 MB pull queued behind the very sender it waited
  for and started reading only once the whole send was done (bench/kv_transfer.py: 0.44x raw
  TCP before, 0.76x after, with the prefill side's reply prepared in advance).
- On a transfer thread over a blocking socket (`framing.set_timeout`) for everything else: the
  handshake of a new connection, larger caches (one blocking `MSG_WAITALL` scatter-read of
  every layer instead of a readiness wake-up per arriving piece), and staged sinks (pools split over shards
  or on a GPU, plain callbacks). The loop opens the TCP connection (cancellable) and sends the
  REQUEST without blocking; a cancelled pull shuts the socket down, which ends the blocked read
  at once, and waits for the thread.
Either way, once `pull` returns or raises (cancellation included) nothing writes into the sink
any more, and the ACK goes out from the loop right after `pull` has returned (`_acknowledge`).

Same host (`kv.shared_memory`): when the port's READY names a shared-memory segment that this
process can map and check, pulls into direct sinks ask for slot runs instead of bytes and copy
the blocks out of the mapping (on the loop or the transfer thread, by size, as above). A peer
whose segment cannot be mapped (another host, another user) is pulled over TCP as before.
When the decode request also says where the held blocks lie and under which lease (`kv.shm`
in the prefill reply) and this process has that peer's segment mapped, the pull copies them
without asking first, checks the lease afterwards and tells the port it may free the cache
after returning (a REQUEST flagged `copied`, which the port does not answer): no round
trip to the prefill worker's port thread, which was most of a 1 MB same-host pull (0.47 of
0.9 ms with sender and receiver on their own cores, bench/kv_transfer.py --pin). If the lease
has gone (expired, released) the pull asks the port as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from disaggserve_worker.kv import auth, native
from disaggserve_worker.kv.framing import (
    BYTE_COUNT,
    COUNT_FRAME_SIZE,
    HEADER,
    LAYER_HEAD_SIZE,
    LAYER_INDEX,
    LEGACY_VERSION,
    MAX_CONTROL_FRAME,
    MAX_HANDSHAKE_FRAME,
    PROTOCOL_VERSION,
    SOCKET_BUFFER,
    VERSIONS,
    FrameType,
    KVTransferError,
    LoopStream,
    PeerClosed,
    PullRequest,
    ReplyHeader,
    check_control,
    decode_json,
    encode_count,
    encode_request,
    frame_head,
    make_blocking,
    raise_if_error,
    recv_control,
    recv_exact,
    recv_frame_head,
    recv_into_buffers,
    send_buffers,
    send_json,
    set_timeout,
    translate,
)
from disaggserve_worker.kv.layout import DTYPES, KVLayout, LayerSink, PoolSink, TransferStats
from disaggserve_worker.kv.native import NativePull
from disaggserve_worker.kv.shared_memory import (
    COPY_BEFORE_CHECK,
    HeldLocation,
    SegmentInfo,
    SegmentReader,
    copy_regions,
)

log = logging.getLogger(__name__)
_UNSET = object()
# Pulls into reservations of up to this size are read on the event loop, larger ones on a transfer
# thread (one blocking read per layer instead of a readiness wake-up per arriving piece), over TCP
# and through shared memory alike. Why 16 MB: with the loop's reads in C (`kv.native`) a 12 MB pull
# read on the loop took 4.6-4.7 ms against 4.7-6.2 on a thread with sender and receiver pinned to
# their own cores (1.12x raw TCP against 0.86-1.00x), and 5.2-6.3 against 6.6-7.2 ms unpinned
# (bench/kv_transfer.py, the two interleaved on one trace); with the loop's reads in Python the
# thread had won (8.4-9.7 ms on the loop, 7.8-8.8 on a thread). Through shared memory a pull is a
# memcpy (~14 GB/s: 0.9 ms for 12 MB); on a thread a 12 MB same-host pull took 3.1 ms, most of it
# the hand-off (--pin). Past this size a pull's wake-ups would crowd the loop's other work.
LOOP_MAX_BYTES = 16 << 20
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
    segment: SegmentReader | None = None  # the peer's pool, mapped (same host)
    version: int = PROTOCOL_VERSION  # of the frames, settled by the handshake
    ack: int | None = None  # the last pull's bytes, its ACK not sent yet: it goes out before anything else
    native: NativePull | None = None  # the native reply reader, made on the first loop pull

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
                 token: str | object | None = _UNSET, idle_seconds: float = 60.0, max_threads: int = 32,
                 shared_memory: bool = True, versions: tuple[int, ...] = VERSIONS):
        self.connect_timeout = connect_timeout
        self.versions = versions  # of the protocol this side speaks; the newest both sides know is used
        self.frame_timeout = frame_timeout
        self.token: str | None = auth.worker_token() if token is _UNSET else token  # type: ignore[assignment]
        self.idle_seconds = idle_seconds
        self.max_threads = max_threads
        self.shared_memory = shared_memory  # map same-host peers' segments (False: always TCP)
        self._segments: dict[str, SegmentReader] = {}  # by segment id, shared by a peer's connections
        self._segment_of: dict[str, str] = {}  # peer address -> the id of the segment it announced
        self._segments_lock = threading.Lock()
        self._idle: dict[str, list[_Connection]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._closed = False
        self._notices: set[asyncio.Task[None]] = set()  # "copied" notices still being sent
        self.copied_pulls = 0  # pulls served by copying a leased cache without asking first
        self._loop_pulls = 0  # native loop pulls in flight
        self._loop_limits: tuple[KVLayout, int] | None = None  # `_loop_tokens`

    async def pull(self, address: str, handle: str, request_id: str, expect: KVLayout,
                   sink: LayerSink | PoolSink, shared: HeldLocation | None = None) -> TransferStats:
        """Pull `handle` into `sink` (`shared`: where it lies in the peer's shared pool, if the
        prefill reply said). Once it returns or raises (cancellation included) nothing writes
        into the sink any more."""
        start = time.perf_counter()
        if shared is not None and COPY_BEFORE_CHECK and isinstance(sink, PoolSink) and sink.direct:
            copied = await self._copy_leased(address, shared, expect, sink)
            if copied is not None:
                self.copied_pulls += 1
                notice = asyncio.create_task(self._notify_copied(address, handle, request_id))
                self._notices.add(notice)
                notice.add_done_callback(self._notices.discard)
                return TransferStats(expect.layer_bytes(copied) * expect.layers, time.perf_counter() - start, copied)
        for attempt in range(2):
            # A pooled connection without a coroutine round (the usual case), else a new one.
            conn = self._take_idle(address)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(address)
            direct = sink if isinstance(sink, PoolSink) and sink.direct else None
            shared = conn.segment is not None and direct is not None
            request = encode_request(handle, request_id, shared, version=conn.version)
            may_be_stale = reused and attempt == 0
            try:
                # On an authenticated connection the REQUEST goes out first, before any other Python:
                # on a vCPU woken cold, the Python before it was ~60 us of a 1 MB pull (pinned), and
                # on a 2-vCPU host the port's thread, woken onto this vCPU, waits for what runs here.
                sent = conn.send_now(request) if conn.authenticated else 0
                if conn.authenticated and direct is not None and direct.capacity <= self._loop_tokens(expect):
                    total, tokens = await self._exchange_on_loop(conn, request[sent:], expect, direct, may_be_stale)
                else:
                    exchange = functools.partial(self._exchange, conn, request[sent:] if sent else None, expect, sink,
                                                 may_be_stale=may_be_stale, handle=handle, request_id=request_id)
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
            conn.ack = total  # its ACK is sent from the loop once this has returned, or before the next REQUEST
            self._checkin(conn)
            asyncio.get_running_loop().call_soon(self._acknowledge, conn)
            return TransferStats(total, time.perf_counter() - start, tokens)
        raise KVTransferError("kv_unavailable", f"KV port {address} closed the connection", True)

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                self._acknowledge(conn)  # a last pull's ACK still due: the peer then frees its cache now
                conn.close()
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)
        with self._segments_lock:
            segments, self._segments = list(self._segments.values()), {}
        for segment in segments:
            segment.close()

    # ---- same host, leased -----------------------------------------------------------------
    async def _copy_leased(self, address: str, shared: HeldLocation, expect: KVLayout, sink: PoolSink) -> int | None:
        """Copy a leased cache out of `address`'s mapped segment; its tokens, or None where this
        cannot be done or the lease was gone by the end of the copy (the caller asks the port)."""
        with self._segments_lock:
            segment = self._segments.get(shared.segment) if self._segment_of.get(address) == shared.segment else None
        if segment is None or segment.info.token_bytes != expect.token_bytes or segment.info.layers != expect.layers:
            return None  # not mapped yet (the first pull from a peer maps it), or not this segment
        try:
            tokens = sum(int(n) for _, n in shared.runs)
            runs = segment.check_runs([list(run) for run in shared.runs], tokens)
        except (ValueError, TypeError) as error:
            raise KVTransferError("kv_protocol", f"bad shared-memory slot runs in kv.shm: {error}", False) from None
        if not 0 < tokens <= min(expect.max_tokens, sink.capacity):
            raise KVTransferError("kv_mismatch", f"KV cache of {tokens} tokens does not fit the "
                                  f"{min(expect.max_tokens, sink.capacity)} this worker reserved", False)

        def copy() -> bool:
            for layer in range(expect.layers):
                copy_regions(segment.layer_regions(layer, runs), sink.targets(layer, tokens))
            return segment.leased(runs, shared.lease)  # read after the copy: see kv.shared_memory

        if expect.layer_bytes(tokens) * expect.layers <= LOOP_MAX_BYTES:
            held = copy()
        else:
            held = await self._on_thread(None, copy)
        return tokens if held else None

    async def _notify_copied(self, address: str, handle: str, request_id: str) -> None:
        """Tell the port a leased cache was copied, so it frees it now rather than at its TTL."""
        notice = PullRequest(handle, request_id, copied=True)
        try:
            conn, _ = await self._checkout(address)
        except KVTransferError as error:
            log.warning("KV port %s: cannot say %s was copied (%s); it expires at its TTL", address, handle, error)
            return
        try:
            if conn.authenticated:
                frame = notice.encode(conn.version)
                sent = conn.send_now(frame) == len(frame)
            else:
                await self._on_thread(conn, functools.partial(self._handshake_and_send, conn, notice))
                sent = True
        except (KVTransferError, OSError) as error:
            log.warning("KV port %s: cannot say %s was copied (%s); it expires at its TTL", address, handle, error)
            sent = False
        if sent:
            self._checkin(conn)
        else:
            log.warning("KV port %s: the notice that %s was copied did not go out; it expires at its TTL",
                        address, handle)
            conn.close()

    def _handshake_and_send(self, conn: _Connection, request: PullRequest) -> None:
        set_timeout(conn.sock, self.frame_timeout)
        self._handshake(conn)
        send_buffers(conn.sock, [request.encode(conn.version)])

    # ---- threads -----------------------------------------------------------------------------
    async def _on_thread(self, conn: _Connection | None, job: Callable[[], _T]) -> _T:
        """Run `job` (which uses `conn`, if any) on a transfer thread; on cancellation, cut `conn`
        and wait until the job has stopped before letting the cancellation through."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.max_threads, thread_name_prefix="kv-pull")
            executor = self._executor
        future = asyncio.get_running_loop().run_in_executor(executor, job)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if conn is not None:
                conn.abort()
            while not future.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([future])
            if not future.cancelled():
                future.exception()  # retrieved: the cancellation is what the caller sees
            raise

    def _loop_tokens(self, expect: KVLayout) -> int:
        """The most tokens a pull into a direct sink reads on the loop (LOOP_MAX_BYTES), worked
        out once for the layout last asked about (a decode worker passes the one it made at start)."""
        limits = self._loop_limits
        if limits is None or limits[0] is not expect:
            limits = self._loop_limits = (expect, LOOP_MAX_BYTES // (expect.layer_bytes(1) * expect.layers))
        return limits[1]

    # ---- connections -----------------------------------------------------------------------
    async def _checkout(self, address: str) -> tuple[_Connection, bool]:
        conn = self._take_idle(address)
        return (conn, True) if conn is not None else (await self._connect(address), False)

    def _take_idle(self, address: str) -> _Connection | None:
        """A pooled connection to `address` still in use (its last ACK sent), or None."""
        conns = self._idle.get(address)
        if not conns:
            return None
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if now - conn.last_used < self.idle_seconds and self._acknowledge(conn):
                return conn
            conn.close()
        return None

    def _checkin(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.last_used = time.monotonic()
        self._idle.setdefault(conn.address, []).append(conn)

    def _acknowledge(self, conn: _Connection) -> bool:
        """Send a pull's ACK if it is still due: from the loop right after the pull returned (the
        cache is in place: the decode engine need not wait for the syscall, which on loopback also
        delivers it and wakes the sender: ~0.3 ms of a ~2 ms 1 MB pull), or before the connection's
        next use if that comes first, so the next REQUEST always follows it. A connection that
        cannot take 30 bytes at once is closed and dropped from the pool (the prefill worker then
        keeps the cache until its TTL, as for a decode worker that died); False then."""
        if conn.ack is None:
            return True
        ack = encode_count(FrameType.ACK, conn.ack, conn.version)  # made here: off the pull's path
        conn.ack = None
        if conn.send_now(ack) == len(ack):
            return True
        idle = self._idle.get(conn.address, [])
        if conn in idle:
            idle.remove(conn)
        conn.close()
        return False

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
            offered = hello.get("versions")
            if not isinstance(offered, list):  # a port of version 2 names only its own
                offered = [hello.get("version")]
            common = [v for v in self.versions if v in offered]
            if not common:
                raise KVTransferError("kv_protocol", f"the KV port speaks protocol versions {offered}, this worker "
                                      f"{list(self.versions)}: upgrade the older of the two worker images", False)
            conn.version = max(common)
            nonce = bytes.fromhex(str(hello.get("nonce", "")))
            send_json(sock, FrameType.AUTH, {"mac": auth.prove(self.token, nonce), "version": conn.version})
            kind, payload = recv_control(sock, MAX_HANDSHAKE_FRAME)
            raise_if_error(kind, payload)
            if kind is not FrameType.READY:
                raise KVTransferError("kv_protocol", f"expected READY, got {kind.name}", False)
            ready = decode_json(payload)
        except ValueError as error:
            raise KVTransferError("kv_protocol", f"malformed KV handshake: {error!r}", False) from None
        conn.authenticated = True
        if self.shared_memory and "shm" in ready:
            conn.segment = self._map_segment(conn.address, ready["shm"])

    def _map_segment(self, address: str, described: object) -> SegmentReader | None:
        """The peer's pool segment, mapped once per segment; None where it cannot be (another
        host or user: the pulls then go over TCP)."""
        stale: SegmentReader | None = None
        try:
            info = SegmentInfo.parse(described)
            with self._segments_lock:
                reader = self._segments.get(info.id)
                mapped = reader is None
                if reader is None:
                    reader = self._segments[info.id] = SegmentReader(info)
                # A restarted peer announces a new segment: drop the old one's mapping, which
                # would otherwise keep its whole pool's pages alive after its file is gone.
                old, self._segment_of[address] = self._segment_of.get(address), info.id
                if old is not None and old != info.id and old not in self._segment_of.values():
                    stale = self._segments.pop(old, None)
            # Once per segment: every new connection to the peer (one per concurrent pull) lands here.
            log.log(logging.INFO if mapped else logging.DEBUG,
                    "KV port %s: same host, pulls copy from its shared pool %s", address, info.path)
            return reader
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.debug("KV port %s: its shared pool is not reachable from here (%s); pulling over TCP",
                      address, error)
            return None
        finally:
            if stale is not None:
                stale.close()

    # ---- one pull (on a transfer thread) -----------------------------------------------------
    def _exchange(self, conn: _Connection, unsent: bytes | None, expect: KVLayout, sink: LayerSink | PoolSink,
                  may_be_stale: bool, handle: str, request_id: str) -> tuple[int, int]:
        """One pull on a transfer thread: the handshake on a new connection, whatever of the
        REQUEST frame the loop did not send (None: none of it, so it is made here, after the
        handshake has told whether the peer shares memory), then the reply. Returns (bytes,
        tokens); the loop sends the ACK after the pull has returned, as for a loop pull. Sent
        here, it woke the port's thread, which on the 2-core bench host ran in this thread's
        place before the hop back to the loop: 0.3-0.5 ms of a 7-8 ms 12 MB pull
        (bench/kv_transfer.py)."""
        sock = conn.sock
        make_blocking(sock)  # a loop pull leaves it non-blocking
        if not conn.authenticated:
            self._handshake(conn)
        if unsent is None:
            shared = conn.segment is not None and isinstance(sink, PoolSink) and sink.direct
            unsent = encode_request(handle, request_id, shared, version=conn.version)
        with _stale_if(may_be_stale):
            send_buffers(sock, [unsent])
            kind, payload = recv_control(sock)
        header = _reply_header(kind, payload, conn.version)
        tokens = self._check_header(header, expect, sink)
        layer_bytes = expect.layer_bytes(tokens)
        ended = False  # whether the END came in with the layers
        if header.runs:
            self._copy_shared(conn, header, expect, sink, tokens)
        elif isinstance(sink, PoolSink) and sink.direct:
            reply = _DirectReply(expect, sink, tokens, conn.version)
            recv_into_buffers(sock, reply.buffers)
            ended = reply.check(layer_bytes)
        else:
            self._receive_staged(sock, expect, sink, tokens, layer_bytes)
        if not ended:
            _check_end(*recv_control(sock))
        return layer_bytes * expect.layers, tokens

    async def _exchange_on_loop(self, conn: _Connection, request: bytes, expect: KVLayout, sink: PoolSink,
                                may_be_stale: bool) -> tuple[int, int]:
        """One pull on an authenticated connection into a direct sink, from the event loop
        (`framing.LoopStream`): the same frames as `_exchange`, each layer scatter-read straight
        into the reserved blocks; `request` is what of the REQUEST frame is still to send (the
        caller sends what the socket takes at once). Returns (bytes, tokens). A cancellation
        stops it at a read; the caller then closes the connection, and nothing writes into the
        sink any more."""
        # The native receive takes a stream reply of the current protocol (a same-host peer's
        # connection asks for slot runs instead).
        lib = native.library() if conn.version == PROTOCOL_VERSION and conn.segment is None else None
        # Only what a pull needs is made on the way to its first read: on a 2-vCPU host the port's
        # thread often waits for this very vCPU, so every microsecond here delays its reply
        # (bench/kv_transfer.py, unpinned). The stream is made when something is still to send or
        # to wait for, or for the Python path.
        stream: LoopStream | None = None
        if request or lib is None:
            stream = LoopStream(conn.sock, self.frame_timeout)
            with _stale_if(may_be_stale):
                await stream.send(request)
                if lib is None:
                    kind, payload = await stream.control()
        if lib is not None:
            # Alone, a pull may wait for the port's first bytes spinning (`native.FIRST_SPIN_NS`);
            # beside others in flight it leaves the loop to them.
            first_spin = native.FIRST_SPIN_NS if self._loop_pulls == 0 else 0
            reader = conn.native
            if reader is None or (reader.expect is not expect and not reader.serves(expect)):
                reader = conn.native = NativePull(lib, conn.sock.fileno(), expect)  # once per connection
            self._loop_pulls += 1
            try:
                status = reader.begin(sink, first_spin)
                if status == native.DONE:
                    read: int | tuple[FrameType, bytearray] = int(reader.state.tokens)
                else:
                    if stream is None:
                        stream = LoopStream(conn.sock, self.frame_timeout)
                    read = await self._receive_native(reader, status, stream, may_be_stale)
            finally:
                self._loop_pulls -= 1
            if isinstance(read, int):
                return expect.layer_bytes(read) * expect.layers, read
            kind, payload = read
        header = _reply_header(kind, payload, conn.version)
        tokens = self._check_header(header, expect, sink)
        layer_bytes = expect.layer_bytes(tokens)
        total = layer_bytes * expect.layers
        ended = False  # whether the END came in with the layers
        if header.runs:
            self._copy_shared(conn, header, expect, sink, tokens)
        else:
            reply = _DirectReply(expect, sink, tokens, conn.version)
            await stream.recv_into(reply.buffers)
            ended = reply.check(layer_bytes)
        if not ended:
            _check_end(*await stream.control())
        return total, tokens

    @staticmethod
    async def _receive_native(pull: NativePull, status: int, stream: LoopStream,
                              may_be_stale: bool) -> int | tuple[FrameType, bytearray]:
        """The rest of a reply the native receive (`kv.native`) began with answer `status`: its
        tokens once it is all in the sink, or the first frame it declined (an ERROR, slot runs,
        a shape that does not fit), read whole, for the Python path to take on from. A peer that
        closed a pooled connection before answering is `_Stale`, as on the Python path."""
        while status == native.AGAIN:
            await stream.wait_readable()
            status = pull.step()
        if status == native.DONE:
            return int(pull.state.tokens)
        if status == native.DECLINED_HEADER:
            return FrameType.HEADER, pull.header_payload()
        if status == native.DECLINED_HEAD:
            kind, length = frame_head(pull.frame_head())
            check_control(kind, length, MAX_CONTROL_FRAME)
            payload = bytearray(length)
            await stream.recv_into([memoryview(payload)])
            return kind, payload
        if status == native.BAD_FRAMES:
            heads, end = pull.layer_frames()
            layer_bytes = 2 * int(pull.state.tokens) * int(pull.state.token_bytes)
            _check_frames(heads, end, layer_bytes)  # raises the Python path's error
            raise KVTransferError("kv_protocol", "the native KV receive refused frames the Python path "
                                  "takes", False)
        if status == native.CLOSED:
            if may_be_stale and pull.untouched:
                raise _Stale()
            raise PeerClosed("KV peer closed the stream mid-frame")
        if status == native.ERRNO:
            error = OSError(int(pull.state.error), os.strerror(int(pull.state.error)))
            if may_be_stale and pull.untouched and isinstance(error, ConnectionError):
                raise _Stale()
            raise translate(error, stream.sock)
        raise KVTransferError("kv_protocol", f"native KV receive failed (status {status}): the reservation "
                              "does not hold the reply", False)

    @staticmethod
    def _copy_shared(conn: _Connection, header: ReplyHeader, expect: KVLayout, sink: LayerSink | PoolSink,
                     tokens: int) -> None:
        """A same-host reply: copy the held blocks' slot runs out of the peer's mapped pool."""
        segment = conn.segment
        if segment is None or not isinstance(sink, PoolSink) or not sink.direct:
            raise KVTransferError("kv_protocol", "the KV port answered with shared-memory slot runs to a "
                                  "request that did not ask for them", False)
        if segment.info.token_bytes != expect.token_bytes or segment.info.layers != expect.layers:
            raise KVTransferError("kv_mismatch", f"the peer's shared pool ({segment.info}) does not hold "
                                  f"this worker's KV layout ({expect})", False)
        try:
            runs = segment.check_runs(list(header.runs), tokens)
        except (ValueError, TypeError) as error:
            raise KVTransferError("kv_protocol", f"bad shared-memory slot runs: {error}", False) from None
        for layer in range(expect.layers):
            copy_regions(segment.layer_regions(layer, runs), sink.targets(layer, tokens))

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
    def _check_header(header: ReplyHeader, expect: KVLayout, sink: LayerSink | PoolSink) -> int:
        if (DTYPES.get(header.dtype) != expect.dtype or header.layers != expect.layers
                or (header.kv_heads, header.head_dim) != (expect.kv_heads, expect.head_dim)):
            raise KVTransferError(
                "kv_mismatch", f"KV cache of {header.layers} layers x {header.kv_heads} heads x {header.head_dim} "
                f"{header.dtype} does not fit this worker ({expect}); prefill and decode must serve the same "
                "model and dtype", False)
        tokens = header.tokens
        limit = min(expect.max_tokens, sink.capacity) if isinstance(sink, PoolSink) else expect.max_tokens
        if not 0 < tokens <= limit:
            raise KVTransferError("kv_mismatch", f"KV cache of {tokens} tokens does not fit the {limit} "
                                  "this worker reserved (model length or reservation)", False)
        return tokens


class _DirectReply:
    """Every layer frame and the END of a reply laid out for one scatter-read: each layer's
    frame head, then its K and V straight into the reserved blocks, then the fixed-size END.
    After the header only these may come, each of the size just checked, so the read is bounded
    by the reservation; a frame head that turns out wrong fails the pull (the caller frees the
    reservation it wrote into). One read instead of two per layer and two for the END: on the
    2-core bench host each was a Python round on a cold vCPU (bench/kv_transfer.py). A port of
    the legacy version sends a JSON END of its own length: the caller reads that one after."""

    def __init__(self, expect: KVLayout, sink: PoolSink, tokens: int, version: int):
        self.heads = [bytearray(LAYER_HEAD_SIZE) for _ in range(expect.layers)]
        self.end = bytearray(COUNT_FRAME_SIZE) if version != LEGACY_VERSION else None
        self.buffers: list[memoryview] = []
        for layer, head in enumerate(self.heads):
            self.buffers += [memoryview(head), *sink.targets(layer, tokens)]
        if self.end is not None:
            self.buffers.append(memoryview(self.end))

    def check(self, layer_bytes: int) -> bool:
        """Whether the END came in with the layers (raises if a frame head is wrong)."""
        _check_frames(self.heads, self.end, layer_bytes)
        return self.end is not None


def _check_frames(heads: list[bytearray], end: bytearray | None, layer_bytes: int) -> None:
    """Raise if a layer frame head or the END (None: read apart, legacy) read with the layers is wrong."""
    for layer, head in enumerate(heads):
        _check_layer_head(head, layer, layer_bytes)
    if end is None:
        return
    kind, length = HEADER.unpack_from(end)
    if (kind, length) != (int(FrameType.END), BYTE_COUNT.size):
        raise KVTransferError("kv_protocol", f"expected the KV end frame after the last layer, got a frame of "
                              f"type {kind} and {length} bytes", False)


@contextlib.contextmanager
def _stale_if(may_be_stale: bool) -> Iterator[None]:
    """A peer that had closed a pooled connection shows at the REQUEST or the first read of the
    reply: `_Stale`, which `pull` retries once on a fresh connection."""
    try:
        yield
    except PeerClosed:
        if may_be_stale:
            raise _Stale() from None
        raise


def _reply_header(kind: FrameType, payload: bytearray, version: int) -> ReplyHeader:
    """The HEADER that answers a REQUEST; ERROR (unknown handle...) raises `_Refused`."""
    if kind is FrameType.ERROR:
        err = decode_json(payload)
        raise _Refused(str(err.get("type", "kv_unavailable")), str(err.get("message")),
                       bool(err.get("retryable", True)))
    if kind is not FrameType.HEADER:
        raise KVTransferError("kv_protocol", f"expected a KV header, got {kind.name}", False)
    return ReplyHeader.decode(payload, version)


def _check_layer_head(head: bytearray, expected_layer: int, layer_bytes: int) -> None:
    """A direct read takes a layer frame's head together with its payload: a head that turns out
    wrong fails the pull (the caller frees the reservation it wrote into)."""
    kind, length = HEADER.unpack_from(head)
    (layer,) = LAYER_INDEX.unpack_from(head, HEADER.size)
    if (kind, length, layer) != (int(FrameType.LAYER), LAYER_INDEX.size + layer_bytes, expected_layer):
        raise KVTransferError("kv_protocol", f"bad KV frame (type {kind}, {length} bytes, layer {layer}) "
                              f"where layer {expected_layer} of {layer_bytes} bytes was due", False)


def _check_end(kind: FrameType, payload: bytearray) -> None:
    raise_if_error(kind, payload)
    if kind is not FrameType.END:
        raise KVTransferError("kv_protocol", f"expected the KV end frame, got {kind.name}", False)


class _Stale(Exception):
    """A pooled connection the peer had already closed."""


class _Refused(KVTransferError):
    """The server answered a request with ERROR (unknown handle...): the connection stays usable."""
