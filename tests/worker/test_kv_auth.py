"""The KV port trusts only peers that prove the worker token, and bounds what anyone may send."""

from __future__ import annotations

import asyncio
import socket
import time
import tracemalloc

import pytest

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv import auth
from disaggserve_worker.kv.framing import (
    HEADER,
    MAX_HANDSHAKE_FRAME,
    PROTOCOL_VERSION,
    FrameType,
    KVTransferError,
    PullRequest,
    ReplyHeader,
    decode_json,
    encode_count,
    recv_control,
    recv_exact,
    recv_frame_head,
    send_json,
)
from disaggserve_worker.kv.transport import KVServer, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.model.loader import LoadedModel
from kv_fakes import kv_io  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("kv_io")  # each test reads in C and in Python

HOST = "127.0.0.33"
TOKEN = "s3cret-of-this-disaggserve"


@pytest.fixture
async def port(tiny: LoadedModel):  # type: ignore[no-untyped-def]
    """A prefill engine holding one cache, served on a KV port that requires TOKEN."""
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role="prefill", kv_cache_tokens=256, kv_ttl_seconds=30))
    engine.start()
    server = KVServer(engine, frame_timeout=2, token=TOKEN, handshake_timeout=2)
    await server.start(HOST, 0)
    prompt = tiny.tokenizer.encode("a prompt whose cache is guarded").ids
    stream = RequestStream("r", asyncio.get_running_loop())
    engine.submit("r", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), stream)
    first = await stream.queue.get()
    assert first.kv_handle is not None
    try:
        yield engine, server, f"{HOST}:{server.port}", first.kv_handle, prompt
    finally:
        await server.stop()
        engine.stop()


async def _wait_no_connections(server: KVServer) -> None:
    for _ in range(200):
        if server.connections == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.connections} connections still open")


@pytest.mark.parametrize("token", [None, "a-token-of-another-disaggserve"])
async def test_pull_without_the_right_token_is_refused(port, tiny: LoadedModel, token: str | None) -> None:  # type: ignore[no-untyped-def]
    engine, server, address, handle, prompt = port
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=256))
    reservation = receiver.reserve(prompt, SamplingParams(max_tokens=8))
    assert reservation is not None
    transport = TcpKVTransport(token=token)
    try:
        with pytest.raises(KVTransferError) as error:
            await transport.pull(address, handle, "r", layout_of(receiver),
                                 pool_sink(receiver, reservation))
    finally:
        transport.close()
    assert error.value.kind == "kv_unauthorized" and not error.value.retryable
    assert engine.held_count == 1, "the cache was neither sent nor released"
    await _wait_no_connections(server)


async def test_pull_with_the_token_succeeds(port, tiny: LoadedModel) -> None:  # type: ignore[no-untyped-def]
    _engine, _server, address, handle, prompt = port
    receiver = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=256))
    reservation = receiver.reserve(prompt, SamplingParams(max_tokens=8))
    assert reservation is not None
    transport = TcpKVTransport(token=TOKEN)
    try:
        stats = await transport.pull(address, handle, "r", layout_of(receiver),
                                     pool_sink(receiver, reservation))
    finally:
        transport.close()
    assert stats.tokens == len(prompt)


async def test_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch, tiny: LoadedModel) -> None:
    monkeypatch.setenv(auth.ENV_WORKER_TOKEN, TOKEN)
    engine = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="prefill", kv_cache_tokens=64))
    assert KVServer(engine).token == TOKEN and TcpKVTransport().token == TOKEN
    monkeypatch.delenv(auth.ENV_WORKER_TOKEN)
    assert KVServer(engine).token is None


def test_proof_is_bound_to_the_nonce_and_the_token() -> None:
    nonce = auth.new_nonce()
    proof = auth.prove(TOKEN, nonce)
    assert auth.verify(TOKEN, nonce, proof)
    assert not auth.verify(TOKEN, auth.new_nonce(), proof), "a recorded proof cannot be replayed"
    assert not auth.verify(TOKEN, nonce, auth.prove("other", nonce))
    assert not auth.verify(TOKEN, nonce, "") and not auth.verify(TOKEN, nonce, None)
    assert TOKEN not in proof


def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=3)
    kind, payload = recv_control(sock, MAX_HANDSHAKE_FRAME)
    assert kind is FrameType.HELLO and decode_json(payload)["auth"] is True
    return sock


def _closed_by_peer(sock: socket.socket) -> bytes:
    """Everything the server still sends before closing (an ERROR frame at most)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionError:
        pass
    return data


async def test_request_without_authentication_is_refused_at_once(port) -> None:  # type: ignore[no-untyped-def]
    engine, server, address, handle, _prompt = port
    sock = _raw(address)
    try:
        sock.sendall(PullRequest(handle, "r").encode())  # skips AUTH
        start = time.monotonic()
        reply = await asyncio.to_thread(_closed_by_peer, sock)
        assert time.monotonic() - start < 1.5
    finally:
        sock.close()
    assert FrameType(reply[0]) is FrameType.ERROR and b"kv_unauthorized" in reply
    assert engine.held_count == 1
    await _wait_no_connections(server)


async def test_oversized_first_frame_is_refused_and_nothing_is_buffered(port) -> None:  # type: ignore[no-untyped-def]
    """The attack from the hardening issue: a 1 GiB frame header, then data. The port refuses
    it before reading the payload and closes; the process does not grow by what was sent."""
    _engine, server, address, _handle, _prompt = port
    sock = _raw(address)
    chunk = bytes(1 << 20)
    sent = 0

    def attack() -> None:
        nonlocal sent
        sock.sendall(HEADER.pack(int(FrameType.AUTH), 1 << 30))
        try:
            for _ in range(64):
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass  # the server closed the connection: what we wanted

    tracemalloc.start()
    try:
        await asyncio.to_thread(attack)
        await _wait_no_connections(server)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        sock.close()
    assert sent < 64 << 20, "the server stopped reading instead of swallowing 64 MiB"
    assert peak < 8 << 20, f"{peak} bytes allocated while refusing the frame"


def _authenticated(address: str) -> socket.socket:
    host, p = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(p)), timeout=3)
    _kind, payload = recv_control(sock, MAX_HANDSHAKE_FRAME)
    send_json(sock, FrameType.AUTH, {"mac": auth.prove(TOKEN, bytes.fromhex(decode_json(payload)["nonce"])),
                                     "version": PROTOCOL_VERSION})
    assert recv_control(sock, MAX_HANDSHAKE_FRAME)[0] is FrameType.READY
    return sock


async def test_oversized_control_frame_after_authentication_is_refused(port) -> None:  # type: ignore[no-untyped-def]
    _engine, server, address, _handle, _prompt = port
    sock = _authenticated(address)
    try:
        sock.sendall(HEADER.pack(int(FrameType.REQUEST), 1 << 34))
        reply = await asyncio.to_thread(_closed_by_peer, sock)
    finally:
        sock.close()
    assert FrameType(reply[0]) is FrameType.ERROR and b"exceeds" in reply
    await _wait_no_connections(server)


async def test_the_ack_is_awaited_under_the_frame_timeout_and_requests_under_the_idle_one(port) -> None:  # type: ignore[no-untyped-def]
    engine, server, address, handle, _prompt = port
    server.idle_timeout = 0.5  # the fixture's frame timeout is 2 s
    sock = _authenticated(address)
    try:
        sock.sendall(PullRequest(handle, "r").encode())
        kind, payload = recv_control(sock)
        assert kind is FrameType.HEADER
        for _ in range(ReplyHeader.decode(payload).layers):
            recv_exact(sock, recv_frame_head(sock)[1])
        assert recv_control(sock)[0] is FrameType.END
        await asyncio.sleep(1.0)  # past the idle bound, within the frame bound
        sock.sendall(encode_count(FrameType.ACK, 0))
        for _ in range(200):
            if engine.held_count == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.held_count == 0, "the late ACK, within the frame timeout, freed the cache"
        start = time.monotonic()
        await asyncio.to_thread(_closed_by_peer, sock)
        assert 0.3 < time.monotonic() - start < 1.5, "then the next request is awaited under the idle bound"
    finally:
        sock.close()


async def test_malformed_request_is_refused_and_the_cache_kept(port) -> None:  # type: ignore[no-untyped-def]
    engine, server, address, _handle, _prompt = port
    sock = _authenticated(address)
    try:
        payload = b"\x00\x00\x40abc"  # announces a 64-byte handle, carries 3 bytes
        sock.sendall(HEADER.pack(int(FrameType.REQUEST), len(payload)) + payload)
        reply = await asyncio.to_thread(_closed_by_peer, sock)
    finally:
        sock.close()
    assert FrameType(reply[0]) is FrameType.ERROR and b"kv_protocol" in reply and b"malformed KV request" in reply
    assert engine.held_count == 1
    await _wait_no_connections(server)


async def test_connections_beyond_the_limit_are_closed(tiny: LoadedModel) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="prefill", kv_cache_tokens=64))
    server = KVServer(engine, token=TOKEN, max_connections=2, handshake_timeout=3)
    await server.start(HOST, 0)
    socks = []
    try:
        for _ in range(2):
            socks.append(_raw(f"{HOST}:{server.port}"))
        extra = socket.create_connection((HOST, server.port), timeout=3)
        socks.append(extra)
        assert await asyncio.to_thread(_closed_by_peer, extra) == b""
        assert server.connections == 2
    finally:
        for s in socks:
            s.close()
        await server.stop()


def test_receiver_frame_limit_is_sized_from_the_model(tiny: LoadedModel) -> None:
    engine = Engine(tiny.model, tiny.tokenizer, [], EngineConfig(role="decode", kv_cache_tokens=256,
                                                                 max_model_len=512))
    layout = layout_of(engine)
    c = tiny.config
    assert layout.max_tokens == 512
    assert layout.max_request_bytes == c.num_hidden_layers * 2 * 512 * c.kv_heads * c.dim_per_head * 4
