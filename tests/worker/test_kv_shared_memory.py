"""Same-host KV pulls through the prefill pool's shared-memory segment (`kv.shared_memory`): the
cache lands exactly as over TCP, peers that cannot map the segment fall back to TCP, a hostile
peer's slot runs are refused, segments do not outlive their pool or process, and a cache copied
under its lease without asking the port is exact, freed after, and never taken from reused blocks."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
import torch

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv import client, shared_memory
from disaggserve_worker.kv.framing import KVTransferError
from disaggserve_worker.kv.shared_memory import SegmentReader, copy_regions, shared_pool, sweep_stale
from disaggserve_worker.kv.transport import KVServer, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.model.loader import LoadedModel
from disaggserve_worker.server.app import ServerConfig, WorkerServer
from disaggserve_worker.server.schemas import SharedKVRef
from disaggserve_worker.server.worker_metrics import WorkerMetrics

copy_before_check = pytest.mark.skipif(not shared_memory.COPY_BEFORE_CHECK,
                                       reason="copying before the lease check needs x86-64's memory order")


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(shared_memory.ENV_DIR, str(tmp_path))
    monkeypatch.setenv(shared_memory.ENV_MODE, "on")
    return tmp_path


async def _prefill(engine: Engine, tiny: LoadedModel, text: str) -> tuple[str, list[int], SharedKVRef | None]:
    """The held cache's handle, the prompt, and where the cache lies (as the prefill reply's kv.shm)."""
    prompt = tiny.tokenizer.encode(text).ids
    stream = RequestStream(text, asyncio.get_running_loop())
    engine.submit(text, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), stream)
    first = await stream.queue.get()
    assert first.kv_handle is not None
    return first.kv_handle, prompt, None if first.kv_shared is None else SharedKVRef.model_validate(first.kv_shared)


async def _eventually(condition: Callable[[], bool]) -> bool:
    """ACKs and "copied" notices are sent after the pull returns: give them a moment to land."""
    for _ in range(200):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def _held_cache(engine: Engine, handle: str, tokens: int) -> torch.Tensor:
    held = engine.pin_held(handle)
    assert held is not None
    engine.unpin_held(handle, release=False)
    return torch.stack([engine.kv_pool.read(i, held.slot_table[:tokens]) for i in range(len(engine.kv_pool))])


async def _pull_all(tiny: LoadedModel, transport: TcpKVTransport, server: KVServer, engine: Engine,
                    texts: list[str], receiver_block: int = 16, leased: bool = False) -> None:
    """Prefill each text, pull its cache into a (fragmented) decode pool, compare with the source;
    `leased`: the pull is told where the cache lies, as a decode request's kv.shm says."""
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=512,
                                                                   block_size=receiver_block))
    every = receiver.allocator.try_allocate(receiver.allocator.capacity_tokens)
    assert every is not None
    receiver.allocator.free(every[1::3] + every[::3][::-1] + every[2::3])  # scattered free blocks
    for text in texts:
        handle, prompt, location = await _prefill(engine, tiny, text)
        source = _held_cache(engine, handle, len(prompt))
        reservation = receiver.reserve(prompt, SamplingParams(max_tokens=4))
        assert reservation is not None
        stats = await transport.pull(f"127.0.0.33:{server.port}", handle, text, layout_of(receiver),
                                     pool_sink(receiver, reservation), shared=location if leased else None)
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


@copy_before_check
async def test_a_leased_cache_is_copied_without_asking_and_freed_after(tiny: LoadedModel, shm_dir: Path) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="prefill", kv_cache_tokens=512, block_size=4,
                                                                 shared_kv=True))
    engine.start()
    scattered = engine.allocator.try_allocate(engine.allocator.capacity_tokens)
    assert scattered is not None
    engine.allocator.free(scattered[1::2] + scattered[::2][::-1])
    server = KVServer(engine, frame_timeout=2, token=None)
    await server.start("127.0.0.33", 0)
    transport = TcpKVTransport(token=None)
    texts = ["the first pull maps the segment", "the second copies under its lease " * 3, "and so does the third"]
    try:
        await _pull_all(tiny, transport, server, engine, texts, receiver_block=16, leased=True)  # exact, all freed
        assert server.shared_pulls == 1 and transport.copied_pulls == 2
        assert await _eventually(lambda: server.copied_releases == 2)
        # A transport that does not map segments ignores the location and pulls over TCP.
        plain = TcpKVTransport(token=None, shared_memory=False)
        try:
            await _pull_all(tiny, plain, server, engine, ["told where, pulled over TCP"], leased=True)
        finally:
            plain.close()
        assert plain.copied_pulls == 0 and server.copied_releases == 2
    finally:
        transport.close()
        await server.stop()
        engine.stop()


@copy_before_check
async def test_a_cache_whose_lease_is_gone_is_never_taken_from_the_pool(
        tiny: LoadedModel, shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Released before the copy, released while it copies, or told a wrong lease: the pull asks the
    port, which refuses a cache it no longer holds and serves one it does."""
    # Room for one prompt at a time: a cache prefilled after a release lands on the same blocks.
    engine = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="prefill", kv_cache_tokens=20, block_size=4,
                                                                 max_model_len=20, shared_kv=True))
    engine.start()
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=256))
    server = KVServer(engine, frame_timeout=2, token=None)
    await server.start("127.0.0.33", 0)
    transport = TcpKVTransport(token=None)
    address = f"127.0.0.33:{server.port}"

    async def pull(handle: str, prompt: list[int], location: SharedKVRef | None) -> None:
        reservation = receiver.reserve(prompt, SamplingParams(max_tokens=4))
        assert reservation is not None
        try:
            await transport.pull(address, handle, "r", layout_of(receiver), pool_sink(receiver, reservation),
                                 shared=location)
        finally:
            receiver.cancel_reservation(reservation)

    try:
        await _pull_all(tiny, transport, server, engine, ["maps the segment"])
        handle, prompt, location = await _prefill(engine, tiny, "released before the decode worker copies it")
        assert location is not None
        engine.release_held(handle)
        again, _, reused = await _prefill(engine, tiny, "released before the decode worker copies it")
        assert reused is not None and reused.runs == location.runs, "the same blocks, held anew"
        with pytest.raises(KVTransferError) as refused:
            await pull(handle, prompt, location)
        assert refused.value.kind == "kv_unavailable"
        # Released in the middle of the copy: the check after it sees the lease gone.
        copy = client.copy_regions

        def copy_then_release(sources: list[memoryview], targets: list[memoryview]) -> int:
            engine.release_held(again)
            return copy(sources, targets)

        monkeypatch.setattr(client, "copy_regions", copy_then_release)
        with pytest.raises(KVTransferError) as refused:
            await pull(again, prompt, reused)
        assert refused.value.kind == "kv_unavailable"
        monkeypatch.setattr(client, "copy_regions", copy)
        # A wrong lease for a cache that is still held: the port serves it.
        handle, prompt, location = await _prefill(engine, tiny, "a live cache, a wrong lease")
        assert location is not None
        await pull(handle, prompt, location.model_copy(update={"lease": location.lease ^ 2}))
        assert transport.copied_pulls == 0
        assert await _eventually(lambda: server.shared_pulls == 2)
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
    made = shared_pool(2, 64, 2, 8, torch.float32, block_size=8)
    assert made is not None
    pool, info = made.pool, made.info
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
            SegmentReader(shared_memory.SegmentInfo(info.path, "0" * 32, info.layers, info.slots, info.token_bytes,
                                                    info.block_size))
        # Leases: every block a run touches must hold it; revoked or granted anew, it is gone.
        lease = made.leases.grant([0, 1, 4])
        assert reader.leased([(0, 16), (33, 2)], lease) and reader.leased([(7, 2)], lease)
        assert not reader.leased([(0, 17)], lease) and not reader.leased([(0, 16)], lease + 2)
        made.leases.revoke([1])
        assert reader.leased([(0, 8)], lease) and not reader.leased([(0, 16)], lease)
        assert made.leases.grant([1]) != lease and not reader.leased([(8, 8)], lease)
    finally:
        reader.close()


def test_a_restarted_peers_old_segment_is_unmapped(shm_dir: Path) -> None:
    """The old mapping would keep the old pool's pages alive after its worker is gone."""
    first, second = shared_pool(1, 32, 1, 4, torch.float32), shared_pool(1, 32, 1, 4, torch.float32)
    assert first is not None and second is not None
    transport = TcpKVTransport(token=None)
    try:
        old = transport._map_segment("10.0.0.1:9000", first.info.wire())
        assert old is not None and transport._map_segment("10.0.0.2:9000", first.info.wire()) is old
        assert transport._map_segment("10.0.0.1:9000", second.info.wire()) is not old
        assert not old._map.closed, "another peer address still uses it"
        transport._map_segment("10.0.0.2:9000", second.info.wire())
        assert old._map.closed
    finally:
        transport.close()


def test_segments_go_with_their_pool_and_stale_ones_are_swept(shm_dir: Path) -> None:
    made = shared_pool(1, 32, 1, 4, torch.bfloat16)
    assert made is not None
    path = Path(made.info.path)
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


@copy_before_check
async def test_the_prefill_reply_says_where_the_cache_lies_and_decode_copies_it(
        tiny: LoadedModel, shm_dir: Path, reference_greedy: Callable[[list[int], int], list[int]]) -> None:
    """Over the workers' HTTP protocol, as the router drives it: kv.shm passes through untouched,
    greedy tokens equal the reference, and a malformed kv.shm is a 400 that says what is wrong."""
    servers = {}
    for role, host in (("prefill", "127.0.0.34"), ("decode", "127.0.0.35")):
        engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                        EngineConfig(role=role, kv_cache_tokens=512, max_model_len=256, shared_kv=role == "prefill"))
        servers[role] = WorkerServer(engine, ServerConfig(role=role, host=host, port=0, kv_port=0, model_name="tiny"),
                                     WorkerMetrics(role, engine.load, 0.25, 0.05))
        await servers[role].start()
    urls = {role: f"http://{s.config.host}:{s.port}" for role, s in servers.items()}
    try:
        async with aiohttp.ClientSession() as session:
            for i, text in enumerate(["the first request maps the segment", "the second copies it under its lease"]):
                prompt = tiny.tokenizer.encode(text).ids
                body = {"request_id": f"r{i}", "prompt_token_ids": prompt,
                        "sampling": {"temperature": 0, "max_tokens": 6, "ignore_eos": True}}
                async with session.post(urls["prefill"] + "/internal/prefill", json=body) as resp:
                    first = await resp.json()
                assert set(first["kv"]["shm"]) == {"segment", "lease", "runs"}
                decode_body = {**body, "first_token_id": first["first_token_id"], "kv": first["kv"]}
                async with session.post(urls["decode"] + "/internal/decode", json=decode_body) as resp:
                    rest = [json.loads(line) async for line in resp.content if line.strip()]
                assert [first["first_token_id"]] + [e["token_id"] for e in rest] == reference_greedy(prompt, 6)
            assert servers["decode"].transport.copied_pulls == 1  # type: ignore[attr-defined]
            assert await _eventually(lambda: servers["prefill"].engine.held_count == 0)
            bad = {**decode_body, "kv": {**first["kv"], "shm": {**first["kv"]["shm"], "runs": [[0]]}}}
            async with session.post(urls["decode"] + "/internal/decode", json=bad) as resp:
                assert resp.status == 400
                assert "kv.shm.runs" in (await resp.json())["error"]["message"]
    finally:
        for server in servers.values():
            await server.stop()


def test_a_segment_is_announced_once_not_per_connection(shm_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Each concurrent pull opens a connection that maps the peer's segment: one INFO line per
    segment, not one per connection (a decode pod logged the same line 23 times in a second)."""
    made = shared_pool(1, 32, 1, 4, torch.float32)
    assert made is not None
    transport = TcpKVTransport(token=None)
    try:
        with caplog.at_level(logging.INFO, logger="disaggserve_worker.kv.client"):
            for _ in range(3):
                assert transport._map_segment("10.0.0.1:9000", made.info.wire()) is not None
        assert sum("same host" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO) == 1
    finally:
        transport.close()
