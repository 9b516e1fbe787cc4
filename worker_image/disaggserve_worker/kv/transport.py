"""KV transports: the `KVTransport` protocol and its TCP implementation (asyncio streams).

The decode side *pulls*: it reserves cache room first, then asks the prefill worker's KV
port for a handle. A faster path (CUDA IPC on one node, NCCL across nodes) implements the
same `pull` and is chosen per peer; everything above the transport stays unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from disaggserve_worker.engine.engine import Engine
from disaggserve_worker.kv.framing import (
    HEADER,
    LAYER_INDEX,
    FrameType,
    KVTransferError,
    decode_json,
    encode_json,
    read_frame,
)

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}
LayerSink = Callable[[int, torch.Tensor], None]
OFFLOAD_BYTES = 1 << 20


@dataclass
class KVLayout:
    """What the receiver expects: a mismatch (other model, other dtype) is not retryable."""

    dtype: torch.dtype
    layers: int
    kv_heads: int
    head_dim: int
    on_gpu: bool = False


@dataclass
class TransferStats:
    bytes: int
    seconds: float
    tokens: int


class KVTransport(Protocol):
    async def pull(self, address: str, handle: str, request_id: str, expect: KVLayout,
                   sink: LayerSink) -> TransferStats: ...


def layout_of(engine: Engine) -> KVLayout:
    c = engine.model.config
    return KVLayout(engine.model.dtype, c.num_hidden_layers, c.kv_heads, c.dim_per_head,
                    on_gpu=engine.kv_pool.is_cuda)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().cpu().contiguous().view(torch.uint8).numpy()).cast("B")


def _view(payload: bytes, offset: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    """A zero-copy tensor over the received bytes; the sink copies it into the pool at once,
    so the read-only buffer (which torch warns about) is never written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(payload, dtype=torch.uint8, offset=offset)
    return flat.view(dtype).reshape(shape)


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise KVTransferError("kv_bad_address", f"KV address {address!r} is not host:port", False)
    return host.strip("[]"), int(port)


class TcpKVTransport:
    """Pull over one TCP connection per request."""

    def __init__(self, connect_timeout: float = 5.0, frame_timeout: float = 30.0):
        self.connect_timeout = connect_timeout
        self.frame_timeout = frame_timeout

    async def pull(self, address: str, handle: str, request_id: str, expect: KVLayout,
                   sink: LayerSink) -> TransferStats:
        host, port = _split(address)
        start = time.perf_counter()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.connect_timeout)
        except (TimeoutError, OSError) as error:
            raise KVTransferError("kv_unavailable", f"cannot reach KV port {address}: {error!r}",
                                  True) from None
        total = 0
        try:
            writer.write(encode_json(FrameType.REQUEST, {"handle": handle, "request_id": request_id}))
            await writer.drain()
            kind, payload = await read_frame(reader, self.frame_timeout)
            if kind is FrameType.ERROR:
                err = decode_json(payload)
                raise KVTransferError(str(err.get("type", "kv_unavailable")), str(err.get("message")),
                                      bool(err.get("retryable", True)))
            if kind is not FrameType.HEADER:
                raise KVTransferError("kv_protocol", f"expected a KV header, got {kind.name}", False)
            header = decode_json(payload)
            shape = [int(x) for x in header["shape"]]
            dtype = DTYPES.get(str(header["dtype"]))
            if (dtype != expect.dtype or int(header["layers"]) != expect.layers
                    or shape[2:] != [expect.kv_heads, expect.head_dim] or shape[0] != 2):
                raise KVTransferError(
                    "kv_mismatch",
                    f"KV cache of {header} does not fit this worker ({expect}); prefill and decode "
                    "must serve the same model and dtype", False)
            layer_bytes = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
            for expected_layer in range(expect.layers):
                kind, payload = await read_frame(reader, self.frame_timeout)
                if kind is FrameType.ERROR:
                    err = decode_json(payload)
                    raise KVTransferError(str(err.get("type")), str(err.get("message")),
                                          bool(err.get("retryable", True)))
                (layer,) = LAYER_INDEX.unpack_from(payload)
                if kind is not FrameType.LAYER or layer != expected_layer or \
                        len(payload) - LAYER_INDEX.size != layer_bytes:
                    raise KVTransferError("kv_protocol", f"bad KV layer frame (layer {layer}, "
                                          f"{len(payload)} bytes, expected {expected_layer})", False)
                tensor = _view(payload, LAYER_INDEX.size, dtype, shape)
                if expect.on_gpu and layer_bytes >= OFFLOAD_BYTES:  # host-to-device: keep the loop free
                    await asyncio.to_thread(sink, layer, tensor)
                else:
                    sink(layer, tensor)
                total += layer_bytes
            kind, _ = await read_frame(reader, self.frame_timeout)
            if kind is not FrameType.END:
                raise KVTransferError("kv_protocol", f"expected the KV end frame, got {kind.name}", False)
            writer.write(encode_json(FrameType.ACK, {"bytes": total}))
            await writer.drain()
            return TransferStats(total, time.perf_counter() - start, shape[1])
        except (KeyError, ValueError, TypeError) as error:
            raise KVTransferError("kv_protocol", f"malformed KV header: {error!r}", False) from None
        except ConnectionError as error:
            raise KVTransferError("kv_unavailable", f"KV connection failed: {error!r}", True) from None
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class KVServer:
    """Serves a prefill engine's held caches on the KV port."""

    def __init__(self, engine: Engine, frame_timeout: float = 30.0,
                 on_sent: Callable[[int, float], None] | None = None):
        self.engine = engine
        self.frame_timeout = frame_timeout
        self.on_sent = on_sent
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handle = None
        try:
            kind, payload = await read_frame(reader, self.frame_timeout)
            if kind is not FrameType.REQUEST:
                raise KVTransferError("kv_protocol", f"expected a KV request, got {kind.name}", False)
            request = decode_json(payload)
            handle = str(request.get("handle", ""))
            held = self.engine.pin_held(handle)
            if held is None:
                handle = None
                raise KVTransferError("kv_unavailable", f"KV cache {request.get('handle')!r} is unknown or "
                                      "expired (TTL); run the prefill again", True)
            start = time.perf_counter()
            sent = await self._send(writer, held.request_id, held.slot_table[: held.num_tokens])
            kind, _ = await read_frame(reader, self.frame_timeout)
            delivered = kind is FrameType.ACK
            self.engine.unpin_held(handle, release=delivered)
            handle = None
            if delivered and self.on_sent:
                self.on_sent(sent, time.perf_counter() - start)
        except KVTransferError as error:
            with contextlib.suppress(ConnectionError):
                writer.write(encode_json(FrameType.ERROR, error.wire()))
                await writer.drain()
        except ConnectionError as error:
            log.warning("KV pull of %s broke off: %r", handle, error)
        finally:
            if handle is not None:
                self.engine.unpin_held(handle, release=False)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, request_id: str, slots: torch.Tensor) -> int:
        # Full-head layers on the wire whatever this worker's tensor size: the pool joins its
        # shards, so a receiver of another tensor size splits them its own way.
        pool = self.engine.kv_pool
        shape = [2, int(slots.numel()), pool.kv_heads, pool.head_dim]
        writer.write(encode_json(FrameType.HEADER, {
            "request_id": request_id, "dtype": DTYPE_NAMES[pool.dtype], "layers": len(pool),
            "shape": shape}))
        sent = 0
        for layer in range(len(pool)):
            def gather(i: int = layer) -> memoryview:
                return tensor_bytes(pool.read(i, slots))

            # A device-to-host copy waits for the GPU: keep it off the event loop. On a CPU the
            # gather is a memcpy that costs less than the thread hop.
            data = await asyncio.to_thread(gather) if pool.is_cuda else gather()
            writer.writelines([HEADER.pack(int(FrameType.LAYER), LAYER_INDEX.size + len(data)),
                               LAYER_INDEX.pack(layer), data])
            await writer.drain()
            sent += len(data)
        writer.write(encode_json(FrameType.END, {"bytes": sent}))
        await writer.drain()
        return sent


def pool_sink(engine: Engine, slots: torch.Tensor) -> LayerSink:
    """Write pulled (full-head) layers straight into the reserved slots of the receiver's pool."""
    pool = engine.kv_pool

    def write(layer: int, tensor: torch.Tensor) -> None:
        tokens = tensor.shape[1]
        if tokens > slots.numel():
            raise KVTransferError("kv_mismatch", f"KV cache of {tokens} tokens exceeds the "
                                  f"{slots.numel()} reserved slots", False)
        pool.write(layer, slots[:tokens], tensor)

    return write
