"""KV-cache transfer throughput vs raw loopback TCP, measured side by side in one run.

For each size (default ~1 MB, the cache of a typical prompt, and ~12 MB) both sides move the
same bytes over 127.0.0.x, interleaved repeat by repeat so machine load hits both alike:
- raw: the strongest plain-socket baseline — a connection opened beforehand, the receiver
  sends a request, a resident sender thread `sendall`s the bytes in per-layer chunks, the
  receiver `recv_into`s a preallocated buffer (no framing, no pool, no auth);
The sending side (prefill engine + KV port, raw sender) runs in a child process, as a prefill
worker does in a deployment; the receiving side in this process.
- kv: a real pull from a prefill engine's held cache into a decode engine's reservation
  (`TcpKVTransport.pull` → `KVServer`), over its persistent authenticated connection, timed
  as the decode worker's event loop sees it, two ways: over TCP (a transport that does not map
  the peer's segment: what a pull between hosts does) and through the prefill pool's
  shared-memory segment (`kv.shared_memory`: what a pull between workers on one host does; the
  sender's pool is in shared memory as a prefill worker's is, when /dev/shm has room), the
  latter two ways: told where the cache lies and under which lease, as the prefill reply's
  `kv.shm` tells a decode worker (it copies, checks the lease, and tells the port afterwards:
  the headline), and asking the port for the slot runs first (one round trip more).
Raw is timed three ways — received on the event loop, on a thread awaited from the loop, and
inside that thread (no hop at all); the headline ratio takes the faster of the first two,
and the ratio against the third is reported beside it. Both kinds are billed alike: from just
before the call that starts a transfer to just after its await returns. (Raw on the loop was
timed inside its coroutine, the pull around its call, which also formatted its address and
request id; a decode worker has both before it pulls, so they are made beforehand. The
reservation's sink is still made in the call, as the worker does.)
Before each timed transfer (either kind) the bench waits `--settle-ms` so both start from an
idle sender: the prefill child's engine thread and event loop are still finishing the step that
produced the handle when the handle arrives, and on a 2-core host that work would otherwise be
billed to the KV pull alone (the raw transfer always ran second, on a quiet sender).
`--pin` puts the sending process on one core and the receiving one on another, as a
deployment's prefill and decode pods are: unpinned on a 2-vCPU host, loopback delivery wakes the
receiver from the sender's context, the scheduler queues it behind the sender on the same vCPU,
and a 1 MB pull's receiver only starts once the whole send is done (traced: the transfer thread
started 1.4 ms into a 2.3 ms pull). Both kinds of transfer run in the same two processes, so
pinning applies to the raw baseline alike.
Medians over repeats, and over `--rounds` (each a fresh sender process and connections: on the
shared 2-vCPU host the median of one round of 21 repeats at 1 MB ranged 0.63-0.99x between
rounds minutes apart, more than any change measured); JSON to bench/results/kv_transfer.json
with every round and the machine load.

    .venv/bin/python bench/kv_transfer.py [--model builtin:small-llama] [--tokens 256 3000] [--repeats 15]
        [--rounds 3] [--pin]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import statistics
import threading
import time
from pathlib import Path

import torch

from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.engine.sampling import SamplingParams
from disaggserve_worker.engine.types import RequestStream
from disaggserve_worker.kv.framing import SOCKET_BUFFER
from disaggserve_worker.kv.transport import KVServer, TcpKVTransport, layout_of, pool_sink
from disaggserve_worker.model.loader import load_model
from disaggserve_worker.server.schemas import SharedKVRef

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-token"


class RawSender:
    """Child-process side of the raw baseline: a resident thread that answers each 8-byte
    request with `chunks` chunks of real bytes (a full-size buffer, like a pool: `bytes(n)`
    would send the kernel's shared zero page, always in cache, flattering the baseline)."""

    def __init__(self, host: str, chunk: int, chunks: int):
        self.listener = socket.create_server((host, 0))
        self.port = int(self.listener.getsockname()[1])
        source = torch.randint(0, 256, (chunk * chunks,), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(1))
        self.payloads = [memoryview(source[i * chunk:(i + 1) * chunk].numpy()) for i in range(chunks)]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        sender, _ = self.listener.accept()
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)  # as the KV port does
        with sender:
            while sender.recv(8):
                for payload in self.payloads:
                    sender.sendall(payload)

    def close(self) -> None:
        self.listener.close()


def sender_process(pipe, model: str, tokens: int, threads: int,  # type: ignore[no-untyped-def]
                   core: int | None = None) -> None:
    """The prefill worker's side in its own process (as in a deployment: no shared GIL with the
    receiver): a prefill engine holding caches on a KV port, and the raw sender."""
    if core is not None:
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(threads)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        loaded = load_model(model, device="cpu")
        prefill = Engine(loaded.model, loaded.tokenizer, [], EngineConfig(
            role="prefill", kv_cache_tokens=2 * tokens + 64, max_batch_tokens=tokens, max_model_len=tokens + 64,
            shared_kv=True))
        prefill.start()
        server = KVServer(prefill, token=TOKEN)
        await server.start("127.0.0.61", 0)
        raw = RawSender("127.0.0.62", loaded.config.kv_bytes_per_token(4) * tokens // loaded.config.num_hidden_layers,
                        loaded.config.num_hidden_layers)
        pipe.send((server.port, raw.port, prefill.kv_segment is not None))
        prompt = torch.randint(0, loaded.config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        try:
            i = 0
            while await asyncio.to_thread(pipe.recv) == "prefill":
                stream = RequestStream(f"b{i}", loop)
                prefill.submit(f"b{i}", prompt.tolist(), params, stream)
                first = await stream.queue.get()
                pipe.send((first.kv_handle, first.kv_shared))
                i += 1
        finally:
            raw.close()
            await server.stop()
            prefill.stop()

    asyncio.run(serve())


class RawReceiver:
    def __init__(self, port: int, nbytes: int):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)  # as the KV client does
        self.sock.connect(("127.0.0.62", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = memoryview(torch.ones(nbytes, dtype=torch.uint8).numpy())

    def transfer(self) -> float:
        """Blocking receive (run on a thread): seconds from request to the last byte."""
        start = time.perf_counter()
        self.sock.sendall(b"request!")
        got, view = 0, self.buffer
        while got < len(view):
            got += self.sock.recv_into(view[got:])
        return time.perf_counter() - start

    async def transfer_on_loop(self) -> None:
        """The same receive done the way the KV client does it: non-blocking (the caller sets
        that, as a loop receiver's socket always is), on the event loop. The caller times the
        call as it times a KV pull: from before the call to after the await."""
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self.sock, b"request!")
        got, view = 0, self.buffer
        while got < len(view):
            got += await loop.sock_recv_into(self.sock, view[got:])


async def measure(model: str, loaded, tokens: int, repeats: int, threads: int,  # type: ignore[no-untyped-def]
                  settle_s: float = 0.0, sender_core: int | None = None) -> dict[str, object]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=sender_process, args=(child, model, tokens, threads, sender_core), daemon=True)
    proc.start()
    decode = Engine(loaded.model, loaded.tokenizer, [], EngineConfig(
        role="decode", kv_cache_tokens=tokens + 64, max_model_len=tokens + 64))
    transports = {"tcp": TcpKVTransport(token=TOKEN, shared_memory=False), "shm": TcpKVTransport(token=TOKEN),
                  "shm_asking": TcpKVTransport(token=TOKEN)}
    kv_s: dict[str, list[float]] = {name: [] for name in transports}
    raw_loop, raw_thread, raw_inner, nbytes = [], [], [], 0
    try:
        kv_port, raw_port, shared = await asyncio.to_thread(parent.recv)
        layers = loaded.config.num_hidden_layers
        layout = layout_of(decode)  # made once, as the decode worker does
        raw = RawReceiver(raw_port, layout.layer_bytes(tokens) * layers)
        prompt = [1] * tokens
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        address = f"127.0.0.61:{kv_port}"  # as a decode worker has it: from the prefill reply
        for i in range(repeats + 1):  # the first pull opens the persistent connection: not timed
            pulled: dict[str, float] = {}
            for name, transport in transports.items():
                parent.send("prefill")
                handle, where = await asyncio.to_thread(parent.recv)
                location = SharedKVRef.model_validate(where) if where is not None and name == "shm" else None
                reservation = decode.reserve(prompt, params)
                assert reservation is not None
                request_id = f"b{i}{name}"
                await asyncio.sleep(settle_s)
                start = time.perf_counter()
                stats = await transport.pull(address, handle, request_id, layout, pool_sink(decode, reservation),
                                             shared=location)
                pulled[name] = time.perf_counter() - start
                decode.cancel_reservation(reservation)
                nbytes = stats.bytes
            raw.sock.setblocking(False)
            await asyncio.sleep(settle_s)
            start = time.perf_counter()  # billed as the pull is: the call and its await included
            await raw.transfer_on_loop()
            on_loop = time.perf_counter() - start
            raw.sock.setblocking(True)
            await asyncio.sleep(settle_s)
            start = time.perf_counter()
            inner = await asyncio.to_thread(raw.transfer)
            on_thread = time.perf_counter() - start
            if i == 0:
                continue
            for name, seconds in pulled.items():
                kv_s[name].append(seconds)
            raw_loop.append(on_loop)
            raw_thread.append(on_thread)
            raw_inner.append(inner)
        raw.sock.close()
    finally:
        for transport in transports.values():
            transport.close()
        parent.send("stop")
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    kv_median = statistics.median(kv_s["tcp"])
    shm_median = statistics.median(kv_s["shm"])
    asking_median = statistics.median(kv_s["shm_asking"])
    raw_variants = {"raw_tcp_on_event_loop": statistics.median(raw_loop),
                    "raw_tcp_on_a_thread_awaited": statistics.median(raw_thread),
                    "raw_tcp_on_a_thread_excluding_the_hop": statistics.median(raw_inner)}
    # The headline baseline is the faster of the two that a worker could use (awaited from its
    # event loop); the thread-internal time, with no hop at all, is reported beside it.
    raw_median = min(raw_variants["raw_tcp_on_event_loop"], raw_variants["raw_tcp_on_a_thread_awaited"])
    return {
        "tokens": tokens, "bytes": nbytes, "repeats": repeats,
        "kv_seconds_median": kv_median, "raw_tcp_seconds_median": raw_median,
        "kv_gbytes_per_s": nbytes / kv_median / 1e9, "raw_tcp_gbytes_per_s": nbytes / raw_median / 1e9,
        "kv_over_raw_throughput": raw_median / kv_median,
        "raw_variants_seconds_median": raw_variants,
        "kv_over_raw_excluding_any_hop": raw_variants["raw_tcp_on_a_thread_excluding_the_hop"] / kv_median,
        # Same host: the pull copies the held blocks out of the prefill pool's shared segment.
        "sender_pool_in_shared_memory": shared,
        "kv_shared_memory_seconds_median": shm_median,
        "kv_shared_memory_gbytes_per_s": nbytes / shm_median / 1e9,
        "kv_shared_memory_over_raw_throughput": raw_median / shm_median,
        "kv_shared_memory_copied_without_asking": transports["shm"].copied_pulls,
        "kv_shared_memory_asking_first_seconds_median": asking_median,
        "kv_shared_memory_asking_first_over_raw_throughput": raw_median / asking_median,
        "kv_seconds": kv_s["tcp"], "kv_shared_memory_seconds": kv_s["shm"],
        "kv_shared_memory_asking_first_seconds": kv_s["shm_asking"], "raw_tcp_on_event_loop_seconds": raw_loop,
        "raw_tcp_on_a_thread_seconds": raw_thread,
    }


def pinned_cores() -> tuple[int, int]:
    """(sender core, receiver core): the last two this process may use."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise SystemExit("--pin needs two cores")
    return cores[-2], cores[-1]


_RATIOS = ("kv_over_raw_throughput", "kv_over_raw_excluding_any_hop", "kv_shared_memory_over_raw_throughput",
           "kv_shared_memory_asking_first_over_raw_throughput")
_SECONDS = ("kv_seconds_median", "raw_tcp_seconds_median", "kv_shared_memory_seconds_median",
            "kv_shared_memory_asking_first_seconds_median")


def over_rounds(rounds: list[dict[str, object]]) -> dict[str, object]:
    """One size's headline: the median over rounds of each round's medians and ratios, each
    round's ratios beside it, and every round whole."""
    first = rounds[0]
    out: dict[str, object] = {"tokens": first["tokens"], "bytes": first["bytes"], "repeats": first["repeats"],
                              "rounds": len(rounds)}
    for key in (*_SECONDS, *_RATIOS):
        out[key] = statistics.median(float(r[key]) for r in rounds)  # type: ignore[arg-type]
    nbytes = int(first["bytes"])  # type: ignore[call-overload]
    out["kv_gbytes_per_s"] = nbytes / out["kv_seconds_median"] / 1e9  # type: ignore[operator]
    out["raw_tcp_gbytes_per_s"] = nbytes / out["raw_tcp_seconds_median"] / 1e9  # type: ignore[operator]
    out["kv_shared_memory_gbytes_per_s"] = nbytes / out["kv_shared_memory_seconds_median"] / 1e9  # type: ignore[operator]
    out["ratios_by_round"] = {key: [r[key] for r in rounds] for key in _RATIOS}
    out["sender_pool_in_shared_memory"] = first["sender_pool_in_shared_memory"]
    out["by_round"] = rounds
    return out


async def run(model: str, sizes: list[int], repeats: int, threads: int, settle_ms: float = 0.0,
              pin: bool = False, rounds: int = 1) -> dict[str, object]:
    sender_core, receiver_core = pinned_cores() if pin else (None, None)
    if receiver_core is not None:
        os.sched_setaffinity(0, {receiver_core})  # every thread this process starts from here on
    loaded = load_model(model, device="cpu")
    load_before = os.getloadavg()
    by_size: dict[int, list[dict[str, object]]] = {tokens: [] for tokens in sizes}
    for _ in range(rounds):  # round by round, every size in each, so drift hits the sizes alike
        for tokens in sizes:
            by_size[tokens].append(await measure(model, loaded, tokens, repeats, threads, settle_ms / 1000,
                                                 sender_core))
    return {
        "benchmark": "kv_transfer", "model": model, "layers": loaded.config.num_hidden_layers,
        "sizes": [over_rounds(by_size[tokens]) for tokens in sizes], "authenticated": True,
        "host": platform.node(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "settle_ms": settle_ms,
        "pinned": {"sender_core": sender_core, "receiver_core": receiver_core} if pin else None,
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "note": "shared machine (several sessions ran at once); ratios compare the two paths under the "
                "same load, interleaved repeat by repeat",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 3000],
                        help="cache sizes in tokens (small-llama: 4096 B/token, so ~1 MB and ~12 MB)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3,
                        help="whole measurements, each with a fresh sender process; medians over them")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--settle-ms", type=float, default=20.0,
                        help="idle time before each timed transfer, both kinds (0: pull at once)")
    parser.add_argument("--pin", action="store_true",
                        help="sender and receiver processes on two different cores, as pods are")
    parser.add_argument("--out", default=str(RESULTS / "kv_transfer.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = asyncio.run(run(args.model, args.tokens, args.repeats, args.threads, args.settle_ms, args.pin,
                             args.rounds))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for size in result["sizes"]:  # type: ignore[attr-defined]
        by_round = [round(r, 2) for r in size["ratios_by_round"]["kv_over_raw_throughput"]]
        print(f"{size['bytes'] / 1e6:5.1f} MB: KV over TCP {size['kv_gbytes_per_s']:.2f} GB/s, through shared "
              f"memory {size['kv_shared_memory_gbytes_per_s']:.2f} GB/s, vs raw TCP "
              f"{size['raw_tcp_gbytes_per_s']:.2f} GB/s (ratios {size['kv_over_raw_throughput']:.2f} / "
              f"{size['kv_shared_memory_over_raw_throughput']:.2f}; asking the port first "
              f"{size['kv_shared_memory_asking_first_over_raw_throughput']:.2f}), median of {size['rounds']} rounds "
              f"of {size['repeats']}; TCP ratio by round {by_round}")
    print(f"load average {result['load_average_before']} -> {result['load_average_after']}")


if __name__ == "__main__":
    main()
