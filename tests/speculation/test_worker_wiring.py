"""Speculation through the worker's own wiring: CLI flags -> speculator -> HTTP -> /metrics."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest
from speculation_harness import copy_heavy_prompt

from disaggserve_worker.cli import build_parser, build_speculator, validate_serve_args
from disaggserve_worker.engine.engine import Engine, EngineConfig
from disaggserve_worker.model.loader import LoadedModel
from disaggserve_worker.server.app import ServerConfig, WorkerServer
from disaggserve_worker.server.worker_metrics import WorkerMetrics
from disaggserve_worker.speculation.draft import check_compatible

FLAGS = ["serve", "--role", "colocated", "--model", "builtin:tiny-llama", "--device", "cpu",
         "--speculation-mode", "adaptive", "--speculation-num-speculative-tokens", "4"]


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


@pytest.mark.parametrize("proposer", [["--speculation-proposer", "ngram"],
                                      ["--speculation-proposer", "draft", "--speculation-draft-model",
                                       "builtin:tiny-llama-draft"]])
async def test_flags_build_a_speculating_worker_with_metrics(tiny: LoadedModel, proposer: list[str]) -> None:
    args = build_parser().parse_args([*FLAGS, *proposer])
    assert validate_serve_args(args) == []
    engine_ref: list[Engine] = []
    metrics = WorkerMetrics("colocated", lambda: engine_ref[0].load(), None, None)
    speculator = build_speculator(args, tiny, 2048, metrics.registry)
    assert speculator is not None and speculator.config.proposer == proposer[1]
    engine = Engine(tiny.model, tiny.tokenizer, tiny.eos_token_ids,
                    EngineConfig(role="colocated", kv_cache_tokens=2048, max_model_len=512),
                    observer=metrics.observe_iteration, speculator=speculator)
    engine_ref.append(engine)
    server = WorkerServer(engine, ServerConfig(role="colocated", host="127.0.0.73", port=0, kv_port=0),
                          metrics)
    await server.start()
    try:
        url = f"http://127.0.0.73:{server.port}"
        # Text whose continuation n-grams predict: adaptive speculates on it whatever its step-time
        # fit says (on other text whether it pays is the controller's call, not this wiring's).
        prompt = await copy_heavy_prompt(tiny)
        body = {"request_id": "s", "prompt_token_ids": prompt,
                "sampling": {"temperature": 0, "max_tokens": 24, "ignore_eos": True}}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/internal/generate", json=body) as resp:
                events = [json.loads(line) async for line in resp.content if line.strip()]
            assert len(events) == 24 and events[-1]["finish_reason"] == "length"
            async with session.get(url + "/metrics") as resp:
                text = await resp.text()
    finally:
        await server.stop()
    proposed = _metric(text, "disaggserve_spec_proposed_tokens_total")
    accepted = _metric(text, "disaggserve_spec_accepted_tokens_total")
    assert proposed > 0 and 0 <= accepted <= proposed
    assert _metric(text, "disaggserve_spec_chosen_k_count") > 0
    assert _metric(text, "disaggserve_spec_tokens_per_step") >= 1.0
    assert _metric(text, "disaggserve_spec_goodput_tokens_per_second") > 0
    assert _metric(text, "vllm:generation_tokens_total") == 24  # every token the worker emitted


def test_off_builds_nothing(tiny: LoadedModel) -> None:
    args = build_parser().parse_args([*FLAGS[:-4]])
    assert build_speculator(args, tiny, 2048, WorkerMetrics("decode", dict, None, None).registry) is None


def test_a_draft_of_another_vocabulary_is_refused(tiny: LoadedModel, tiny_draft: LoadedModel) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        check_compatible(1000, tiny_draft.model, True)
    with pytest.raises(ValueError, match="tokenizer differs"):
        check_compatible(tiny.config.vocab_size, tiny_draft.model, False)


def test_a_missing_draft_checkpoint_is_reported(tiny: LoadedModel) -> None:
    from disaggserve_worker.model.loader import ModelLoadError

    args = build_parser().parse_args([*FLAGS, "--speculation-proposer", "draft",
                                      "--speculation-draft-model", "/nonexistent/draft"])
    with pytest.raises(ModelLoadError, match="/nonexistent/draft"):
        build_speculator(args, tiny, 2048, WorkerMetrics("decode", dict, None, None).registry)


@pytest.mark.parametrize("speculation", [
    {"mode": "adaptive", "proposer": "ngram", "num-speculative-tokens": 8, "ngram-min": 1, "ngram-max": 4},
    {"mode": "fixed", "proposer": "draft", "num-speculative-tokens": 4, "draft-model": "builtin:tiny-llama-draft"},
])
def test_operator_rendered_speculation_flags_are_accepted_on_decode(
        tiny: LoadedModel, speculation: dict[str, str | int]) -> None:
    operator_contract = pytest.importorskip("disaggserve.contract")
    rendered = operator_contract.worker_args(role="decode", model="builtin:tiny-llama", model_name="tiny",
                                             tensor=1, pipeline=1, device="cpu", ttft_slo_ms=200,
                                             tpot_slo_ms=50, speculation=speculation)
    args = build_parser().parse_args(rendered)
    assert validate_serve_args(args) == []
    speculator = build_speculator(args, tiny, 4096, WorkerMetrics("decode", dict, None, None).registry)
    assert speculator is not None
    assert (speculator.config.mode, speculator.config.num_speculative_tokens) == (speculation["mode"],
                                                                      speculation["num-speculative-tokens"])


def test_the_draft_cache_counts_in_kv_sizing(tiny: LoadedModel) -> None:
    """The draft's pool (as many slots as the target's) sits on the target's first device: sizing
    the target's pool from free memory without it would overrun that device."""
    from disaggserve_worker.cli import kv_bytes_per_token, load_draft

    ngram = build_parser().parse_args([*FLAGS, "--speculation-proposer", "ngram"])
    assert load_draft(ngram, tiny) is None
    assert kv_bytes_per_token(tiny) == tiny.model.kv_bytes_per_token()
    args = build_parser().parse_args([*FLAGS, "--speculation-proposer", "draft",
                                      "--speculation-draft-model", "builtin:tiny-llama-draft"])
    draft = load_draft(args, tiny)
    assert draft is not None and draft.model.device == tiny.model.device
    (device,) = kv_bytes_per_token(tiny, draft)
    assert kv_bytes_per_token(tiny, draft)[device] == (tiny.config.kv_bytes_per_token(4)
                                                       + draft.config.kv_bytes_per_token(4))
    assert build_speculator(args, tiny, 256, WorkerMetrics("decode", dict, None, None).registry,
                            draft).draft.model is draft.model  # the loaded draft is used, not reloaded
