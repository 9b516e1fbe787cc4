"""vLLM as the engine, end to end on this machine's CPUs: `disaggserve up -f examples/vllm-tiny-cpu.yaml`.

One system is started for the whole session (vLLM takes minutes to start on two cores): the real
`disaggserve up` (local API, operator, node agent, router) running prefill and decode vLLM servers
that move the KV cache with NixlConnector. Before it starts, one plain vLLM server (no connector)
on the same checkpoint, the reference a user would otherwise run, answers every greedy prompt the
tests compare against, and is stopped (four servers at once on two cores timed out). The tests
check that

- disaggregated greedy completions are token-identical to the plain server's, and the decode
  server really pulled the KV cache (NIXL transfer count) instead of recomputing the prompt;
- streaming chat works through the official `openai` client;
- a scale-down under load fails no request, and no request was retried by the router: the
  SIGTERMed vLLM server drained its streams itself (`--shutdown-timeout`);
- a decode server killed mid-stream gives the client the complete answer or a clear retryable error,
  and is restarted and serves again.

They run with the vLLM interpreter `scripts/test` installs (`.venv/vllm`); without one they skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "vllm-tiny-cpu.yaml"
NAME, MODEL = "tiny-vllm", "tiny-llama"
REFERENCE_HOST = "127.0.91.1"
START_TIMEOUT_S = 600
# The local API server shares two cores with three vLLM servers under load: httpx's 5 s default
# timed a PATCH out in a rehearsal.
API_TIMEOUT_S = 60
PROMPTS = [
    "The quick brown fox",
    "Kubernetes runs containers in pods; an operator watches",
    "Serving large language models splits generation into two phases.",
]

# The first test also waits for the shared start (about 2 minutes on two idle cores with
# --enforce-eager; the reference server first, then the system).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(START_TIMEOUT_S + 300)]


def _vllm_python() -> str | None:
    for candidate in (os.environ.get("DISAGGSERVE_VLLM_PYTHON"), str(ROOT / ".venv" / "vllm" / "bin" / "python")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT / "worker_image")]),
            "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}


class System:
    """What the session fixture started (`disaggserve up`) and the plain vLLM's greedy answers."""

    def __init__(self, state_dir: Path, api: str, endpoint: str,
                 references: dict[tuple[str, int], tuple[list[int], str]], up: subprocess.Popen[bytes]):
        self.state_dir = state_dir
        self.api = api
        self.endpoint = endpoint
        self.references = references
        self.up = up

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.endpoint, api_key="unused", max_retries=0, timeout=300)

    def resource_url(self) -> str:
        return f"{self.api}/apis/disaggserve.io/v1alpha1/namespaces/default/disaggserves/{NAME}"

    async def pods(self, phase: str) -> list[dict]:
        async with httpx.AsyncClient(timeout=API_TIMEOUT_S) as http:
            items = (await http.get(f"{self.api}/api/v1/namespaces/default/pods")).json()["items"]
        prefix = f"{NAME}-{phase}-"
        return sorted((p for p in items if p["metadata"]["name"].startswith(prefix)
                       and not p["metadata"].get("deletionTimestamp")), key=lambda p: p["metadata"]["name"])

    async def ready_pods(self, phase: str) -> list[dict]:
        return [p for p in await self.pods(phase) if any(
            c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions", []))]

    async def scale_decode(self, replicas: int) -> None:
        async with httpx.AsyncClient(timeout=API_TIMEOUT_S) as http:
            response = await http.patch(
                self.resource_url(), headers={"Content-Type": "application/merge-patch+json"},
                json={"spec": {"parallelism": {"decode": {"replicas": replicas}}}})
            response.raise_for_status()

    async def wait_ready_decode(self, count: int, timeout: float = 900) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(await self.ready_pods("decode")) == count and len(await self.pods("decode")) == count:
                return
            await asyncio.sleep(2)
        raise AssertionError(f"no {count} ready decode pods after {timeout:.0f}s; logs in {self.state_dir}/logs")


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (len(line) == len(name) or line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _get_text(url: str) -> str:
    async with httpx.AsyncClient(timeout=API_TIMEOUT_S) as http:
        return (await http.get(url)).text


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
              log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}; "
                               f"{log.read_text()[-3000:] if log else ''}")
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise RuntimeError(f"{what}: not after {timeout:.0f}s; {log.read_text()[-3000:] if log else ''}")


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def vllm_system():
    python = _vllm_python()
    if python is None:
        pytest.skip("no vLLM interpreter: scripts/test installs .venv/vllm (or set DISAGGSERVE_VLLM_PYTHON)")
    # Not pytest's tmp_path: its base folder is shared by every pytest run of the user and only the
    # last three are kept, so a parallel run can delete this system's state (pods' folders and logs)
    # while it is up. A short path also keeps vLLM's unix sockets under the 107-character limit.
    state = Path(tempfile.mkdtemp(prefix="dsvllm-"))
    try:
        yield from _start_system(python, state)
    finally:
        if os.environ.get("DISAGGSERVE_E2E_KEEP_STATE") == "1":
            print(f"kept the vLLM system's state (logs) in {state}")
        else:
            shutil.rmtree(state, ignore_errors=True)


# Greedy references the tests compare against: (prompt, max_tokens) pairs.
REFERENCE_CASES = [*((prompt, 24) for prompt in PROMPTS), (PROMPTS[0], 200)]
# Each vLLM server as the rendered CPU pods run it: one OpenMP thread, not bound to cores (vLLM's
# default binds and spins threads on every core, which starves the other servers on two cores).
CPU_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def _reference_outputs(python: str, checkpoint: Path, state: Path) -> dict[tuple[str, int], tuple[list[int], str]]:
    """Greedy ids and text of one plain vLLM server for every REFERENCE_CASES entry.

    The plain server runs first and alone, and is stopped before the system under test starts:
    four vLLM servers at once on two cores made start-up and every test time out.
    """
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    log = state / "reference.log"
    with open(log, "wb") as out:
        reference = subprocess.Popen(
            [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
             "--served-model-name", MODEL, "--host", REFERENCE_HOST, "--port", "8100", "--max-num-seqs", "8",
             *yaml.safe_load(EXAMPLE.read_text())["spec"]["engine"].get("extraArgs", [])],
            stdout=out, stderr=subprocess.STDOUT, env={**_env(), **CPU_ENV, "HOME": str(state)},
            start_new_session=True)
    try:
        def reference_up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"http://{REFERENCE_HOST}:8100/health", timeout=5).status_code == 200
            return False

        _wait_for(reference_up, START_TIMEOUT_S, "the reference vLLM", reference, log)
        outputs = {}
        for prompt, max_tokens in REFERENCE_CASES:
            ids = tokenizer.encode(prompt, add_special_tokens=False).ids  # the router's tokenization
            body = {"model": MODEL, "prompt": ids, "max_tokens": max_tokens, "temperature": 0,
                    "return_token_ids": True}
            reply = httpx.post(f"http://{REFERENCE_HOST}:8100/v1/completions", json=body, timeout=300)
            reply.raise_for_status()
            out = reply.json()["choices"][0]["token_ids"]
            outputs[(prompt, max_tokens)] = (out, tokenizer.decode(out, skip_special_tokens=True))
        return outputs
    finally:
        _stop(reference, 30)


def _start_system(python: str, state: Path):
    # The resource under test: the example, with two decode servers so that one can be scaled away.
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["parallelism"]["decode"]["replicas"] = 2
    resource = state / "resource-under-test.yaml"
    resource.write_text(yaml.safe_dump(doc))
    checkpoint = state / "state" / "models" / MODEL  # where `up` writes it; it reuses a complete folder
    subprocess.run([python, "-m", "disaggserve_worker.cli", "export-checkpoint", "--model", MODEL,
                    "--out", str(checkpoint)], check=True, env=_env(), capture_output=True)
    references = _reference_outputs(python, checkpoint, state)
    port = _free_port()
    up_log = state / "up.log"
    with open(up_log, "wb") as out:
        up = subprocess.Popen(
            [python, "-m", "disaggserve.cli", "up", "-f", str(resource), "--state-dir", str(state / "state"),
             "--api-port", str(port), "--timeout", str(START_TIMEOUT_S)],
            stdout=out, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        ready = re.compile(r"is ready\S*: (http://\S+/v1)")
        endpoint = _wait_for(lambda: (m := ready.search(up_log.read_text())) and m.group(1), START_TIMEOUT_S,
                             "disaggserve up", up, up_log)
        _warm_every_decode_server(endpoint, f"http://127.0.0.1:{port}")
        yield System(state, f"http://127.0.0.1:{port}", endpoint, references, up)
    finally:
        _stop(up, 300)


def _warm_every_decode_server(endpoint: str, api: str, attempts: int = 12) -> None:
    """Requests until every decode server has pulled a KV cache over NIXL once.

    The first pull from each decode server pays NIXL's handshake with the prefill server; one
    warm-up request reached only one of two decode servers, and in a CI rehearsal the other's
    first pull then timed out inside a test. The tests are about steady behaviour.
    """
    def decode_ips() -> list[str]:
        items = httpx.get(f"{api}/api/v1/namespaces/default/pods", timeout=API_TIMEOUT_S).json()["items"]
        return [p["status"]["podIP"] for p in items if p["metadata"]["name"].startswith(f"{NAME}-decode-")
                and (p.get("status") or {}).get("podIP")]

    def pulled(ip: str) -> float:
        text = httpx.get(f"http://{ip}:8100/metrics", timeout=API_TIMEOUT_S).text
        return _metric(text, "vllm:nixl_xfer_time_seconds_count")

    def post(prompt: str) -> None:
        with contextlib.suppress(httpx.HTTPError):  # a first pull may time out: that is what this absorbs
            httpx.post(f"{endpoint}/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 8},
                       timeout=300)

    for i in range(attempts):
        ips = decode_ips()
        if all(pulled(ip) > 0 for ip in ips):
            return
        # Concurrent: the router sends one request after another to the same idle decode server
        # (ties go to the one with the most free cache), so only overlap reaches them all.
        with ThreadPoolExecutor(len(ips) + 1) as pool:
            list(pool.map(post, [f"warm up {i}.{j}" for j in range(len(ips) + 1)]))
    raise AssertionError(f"not every decode server pulled a KV cache after {attempts} warm-up requests")


def _reference_ids(system: System, prompt: str, max_tokens: int) -> tuple[list[int], str]:
    """Greedy token ids and text of the plain vLLM server (computed before the system started)."""
    return system.references[(prompt, max_tokens)]


@pytest.fixture
async def client(vllm_system: System):
    """An OpenAI client of the system, closed while the test's event loop still runs."""
    client = vllm_system.client()
    yield client
    await client.close()


async def test_disaggregated_greedy_is_token_identical_to_one_plain_vllm(
    vllm_system: System, client: openai.AsyncOpenAI
):
    decode_urls = [f"http://{p['status']['podIP']}:8100/metrics" for p in await vllm_system.ready_pods("decode")]
    pulled_before = sum([_metric(await _get_text(u), "vllm:nixl_xfer_time_seconds_count") for u in decode_urls])
    for prompt in PROMPTS:
        expected_ids, expected_text = _reference_ids(vllm_system, prompt, 24)
        got = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert got.choices[0].text == expected_text, prompt
        assert got.usage.completion_tokens == len(expected_ids)
    pulled_after = sum([_metric(await _get_text(u), "vllm:nixl_xfer_time_seconds_count") for u in decode_urls])
    # Each request's prompt KV cache came from the prefill server over NIXL, not from recomputing it.
    assert pulled_after - pulled_before >= len(PROMPTS)


async def test_streaming_chat_through_the_openai_client(
    vllm_system: System, client: openai.AsyncOpenAI
):
    messages = [{"role": "user", "content": "Say hello to the operator."}]
    whole = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                  stream=True)
    deltas, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            deltas.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert len([d for d in deltas if d]) > 1, "the answer arrived in several chunks"
    assert "".join(deltas) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason


async def test_scale_down_under_load_fails_no_request_and_vllm_drains_itself(
    vllm_system: System, client: openai.AsyncOpenAI
):
    await vllm_system.wait_ready_decode(2)
    router_metrics = vllm_system.endpoint.removesuffix("/v1") + "/metrics"
    resumed_before = _metric(await _get_text(router_metrics), "disaggserve_router_resumed_total")
    leaving = (await vllm_system.pods("decode"))[-1]  # a StatefulSet removes the highest ordinal
    leaving_metrics = f"http://{leaving['status']['podIP']}:8100/metrics"
    max_tokens = 160

    async def long_stream(i: int) -> int:
        stream = await client.completions.create(model=MODEL, prompt=f"{i} {PROMPTS[i % len(PROMPTS)]}",
                                                 max_tokens=max_tokens, temperature=0, stream=True,
                                                 extra_body={"ignore_eos": True})
        return len([c async for c in stream if c.choices and c.choices[0].text])

    # Rounds of six streams until the leaving server holds one (the router spreads by load, and on
    # a loaded host a round can finish, or land on the other server, before a poll sees it).
    streams: list[asyncio.Task[int]] = []
    running, deadline = 0.0, time.monotonic() + 240
    while not running and time.monotonic() < deadline:
        if all(s.done() for s in streams):
            for done in streams:
                done.result()  # a stream that failed fails the test with its own error
            streams += [asyncio.create_task(long_stream(len(streams) + i)) for i in range(6)]
        running = _metric(await _get_text(leaving_metrics), "vllm:num_requests_running")
        await asyncio.sleep(0.1)
    assert running > 0, f"no stream ran on the decode server about to be removed in {len(streams)} streams"
    await vllm_system.scale_decode(1)
    counts = await asyncio.gather(*streams)  # raises if any request failed
    assert all(n > 0 for n in counts)
    # A stream that had begun on the leaving server and moved elsewhere counts as resumed; a
    # request the draining server refused before its first token is retried, which is the
    # router doing its job (a CI rehearsal saw two such retries, every stream complete).
    after = await _get_text(router_metrics)
    retries = [line for line in after.splitlines() if line.startswith("disaggserve_router_retries_total{")]
    assert _metric(after, "disaggserve_router_resumed_total") == resumed_before, (
        f"a running stream was moved: the removed vLLM server did not drain it ({retries})")
    await vllm_system.wait_ready_decode(1, timeout=300)
    log = (vllm_system.state_dir / "state" / "logs" / f"default_{leaving['metadata']['name']}.log").read_text()
    assert "draining in-flight requests" in log or "mode=drain" in log, "vLLM did not report a drain"


async def test_decode_killed_mid_stream_gives_a_complete_answer_or_a_retryable_error(
    vllm_system: System, client: openai.AsyncOpenAI
):
    await vllm_system.scale_decode(1)  # as the scale-down test left it, whether or not that passed
    await vllm_system.wait_ready_decode(1, timeout=600)
    prompt = PROMPTS[0]
    _, reference_text = _reference_ids(vllm_system, prompt, 200)
    decode = (await vllm_system.ready_pods("decode"))[0]
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=200, temperature=0, stream=True)
    text, killed, error = [], False, None
    try:
        async for chunk in stream:
            text.append(chunk.choices[0].text if chunk.choices else "")
            if not killed and len(text) >= 5:
                killed = _kill_server_on(decode["status"]["podIP"])
    except openai.APIError as exc:
        error = exc
    assert killed, "found no vLLM process for the decode pod"
    if error is None:
        assert "".join(text) == reference_text, "a resumed stream must equal the greedy reference"
    else:
        assert "can be retried" in str(error), f"the error must say the request can be retried: {error}"
    # The node agent restarts the killed server, which serves again. Waiting here also keeps a
    # restart from still being in vLLM's start-up at the end of the session: one caught there did
    # not answer SIGTERM and the session's teardown waited out the pod's 180 s grace period.
    await _wait_restarted(vllm_system, decode["metadata"]["name"], _restarts(decode))
    again = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
    assert again.choices[0].text == _reference_ids(vllm_system, prompt, 24)[1]


def _restarts(pod: dict) -> int:
    return sum(int(c.get("restartCount", 0)) for c in (pod.get("status") or {}).get("containerStatuses", []))


async def _wait_restarted(system: System, name: str, before: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in await system.ready_pods("decode"):
            if pod["metadata"]["name"] == name and _restarts(pod) > before:
                return
        await asyncio.sleep(2)
    raise AssertionError(f"decode pod {name} was not restarted and ready within {timeout:.0f}s; "
                         f"logs in {system.state_dir}/logs")


def _kill_server_on(ip: str) -> bool:
    """SIGKILL the vLLM API server the node agent started for the pod with address `ip`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if b"vllm.entrypoints.openai.api_server" in argv and ip.encode() in argv:
                os.kill(int(entry.name), signal.SIGKILL)
                return True
    return False


def test_the_example_is_what_users_run():
    """The example parses as `disaggserve up` applies it (builtin model → checkpoint folder)."""
    doc = yaml.safe_load(EXAMPLE.read_text())
    assert doc["spec"]["engine"]["kind"] == "vllm"
    assert json.dumps(doc["spec"]["model"]["source"]) == json.dumps({"builtin": MODEL})
