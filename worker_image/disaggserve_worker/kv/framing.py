"""The framed KV stream: `type (u8) | length (u64, big-endian) | payload`.

A pull is: decode sends REQUEST {handle, request_id}; prefill answers HEADER {request_id,
dtype, layers, shape} (or ERROR {type, message, retryable}), then one LAYER frame per layer
(`layer index (u32) | raw K,V bytes`), then END {bytes}; decode answers ACK, and only then
does prefill free the cache — a decode worker that dies mid-pull can be retried.
Layer frames let the receiver write layer i while layer i+1 is still on the wire.
"""

from __future__ import annotations

import asyncio
import json
import struct
from enum import IntEnum
from typing import Any

HEADER = struct.Struct("!BQ")
LAYER_INDEX = struct.Struct("!I")
MAX_JSON_FRAME = 1 << 20
MAX_FRAME = 1 << 34


class FrameType(IntEnum):
    REQUEST = 1
    HEADER = 2
    LAYER = 3
    END = 4
    ERROR = 5
    ACK = 6


class KVTransferError(RuntimeError):
    """A pull that failed; `kind` and `retryable` go to the router verbatim."""

    def __init__(self, kind: str, message: str, retryable: bool):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable

    def wire(self) -> dict[str, Any]:
        return {"type": self.kind, "message": str(self), "retryable": self.retryable}


def encode_json(kind: FrameType, obj: dict[str, Any]) -> bytes:
    data = json.dumps(obj).encode()
    return HEADER.pack(int(kind), len(data)) + data


async def read_frame(reader: asyncio.StreamReader, timeout: float) -> tuple[FrameType, bytes]:
    """One whole frame, or KVTransferError on timeout, a closed peer or garbage."""
    try:
        head = await asyncio.wait_for(reader.readexactly(HEADER.size), timeout)
        kind_value, length = HEADER.unpack(head)
        try:
            kind = FrameType(kind_value)
        except ValueError:
            raise KVTransferError("kv_protocol", f"unknown KV frame type {kind_value}", False) from None
        limit = MAX_FRAME if kind is FrameType.LAYER else MAX_JSON_FRAME
        if length > limit:
            raise KVTransferError("kv_protocol", f"KV frame of {length} bytes exceeds {limit}", False)
        payload = await asyncio.wait_for(reader.readexactly(length), timeout)
    except TimeoutError:
        raise KVTransferError("kv_timeout", f"no KV data within {timeout:g} s", True) from None
    except (asyncio.IncompleteReadError, ConnectionError) as error:
        raise KVTransferError("kv_unavailable", f"KV peer closed the stream: {error!r}", True) from None
    return kind, payload


def decode_json(payload: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(payload)
    except ValueError as error:
        raise KVTransferError("kv_protocol", f"bad JSON in KV frame: {error}", False) from None
    if not isinstance(obj, dict):
        raise KVTransferError("kv_protocol", "KV control frame is not a JSON object", False)
    return obj
