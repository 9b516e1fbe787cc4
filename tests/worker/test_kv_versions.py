"""Workers of two releases pull from each other during a rolling upgrade: the KV handshake settles
on the newest protocol version both speak (3: binary pull frames; 2: the previous release's JSON
ones), and every kind of pull (TCP on a transfer thread and on the loop, shared-memory slot runs,
a staged sink) moves the same bytes either way. Without a common version the pull fails at once,
saying which image to upgrade."""

from __future__ import annotations

import asyncio

import pytest
import torch

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv.framing import LEGACY_VERSION, PROTOCOL_VERSION, KVTransferError
from disaggserve_worker.kv.transport import KVServer, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.model.loader import LoadedModel
from kv_fakes import kv_io  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("kv_io")  # each test reads in C and in Python

HOST = "127.0.0.34"
BOTH = (LEGACY_VERSION, PROTOCOL_VERSION)


async def _held(engine: Engine, tiny: LoadedModel, count: int) -> list[tuple[str, list[int], torch.Tensor]]:
    """`count` held caches: (handle, prompt, the cache as the prefill pool holds it)."""
    out = []
    for i in range(count):
        prompt = tiny.tokenizer.encode(f"prompt number {i} of a rolling upgrade " * (i + 1)).ids
        stream = RequestStream(f"r{i}", asyncio.get_running_loop())
        engine.submit(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), stream)
        handle = (await stream.queue.get()).kv_handle
        assert handle is not None
        held = engine.pin_held(handle)
        assert held is not None
        engine.unpin_held(handle, release=False)
        out.append((handle, prompt, torch.stack([engine.kv_pool.read(layer, held.slot_table[:len(prompt)])
                                                 for layer in range(len(engine.kv_pool))])))
    return out


@pytest.mark.parametrize(("port_versions", "puller_versions", "spoken"), [
    ((LEGACY_VERSION,), BOTH, LEGACY_VERSION),  # a new decode worker pulls from an old prefill worker
    (BOTH, (LEGACY_VERSION,), LEGACY_VERSION),  # an old decode worker pulls from a new one
    (BOTH, BOTH, PROTOCOL_VERSION),
])
@pytest.mark.parametrize("shared_memory", [False, True])
async def test_pulls_between_releases_move_the_same_bytes(tiny: LoadedModel, port_versions: tuple[int, ...],
                                                          puller_versions: tuple[int, ...], spoken: int,
                                                          shared_memory: bool) -> None:
    prefill = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                     EngineConfig(role="prefill", kv_cache_tokens=1024, kv_ttl_seconds=30, shared_kv=True))
    prefill.start()
    server = KVServer(prefill, frame_timeout=5, token=None, versions=port_versions)
    await server.start(HOST, 0)
    address = f"{HOST}:{server.port}"
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=1024))
    transport = TcpKVTransport(token=None, versions=puller_versions, shared_memory=shared_memory)
    try:
        caches = await _held(prefill, tiny, 3)
        for i, (handle, prompt, source) in enumerate(caches):
            reservation = receiver.reserve(prompt, SamplingParams(max_tokens=4))
            assert reservation is not None
            if i < 2:  # the first opens the connection (a transfer thread), the second runs on the loop
                await transport.pull(address, handle, f"r{i}", layout_of(receiver), pool_sink(receiver, reservation))
                slots = reservation.slot_table[:len(prompt)]
                received = torch.stack([receiver.kv_pool.read(layer, slots) for layer in range(len(receiver.kv_pool))])
            else:  # a staged sink: layer by layer, each frame head checked before its payload
                staged: list[torch.Tensor] = []
                await transport.pull(address, handle, f"r{i}", layout_of(receiver),
                                     lambda _layer, t, into=staged: into.append(t.clone()))
                received = torch.stack(staged)
            receiver.cancel_reservation(reservation)
            assert torch.equal(received, source), f"pull {i}"
        for _ in range(200):
            if prefill.held_count == 0:
                break
            await asyncio.sleep(0.01)
        assert prefill.held_count == 0, "every ACK, of either version, freed its cache"
        (conn,) = transport._idle[address]
        assert conn.version == spoken
        assert (conn.segment is not None) == shared_memory
        if shared_memory:
            assert server.shared_pulls == 2, "the slot runs went in the header of the version spoken"
    finally:
        transport.close()
        await server.stop()
        prefill.stop()


async def test_without_a_common_version_the_pull_fails_naming_the_fix(tiny: LoadedModel) -> None:
    prefill = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                     EngineConfig(role="prefill", kv_cache_tokens=256, kv_ttl_seconds=30))
    prefill.start()
    server = KVServer(prefill, frame_timeout=5, token=None, versions=(PROTOCOL_VERSION,))
    await server.start(HOST, 0)
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=256))
    transport = TcpKVTransport(token=None, versions=(LEGACY_VERSION,))
    try:
        ((handle, prompt, _),) = await _held(prefill, tiny, 1)
        reservation = receiver.reserve(prompt, SamplingParams(max_tokens=4))
        assert reservation is not None
        with pytest.raises(KVTransferError, match="upgrade the older of the two worker images") as error:
            await transport.pull(f"{HOST}:{server.port}", handle, "r", layout_of(receiver),
                                 pool_sink(receiver, reservation))
        assert error.value.kind == "kv_protocol" and not error.value.retryable
        assert prefill.held_count == 1, "the cache waits for a puller that can take it"
    finally:
        transport.close()
        await server.stop()
        prefill.stop()
