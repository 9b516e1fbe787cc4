"""`disaggserve-worker profile-link` against real workers: it pulls what a prefill worker announces,
frees every cache it makes, writes a profile the operator's planner accepts, and refuses bad input
with one line, exit 2 and no file touched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import pytest

from disaggserve_worker import contract
from disaggserve_worker.cli import main
from disaggserve_worker.model.builtin_configs import builtin_config
from disaggserve_worker.profile.link import LinkError, parse_sizes

TOKEN = "token-of-the-profile-link-test"
PREFILL = "http://127.0.94.71:8100"
DECODE = "http://127.0.94.72:8100"
MODEL = ["--model", "builtin:tiny-llama", "--device", "cpu", "--threads", "1"]
SIZES = [16, 96]
WORKER_MAX_LEN = 512
# Short, so a cache a refused run leaves behind (the dtype case) is gone before the next test counts.
KV_TTL_S = 3


def _worker(role: str, host: str) -> subprocess.Popen[str]:
    env = {**os.environ, contract.ENV_WORKER_TOKEN: TOKEN}
    return subprocess.Popen(
        [sys.executable, "-m", "disaggserve_worker.cli", "serve", "--role", role, *MODEL, "--host", host,
         "--port", "8100", "--kv-port", "8101", "--kv-cache-tokens", "2048", "--max-model-len", str(WORKER_MAX_LEN),
         "--kv-ttl-s", str(KV_TTL_S), "--drain-grace-s", "1", "--log-level", "WARNING"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_ready(proc: subprocess.Popen[str], url: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(url + contract.PATH_READY, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"worker {url} did not become ready: {proc.communicate()[0]}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def workers() -> Iterator[None]:
    """A prefill and a decode worker of one DisaggServe (same token), as separate processes."""
    procs = {PREFILL: _worker("prefill", "127.0.94.71"), DECODE: _worker("decode", "127.0.94.72")}
    try:
        for url, proc in procs.items():
            _wait_ready(proc, url)
        yield
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def in_a_pod(monkeypatch: pytest.MonkeyPatch, workers: None) -> None:
    """The tool reads the worker token from the environment, as in a decode pod."""
    monkeypatch.setenv(contract.ENV_WORKER_TOKEN, TOKEN)


def _held_caches() -> int:
    request = urllib.request.Request(PREFILL + contract.PATH_LOAD, headers={contract.HEADER_WORKER_TOKEN: TOKEN})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return int(json.load(resp)["held_caches"])


def _wait_none_held() -> None:
    """Until caches earlier tests left behind have expired (at most the worker's TTL)."""
    deadline = time.monotonic() + KV_TTL_S + 5
    while _held_caches() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _held_caches() == 0


def _profile(path: Path) -> Path:
    """A real planner profile with measured router costs and a provenance key of its own."""
    shipped = resources.files("disaggserve") / "data" / "profiles" / "tiny-llama-cpu.json"
    doc = json.loads(shipped.read_text())
    doc["overheads"] = {"router": {"per_request_ms": 1.5, "per_token_ms": 0.2}}
    doc["host"] = "the test host"
    path.write_text(json.dumps(doc, indent=2))
    return path


def _run(*extra: str) -> int:
    return main(["profile-link", "--prefill", PREFILL, *MODEL, "--sizes", ",".join(map(str, SIZES)),
                 "--repeats", "2", *extra])


def test_pulls_what_the_prefill_worker_announced_and_frees_every_cache(
        in_a_pod: None, capsys: pytest.CaptureFixture[str]) -> None:
    _wait_none_held()
    assert _run() == 0
    result = json.loads(capsys.readouterr().out)
    link = result["kv_link"]
    assert link["gbps"] > 0 and link["latency_ms"] >= 0
    samples = result["samples"]
    # Warm-ups are not samples; the sizes take turns, repeat by repeat.
    assert [s["tokens"] for s in samples] == SIZES * 2
    config = builtin_config("tiny-llama")
    for s in samples:
        expected = 2 * config.num_hidden_layers * config.kv_heads * config.dim_per_head * 4 * s["tokens"]
        assert s["bytes"] == s["kv_bytes"] == expected, s
        assert s["seconds"] > 0
    # Read at once (well within the TTL): no cache is left because each pull freed its cache.
    assert _held_caches() == 0, "every cache the tool made was pulled, which frees it"


def test_writes_the_link_into_the_profile_and_keeps_everything_else(
        in_a_pod: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from disaggserve.planner.profile import parse_profile

    path = _profile(tmp_path / "p.json")
    before = json.loads(path.read_text())
    assert _run("--profile", str(path)) == 0
    assert f"wrote {path}: kv_link" in capsys.readouterr().out
    after = json.loads(path.read_text())
    link = after["overheads"].pop("kv_link")
    assert link["gbps"] > 0 and link["latency_ms"] >= 0
    assert after.pop("kv_link_source").startswith(f"disaggserve-worker profile-link --prefill {PREFILL}: 4 pulls")
    assert after == before, "only overheads.kv_link (and its provenance) changed"
    planned = parse_profile(path.read_text(), origin=str(path))
    assert planned.overheads.kv_link is not None and planned.overheads.kv_link.gbps == link["gbps"]
    assert planned.overheads.router.per_request_ms == 1.5

    out = tmp_path / "elsewhere.json"
    written = path.read_bytes()
    assert _run("--profile", str(path), "--out", str(out)) == 0
    assert path.read_bytes() == written, "--out leaves --profile as it was"
    assert parse_profile(out.read_text()).overheads.kv_link is not None


@pytest.mark.parametrize(("flags", "needle"), [
    (["--prefill", "http://127.0.94.79:8100"], "cannot reach the prefill worker at http://127.0.94.79:8100"),
    (["--prefill", "127.0.94.71:8100"], "expected the prefill worker's HTTP URL"),
    (["--prefill", DECODE], "is a decode worker, not a prefill worker"),
    (["--sizes", "128"], "give at least two different sizes"),
    (["--sizes", "16,5000"], "5000 tokens exceed the model's context of 4096 tokens"),
    (["--sizes", "16,600"], "refused a 600-token prompt (400)"),
    (["--dtype", "bfloat16"], "pass the --model and --dtype the prefill worker serves with"),
])
def test_bad_input_is_one_line_exit_2_and_no_file_changed(
        in_a_pod: None, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str) -> None:
    path = _profile(tmp_path / "p.json")
    written = path.read_bytes()
    # The later flags win over _run's defaults (argparse keeps the last value given).
    assert _run("--profile", str(path), *flags) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert err.count("\n") == 1 and err.startswith("disaggserve-worker profile-link: ")
    assert path.read_bytes() == written
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"], "no other file either"


def test_a_file_that_is_not_a_profile_is_refused_before_measuring(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "values.json"
    path.write_text('{"replicas": 3}\n')
    # Nothing listens there: a refusal that names the file, not the URL, came before any measuring.
    assert _run("--profile", str(path), "--prefill", "http://127.0.94.79:8100") == 2
    err = capsys.readouterr().err
    assert "is not a planner profile (it has no model, gpu, entries)" in err and "cannot reach" not in err
    assert path.read_text() == '{"replicas": 3}\n'


def test_a_worker_of_another_disaggserve_refuses_the_tool(
        workers: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(contract.ENV_WORKER_TOKEN, "another-token")
    assert _run() == 2
    assert "refused the worker token" in capsys.readouterr().err


def test_sizes_are_distinct_positive_and_at_least_two() -> None:
    assert parse_sizes("1024,128,128") == [128, 1024]
    for bad in ("128", "128,128", "0,128", "a,b"):
        with pytest.raises(LinkError):
            parse_sizes(bad)


def test_the_kv_layout_comes_from_the_config_alone(tmp_path: Path) -> None:
    """A checkpoint folder needs no weights read: its config.json gives layers, KV heads, head size."""
    from disaggserve_worker.model.export import hf_config
    from disaggserve_worker.profile.link import kv_target

    (tmp_path / "config.json").write_text(json.dumps({**hf_config("tiny-llama"), "max_position_embeddings": 256}))
    target = kv_target(str(tmp_path), [16, 96], device="cpu")
    config = builtin_config("tiny-llama")
    assert (target.layout.layers, target.layout.kv_heads, target.layout.head_dim, target.layout.max_tokens) == (
        config.num_hidden_layers, config.kv_heads, config.dim_per_head, 256)
    assert target.sink.capacity == 96 and target.vocab == config.vocab_size
    with pytest.raises(LinkError, match="300 tokens exceed the model's context of 256"):
        kv_target(str(tmp_path), [16, 300], device="cpu")
