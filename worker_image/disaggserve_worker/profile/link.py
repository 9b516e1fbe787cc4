"""`disaggserve-worker profile-link`: measure the KV link from a decode pod to a prefill worker.

Why: the planner's simulator charges each request's KV hand-off `latency + bytes / bandwidth`
from the profile's `overheads.kv_link`. Until now only a benchmark measured it, in one process on
loopback; what a deployment gets depends on its pods, nodes and network. This measures it where
it matters: from the pod it runs in (a decode pod, with `kubectl exec`) to a running prefill
worker, over the workers' own KV transport, the way a decode worker pulls.

Method: prompts of at least two sizes (random ids within the vocabulary) go to the prefill
worker's internal prefill endpoint with the worker token and `max_tokens: 2` (`ignore_eos`), so
the worker holds each prompt's KV cache under a handle. Each handle is pulled at once with
`TcpKVTransport.pull` into a `PoolSink` over a KV pool of the model's layout (on `--device`, as
a decode worker's pool), and the transport's own timing (`TransferStats`) is the sample. A
delivered pull frees the cache on the prefill worker (`KVServer` releases a held cache when the
receiver ACKs it); a cache that is not pulled (the run failed) expires after the worker's
`--kv-ttl-s`. One warm-up pull per size opens the persistent connection and is not counted;
then sizes are interleaved repeat by repeat so drifting load hits every size alike, and
`overheads.fit_link` fits bandwidth (slope) and per-transfer latency (intercept).

Not measured: contention with other transfers and forward passes under load (one pull at a
time), and tensor-parallel decode pools (the pool here is one shard on one device).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import torch

from disaggserve_worker import contract
from disaggserve_worker.auth import auth_headers, signature_matches, worker_token
from disaggserve_worker.kv.client import TcpKVTransport
from disaggserve_worker.kv.framing import KVTransferError
from disaggserve_worker.kv.layout import KVLayout, PoolSink
from disaggserve_worker.model.kv_pool import KVPool
from disaggserve_worker.model.loader import resolve_device, resolve_dtype
from disaggserve_worker.model.source import load_config
from disaggserve_worker.profile.overheads import fit_link

DEFAULT_SIZES = (128, 1024)
DEFAULT_REPEATS = 5
# The first token must not end the request (else nothing is held): greedy, no EOS, two tokens.
SAMPLING = {"max_tokens": 2, "temperature": 0, "ignore_eos": True}
EXAMPLE_URL = "http://<name>-prefill-0.<name>-prefill:8100"


class LinkError(Exception):
    """Something the user fixes (URL, worker, sizes, files): the CLI prints it as one line, exit 2."""


@dataclass(frozen=True)
class LinkSample:
    """One timed pull: `bytes` the transport moved, `kv_bytes` the prefill worker announced."""

    tokens: int
    bytes: int
    kv_bytes: int
    seconds: float


@dataclass(frozen=True)
class Target:
    """Where the pulled caches land, as in a decode worker: its layout, a pool, the vocabulary."""

    layout: KVLayout
    sink: PoolSink
    vocab: int


# ---- input ---------------------------------------------------------------------------------
def parse_sizes(value: str | Sequence[int]) -> list[int]:
    """Distinct prompt sizes in tokens, ascending; a line naming the fix when they are unusable."""
    try:
        sizes = sorted({int(part) for part in (value.split(",") if isinstance(value, str) else value)})
    except ValueError:
        raise LinkError(f"--sizes {value!r}: expected comma-separated token counts such as 128,1024") from None
    if any(size < 1 for size in sizes):
        raise LinkError(f"--sizes {value!r}: token counts must be at least 1")
    if len(sizes) < 2:
        raise LinkError(f"--sizes {value!r}: give at least two different sizes (e.g. 128,1024): the fit "
                        "separates per-transfer latency from bandwidth by how time grows with size")
    return sizes


def kv_target(model: str, sizes: list[int], *, device: str = "auto", dtype: str = "auto",
              max_model_len: int | None = None) -> Target:
    """The KV layout of `--model` (from its config: no weights are read) and a pool holding the
    largest size, on the device a decode worker would use. Sizes beyond the context are refused."""
    config = load_config(model)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    context = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    too_long = [size for size in sizes if size > context]
    if too_long:
        raise LinkError(f"--sizes: {', '.join(map(str, too_long))} tokens exceed the model's context of "
                        f"{context} tokens; choose sizes up to {context}")
    layout = KVLayout(torch_dtype, config.num_hidden_layers, config.kv_heads, config.dim_per_head,
                      on_gpu=torch_device.type == "cuda", max_tokens=context)
    slots = max(sizes)
    try:
        pool = KVPool([[torch.zeros(2, slots, config.kv_heads, config.dim_per_head, dtype=torch_dtype,
                                    device=torch_device)] for _ in range(config.num_hidden_layers)])
    except RuntimeError as error:  # out of memory: the decode worker beside us holds most of it
        raise LinkError(f"no room for a KV pool of {slots} tokens ({layout.layers * layout.layer_bytes(slots)} "
                        f"bytes) on {torch_device}: {str(error).splitlines()[0]}; choose smaller --sizes or "
                        "--device cpu") from None
    return Target(layout, PoolSink(pool, torch.arange(slots)), config.vocab_size)


def check_url(url: str) -> str:
    """The prefill worker's base URL without a trailing slash."""
    if not url.startswith(("http://", "https://")) or len(url.rstrip("/")) <= len("https://"):
        raise LinkError(f"--prefill {url!r}: expected the prefill worker's HTTP URL, e.g. --prefill {EXAMPLE_URL}")
    return url.rstrip("/")


# ---- talking to the prefill worker ----------------------------------------------------------
def _unreachable(url: str, error: BaseException) -> LinkError:
    return LinkError(f"cannot reach the prefill worker at {url} ({type(error).__name__}: {error}); pass the "
                     f"URL of a ready prefill pod, e.g. --prefill {EXAMPLE_URL}")


async def _error_message(resp: aiohttp.ClientResponse) -> str:
    text = await resp.text()
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def check_prefill_worker(session: aiohttp.ClientSession, url: str) -> None:
    """Refuse anything but a built-in prefill worker that accepts our token, before any prompt."""
    try:
        async with session.get(url + contract.PATH_LOAD) as resp:
            if resp.status == 401:
                raise LinkError(f"{url} refused the worker token: run this in a pod of the same DisaggServe "
                                f"(it has {contract.ENV_WORKER_TOKEN}) or export that variable")
            if resp.status != 200:
                raise LinkError(f"{url}{contract.PATH_LOAD} answered {resp.status}: not a DisaggServe built-in "
                                f"worker; pass a prefill worker's URL, e.g. --prefill {EXAMPLE_URL}")
            load = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as error:
        raise _unreachable(url, error) from None
    except ValueError:  # a 200 that is not JSON
        load = None
    role = load.get("role") if isinstance(load, dict) else "non-DisaggServe"
    if role != "prefill":
        raise LinkError(f"{url} is a {role} worker, not a prefill worker; pass a pod of the prefill "
                        f"StatefulSet, e.g. --prefill {EXAMPLE_URL}")


async def prefill(session: aiohttp.ClientSession, url: str, prompt: list[int], request_id: str) -> dict[str, Any]:
    """Prefill `prompt` on the worker, which then holds its KV cache; the reply's `kv` reference."""
    body = {"request_id": request_id, "prompt_token_ids": prompt, "sampling": SAMPLING}
    try:
        async with session.post(url + contract.PATH_PREFILL, json=body) as resp:
            if resp.status != 200:
                raise LinkError(f"the prefill worker refused a {len(prompt)}-token prompt ({resp.status}): "
                                f"{await _error_message(resp)}; choose smaller --sizes or another worker")
            reply = await resp.json()
    except (aiohttp.ClientError, TimeoutError) as error:
        raise _unreachable(url, error) from None
    except ValueError:  # a 200 that is not JSON: checked below
        reply = None
    kv = reply.get("kv") if isinstance(reply, dict) else None
    if not isinstance(kv, dict) or not (kv.get("address") and kv.get("handle") and isinstance(kv.get("bytes"), int)):
        raise LinkError(f"the prefill worker at {url} held no KV cache for the prompt (reply {reply!r:.200}); "
                        "is it a DisaggServe prefill worker of this version?")
    return kv


def check_reference(kv: dict[str, Any], tokens: int, layout: KVLayout, token: str | None) -> None:
    """What a decode worker checks before it connects: the reference is vouched for by a worker
    of this DisaggServe, and the announced size is what this model's layout expects. A refused
    reference's cache is left to expire on the prefill worker (its --kv-ttl-s)."""
    if token is not None and not signature_matches(token, kv.get("signature"), str(kv["address"]),
                                                   str(kv["handle"])):
        raise LinkError(f"the KV reference to {kv['address']} is not signed with this pod's "
                        f"{contract.ENV_WORKER_TOKEN}: the prefill worker belongs to another DisaggServe")
    expected = layout.layers * layout.layer_bytes(tokens)
    if int(kv["bytes"]) != expected:
        dtype = str(layout.dtype).removeprefix("torch.")
        raise LinkError(f"the prefill worker announced {kv['bytes']} KV bytes for {tokens} tokens where this "
                        f"--model in {dtype} gives {expected}: pass the --model and --dtype the prefill "
                        "worker serves with")


# ---- measuring ------------------------------------------------------------------------------
async def _sample(session: aiohttp.ClientSession, url: str, transport: TcpKVTransport, target: Target,
                  tokens: int, rng: random.Random) -> LinkSample:
    """One prefill and the pull of its cache, timed by the transport as a decode worker sees it."""
    request_id = f"profile-link-{tokens}-{uuid.uuid4().hex[:12]}"
    prompt = [rng.randrange(target.vocab) for _ in range(tokens)]
    kv = await prefill(session, url, prompt, request_id)
    check_reference(kv, tokens, target.layout, transport.token)
    try:
        stats = await transport.pull(str(kv["address"]), str(kv["handle"]), request_id, target.layout,
                                     target.sink)
    except KVTransferError as error:
        raise LinkError(f"pulling the KV cache from {kv['address']} failed ({error.kind}): {error}") from None
    return LinkSample(tokens, stats.bytes, int(kv["bytes"]), stats.seconds)


async def measure(prefill_url: str, target: Target, sizes: list[int], repeats: int = DEFAULT_REPEATS,
                  *, token: str | None = None, seed: int = 0, timeout_s: float = 120.0) -> list[LinkSample]:
    """Timed pulls: one untimed warm-up per size, then `repeats` rounds over the sizes."""
    url = check_url(prefill_url)
    transport = TcpKVTransport(token=token)
    rng = random.Random(seed)
    async with aiohttp.ClientSession(headers=auth_headers(token),
                                     timeout=aiohttp.ClientTimeout(total=timeout_s, connect=5)) as session:
        try:
            await check_prefill_worker(session, url)
            for tokens in sizes:
                await _sample(session, url, transport, target, tokens, rng)
            return [await _sample(session, url, transport, target, tokens, rng)
                    for _ in range(repeats) for tokens in sizes]
        finally:
            transport.close()


def fit(samples: list[LinkSample]) -> dict[str, float]:
    """{gbps, latency_ms}: the profile's `overheads.kv_link`."""
    return fit_link([(s.bytes, s.seconds) for s in samples])


def run(prefill_url: str, model: str, *, sizes: str | Sequence[int] = DEFAULT_SIZES,
        repeats: int = DEFAULT_REPEATS, device: str = "auto", dtype: str = "auto",
        max_model_len: int | None = None, token: str | None = None) -> dict[str, Any]:
    """Measure and fit: {"kv_link": {gbps, latency_ms}, "samples": [...]}. `token`: default from
    the environment, as in a pod."""
    checked = parse_sizes(sizes)
    check_url(prefill_url)
    if repeats < 1:
        raise LinkError(f"--repeats {repeats}: at least 1")
    target = kv_target(model, checked, device=device, dtype=dtype, max_model_len=max_model_len)
    samples = asyncio.run(measure(prefill_url, target, checked, repeats,
                                  token=worker_token() if token is None else token))
    return {"kv_link": fit(samples), "samples": [asdict(s) for s in samples]}


# ---- the profile file -----------------------------------------------------------------------
def read_profile(path: str | Path) -> dict[str, Any]:
    """A planner profile as written by `disaggserve-worker profile` (checked before measuring, so
    a wrong file costs no measurement and is never touched)."""
    hint = "pass the JSON `disaggserve-worker profile` wrote, or leave --profile out to print the link"
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as error:
        raise LinkError(f"--profile {path}: cannot read it ({error.strerror or error}); {hint}") from None
    except ValueError as error:
        raise LinkError(f"--profile {path} is not JSON ({error}); {hint}") from None
    if not isinstance(doc, dict):
        raise LinkError(f"--profile {path} is not a planner profile (a JSON object); {hint}")
    missing = [key for key in ("model", "gpu", "entries") if not doc.get(key)]
    if missing or not isinstance(doc["entries"], list) or not isinstance(doc.get("overheads", {}), dict):
        what = f"it has no {', '.join(missing)}" if missing else "its entries or overheads are malformed"
        raise LinkError(f"--profile {path} is not a planner profile ({what}); {hint}")
    return doc


def with_link(profile: dict[str, Any], link: dict[str, float], source: str) -> dict[str, Any]:
    """The profile with `overheads.kv_link` replaced and everything else kept; `kv_link_source`
    (a top-level key the operator ignores) says where the link came from."""
    return {**profile, "overheads": {**(profile.get("overheads") or {}), "kv_link": dict(link)},
            "kv_link_source": source}


def source_line(prefill_url: str, result: dict[str, Any]) -> str:
    sizes = sorted({s["tokens"] for s in result["samples"]})
    return (f"disaggserve-worker profile-link --prefill {prefill_url}: {len(result['samples'])} pulls of "
            f"{', '.join(map(str, sizes))} tokens, {datetime.now(UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}")


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    """Replace `path` whole (a temporary file renamed over it): an interrupted write leaves the
    old file, never half a profile."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise LinkError(f"cannot write {path} ({error.strerror or error}); choose a writable --out") from None
