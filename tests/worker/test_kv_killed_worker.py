"""A real prefill worker process killed in the middle of a KV transfer: a clean, retryable error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from disaggserve_worker.kv.framing import KVTransferError
from disaggserve_worker.kv.transport import KVLayout, TcpKVTransport
from disaggserve_worker.model.builtin_configs import builtin_config

HOST = "127.0.94.7"


def _wait_ready(proc: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"prefill worker did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.2)


async def test_prefill_worker_killed_mid_transfer() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "disaggserve_worker.cli", "serve", "--role", "prefill", "--model",
         "builtin:small-llama", "--host", HOST, "--port", "18200", "--kv-port", "18201", "--device", "cpu",
         "--threads", "1", "--kv-cache-tokens", "4096", "--max-batch-tokens", "4096"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://{HOST}:18200"
        _wait_ready(proc, url)
        # 3000 tokens of small-llama: 12 MB of cache, more than loopback socket buffers hold.
        body = json.dumps({"request_id": "k", "prompt_token_ids": [7] * 3000,
                           "sampling": {"temperature": 0, "max_tokens": 4}}).encode()
        request = urllib.request.Request(url + "/internal/prefill", data=body, method="POST")
        with urllib.request.urlopen(request, timeout=60) as resp:
            kv = json.load(resp)["kv"]
        config = builtin_config("small-llama")
        layout = KVLayout(torch.float32, config.num_hidden_layers, config.kv_heads, config.dim_per_head)
        layers: list[int] = []

        def kill_after_first_layer(layer: int, _tensor: torch.Tensor) -> None:
            layers.append(layer)
            if layer == 0:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

        start = time.monotonic()
        with pytest.raises(KVTransferError) as error:
            await TcpKVTransport(frame_timeout=20).pull(kv["address"], kv["handle"], "k", layout,
                                                        kill_after_first_layer)
        assert error.value.retryable and error.value.kind == "kv_unavailable"
        assert time.monotonic() - start < 10, "noticed when the socket closes, not at a timeout"
        assert layers[0] == 0 and len(layers) < config.num_hidden_layers
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
