"""guidellm (the benchmark llm-d publishes with, pinned, from PyPI) runs a short sweep against the
system `disaggserve up` starts with no overrides, counting tokens with the tokenizer folder that
`disaggserve-worker tokenizer --out DIR` writes; no request may fail.

guidellm's dependencies clash with ours, so it lives in its own virtualenv (`scripts/test` makes
`.venv/guidellm`); DISAGGSERVE_GUIDELLM may point at another guidellm binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from disaggserve.local.cluster import default_resource
from disaggserve_worker.contract import METRIC_ROUTER_INFLIGHT
from e2e_tools import ROOT, ready_cluster

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]
GUIDELLM_VERSION = "0.8.1"
PROMPT_TOKENS, OUTPUT_TOKENS = 32, 8


def guidellm_binary() -> str:
    candidates = [os.environ.get("DISAGGSERVE_GUIDELLM"), str(ROOT / ".venv" / "guidellm" / "bin" / "guidellm"),
                  str(Path(sys.prefix) / "guidellm" / "bin" / "guidellm")]
    for candidate in candidates:
        if candidate and Path(candidate).exists():
            return candidate
    if os.environ.get("CI"):
        pytest.fail("guidellm is not installed; scripts/test makes .venv/guidellm")
    pytest.skip(f"guidellm {GUIDELLM_VERSION} is not installed (scripts/test makes .venv/guidellm)")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory):
    guidellm_binary()  # skip before starting anything
    async with ready_cluster(tmp_path_factory.mktemp("cluster"), default_resource()) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    subprocess.run([sys.executable, "-m", "disaggserve_worker.cli", "tokenizer", "--model", "builtin:tiny-llama",
                    "--out", str(out)], check=True, capture_output=True, timeout=120)
    return out


# guidellm itself sometimes stalls between two strategies of a sweep, sending nothing more while
# the server sits idle (vllm-project/guidellm#431, #1152). A stall with nothing in flight at our
# router is that, and is retried once; a stall with requests still in flight is ours and fails.
ATTEMPT_SECONDS = 240
ATTEMPTS = 2


async def _inflight(target: str) -> float | None:
    """The router's in-flight gauge: requests it accepted and has not answered yet."""
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(f"{target}/metrics")).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith(METRIC_ROUTER_INFLIGHT + " "):
            return float(line.split()[1])
    return None


async def _guidellm_once(target: str, tokenizer: Path, folder: Path, args: tuple[str, ...]) -> tuple[int | None, str]:
    """One guidellm run: its exit code (None when it stalled past ATTEMPT_SECONDS) and its log.

    It runs in its own session with its log in a file: guidellm's worker processes inherit its
    stdout, so after a stall only killing the whole group ends it (a pipe held open by an orphaned
    worker would keep this test waiting forever)."""
    log_path = folder / "guidellm.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": "",
           "GUIDELLM__LOGGING__CONSOLE_LOG_LEVEL": "WARNING"}
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            guidellm_binary(), "run",
            "--tokenizer", f"kind=huggingface_auto,model={tokenizer}",
            "--data", f"kind=synthetic_text,prompt_tokens={PROMPT_TOKENS},output_tokens={OUTPUT_TOKENS}",
            "--output", f"kind=json,path={folder / 'report.json'}", "--disable-console-interactive", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, cwd=folder,
            start_new_session=True)
        try:
            code: int | None = await asyncio.wait_for(proc.wait(), timeout=ATTEMPT_SECONDS)
        except TimeoutError:
            code = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group: guidellm and its worker processes
            await proc.wait()
    return code, log_path.read_text(errors="replace")


async def _guidellm(target: str, tokenizer: Path, folder: Path, *args: str) -> dict:
    for attempt in range(1, ATTEMPTS + 1):
        run_folder = folder / f"attempt-{attempt}"
        run_folder.mkdir()
        code, log = await _guidellm_once(target, tokenizer, run_folder, args)
        if code is not None:
            assert code == 0, log[-4000:]
            return json.loads((run_folder / "report.json").read_text())
        inflight = await _inflight(target)
        assert inflight == 0, (
            f"guidellm made no progress for {ATTEMPT_SECONDS} s while the router still had {inflight} "
            f"requests in flight: the server stopped answering.\n{log[-4000:]}")
        print(f"guidellm stalled with nothing in flight at the router (attempt {attempt}); its log:\n{log[-2000:]}")
    raise AssertionError(f"guidellm stalled {ATTEMPTS} times with nothing in flight at the router")


def _check_no_failures(report: dict) -> list[str]:
    strategies = []
    for bench in report["benchmarks"]:
        totals = bench["metrics"]["request_totals"]
        strategy = bench["config"]["strategy"]["type_"] if "strategy" in bench["config"] else "?"
        strategies.append(strategy)
        assert totals["errored"] == 0, f"{strategy}: {totals['errored']} failed requests"
        assert totals["successful"] > 0, f"{strategy}: no request finished"
        outputs = bench["metrics"]["output_token_count"]["successful"]
        # guidellm's token counts are the server's usage: every finished request produced exactly
        # the output length it asked for.
        assert outputs["total_sum"] == OUTPUT_TOKENS * totals["successful"], outputs
    return strategies


async def test_guidellm_sweep_chat_has_no_failed_requests(cluster, tokenizer_dir, tmp_path):
    base = (await cluster.endpoint("tiny")).removesuffix("/v1")
    report = await _guidellm(
        base, tokenizer_dir, tmp_path,
        "--backend", f"kind=openai_http,target={base},model=tiny-llama",
        "--profile", "kind=sweep,sweep_size=3,max_concurrency=8",
        "--constraint", "kind=max_duration,seconds=10")  # enough for a loaded machine to finish requests
    strategies = _check_no_failures(report)
    assert len(report["benchmarks"]) == 3, strategies
    async with httpx.AsyncClient(timeout=10) as http:
        metrics = (await http.get(f"{base}/metrics")).text
    assert 'disaggserve_requests_total{status="client_error"} 0.0' in metrics, "the router refused nothing"


async def test_guidellm_completions_endpoint(cluster, tokenizer_dir, tmp_path):
    base = (await cluster.endpoint("tiny")).removesuffix("/v1")
    report = await _guidellm(
        base, tokenizer_dir, tmp_path,
        "--backend", f"kind=openai_http,target={base},model=tiny-llama,request_format=/v1/completions",
        "--profile", "kind=synchronous",
        "--constraint", "kind=max_requests,count=5")
    _check_no_failures(report)
    [bench] = report["benchmarks"]
    prompts = bench["metrics"]["prompt_token_count"]["successful"]["total_sum"]
    assert prompts == PROMPT_TOKENS * bench["metrics"]["request_totals"]["successful"], \
        "guidellm's prompt length (our tokenizer folder) is the server's count"
