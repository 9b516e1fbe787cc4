"""KV transports: the `KVTransport` protocol and its TCP implementation.

The decode side *pulls*: it reserves cache room first, then asks the prefill worker's KV
port for a handle (`kv.client.TcpKVTransport`; the port is `kv.server.KVServer`, the wire
format `kv.framing`). A faster path (shared memory on one host, CUDA IPC, NCCL) implements
the same `pull` and is chosen per peer; everything above the transport stays unchanged.
"""

from __future__ import annotations

from typing import Protocol

from disaggserve_worker.kv.client import TcpKVTransport
from disaggserve_worker.kv.layout import KVLayout, LayerSink, PoolSink, TransferStats, layout_of, pool_sink
from disaggserve_worker.kv.server import KVServer
from disaggserve_worker.kv.shared_memory import HeldLocation


class KVTransport(Protocol):
    async def pull(self, address: str, handle: str, request_id: str, expect: KVLayout,
                   sink: LayerSink | PoolSink, shared: HeldLocation | None = None) -> TransferStats: ...


__all__ = ["KVLayout", "KVServer", "KVTransport", "LayerSink", "PoolSink", "TcpKVTransport", "TransferStats",
           "layout_of", "pool_sink"]
