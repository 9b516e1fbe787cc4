"""Same-host KV pulls through the prefill pool's shared-memory segment (`kv.shared_memory`): the
cache lands exactly as over TCP, peers that cannot map the segment fall back to TCP, a hostile
peer's slot runs are refused, and segments do not outlive their pool or process."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import pytest
import torch

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv import shared_memory
from disaggserve_worker.kv.shared_memory import SegmentReader, copy_regions, shared_pool, sweep_stale
from disaggserve_worker.kv.transport import KVServer, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.model.loader import LoadedModel


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(shared_memory.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(shared_memory.ENV_MODE, "on")
    return tmp_path


async def _prefill(engine: Engine, tiny: LoadedModel, text: str) -> tuple[str, list[int]]:
    prompt = tiny.tokenizer.encode(text).ids
    stream = RequestStream(text, asyncio.get_running_loop())
    engine.submit(text, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), stream)
    first = await stream.queue.get()
    assert first.kv_handle is not None
    return first.kv_handle, prompt


def _held_cache(engine: Engine, handle: str, tokens: int) -> torch.Tensor:
    held = engine.pin_held(handle)
    assert held is not None
    engine.unpin_held(handle, release=False)
    return torch.stack([engine.kv_pool.read(i, held.slot_table[:tokens]) for i in range(len(engine.kv_pool))])


async def _pull_all(tiny: LoadedModel, transport: TcpKVTransport, server: KVServer, engine: Engine,
                    texts: list[str], receiver_block: int = 16) -> None:
    """Prefill each text, pull its cache into a (fragmented) decode pool, compare with the source."""
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=512,
                                                                   block_size=receiver_block))
    every = receiver.allocator.try_allocate(receiver.allocator.capacity_tokens)
    assert every is not None
    receiver.allocator.free(every[1::3] + every[::3][::-1] + every[2::3])  # scattered free blocks
    for text in texts:
        handle, prompt = await _prefill(engine, tiny, text)
        source = _held_cache(engine, handle, len(prompt))
        reservation = receiver.reserve(prompt, SamplingParams(max_tokens=4))
        assert reservation is not None
        stats = await transport.pull(f"127.0.0.33:{server.port}", handle, text, layout_of(receiver),
                                     pool_sink(receiver, reservation))
        assert stats.bytes == source.numel() * source.element_size()
        slots = reservation.slot_table[:len(prompt)]
        got = torch.stack([receiver.kv_pool.read(i, slots) for i in range(len(receiver.kv_pool))])
        assert torch.equal(got, source), text
    for _ in range(100):  # every ACK arrived: the caches are released
        if engine.held_count == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.held_count == 0


async def test_a_same_host_pull_copies_the_held_blocks_exactly(tiny: LoadedModel, shm_dir: Path) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="prefill", kv_cache_tokens=512, block_size=4,
                                                                 shared_kv=True))
    assert engine.kv_segment is not None and Path(engine.kv_segment.path).parent == shm_dir
    engine.start()
    # The prefill pool is fragmented too, so source runs and target runs break in different places.
    scattered = engine.allocator.try_allocate(engine.allocator.capacity_tokens)
    assert scattered is not None
    engine.allocator.free(scattered[::2] + scattered[1::2][::-1])
    server = KVServer(engine, frame_timeout=2, token=None)
    await server.start("127.0.0.33", 0)
    transport = TcpKVTransport(token=None)
    texts = ["a first prompt whose cache crosses in shared memory",
             "a second, longer prompt: its pull reuses the pooled connection and its mapping " * 3]
    try:
        await _pull_all(tiny, transport, server, engine, texts, receiver_block=16)
        assert server.shared_pulls == len(texts)
        held = next(iter(transport._idle.values()))[0]
        assert held.segment is not None
        # A transport told not to map segments pulls the same bytes over TCP.
        plain = TcpKVTransport(token=None, shared_memory=False)
        try:
            await _pull_all(tiny, plain, server, engine, ["over TCP on purpose"])
        finally:
            plain.close()
        assert server.shared_pulls == len(texts)
    finally:
        transport.close()
        await server.stop()
        engine.stop()


async def test_a_segment_this_host_cannot_open_falls_back_to_tcp(tiny: LoadedModel, shm_dir: Path) -> None:
    """Another host (or user) cannot open the announced file: the pull goes over TCP, exactly."""
    engine = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="prefill", kv_cache_tokens=256,
                                                                 shared_kv=True))
    assert engine.kv_segment is not None
    os.rename(engine.kv_segment.path, shm_dir / "moved")  # the mapping lives on; the name is gone
    engine.start()
    server = KVServer(engine, frame_timeout=2, token=None)
    await server.start("127.0.0.33", 0)
    transport = TcpKVTransport(token=None)
    try:
        await _pull_all(tiny, transport, server, engine, ["a prompt on a host of its own", "and another one"])
        assert server.shared_pulls == 0
    finally:
        transport.close()
        await server.stop()
        engine.stop()


def test_a_peers_slot_runs_are_checked_against_the_segment(shm_dir: Path) -> None:
    made = shared_pool(2, 64, 2, 8, torch.float32)
    assert made is not None
    pool, info = made
    reader = SegmentReader(info)
    try:
        assert reader.check_runs([[0, 16], [32, 8]], 24) == [(0, 16), (32, 8)]
        for runs, tokens in (([[60, 8]], 8), ([[-1, 4]], 4), ([[0, 0]], 0), ([[0, 8]], 9), ("0-8", 8)):
            with pytest.raises(ValueError):
                reader.check_runs(runs, tokens)
        # What the reader sees is the pool: a write through the pool shows in the mapping.
        pool.layers[1][0][1, 5] = 7.0
        (v_region,) = reader.layer_regions(1, [(5, 1)])[1:]
        assert torch.equal(torch.frombuffer(bytearray(v_region), dtype=torch.float32), torch.full((16,), 7.0))
        with pytest.raises(OSError, match="another segment"):
            SegmentReader(shared_memory.SegmentInfo(info.path, "0" * 32, info.layers, info.slots, info.token_bytes))
    finally:
        reader.close()


def test_a_restarted_peers_old_segment_is_unmapped(shm_dir: Path) -> None:
    """The old mapping would keep the old pool's pages alive after its worker is gone."""
    first, second = shared_pool(1, 32, 1, 4, torch.float32), shared_pool(1, 32, 1, 4, torch.float32)
    assert first is not None and second is not None
    transport = TcpKVTransport(token=None)
    try:
        old = transport._map_segment("10.0.0.1:9000", first[1].wire())
        assert old is not None and transport._map_segment("10.0.0.2:9000", first[1].wire()) is old
        assert transport._map_segment("10.0.0.1:9000", second[1].wire()) is not old
        assert not old._map.closed, "another peer address still uses it"
        transport._map_segment("10.0.0.2:9000", second[1].wire())
        assert old._map.closed
    finally:
        transport.close()


def test_segments_go_with_their_pool_and_stale_ones_are_swept(shm_dir: Path) -> None:
    made = shared_pool(1, 32, 1, 4, torch.bfloat16)
    assert made is not None
    path = Path(made[1].path)
    assert path.exists() and path.stat().st_mode & 0o777 == 0o600
    del made
    gc.collect()
    assert not path.exists()
    dead = shm_dir / f"{shared_memory.PREFIX}{2 ** 22 + 12345}-abc"  # above Linux's pid_max
    live = shm_dir / f"{shared_memory.PREFIX}{os.getpid()}-def"
    dead.write_bytes(b"x")
    live.write_bytes(b"x")
    assert sweep_stale(shm_dir) == 1
    assert not dead.exists() and live.exists()


def test_auto_keeps_private_memory_without_room_and_on_says_why(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(shared_memory.ENV_DIR, str(tmp_path / "missing"))
    monkeypatch.setenv(shared_memory.ENV_MODE, "auto")
    assert shared_pool(1, 32, 1, 4, torch.float32) is None
    monkeypatch.setenv(shared_memory.ENV_MODE, "on")
    with pytest.raises(shared_memory.SharedMemoryUnavailable, match="cannot go to"):
        shared_pool(1, 32, 1, 4, torch.float32)
    monkeypatch.setenv(shared_memory.ENV_DIR, str(tmp_path))
    monkeypatch.setattr(shared_memory, "HEADROOM", 1e12)  # a folder too small for the pool
    monkeypatch.setenv(shared_memory.ENV_MODE, "auto")
    assert shared_pool(1, 32, 1, 4, torch.float32) is None
    monkeypatch.setenv(shared_memory.ENV_MODE, "sometimes")
    with pytest.raises(ValueError, match="auto, on, off"):
        shared_pool(1, 32, 1, 4, torch.float32)


def test_copy_regions_across_different_boundaries() -> None:
    source = bytes(range(40))
    sources = [memoryview(source)[a:b] for a, b in ((0, 7), (7, 8), (8, 30), (30, 40))]
    target = bytearray(40)
    view = memoryview(target)
    targets = [view[a:b] for a, b in ((0, 16), (16, 32), (32, 40))]
    assert copy_regions(sources, targets) == 40
    assert bytes(target) == source
    with pytest.raises(ValueError, match="targets"):
        copy_regions(sources, targets[:2])
