"""KV-cache transfer throughput vs raw loopback TCP, measured side by side in one run.

Both sides move the same bytes in the same per-layer chunks over 127.0.0.x; the ratio says
how much of the wire the framed KV protocol (gather from the paged pool, frame, scatter
into the receiver's pool) keeps. Medians over repeats, JSON to bench/results/kv_transfer.json.

    .venv/bin/python bench/kv_transfer.py [--model builtin:small-llama] [--tokens 3000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv.transport import KVServer, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.model.loader import load_model

RESULTS = Path(__file__).parent / "results"


async def raw_tcp_seconds(host: str, chunk: int, chunks: int) -> float:
    """Send `chunks` blocks of `chunk` bytes to a reader that drains them; wait for its reply."""
    done = asyncio.Event()

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(chunks):  # per-layer reads, like the KV receiver
            await reader.readexactly(chunk)
        writer.write(b"k")
        await writer.drain()
        writer.close()
        done.set()

    server = await asyncio.start_server(sink, host, 0)
    port = server.sockets[0].getsockname()[1]
    payload = bytes(chunk)
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    for _ in range(chunks):
        writer.write(payload)
        await writer.drain()
    await reader.readexactly(1)
    seconds = time.perf_counter() - start
    writer.close()
    await done.wait()
    server.close()
    await server.wait_closed()
    return seconds


async def run(model: str, tokens: int, repeats: int) -> dict[str, object]:
    loaded = load_model(model, device="cpu")
    loop = asyncio.get_running_loop()
    prefill = Engine(loaded.model, loaded.tokenizer, [], EngineConfig(
        role="prefill", kv_cache_tokens=tokens + 64, max_batch_tokens=tokens, max_model_len=tokens + 64))
    decode = Engine(loaded.model, loaded.tokenizer, [], EngineConfig(
        role="decode", kv_cache_tokens=tokens + 64, max_model_len=tokens + 64))
    prefill.start()
    server = KVServer(prefill)
    await server.start("127.0.0.61", 0)
    transport = TcpKVTransport()
    prompt = torch.randint(0, loaded.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    kv_s, raw_s, nbytes = [], [], 0
    try:
        for i in range(repeats):
            stream = RequestStream(f"b{i}", loop)
            prefill.submit(f"b{i}", prompt.tolist(), params, stream)
            first = await stream.queue.get()
            assert first.kv_handle is not None
            reservation = decode.reserve(prompt.tolist(), params)
            assert reservation is not None
            stats = await transport.pull(f"127.0.0.61:{server.port}", first.kv_handle, f"b{i}",
                                         layout_of(decode), pool_sink(decode, reservation.slot_table))
            decode.cancel_reservation(reservation)
            nbytes = stats.bytes
            kv_s.append(stats.seconds)
            layers = loaded.config.num_hidden_layers
            raw_s.append(await raw_tcp_seconds("127.0.0.62", nbytes // layers, layers))
    finally:
        await server.stop()
        prefill.stop()
    kv_median, raw_median = statistics.median(kv_s), statistics.median(raw_s)
    return {
        "benchmark": "kv_transfer", "model": model, "tokens": tokens, "bytes": nbytes,
        "layers": loaded.config.num_hidden_layers, "repeats": repeats,
        "kv_seconds_median": kv_median, "raw_tcp_seconds_median": raw_median,
        "kv_gbytes_per_s": nbytes / kv_median / 1e9, "raw_tcp_gbytes_per_s": nbytes / raw_median / 1e9,
        "kv_over_raw_throughput": raw_median / kv_median,
        "kv_seconds": kv_s, "raw_tcp_seconds": raw_s,
        "host": platform.node(), "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = asyncio.run(run(args.model, args.tokens, args.repeats))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kv_transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"KV transfer {result['kv_gbytes_per_s']:.2f} GB/s vs raw TCP "
          f"{result['raw_tcp_gbytes_per_s']:.2f} GB/s "
          f"(ratio {result['kv_over_raw_throughput']:.2f}) for {result['bytes'] / 1e6:.1f} MB, "
          f"median of {args.repeats}")


if __name__ == "__main__":
    main()
