"""The framed KV protocol: round trips, partial reads, timeouts, TTL, broken peers."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import torch

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv.framing import (
    HEADER,
    LAYER_INDEX,
    FrameType,
    KVTransferError,
    decode_json,
    encode_json,
    read_frame,
)
from disaggserve_worker.kv.transport import KVLayout, KVServer, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.model.loader import LoadedModel

LAYOUT = KVLayout(torch.float32, layers=2, kv_heads=1, head_dim=4)


async def test_frame_round_trip_with_partial_reads() -> None:
    reader = asyncio.StreamReader()
    data = encode_json(FrameType.HEADER, {"request_id": "r", "layers": 2}) + \
        HEADER.pack(int(FrameType.LAYER), 8) + LAYER_INDEX.pack(1) + b"abcd"

    async def trickle() -> None:  # one byte at a time: frames must still come out whole
        for i in range(len(data)):
            reader.feed_data(data[i:i + 1])
            await asyncio.sleep(0)

    feeder = asyncio.create_task(trickle())
    kind, payload = await read_frame(reader, timeout=2)
    assert kind is FrameType.HEADER and decode_json(payload) == {"request_id": "r", "layers": 2}
    kind, payload = await read_frame(reader, timeout=2)
    assert kind is FrameType.LAYER and LAYER_INDEX.unpack_from(payload) == (1,) and payload[4:] == b"abcd"
    await feeder


async def test_read_timeout_and_garbage() -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(HEADER.pack(int(FrameType.END), 10) + b"abc")  # promises 10 bytes, sends 3
    with pytest.raises(KVTransferError) as timeout:
        await read_frame(reader, timeout=0.2)
    assert timeout.value.kind == "kv_timeout" and timeout.value.retryable
    garbage = asyncio.StreamReader()
    garbage.feed_data(HEADER.pack(99, 0))
    with pytest.raises(KVTransferError, match="unknown KV frame type") as bad:
        await read_frame(garbage, timeout=1)
    assert not bad.value.retryable


async def _serve_once(handler) -> tuple[asyncio.Server, str]:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handler, "127.0.0.31", 0)
    return server, f"127.0.0.31:{server.sockets[0].getsockname()[1]}"


async def test_peer_dying_mid_transfer_is_a_clean_retryable_error() -> None:
    async def dies_after_one_layer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_frame(reader, 2)
        writer.write(encode_json(FrameType.HEADER, {"request_id": "r", "dtype": "float32", "layers": 2,
                                                    "shape": [2, 3, 1, 4]}))
        payload = LAYER_INDEX.pack(0) + torch.zeros(2, 3, 1, 4).numpy().tobytes()
        writer.write(HEADER.pack(int(FrameType.LAYER), len(payload)) + payload)
        writer.write(HEADER.pack(int(FrameType.LAYER), len(payload)) + payload[:10])  # cut mid-layer
        await writer.drain()
        writer.transport.abort()  # like a killed process: no orderly shutdown

    server, address = await _serve_once(dies_after_one_layer)
    received: list[int] = []
    start = time.monotonic()
    with pytest.raises(KVTransferError) as error:
        await TcpKVTransport(frame_timeout=5).pull(address, "h", "r", LAYOUT,
                                                    lambda layer, _t: received.append(layer))
    assert time.monotonic() - start < 2, "a dead peer is noticed at once, not after the frame timeout"
    assert error.value.kind == "kv_unavailable" and error.value.retryable
    assert received == [0], "layers that arrived were handed over as they came"
    server.close()


async def test_stalled_peer_times_out() -> None:
    async def stalls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(5)

    server, address = await _serve_once(stalls)
    with pytest.raises(KVTransferError) as error:
        await TcpKVTransport(frame_timeout=0.3).pull(address, "h", "r", LAYOUT, lambda *_: None)
    assert error.value.kind == "kv_timeout" and error.value.retryable
    server.close()


async def test_unreachable_port_is_retryable() -> None:
    with pytest.raises(KVTransferError) as error:
        await TcpKVTransport(connect_timeout=1).pull("127.0.0.31:1", "h", "r", LAYOUT, lambda *_: None)
    assert error.value.kind == "kv_unavailable" and error.value.retryable


async def _prefilled(tiny: LoadedModel, ttl: float) -> tuple[Engine, KVServer, str, str, list[int]]:
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role="prefill", kv_cache_tokens=256, kv_ttl_seconds=ttl))
    engine.start()
    server = KVServer(engine, frame_timeout=2)
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
                                            pool_sink(receiver, reservation.slot_table))
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
                                    pool_sink(receiver, reservation.slot_table))
        slots = reservation.slot_table[: len(prompt)]
        assert torch.equal(torch.stack([receiver.kv_pool.read(i, slots) for i in range(len(receiver.kv_pool))]),
                           source)
        assert source.abs().sum() > 0
    finally:
        await server.stop()
        engine.stop()
