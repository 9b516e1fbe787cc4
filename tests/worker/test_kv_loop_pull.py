"""Pulls on a pooled connection into a direct pool sink run on the event loop
(`TcpKVTransport._exchange_on_loop`), with the ACK sent right after the pull returns: the same
faults as the transfer-thread path (a stalled peer, a peer dying mid-layer, a cancellation, a
refused handle) must end the same way, and the data and the ACK must arrive."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

import pytest
import torch

from disaggserve_worker.kv.framing import (
    HEADER,
    LAYER_INDEX,
    FrameType,
    KVTransferError,
    ReplyHeader,
    encode_count,
    encode_json,
    recv_control,
)
from disaggserve_worker.kv.layout import PoolSink
from disaggserve_worker.kv.transport import KVLayout, TcpKVTransport
from disaggserve_worker.model.kv_pool import KVPool
from kv_fakes import FakeKVPeer, kv_io  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("kv_io")  # each test reads in C and in Python

LAYOUT = KVLayout(torch.float32, layers=2, kv_heads=1, head_dim=4)
TOKENS = 3


def _layer(layer: int) -> bytes:
    payload = LAYER_INDEX.pack(layer) + torch.full((2, TOKENS, 1, 4), float(layer + 1)).numpy().tobytes()
    return HEADER.pack(int(FrameType.LAYER), len(payload)) + payload


def _header(conn: socket.socket) -> None:
    conn.sendall(ReplyHeader("float32", layers=2, tokens=TOKENS, kv_heads=1, head_dim=4).encode())


def _answers(conn: socket.socket, acks: list[float]) -> None:
    """One well-formed reply, then the ACK (its arrival time recorded)."""
    assert recv_control(conn)[0] is FrameType.REQUEST
    _header(conn)
    conn.sendall(_layer(0) + _layer(1) + encode_count(FrameType.END, 2 * LAYOUT.layer_bytes(TOKENS)))
    kind, _ = recv_control(conn)
    assert kind is FrameType.ACK
    acks.append(time.monotonic())


def _sink() -> tuple[PoolSink, KVPool]:
    pool = KVPool([[torch.zeros(2, 8, 1, 4)] for _ in range(2)])
    return PoolSink(pool, torch.tensor([5, 6, 7])), pool


async def _second_pull(then: Callable[[socket.socket], None], frame_timeout: float = 5.0,
                       cancel_after: threading.Event | None = None,
                       took: list[float] | None = None,
                       pools: list[KVPool] | None = None) -> tuple[TcpKVTransport, PoolSink, KVPool]:
    """A first pull that authenticates the connection (on a transfer thread), then a second one on
    the loop against `then`; raises what the second raises. `took` gets the seconds the second
    pull ran (from its cancellation, if cancelled) before it ended, `pools` its sink's pool."""
    acks: list[float] = []

    def script(conn: socket.socket) -> None:
        _answers(conn, acks)
        then(conn)

    transport = TcpKVTransport(frame_timeout=frame_timeout, token=None)
    with FakeKVPeer(script) as peer:
        first, _ = _sink()
        await transport.pull(peer.address, "h1", "r1", LAYOUT, first)
        sink, pool = _sink()
        if pools is not None:
            pools.append(pool)
        task = asyncio.ensure_future(transport.pull(peer.address, "h2", "r2", LAYOUT, sink))
        start = time.monotonic()
        if cancel_after is not None:
            await asyncio.to_thread(cancel_after.wait, 5)
            await asyncio.sleep(0.1)
            start = time.monotonic()
            task.cancel()
        try:
            await task
        finally:
            if took is not None:
                took.append(time.monotonic() - start)
            transport.close()
    return transport, sink, pool


async def test_a_pooled_pull_lands_in_the_pool_and_is_acknowledged_after_it_returns() -> None:
    acks: list[float] = []
    transport = TcpKVTransport(token=None)
    with FakeKVPeer(lambda conn: (_answers(conn, acks), _answers(conn, acks))) as peer:
        await transport.pull(peer.address, "h1", "r1", LAYOUT, _sink()[0])
        sink, pool = _sink()
        stats = await transport.pull(peer.address, "h2", "r2", LAYOUT, sink)
        returned = time.monotonic()
        for _ in range(100):
            if len(acks) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(acks) == 2, "the second pull's ACK reached the peer"
        assert acks[1] >= returned - 0.05
        assert len(transport._idle[peer.address]) == 1, "pooled again once its ACK was out"
    transport.close()
    assert (stats.bytes, stats.tokens) == (2 * LAYOUT.layer_bytes(TOKENS), TOKENS)
    for layer in range(2):
        assert torch.equal(pool.layers[layer][0][:, 5:8], torch.full((2, TOKENS, 1, 4), float(layer + 1)))
        assert not pool.layers[layer][0][:, :5].any() and not pool.layers[layer][0][:, 8:].any()


async def test_transfer_thread_pulls_back_to_back_share_one_connection_and_both_are_acknowledged() -> None:
    """A staged sink pulls on a transfer thread, whose ACK also goes out from the loop once the pull
    has returned: a pull that follows at once must send it first on the same connection (the fake
    peer accepts one connection only: opening a second would hang this test)."""
    acks: list[float] = []
    received: list[tuple[int, torch.Tensor]] = []
    transport = TcpKVTransport(token=None)
    with FakeKVPeer(lambda conn: (_answers(conn, acks), _answers(conn, acks))) as peer:
        returned = []
        for handle in ("h1", "h2"):
            await transport.pull(peer.address, handle, "r", LAYOUT,
                                 lambda layer, tensor: received.append((layer, tensor.clone())))
            returned.append(time.monotonic())
        for _ in range(100):
            if len(acks) == 2:
                break
            await asyncio.sleep(0.01)
        assert len(acks) == 2, "both ACKs reached the peer"
        assert acks[0] >= returned[0] - 0.05 and acks[1] >= returned[1] - 0.05
        assert len(peer.connections) == 1 and len(transport._idle[peer.address]) == 1
    transport.close()
    assert [layer for layer, _ in received] == [0, 1, 0, 1]
    assert all(torch.equal(t, torch.full((2, TOKENS, 1, 4), float(layer + 1))) for layer, t in received)


async def test_a_stalled_peer_times_out_on_the_loop() -> None:
    def stalls(conn: socket.socket) -> None:
        recv_control(conn)
        time.sleep(1.5)

    took: list[float] = []
    with pytest.raises(KVTransferError) as error:
        await _second_pull(stalls, frame_timeout=0.3, took=took)
    assert error.value.kind == "kv_timeout" and error.value.retryable
    assert took[0] < 1.2, took


async def test_a_peer_dying_mid_layer_is_retryable_on_the_loop() -> None:
    def dies(conn: socket.socket) -> None:
        recv_control(conn)
        _header(conn)
        conn.sendall(_layer(0)[:20])

    with pytest.raises(KVTransferError) as error:
        await _second_pull(dies)
    assert error.value.kind == "kv_unavailable" and error.value.retryable


async def test_a_reply_without_its_end_frame_fails_the_loop_pull() -> None:
    def errs_in_place_of_the_end(conn: socket.socket) -> None:
        recv_control(conn)
        _header(conn)
        conn.sendall(_layer(0) + _layer(1) + encode_json(FrameType.ERROR, {"type": "kv_unavailable",
                                                                            "message": "gone", "retryable": True}))
        time.sleep(0.5)

    with pytest.raises(KVTransferError, match="expected the KV end frame") as error:
        await _second_pull(errs_in_place_of_the_end)
    assert error.value.kind == "kv_protocol"


async def test_a_refused_handle_keeps_the_connection() -> None:
    def refuses(conn: socket.socket) -> None:
        recv_control(conn)
        conn.sendall(encode_json(FrameType.ERROR, {"type": "kv_unavailable", "message": "expired",
                                                   "retryable": True}))
        time.sleep(0.5)

    with pytest.raises(KVTransferError, match="expired"):
        await _second_pull(refuses)


async def test_a_cancelled_loop_pull_writes_nothing_after_it_returns() -> None:
    header_sent = threading.Event()

    def stalls_after_the_header(conn: socket.socket) -> None:
        recv_control(conn)
        _header(conn)
        header_sent.set()
        time.sleep(2)
        conn.sendall(_layer(0))  # too late: the pull was cancelled

    took: list[float] = []
    pools: list[KVPool] = []
    with pytest.raises(asyncio.CancelledError):
        await _second_pull(stalls_after_the_header, cancel_after=header_sent, took=took, pools=pools)
    assert took[0] < 0.5, "cancellation does not wait for the peer"
    assert not any(layer[0].any() for layer in pools[-1].layers), "the late layer went nowhere"


async def test_a_header_that_does_not_fit_fails_the_loop_pull_as_a_mismatch() -> None:
    """The native receive declines a header it does not take; the Python path then reports it."""
    for header in (ReplyHeader("float32", layers=2, tokens=TOKENS, kv_heads=2, head_dim=4),  # another model
                   ReplyHeader("float32", layers=2, tokens=4, kv_heads=1, head_dim=4)):  # more than reserved
        def answers(conn: socket.socket, header: ReplyHeader = header) -> None:
            recv_control(conn)
            conn.sendall(header.encode())
            time.sleep(0.5)

        with pytest.raises(KVTransferError, match="does not fit") as error:
            await _second_pull(answers)
        assert error.value.kind == "kv_mismatch" and not error.value.retryable


async def test_layers_out_of_order_fail_the_loop_pull() -> None:
    def swaps(conn: socket.socket) -> None:
        recv_control(conn)
        _header(conn)
        conn.sendall(_layer(1) + _layer(0) + encode_count(FrameType.END, 2 * LAYOUT.layer_bytes(TOKENS)))
        time.sleep(0.5)

    with pytest.raises(KVTransferError, match=r"layer 1\) where layer 0 ") as error:
        await _second_pull(swaps)
    assert error.value.kind == "kv_protocol" and not error.value.retryable


async def test_a_loop_pull_into_scattered_blocks_lands_token_by_token() -> None:
    """Blocks 3 then 0 of two slots: the three tokens land in slots 6, 7 and 0, K and V apart."""
    values = torch.arange(2 * TOKENS * 4, dtype=torch.float32).reshape(2, TOKENS, 1, 4)

    def answers(conn: socket.socket) -> None:
        recv_control(conn)
        _header(conn)
        for layer in range(2):
            payload = LAYER_INDEX.pack(layer) + (values + 100 * layer).numpy().tobytes()
            conn.sendall(HEADER.pack(int(FrameType.LAYER), len(payload)) + payload)
        conn.sendall(encode_count(FrameType.END, 2 * LAYOUT.layer_bytes(TOKENS)))
        recv_control(conn)

    transport = TcpKVTransport(token=None)
    with FakeKVPeer(lambda conn: (_answers(conn, []), answers(conn))) as peer:
        await transport.pull(peer.address, "h1", "r1", LAYOUT, _sink()[0])
        pool = KVPool([[torch.zeros(2, 8, 1, 4)] for _ in range(2)])
        sink = PoolSink(pool, torch.tensor([6, 7, 0, 1]), blocks=[3, 0], block_size=2)
        stats = await transport.pull(peer.address, "h2", "r2", LAYOUT, sink)
    transport.close()
    assert stats.tokens == TOKENS
    for layer in range(2):
        got = pool.layers[layer][0][:, [6, 7, 0]]
        assert torch.equal(got, values + 100 * layer)
        assert not pool.layers[layer][0][:, 1:6].any()


async def test_loop_pulls_on_one_connection_land_in_each_reservation_and_pool(kv_io: str) -> None:  # noqa: F811
    """A connection's native reader is made once and re-armed for each pull (`kv.native.NativePull`):
    reservations of more blocks than any before, scattered blocks, another pool, an equal layout
    made apart, each pull lands token by token and nothing else is written."""
    values = torch.arange(2 * TOKENS * 4, dtype=torch.float32).reshape(2, TOKENS, 1, 4)

    def answers(conn: socket.socket) -> None:
        assert recv_control(conn)[0] is FrameType.REQUEST
        _header(conn)
        for layer in range(2):
            payload = LAYER_INDEX.pack(layer) + (values + 100 * layer).numpy().tobytes()
            conn.sendall(HEADER.pack(int(FrameType.LAYER), len(payload)) + payload)
        conn.sendall(encode_count(FrameType.END, 2 * LAYOUT.layer_bytes(TOKENS)))
        assert recv_control(conn)[0] is FrameType.ACK

    small = KVPool([[torch.zeros(2, 8, 1, 4)] for _ in range(2)])
    large = KVPool([[torch.zeros(2, 16, 1, 4)] for _ in range(2)])
    pulls = [  # (pool, sink, the slots the three tokens land in, layout)
        (small, PoolSink(small, torch.tensor([6, 7, 0, 1]), blocks=[3, 0], block_size=2), [6, 7, 0], LAYOUT),
        (small, PoolSink(small, torch.tensor([1, 3, 5])), [1, 3, 5], LAYOUT),  # three blocks of one
        (large, PoolSink(large, torch.tensor([14, 2, 9])), [14, 2, 9], LAYOUT),
        (small, PoolSink(small, torch.tensor([4, 5, 2, 3]), blocks=[2, 1], block_size=2), [4, 5, 2],
         KVLayout(torch.float32, layers=2, kv_heads=1, head_dim=4)),
    ]
    transport = TcpKVTransport(token=None)
    readers = []
    with FakeKVPeer(lambda conn: (_answers(conn, []), *(answers(conn) for _ in pulls))) as peer:
        await transport.pull(peer.address, "h0", "r0", LAYOUT, _sink()[0])  # authenticates (transfer thread)
        for i, (pool, sink, slots, layout) in enumerate(pulls):
            for layer in range(2):
                pool.layers[layer][0].zero_()
            stats = await transport.pull(peer.address, f"h{i + 1}", f"r{i + 1}", layout, sink)
            assert stats.tokens == TOKENS
            for layer in range(2):
                tensor = pool.layers[layer][0]
                assert torch.equal(tensor[:, slots], values + 100 * layer)
                rest = [s for s in range(tensor.shape[1]) if s not in slots]
                assert not tensor[:, rest].any(), "nothing written outside the reservation's first tokens"
            readers.append(transport._idle[peer.address][0].native)
        assert len(peer.connections) == 1
    transport.close()
    if kv_io == "native":
        assert readers[0] is not None and all(reader is readers[0] for reader in readers)
    else:
        assert readers == [None] * len(pulls)


@pytest.mark.parametrize(("megabytes", "on_loop"), [(12, True), (20, False)])
async def test_a_pull_is_read_on_the_loop_up_to_loop_max_bytes(megabytes: int, on_loop: bool) -> None:
    """A pooled pull into a direct sink of up to LOOP_MAX_BYTES (12 MB here: the size where the loop's
    C reads beat a transfer thread's blocking read) runs on the loop; a larger one on a thread. The
    bytes land either way."""
    from disaggserve_worker.kv.client import LOOP_MAX_BYTES

    big = KVLayout(torch.float32, layers=2, kv_heads=8, head_dim=64)
    tokens = (megabytes << 20) // (2 * big.layer_bytes(1))
    assert (2 * big.layer_bytes(tokens) <= LOOP_MAX_BYTES) is on_loop

    def big_reply(conn: socket.socket) -> None:
        assert recv_control(conn)[0] is FrameType.REQUEST
        conn.sendall(ReplyHeader("float32", layers=2, tokens=tokens, kv_heads=8, head_dim=64).encode())
        for layer in range(2):
            payload = torch.full((2, tokens, 8, 64), float(layer + 1)).numpy().tobytes()
            conn.sendall(HEADER.pack(int(FrameType.LAYER), LAYER_INDEX.size + len(payload)) + LAYER_INDEX.pack(layer))
            conn.sendall(payload)
        conn.sendall(encode_count(FrameType.END, 2 * big.layer_bytes(tokens)))
        assert recv_control(conn)[0] is FrameType.ACK

    transport = TcpKVTransport(token=None)
    threaded: list[bool] = []
    real = transport._on_thread

    async def on_thread(conn, job):  # type: ignore[no-untyped-def]
        threaded.append(True)
        return await real(conn, job)

    transport._on_thread = on_thread  # type: ignore[method-assign]
    with FakeKVPeer(lambda conn: (_answers(conn, []), big_reply(conn))) as peer:
        await transport.pull(peer.address, "h1", "r1", LAYOUT, _sink()[0])  # authenticates (transfer thread)
        threaded.clear()
        pool = KVPool([[torch.zeros(2, tokens, 8, 64)] for _ in range(2)])
        stats = await transport.pull(peer.address, "h2", "r2", big, PoolSink(pool, torch.arange(tokens)))
    transport.close()
    assert stats.tokens == tokens
    assert (not threaded) is on_loop
    for layer in range(2):
        assert bool((pool.layers[layer][0] == layer + 1).all())
