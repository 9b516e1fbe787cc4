"""The KV port's REQUEST -> reply -> ACK step in C (`kv.native.PortStep`, kv_io.c's
`kv_port_step_run`): what it serves, what it leaves to Python, and that a cache it is sending
stays pinned until the step ends."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import pytest
import torch

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv import auth, native
from disaggserve_worker.kv.framing import (
    HEADER,
    MAX_CONTROL_FRAME,
    MAX_HANDSHAKE_FRAME,
    PROTOCOL_VERSION,
    FrameType,
    KVTransferError,
    PeerClosed,
    PullRequest,
    ReplyHeader,
    decode_json,
    encode_count,
    recv_control,
    recv_exact,
    recv_frame_head,
    send_json,
    set_timeout,
)
from disaggserve_worker.kv.transport import KVServer, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.model.loader import LoadedModel
from kv_fakes import kv_io  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("kv_io")  # each test runs with the C code and without it

HOST = "127.0.0.34"
TOKEN = "token-of-the-native-port-tests"


def _native_only(kv_io: str) -> None:  # noqa: F811
    if kv_io != "native":
        pytest.skip("the C step itself")


def _table_holding(kv_io: str, *buffers: bytes | bytearray) -> tuple[Any, Any, Any]:  # noqa: F811
    """The C library, a port table, and that table's entry "h-1" for a reply of `buffers`."""
    _native_only(kv_io)
    lib = native.library()
    assert lib is not None
    table = native.PortTable(lib)
    reply = native.gather(list(buffers))
    assert reply is not None
    return lib, table, table.register("h-1", reply, time.monotonic() + 30)


# ---- the step on a socket pair -------------------------------------------------------------------

def _rcvtimeo(sock: socket.socket) -> float:
    sec, usec = struct.unpack("@ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    return sec + usec / 1e6


def test_the_step_serves_a_registered_reply_and_switches_the_read_bound(kv_io: str) -> None:  # noqa: F811
    _native_only(kv_io)
    lib = native.library()
    assert lib is not None
    table = native.PortTable(lib)
    reply = native.gather([b"HEAD", bytearray(b"-the-layers-"), b"END"])
    assert reply is not None
    entry = table.register("h-\u00e9", reply, time.monotonic() + 30)  # a handle is UTF-8
    a, b = socket.socketpair()
    try:
        set_timeout(b, 0.5)  # the idle bound while a REQUEST is awaited
        step = native.PortStep(lib, table, b, frame_timeout=2.0, idle_timeout=0.5)
        for _ in range(2):
            a.sendall(PullRequest("h-\u00e9", "req-1").encode() + encode_count(FrameType.ACK, 15))
            assert step.run() == native.SENT
            assert recv_exact(a, 19) == b"HEAD-the-layers-END"
            assert step.ack() == (FrameType.ACK, bytearray((15).to_bytes(8, "big")))
            assert step.handle() == "h-\u00e9" and step.elapsed > 0
            assert _rcvtimeo(b) == pytest.approx(0.5), "back to the idle bound after the ACK"
            assert entry.state == 1, "taken until the take is finished"
            assert not entry.revoke(), "a taken entry cannot be revoked (it counts as a pin)"
            entry.finish(keep=True)
            assert entry.state == 0
        a.close()
        with pytest.raises(PeerClosed):
            step.frame(step.run())
    finally:
        a.close()
        b.close()


def test_the_step_falls_back_on_anything_unusual(kv_io: str) -> None:  # noqa: F811
    lib, table, entry = _table_holding(kv_io, b"HEAD", b"END")
    # Kept referenced: a dropped entry leaves the table.
    old = table.register("h-old", native.gather([b"HEAD", b"END"]), time.monotonic() - 1)
    a, b = socket.socketpair()
    try:
        set_timeout(b, 2)
        step = native.PortStep(lib, table, b, frame_timeout=2.0, idle_timeout=2.0)
        unusual = [PullRequest("h-1", "r", shm=True).encode(),  # flags: slot runs
                   PullRequest("h-1", "r", copied=True).encode(),  # flags: copied under a lease
                   PullRequest("h-1", "réq").encode(),  # a non-ASCII request id: Python's UTF-8 check decides
                   PullRequest("nobody", "r").encode(),  # not in the table
                   PullRequest("h-old", "r").encode(),  # expired
                   HEADER.pack(int(FrameType.REQUEST), 6) + b"\x00\x00\x40abc",  # handle beyond the payload
                   HEADER.pack(int(FrameType.REQUEST), 2) + b"\x00\x00",  # too short for a handle length
                   encode_count(FrameType.ACK, 1)]  # not a REQUEST
        for frame in unusual:
            a.sendall(frame)
            assert step.run() == native.FALLBACK
            kind, _length = HEADER.unpack_from(frame)
            assert step.frame(native.FALLBACK) == (FrameType(kind), bytearray(frame[HEADER.size:])), frame
            assert entry.state == 0, "nothing taken"
        # A taken entry is Python's for any other connection until the take ends.
        a.sendall(PullRequest("h-1", "r").encode() + encode_count(FrameType.ACK, 0))
        assert step.run() == native.SENT and recv_exact(a, 7) == b"HEADEND"
        assert entry.state == 1 and not entry.revoke()
        a.sendall(PullRequest("h-1", "r2").encode())
        assert step.run() == native.FALLBACK
        entry.finish(keep=True)
        assert entry.state == 0 and entry.revoke() and entry.state == 2
        a.sendall(PullRequest("h-1", "r3").encode())
        assert step.run() == native.FALLBACK, "revoked: never taken again"
        entry.finish(keep=True)
        assert entry.state == 2, "finish does not bring a revoked entry back"
        assert old.state == 0
        del old  # its memory goes: out of the table first
        a.sendall(PullRequest("h-old", "r").encode())
        assert step.run() == native.FALLBACK
        # Bounds: a frame longer than a control frame is refused unread, a layer frame too.
        a.sendall(HEADER.pack(int(FrameType.REQUEST), MAX_CONTROL_FRAME + 1))
        with pytest.raises(KVTransferError, match="exceeds"):
            step.frame(step.run())
        a.sendall(HEADER.pack(int(FrameType.LAYER), 8))
        with pytest.raises(KVTransferError, match="unexpected KV layer frame"):
            step.frame(step.run())
        a.close()
        with pytest.raises(PeerClosed):
            step.frame(step.run())
    finally:
        a.close()
        b.close()


def test_the_step_waits_for_the_ack_under_the_frame_bound_and_reports_a_peer_gone(kv_io: str) -> None:  # noqa: F811
    lib, table, entry = _table_holding(kv_io, b"HEAD", b"END")
    a, b = socket.socketpair()
    try:
        set_timeout(b, 5)
        step = native.PortStep(lib, table, b, frame_timeout=0.2, idle_timeout=5)
        a.sendall(PullRequest("h-1", "r").encode())  # and no ACK
        start = time.monotonic()
        status = step.run()
        assert status == native.ACK_FAILED and time.monotonic() - start < 2, "the ACK is awaited for 0.2 s"
        error = step.failure(status)
        assert error.kind == "kv_timeout" and step.handle() == "h-1"
        assert _rcvtimeo(b) == pytest.approx(5), "the idle bound again"
        assert entry.state == 1, "taken until the take is finished"
        a.close()
    finally:
        a.close()
        b.close()


# ---- the port --------------------------------------------------------------------------------------

async def _port(tiny: LoadedModel, prompts: int = 1):  # type: ignore[no-untyped-def]
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role="prefill", kv_cache_tokens=512, kv_ttl_seconds=30))
    engine.start()
    server = KVServer(engine, frame_timeout=2, token=TOKEN, handshake_timeout=2)
    await server.start(HOST, 0)
    handles, token_lists = [], []
    for i in range(prompts):
        prompt = tiny.tokenizer.encode(f"prompt number {i} whose cache is held").ids
        stream = RequestStream(f"r{i}", asyncio.get_running_loop())
        engine.submit(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), stream)
        first = await stream.queue.get()
        assert first.kv_handle is not None
        handles.append(first.kv_handle)
        token_lists.append(prompt)
    return engine, server, f"{HOST}:{server.port}", handles, token_lists


def _authenticated(address: str) -> socket.socket:
    host, p = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(p)), timeout=3)
    _kind, payload = recv_control(sock, MAX_HANDSHAKE_FRAME)
    send_json(sock, FrameType.AUTH, {"mac": auth.prove(TOKEN, bytes.fromhex(decode_json(payload)["nonce"])),
                                     "version": PROTOCOL_VERSION})
    assert recv_control(sock, MAX_HANDSHAKE_FRAME)[0] is FrameType.READY
    return sock


def _read_reply(sock: socket.socket) -> int:
    """A whole stream reply (HEADER, layers, END): its layer bytes."""
    kind, payload = recv_control(sock)
    assert kind is FrameType.HEADER, payload
    total = 0
    for _ in range(ReplyHeader.decode(payload).layers):
        length = recv_frame_head(sock)[1]
        recv_exact(sock, length)
        total += length - 4
    kind, payload = recv_control(sock)
    assert kind is FrameType.END and int.from_bytes(payload) == total
    return total


async def _until(check, what: str) -> None:  # type: ignore[no-untyped-def]
    for _ in range(300):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def test_pulls_of_prepared_replies_go_through_the_c_step_exactly(tiny: LoadedModel, kv_io: str) -> None:  # noqa: F811
    """Two pulls on one connection: served by the C step where it builds (by Python otherwise),
    the same bytes either way, each cache freed once ACKed."""
    engine, server, address, handles, prompts = await _port(tiny, prompts=2)
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=512))
    transport = TcpKVTransport(token=TOKEN)
    try:
        for handle, prompt in zip(handles, prompts, strict=True):
            held = engine.pin_held(handle)
            assert held is not None
            source = torch.stack([engine.kv_pool.read(i, held.slot_table[:len(prompt)])
                                  for i in range(len(engine.kv_pool))])
            engine.unpin_held(handle, release=False)
            reservation = receiver.reserve(prompt, SamplingParams(max_tokens=4))
            assert reservation is not None
            await transport.pull(address, handle, "r", layout_of(receiver), pool_sink(receiver, reservation))
            slots = reservation.slot_table[:len(prompt)]
            assert torch.equal(torch.stack([receiver.kv_pool.read(i, slots) for i in range(len(receiver.kv_pool))]),
                               source)
            receiver.cancel_reservation(reservation)
        await _until(lambda: engine.held_count == 0, "both caches freed after their ACKs")
        assert engine.allocator.free_tokens == engine.allocator.capacity_tokens
        assert server.native_pulls == (2 if kv_io == "native" else 0)
        assert server.accepted == 1
    finally:
        transport.close()
        await server.stop()
        engine.stop()


async def test_requests_the_c_step_declines_are_answered_by_python(tiny: LoadedModel, kv_io: str) -> None:  # noqa: F811
    """An unknown handle (ERROR, the connection kept), a non-ASCII request id (served), a copied
    notice (freed, unanswered): all through the Python path, on a connection the C step serves."""
    engine, server, address, handles, _prompts = await _port(tiny, prompts=3)
    sock = _authenticated(address)
    try:
        sock.sendall(PullRequest("no-such-handle", "r").encode())
        kind, payload = recv_control(sock)
        assert kind is FrameType.ERROR and decode_json(payload)["type"] == "kv_unavailable"
        sock.sendall(PullRequest(handles[0], "réq-ü").encode())
        total = _read_reply(sock)
        sock.sendall(encode_count(FrameType.ACK, total))
        await _until(lambda: engine.held_count == 2, "the ACKed cache freed")
        sock.sendall(PullRequest(handles[1], "r", copied=True).encode())
        await _until(lambda: engine.held_count == 1, "the copied cache freed")
        assert server.copied_releases == 1 and server.native_pulls == 0
        sock.sendall(PullRequest(handles[2], "plain").encode())  # and the C step serves the next one
        sock.sendall(encode_count(FrameType.ACK, _read_reply(sock)))
        await _until(lambda: engine.held_count == 0, "the last cache freed")
        assert server.native_pulls == (1 if kv_io == "native" else 0)
        assert engine.allocator.free_tokens == engine.allocator.capacity_tokens
    finally:
        sock.close()
        await server.stop()
        engine.stop()


async def test_a_cache_sent_in_c_stays_pinned_until_its_ack(tiny: LoadedModel, kv_io: str) -> None:  # noqa: F811
    """Released by the router, past its TTL, and ACKed on another connection while the C step
    waits for its ACK: the cache's blocks stay allocated until that step ends."""
    _native_only(kv_io)
    engine, server, address, handles, _prompts = await _port(tiny, prompts=1)
    handle = handles[0]
    first, second = _authenticated(address), _authenticated(address)
    try:
        first.sendall(PullRequest(handle, "r").encode())
        total = _read_reply(first)
        held = engine._held[handle]
        assert held.native is not None
        await _until(lambda: held.native.state == 1, "taken by the C step")
        used = engine.allocator.capacity_tokens - engine.allocator.free_tokens
        assert used > 0
        assert engine.release_held(handle) and engine.held_count == 1, "deferred: a send is in flight"
        assert engine.expire_held(now=time.monotonic() + 3600) == 0
        second.sendall(PullRequest(handle, "r").encode())  # Python's path refuses it: expired (released)
        kind, payload = recv_control(second)
        assert kind is FrameType.ERROR and decode_json(payload)["type"] == "kv_unavailable"
        assert engine.allocator.capacity_tokens - engine.allocator.free_tokens == used
        first.sendall(encode_count(FrameType.ACK, total))
        await _until(lambda: engine.held_count == 0, "freed once the C step's ACK came")
        assert engine.allocator.free_tokens == engine.allocator.capacity_tokens
        assert held.native.state == 2
    finally:
        first.close()
        second.close()
        await server.stop()
        engine.stop()


async def test_a_python_ack_beside_a_c_send_does_not_free_the_blocks_under_it(tiny: LoadedModel,
                                                                                kv_io: str) -> None:  # noqa: F811
    _native_only(kv_io)
    engine, server, address, handles, _prompts = await _port(tiny, prompts=1)
    handle = handles[0]
    first, second = _authenticated(address), _authenticated(address)
    try:
        first.sendall(PullRequest(handle, "r").encode())
        total = _read_reply(first)
        held = engine._held[handle]
        await _until(lambda: held.native.state == 1, "taken by the C step")
        second.sendall(PullRequest(handle, "r2").encode())  # taken: Python serves this one
        assert _read_reply(second) == total
        second.sendall(encode_count(FrameType.ACK, total))
        await _until(lambda: held.pins == 0, "the Python send ended")
        assert engine.held_count == 1, "not freed under the C step's send"
        first.sendall(encode_count(FrameType.ACK, total))
        await _until(lambda: engine.held_count == 0, "freed once the C step ended")
        assert engine.allocator.free_tokens == engine.allocator.capacity_tokens
    finally:
        first.close()
        second.close()
        await server.stop()
        engine.stop()


async def test_a_peer_gone_before_its_ack_leaves_the_cache_for_a_retry(tiny: LoadedModel, kv_io: str) -> None:  # noqa: F811
    engine, server, address, handles, prompts = await _port(tiny, prompts=1)
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=512))
    transport = TcpKVTransport(token=TOKEN)
    sock = _authenticated(address)
    try:
        sock.sendall(PullRequest(handles[0], "r").encode())
        _read_reply(sock)
        sock.close()  # no ACK
        await _until(lambda: server.connections == 0, "the connection ended")
        assert engine.held_count == 1
        held = engine._held[handles[0]]
        assert held.pins == 0 and (held.native is None or held.native.state == 0), "takeable again"
        reservation = receiver.reserve(prompts[0], SamplingParams(max_tokens=4))
        assert reservation is not None
        await transport.pull(address, handles[0], "r", layout_of(receiver), pool_sink(receiver, reservation))
        await _until(lambda: engine.held_count == 0, "freed after the retry's ACK")
        assert server.native_pulls == (1 if kv_io == "native" else 0)
    finally:
        sock.close()
        transport.close()
        await server.stop()
        engine.stop()
