"""The framed KV protocol: round trips, partial reads, timeouts, TTL, broken peers, reuse."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import torch

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv.framing import (
    HEADER,
    LAYER_INDEX,
    MAX_CONTROL_FRAME,
    FrameType,
    KVTransferError,
    PullRequest,
    ReplyHeader,
    encode_count,
    recv_control,
    recv_exact,
    recv_frame_head,
    set_timeout,
)
from disaggserve_worker.kv.layout import block_runs, slot_runs
from disaggserve_worker.kv.native import frame_reader
from disaggserve_worker.kv.transport import KVLayout, KVServer, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.model.loader import LoadedModel
from kv_fakes import FakeKVPeer, kv_io  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("kv_io")  # each test reads in C and in Python

LAYOUT = KVLayout(torch.float32, layers=2, kv_heads=1, head_dim=4)


def test_pull_frames_round_trip_and_malformed_ones_are_protocol_errors() -> None:
    for request in (PullRequest("h-1", "r"), PullRequest("hé", "réq", shm=True), PullRequest("h", "", copied=True)):
        encoded = request.encode()
        kind, length = HEADER.unpack_from(encoded)
        assert kind == FrameType.REQUEST and length == len(encoded) - HEADER.size
        assert PullRequest.decode(encoded[HEADER.size:]) == request
    header = ReplyHeader("float16", layers=3, tokens=7, kv_heads=2, head_dim=8, runs=((0, 4), (16, 3)))
    assert ReplyHeader.decode(header.encode()[HEADER.size:]) == header
    end = encode_count(FrameType.END, 12345)
    assert HEADER.unpack_from(end) == (int(FrameType.END), 8) and end[HEADER.size:] == (12345).to_bytes(8, "big")
    good = header.encode()[HEADER.size:]
    for bad in (b"", b"\x00\x00\x09abc", b"\xff\xff", PullRequest("h", "r").encode()[HEADER.size:][:2]):
        with pytest.raises(KVTransferError, match="malformed KV request") as error:
            PullRequest.decode(bad)
        assert error.value.kind == "kv_protocol" and not error.value.retryable
    for bad in (good[:-1], good + b"\x00", b"\x09" + good[1:], b""):  # runs cut, runs extra, dtype 9, empty
        with pytest.raises(KVTransferError, match="malformed KV header"):
            ReplyHeader.decode(bad)


def test_gather_writes_keep_the_order_and_each_call_takes_at_most_a_socket_buffer() -> None:
    import random

    from disaggserve_worker.kv.framing import SOCKET_BUFFER, send_buffers

    class Wire:  # takes part of what it is offered, as a full send buffer does
        def __init__(self) -> None:
            self.data, self.calls, self.rng = bytearray(), [], random.Random(3)

        def sendmsg(self, buffers: list[memoryview]) -> int:
            offered = b"".join(bytes(b) for b in buffers)
            self.calls.append(len(offered))
            taken = offered[:self.rng.choice([len(offered), self.rng.randint(1, len(offered))])]
            self.data += taken
            return len(taken)

    rng = random.Random(1)
    buffers = [bytes(rng.getrandbits(8) for _ in range(n)) for n in (29, 13, 5, 0, 13)]
    buffers += [torch.randint(0, 256, (n,), dtype=torch.uint8).numpy().tobytes()
                for n in (3 * SOCKET_BUFFER + 7, SOCKET_BUFFER // 3, 17)]
    wire = Wire()
    send_buffers(wire, [memoryview(b) for b in buffers])  # type: ignore[arg-type]
    assert bytes(wire.data) == b"".join(buffers)
    assert max(wire.calls) == SOCKET_BUFFER and len(wire.calls) >= 5


def test_frame_round_trip_with_partial_reads() -> None:
    a, b = socket.socketpair()
    header = ReplyHeader("bfloat16", layers=2, tokens=3, kv_heads=1, head_dim=4, runs=((8, 2), (40, 1)))
    data = header.encode() + HEADER.pack(int(FrameType.LAYER), 8) + LAYER_INDEX.pack(1) + b"abcd"

    def trickle() -> None:  # one byte at a time: frames must still come out whole
        for i in range(len(data)):
            a.send(data[i:i + 1])
            time.sleep(0.001)

    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        b.settimeout(5)
        kind, payload = recv_control(b)
        assert kind is FrameType.HEADER and ReplyHeader.decode(payload) == header
        kind, length = recv_frame_head(b)
        payload = recv_exact(b, length)
        assert kind is FrameType.LAYER and LAYER_INDEX.unpack_from(payload) == (1,) and payload[4:] == b"abcd"
    finally:
        feeder.join()
        a.close()
        b.close()


def test_read_timeout_garbage_and_oversized_control_frames() -> None:
    a, b = socket.socketpair()
    try:
        b.settimeout(0.2)
        a.sendall(HEADER.pack(int(FrameType.END), 10) + b"abc")  # promises 10 bytes, sends 3
        with pytest.raises(KVTransferError) as timeout:
            recv_control(b)
        assert timeout.value.kind == "kv_timeout" and timeout.value.retryable
    finally:
        a.close()
        b.close()
    a, b = socket.socketpair()
    try:
        b.settimeout(1)
        a.sendall(HEADER.pack(99, 0))
        with pytest.raises(KVTransferError, match="unknown KV frame type") as bad:
            recv_control(b)
        assert not bad.value.retryable
        a.sendall(HEADER.pack(int(FrameType.REQUEST), 1 << 40))  # a terabyte, refused unread
        with pytest.raises(KVTransferError, match="exceeds") as big:
            recv_control(b)
        assert big.value.kind == "kv_protocol"
    finally:
        a.close()
        b.close()


def test_slot_runs_merge_consecutive_blocks() -> None:
    slots = torch.tensor([32, 33, 34, 35, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17])
    assert slot_runs(slots) == [(32, 4), (0, 8), (16, 2)]
    assert slot_runs(torch.tensor([], dtype=torch.long)) == []


def test_block_runs_are_the_slot_runs_of_the_block_table() -> None:
    import random

    from disaggserve_worker.engine.kv_cache import BlockAllocator

    rng = random.Random(5)
    allocator = BlockAllocator(64, 16)
    for _ in range(50):
        blocks = rng.sample(range(64), rng.randint(1, 12))
        if rng.random() < 0.5:
            blocks.sort()  # long runs of consecutive blocks
        tokens = rng.randint(0, len(blocks) * 16)
        table = allocator.slot_table(blocks)
        assert block_runs(blocks, 16, tokens) == slot_runs(table[:tokens]), (blocks, tokens)
    with pytest.raises(ValueError, match="do not fit"):
        block_runs([3], 16, 17)


def test_pool_views_are_shared_and_do_not_outlive_the_pool() -> None:
    import gc

    from disaggserve_worker.kv import layout
    from disaggserve_worker.model.kv_pool import KVPool

    pool = KVPool([[torch.zeros(2, 16, 2, 4)]])
    assert layout.regions_of(pool) is layout.regions_of(pool), "made once, shared by every pull"
    assert layout.regions_of(KVPool([[torch.zeros(2, 16, 2, 4)[:, ::2]]])) is None, "not contiguous: staged"
    import weakref

    alive = weakref.ref(pool)
    views = weakref.ref(layout.regions_of(pool))  # the pool last asked about: answered from `_LAST`
    assert layout.regions_of(pool) is views()
    before = len(layout._REGIONS)
    del pool
    gc.collect()
    # Other tests' dropped pools may go in the same collection: count only that ours went.
    assert alive() is None, "the cached views keep no reference to their pool"
    assert len(layout._REGIONS) <= before - 1, "a dropped pool's views go with it"
    assert views() is None, "the last-asked cache lets them go too"


async def test_peer_dying_mid_transfer_is_a_clean_retryable_error() -> None:
    def dies_after_one_layer(conn: socket.socket) -> None:
        recv_control(conn)
        conn.sendall(ReplyHeader("float32", layers=2, tokens=3, kv_heads=1, head_dim=4).encode())
        payload = LAYER_INDEX.pack(0) + torch.zeros(2, 3, 1, 4).numpy().tobytes()
        conn.sendall(HEADER.pack(int(FrameType.LAYER), len(payload)) + payload)
        second = LAYER_INDEX.pack(1) + payload[LAYER_INDEX.size:]
        conn.sendall(HEADER.pack(int(FrameType.LAYER), len(second)) + second[:10])  # cut mid-layer
        # then the peer is gone (the fake closes the socket, as the kernel does for a killed process)

    with FakeKVPeer(dies_after_one_layer) as peer:
        received: list[int] = []
        start = time.monotonic()
        with pytest.raises(KVTransferError) as error:
            await TcpKVTransport(frame_timeout=5).pull(peer.address, "h", "r", LAYOUT,
                                                        lambda layer, _t: received.append(layer))
    assert time.monotonic() - start < 2, "a dead peer is noticed at once, not after the frame timeout"
    assert error.value.kind == "kv_unavailable" and error.value.retryable
    assert received == [0], "layers that arrived were handed over as they came"


async def test_stalled_peer_times_out() -> None:
    with FakeKVPeer(lambda conn: time.sleep(1), handshake=False) as peer, pytest.raises(KVTransferError) as error:
        await TcpKVTransport(frame_timeout=0.3).pull(peer.address, "h", "r", LAYOUT, lambda *_: None)
    assert error.value.kind == "kv_timeout" and error.value.retryable


async def test_unreachable_port_is_retryable() -> None:
    with pytest.raises(KVTransferError) as error:
        await TcpKVTransport(connect_timeout=1).pull("127.0.0.31:1", "h", "r", LAYOUT, lambda *_: None)
    assert error.value.kind == "kv_unavailable" and error.value.retryable


async def test_receiver_refuses_more_tokens_than_it_reserved(tiny: LoadedModel) -> None:
    """A peer announcing a bigger cache than the reservation is refused before any layer is read."""
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=256))
    c = tiny.config
    reservation = receiver.reserve([1] * 10, SamplingParams(max_tokens=6))
    assert reservation is not None

    def announces_a_huge_cache(conn: socket.socket) -> None:
        recv_control(conn)
        conn.sendall(ReplyHeader("float32", c.num_hidden_layers, 1 << 20, c.kv_heads, c.dim_per_head).encode())
        time.sleep(1)

    with FakeKVPeer(announces_a_huge_cache) as peer, pytest.raises(KVTransferError, match="does not fit") as error:
        await TcpKVTransport(frame_timeout=5).pull(peer.address, "h", "r", layout_of(receiver),
                                                    pool_sink(receiver, reservation))
    assert error.value.kind == "kv_mismatch" and not error.value.retryable


async def test_layer_frame_of_the_wrong_size_is_refused_unread() -> None:
    def lies_about_the_layer(conn: socket.socket) -> None:
        recv_control(conn)
        conn.sendall(ReplyHeader("float32", layers=2, tokens=3, kv_heads=1, head_dim=4).encode())
        conn.sendall(HEADER.pack(int(FrameType.LAYER), 1 << 33) + LAYER_INDEX.pack(0))
        time.sleep(1)

    with FakeKVPeer(lies_about_the_layer) as peer, pytest.raises(KVTransferError, match="bad KV frame") as error:
        await TcpKVTransport(frame_timeout=5).pull(peer.address, "h", "r", LAYOUT, lambda *_: None)
    assert error.value.kind == "kv_protocol"


async def test_cancelled_pull_stops_writing_before_it_returns() -> None:
    """The caller frees the reservation when a pull is cancelled: the transfer thread must be done."""
    sent_header = threading.Event()

    def stalls_after_the_header(conn: socket.socket) -> None:
        recv_control(conn)
        conn.sendall(ReplyHeader("float32", layers=2, tokens=3, kv_heads=1, head_dim=4).encode())
        sent_header.set()
        time.sleep(3)

    writes: list[int] = []
    with FakeKVPeer(stalls_after_the_header) as peer:
        task = asyncio.ensure_future(TcpKVTransport(frame_timeout=20).pull(
            peer.address, "h", "r", LAYOUT, lambda layer, _t: writes.append(layer)))
        await asyncio.to_thread(sent_header.wait, 5)
        await asyncio.sleep(0.1)
        start = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - start < 2, "cancellation cuts the socket instead of waiting it out"
    assert writes == []


async def _prefilled(tiny: LoadedModel, ttl: float) -> tuple[Engine, KVServer, str, str, list[int]]:
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role="prefill", kv_cache_tokens=256, kv_ttl_seconds=ttl))
    engine.start()
    server = KVServer(engine, frame_timeout=2, token=None)
    await server.start("127.0.0.32", 0)
    prompt = tiny.tokenizer.encode("a prompt whose cache waits").ids
    stream = RequestStream("r", asyncio.get_running_loop())
    engine.submit("r", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), stream)
    first = await stream.queue.get()
    assert first.kv_handle is not None
    return engine, server, f"127.0.0.32:{server.port}", first.kv_handle, prompt


async def test_ttl_expiry_gives_retryable_error_and_frees_cache(tiny: LoadedModel) -> None:
    engine, server, address, handle, _prompt = await _prefilled(tiny, ttl=0.2)
    try:
        assert engine.allocator.free_tokens < engine.allocator.capacity_tokens
        await asyncio.sleep(0.6)  # the engine sweeps expired caches while idle
        assert engine.held_count == 0
        assert engine.allocator.free_tokens == engine.allocator.capacity_tokens
        with pytest.raises(KVTransferError, match="expired") as error:
            await TcpKVTransport().pull(address, handle, "r", layout_of(engine), lambda *_: None)
        assert error.value.kind == "kv_unavailable" and error.value.retryable
    finally:
        await server.stop()
        engine.stop()


async def test_mismatched_receiver_is_not_retryable(tiny: LoadedModel) -> None:
    engine, server, address, handle, _prompt = await _prefilled(tiny, ttl=30)
    try:
        wrong = KVLayout(torch.float16, tiny.config.num_hidden_layers, tiny.config.kv_heads,
                         tiny.config.dim_per_head)
        with pytest.raises(KVTransferError) as error:
            await TcpKVTransport().pull(address, handle, "r", wrong, lambda *_: None)
        assert error.value.kind == "kv_mismatch" and not error.value.retryable
        assert engine.held_count == 1, "a failed pull leaves the cache for a retry"
    finally:
        await server.stop()
        engine.stop()


async def test_pulled_cache_equals_source_and_is_freed_after_ack(tiny: LoadedModel) -> None:
    engine, server, address, handle, prompt = await _prefilled(tiny, ttl=30)
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=256))
    try:
        held = engine.pin_held(handle)
        assert held is not None
        engine.unpin_held(handle, release=False)
        source = torch.stack([engine.kv_pool.read(i, held.slot_table[: len(prompt)])
                              for i in range(len(engine.kv_pool))])
        reservation = receiver.reserve(prompt, SamplingParams(max_tokens=8))
        assert reservation is not None
        stats = await TcpKVTransport().pull(address, handle, "r", layout_of(receiver),
                                            pool_sink(receiver, reservation))
        assert stats.bytes == source.numel() * 4
        slots = reservation.slot_table[: len(prompt)]
        received = torch.stack([receiver.kv_pool.read(i, slots) for i in range(len(receiver.kv_pool))])
        assert torch.equal(received, source)
        for _ in range(50):
            if engine.held_count == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.held_count == 0 and engine.allocator.free_tokens == engine.allocator.capacity_tokens
        with pytest.raises(KVTransferError, match="unknown or expired"):
            await TcpKVTransport().pull(address, handle, "r", layout_of(receiver), lambda *_: None)
    finally:
        await server.stop()
        engine.stop()


async def test_decode_reservation_refuses_when_full(tiny: LoadedModel) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=64,
                                                                 block_size=16))
    params = SamplingParams(max_tokens=20)
    first = engine.reserve(list(range(20)), params)  # 40 tokens -> 3 blocks of 16
    assert first is not None and engine.allocator.free_tokens == 16
    assert engine.reserve(list(range(20)), params) is None
    engine.cancel_reservation(first)
    assert engine.reserve(list(range(20)), params) is not None
    assert json.dumps(KVTransferError("kv_timeout", "m", True).wire())


async def test_bfloat16_cache_crosses_the_wire_bit_exact() -> None:
    """GPUs serve bf16: numpy has no bf16, so the wire carries raw bytes and both ends view them."""
    from disaggserve_worker.model.loader import load_model

    loaded = load_model("builtin:tiny-llama", device="cpu", dtype="bfloat16")
    engine, server, address, handle, prompt = await _prefilled(loaded, ttl=30)
    receiver = Engine(loaded.model, loaded.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=256))
    try:
        assert engine.kv_pool.dtype == torch.bfloat16
        held = engine.pin_held(handle)
        assert held is not None
        engine.unpin_held(handle, release=False)
        source = torch.stack([engine.kv_pool.read(i, held.slot_table[: len(prompt)])
                              for i in range(len(engine.kv_pool))])
        reservation = receiver.reserve(prompt, SamplingParams(max_tokens=4))
        assert reservation is not None
        await TcpKVTransport().pull(address, handle, "r", layout_of(receiver),
                                    pool_sink(receiver, reservation))
        slots = reservation.slot_table[: len(prompt)]
        assert torch.equal(torch.stack([receiver.kv_pool.read(i, slots) for i in range(len(receiver.kv_pool))]),
                           source)
        assert source.abs().sum() > 0
    finally:
        await server.stop()
        engine.stop()


async def test_pulls_reuse_one_connection_and_survive_a_restarted_port(tiny: LoadedModel) -> None:
    """Back-to-back pulls from one peer share one authenticated connection; when the peer drops
    it (restart, idle timeout), the next pull reconnects instead of failing."""
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role="prefill", kv_cache_tokens=512, kv_ttl_seconds=30))
    engine.start()
    server = KVServer(engine, frame_timeout=2, token=None)
    await server.start("127.0.0.32", 0)
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=512))
    transport = TcpKVTransport()
    loop = asyncio.get_running_loop()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    async def one(i: int) -> None:
        prompt = [3 + i] * (20 + i)
        stream = RequestStream(f"r{i}", loop)
        engine.submit(f"r{i}", prompt, params, stream)
        first = await stream.queue.get()
        reservation = receiver.reserve(prompt, params)
        assert first.kv_handle is not None and reservation is not None
        await transport.pull(f"127.0.0.32:{server.port}", first.kv_handle, f"r{i}", layout_of(receiver),
                             pool_sink(receiver, reservation))
        receiver.cancel_reservation(reservation)

    try:
        for i in range(3):
            await one(i)
        assert server.accepted == 1, "three pulls, one connection"
        port = server.port
        await server.stop()  # cuts the pooled connection, like a restarted prefill worker
        server = KVServer(engine, frame_timeout=2, token=None)
        await server.start("127.0.0.32", port)
        await one(3)
        assert server.accepted == 1
    finally:
        transport.close()
        await server.stop()
        engine.stop()


async def test_pull_into_fragmented_blocks_equals_source(tiny: LoadedModel) -> None:
    """Blocks freed out of order leave a reservation scattered over the pool: the pull still
    lands each token in its own slot (block-wise scatter straight from the socket)."""
    engine, server, address, handle, prompt = await _prefilled(tiny, ttl=30)
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=256,
                                                                   block_size=4))
    transport = TcpKVTransport()
    try:
        every = receiver.allocator.try_allocate(receiver.allocator.capacity_tokens)
        assert every is not None
        receiver.allocator.free(every[1::3] + every[::3][::-1] + every[2::3])
        reservation = receiver.reserve(prompt, SamplingParams(max_tokens=4))
        assert reservation is not None
        assert len(slot_runs(reservation.slot_table[: len(prompt)])) > 1, "the reservation is fragmented"
        held = engine.pin_held(handle)
        assert held is not None
        engine.unpin_held(handle, release=False)
        source = torch.stack([engine.kv_pool.read(i, held.slot_table[: len(prompt)])
                              for i in range(len(engine.kv_pool))])
        await transport.pull(address, handle, "r", layout_of(receiver), pool_sink(receiver, reservation))
        slots = reservation.slot_table[: len(prompt)]
        assert torch.equal(torch.stack([receiver.kv_pool.read(i, slots) for i in range(len(receiver.kv_pool))]),
                           source)
    finally:
        transport.close()
        await server.stop()
        engine.stop()


def test_the_ports_frame_reader_reads_and_refuses_as_recv_control_does() -> None:
    """`native.frame_reader` (C where it builds, see the kv_io fixture) on a port's blocking socket."""
    a, b = socket.socketpair()
    try:
        set_timeout(b, 0.2)
        read = frame_reader(b)
        a.sendall(HEADER.pack(int(FrameType.ACK), 3) + b"xyz" + HEADER.pack(int(FrameType.REQUEST), 2) + b"hi")
        assert read(MAX_CONTROL_FRAME) == (FrameType.ACK, bytearray(b"xyz"))
        assert read(MAX_CONTROL_FRAME) == (FrameType.REQUEST, bytearray(b"hi"))
        a.sendall(HEADER.pack(int(FrameType.END), 10) + b"abc")  # promises 10 bytes, sends 3
        with pytest.raises(KVTransferError) as timeout:
            read(MAX_CONTROL_FRAME)
        assert timeout.value.kind == "kv_timeout" and timeout.value.retryable
    finally:
        a.close()
        b.close()
    a, b = socket.socketpair()
    try:
        set_timeout(b, 1)
        read = frame_reader(b)
        a.sendall(HEADER.pack(int(FrameType.REQUEST), 1 << 40))  # a terabyte, refused unread
        with pytest.raises(KVTransferError, match="exceeds") as big:
            read(MAX_CONTROL_FRAME)
        assert big.value.kind == "kv_protocol"
        a.sendall(HEADER.pack(int(FrameType.LAYER), 8))
        with pytest.raises(KVTransferError, match="unexpected KV layer frame"):
            read(MAX_CONTROL_FRAME)
        a.sendall(HEADER.pack(int(FrameType.REQUEST), 4) + b"ab")
        a.close()
        with pytest.raises(KVTransferError, match="closed") as closed:
            read(MAX_CONTROL_FRAME)
        assert closed.value.kind == "kv_unavailable" and closed.value.retryable
    finally:
        b.close()


def test_a_prepared_reply_goes_out_whole_and_in_order() -> None:
    """`native.Gather` (a held cache's reply, sent in C) sends what `send_buffers` would, through
    a socket buffer that fills many times over; a peer gone is a retryable error."""
    from disaggserve_worker.kv import native
    from disaggserve_worker.kv.framing import SOCKET_BUFFER, send_buffers

    rng = torch.Generator().manual_seed(5)
    pool = torch.randint(0, 256, (3 * SOCKET_BUFFER + 11,), dtype=torch.uint8, generator=rng)
    view = memoryview(pool.numpy())
    buffers = [b"head", view[5:SOCKET_BUFFER + 9], b"", b"mid", view[SOCKET_BUFFER + 9:], view[:5], b"end"]
    expected = b"".join(bytes(b) for b in buffers)
    prepared = native.gather(buffers)
    assert (prepared is None) == (native.library() is None)
    a, b = socket.socketpair()
    try:
        set_timeout(a, 5)
        received = bytearray()
        reader = threading.Thread(target=lambda: received.extend(recv_exact(b, len(expected))))
        reader.start()
        if prepared is not None:
            prepared.send(a)
        else:
            send_buffers(a, buffers)
        reader.join(10)
        assert received == expected
        b.close()
        with pytest.raises(KVTransferError) as gone:
            for _ in range(4):  # the first send after the peer closed may still be taken
                prepared.send(a) if prepared is not None else send_buffers(a, buffers)
        assert gone.value.kind == "kv_unavailable" and gone.value.retryable
    finally:
        a.close()
        b.close()
