"""The `serve` flags are the operator contract: accepted as rendered, refused with a reason."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from disaggserve_worker import contract
from disaggserve_worker.cli import build_parser, main, validate_serve_args

RENDERED = ["serve", "--role", "decode", "--model", "builtin:tiny-llama", "--model-name", "tiny",
            "--host", "0.0.0.0", "--port", str(contract.WORKER_PORT), "--kv-port", str(contract.KV_PORT),
            "--tensor-parallel", "1", "--pipeline-parallel", "1", "--device", "auto",
            "--ttft-slo-ms", "250", "--tpot-slo-ms", "100", "--max-model-len", "2048",
            "--speculation-mode", "off", "--speculation-proposer", "ngram", "--speculation-num-speculative-tokens", "4",
            "--speculation-ngram-min", "1", "--speculation-ngram-max", "3"]


def test_operator_rendered_flags_parse() -> None:
    args = build_parser().parse_args(RENDERED)
    assert (args.role, args.model, args.port, args.kv_port, args.ttft_slo_ms) == (
        "decode", "builtin:tiny-llama", 8100, 8101, 250.0)
    assert validate_serve_args(args) == []


def test_operator_rendering_is_accepted_when_the_control_plane_is_installed() -> None:
    operator_contract = pytest.importorskip("disaggserve.contract")
    rendered = operator_contract.worker_args(role="prefill", model="builtin:tiny-llama", model_name="tiny",
                                             tensor=1, pipeline=1, device="cpu", ttft_slo_ms=200,
                                             tpot_slo_ms=50, max_model_len=1024, dtype="bfloat16")
    args = build_parser().parse_args(rendered)
    assert validate_serve_args(args) == [] and args.dtype == "bfloat16"


@pytest.mark.parametrize("tensor", [2, 4, 8])
def test_operator_rendered_tensor_sizes_are_accepted_on_gpus(tensor: int) -> None:
    operator_contract = pytest.importorskip("disaggserve.contract")
    rendered = operator_contract.worker_args(role="decode", model="builtin:tiny-llama", model_name="tiny",
                                             tensor=tensor, pipeline=2, device="cuda", ttft_slo_ms=200,
                                             tpot_slo_ms=50)
    args = build_parser().parse_args(rendered)
    assert (args.tensor_parallel, args.pipeline_parallel) == (tensor, 2)
    assert validate_serve_args(args) == []


@pytest.mark.parametrize(("extra", "needle"), [
    (["--role", "prefill", "--speculation-mode", "adaptive"], "a prefill worker does none"),
    (["--speculation-mode", "fixed", "--speculation-proposer", "draft"], "needs --speculation-draft-model"),
    (["--speculation-num-speculative-tokens", "17"], "at most 16"),
    (["--tensor-parallel", "2", "--device", "cpu"], "with --device cpu use --tensor-parallel 1"),
    (["--tensor-parallel", "3"], "must be one of 1, 2, 4, 8"),
    (["--tensor-parallel", "16"], "a power of two no larger than 8"),
    (["--pipeline-parallel", "2", "--device", "cpu"], "splits layers over CUDA devices"),
    (["--speculation-ngram-min", "4", "--speculation-ngram-max", "2"], "must not exceed"),
])
def test_unsupported_or_inconsistent_flags_are_refused(extra: list[str], needle: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*RENDERED, *extra]) == 2
    assert needle in capsys.readouterr().err


def test_tensor_parallel_without_gpus_names_the_gpus_to_request(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.device_count() >= 4:
        pytest.skip("this machine has the GPUs: the worker would start")
    assert main([*RENDERED, "--tensor-parallel", "2", "--pipeline-parallel", "2"]) == 2
    assert "tensor parallel size 2 needs 4 CUDA devices" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--role", "router"], ["--port", "70000"], ["--tensor-parallel", "0"],
                                 ["--device", "tpu"], ["--ttft-slo-ms", "-1"]])
def test_malformed_flags_exit_with_usage(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*RENDERED, *bad])
    assert exit_info.value.code == 2


def test_serve_runs_and_exits_cleanly_on_sigterm() -> None:
    env = {**os.environ, contract.ENV_POD_IP: "127.0.93.51", contract.ENV_POD_NAME: "tiny-prefill-0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "disaggserve_worker.cli", "serve", "--role", "prefill", "--model",
         "builtin:tiny-llama", "--host", "127.0.93.51", "--port", "18100", "--kv-port", "18101",
         "--device", "cpu", "--threads", "1", "--kv-cache-tokens", "1024", "--drain-grace-s", "5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen("http://127.0.93.51:18100/readyz", timeout=1) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"worker did not become ready: {proc.stdout.read() if proc.stdout else ''}")
                time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        output = proc.stdout.read() if proc.stdout else ""
        assert "draining" in output and "127.0.93.51:18101" in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_parallel_sizes_without_enough_gpus_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from disaggserve_worker.model.loader import ModelLoadError, device_grid

    assert device_grid(torch.device("cpu")) == [[torch.device("cpu")]]
    with pytest.raises(ModelLoadError, match="needs 2 CUDA devices"):
        device_grid(torch.device("cpu"), pipeline=2)
    with pytest.raises(ModelLoadError, match="tensor parallel size 2 needs 2 CUDA devices"):
        device_grid(torch.device("cpu"), tensor=2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ModelLoadError, match=r"needs 8 CUDA devices but this pod sees 4; request "
                                             r"nvidia.com/gpu: 8"):
        device_grid(torch.device("cuda"), pipeline=2, tensor=4)
    cuda = [torch.device("cuda", i) for i in range(4)]
    # Stage s takes cuda:s*T .. s*T+T-1: a stage's shards are neighbours (one NVLink island).
    assert device_grid(torch.device("cuda"), pipeline=2, tensor=2) == [cuda[:2], cuda[2:]]
    assert device_grid(torch.device("cuda"), pipeline=1, tensor=4) == [cuda]
