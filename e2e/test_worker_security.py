"""An attacker on the pod network, against `disaggserve up` (issue 11, "Must show").

Random calls on the worker ports, with no token and with the token of another DisaggServe: every
one is refused (401), and the service is unaffected: clients keep getting complete answers while
the attack runs, no worker drains, no prefill cache is held, and the decode worker's free KV cache
is what it was. A control call with the DisaggServe's own token (read from its Secret, as the
router gets it) succeeds, so the refusals are the token's doing, not a broken endpoint.
"""

from __future__ import annotations

import asyncio
import copy
import random
import secrets

import httpx
import openai
import pytest
import pytest_asyncio

from disaggserve.api.constants import API_VERSION, KIND
from disaggserve.contract import HEADER_WORKER_TOKEN, KV_PORT, WORKER_PORT
from disaggserve.local.cluster import default_resource
from e2e_tools import ready_cluster, worker_headers

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]
NS = "default"
PATHS = [("GET", "/internal/load"), ("POST", "/internal/drain"), ("POST", "/internal/prefill"),
         ("POST", "/internal/decode"), ("POST", "/internal/generate"), ("GET", "/internal/anything"),
         ("PUT", "/internal/drain"), ("DELETE", "/")]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster(tmp_path_factory):
    async with ready_cluster(tmp_path_factory.mktemp("attack"), default_resource()) as c:
        yield c


async def token_of(cluster, name: str, timeout: float = 60) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return (await worker_headers(cluster, name, NS))[HEADER_WORKER_TOKEN]
        except AssertionError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def other_deployments_token(cluster) -> str:
    """The token of a second DisaggServe (applied, its Secret read, then deleted again)."""
    other = copy.deepcopy(default_resource())
    other["metadata"]["name"] = "other"
    await cluster.apply(other)
    try:
        return await token_of(cluster, "other")
    finally:
        await cluster.kube.delete(API_VERSION, KIND, NS, "other")


def worker_ips(cluster, name: str) -> dict[str, str]:
    return {key[1]: pod.ip for key, pod in cluster.agent.pods.items()
            if key[1].startswith((f"{name}-prefill-", f"{name}-decode-")) and not pod.terminating}


def random_body(rng: random.Random, kv_address: str) -> object:
    ids = [rng.randrange(3, 500) for _ in range(rng.randrange(1, 64))]
    return rng.choice([
        {"request_id": secrets.token_hex(4), "prompt_token_ids": ids, "sampling": {"max_tokens": 64}},
        {"request_id": secrets.token_hex(4), "prompt_token_ids": ids, "first_token_id": 5,
         "sampling": {"max_tokens": 8}, "kv": {"address": kv_address, "handle": secrets.token_hex(8)}},
        {}, [], "x" * rng.randrange(0, 2000), {"drain": True},
    ])


async def attack(http: httpx.AsyncClient, ips: dict[str, str], bad_tokens: list[str | None], calls: int,
                 seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    prefill_ip = next(ip for pod, ip in ips.items() if "-prefill-" in pod)
    answers = []
    for _ in range(calls):
        ip = rng.choice(list(ips.values()))
        method, path = rng.choice(PATHS)
        token = rng.choice(bad_tokens)
        headers = {} if token is None else {HEADER_WORKER_TOKEN: token}
        body = random_body(rng, f"{prefill_ip}:{KV_PORT}")
        response = await http.request(method, f"http://{ip}:{WORKER_PORT}{path}", headers=headers,
                                      json=body if method != "GET" else None)
        answers.append((f"{method} {path} token={'none' if token is None else token[:6]}", response.status_code))
        if response.status_code == 401:
            assert response.json()["error"]["code"] == "invalid_worker_token"
    return answers


async def clients_meanwhile(url: str, stop: asyncio.Event) -> list[str]:
    """Streamed completions through the router while the attack runs; returns their failures."""
    api = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
    failures: list[str] = []
    done = 0
    while not stop.is_set() or done < 3:
        try:
            stream = await api.completions.create(model="tiny-llama", prompt="attack in progress", max_tokens=16,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
            finish = [c.choices[0].finish_reason async for c in stream if c.choices]
            if finish[-1] != "length":
                failures.append(f"finish {finish[-1]}")
        except openai.OpenAIError as exc:
            failures.append(repr(exc))
        done += 1
    return failures


async def test_attacker_without_the_token_or_with_another_deployments_token_is_refused(cluster):
    own = await token_of(cluster, "tiny")
    foreign = await other_deployments_token(cluster)
    assert foreign != own
    ips = worker_ips(cluster, "tiny")
    assert len(ips) == 2, ips
    decode_ip = next(ip for pod, ip in ips.items() if "-decode-" in pod)
    prefill_ip = next(ip for pod, ip in ips.items() if "-prefill-" in pod)
    async with httpx.AsyncClient(timeout=30) as http:
        load = await http.get(f"http://{decode_ip}:{WORKER_PORT}/internal/load", headers={HEADER_WORKER_TOKEN: own})
        assert load.status_code == 200, "the DisaggServe's own token is accepted"
        free_before = load.json()["free_kv_tokens"]

        stop = asyncio.Event()
        meanwhile = asyncio.create_task(clients_meanwhile(await cluster.endpoint("tiny"), stop))
        try:
            bad = [None, "", foreign, foreign.upper(), secrets.token_hex(32), own[:-1], f"Bearer {own}"]
            answers = await attack(http, ips, bad, calls=300, seed=11)
        finally:
            stop.set()
        failures = await meanwhile

        refused = [a for a in answers if a[1] != 401]
        assert not refused, f"calls not refused: {refused[:10]}"
        assert any("drain" in a[0] and foreign[:6] in a[0] for a in answers), "the foreign token tried a drain"
        assert failures == [], f"clients failed during the attack: {failures[:5]}"

        own_headers = {HEADER_WORKER_TOKEN: own}
        decode = (await http.get(f"http://{decode_ip}:{WORKER_PORT}/internal/load", headers=own_headers)).json()
        prefill = (await http.get(f"http://{prefill_ip}:{WORKER_PORT}/internal/load", headers=own_headers)).json()
        assert decode["draining"] is False and prefill["draining"] is False
        # A same-host decode worker frees the caches it copied with a notice sent after its pull
        # returned (kv.client): give the last client's a moment, far under the caches' TTL.
        for _ in range(50):
            if prefill["held_caches"] == 0:
                break
            await asyncio.sleep(0.1)
            prefill = (await http.get(f"http://{prefill_ip}:{WORKER_PORT}/internal/load", headers=own_headers)).json()
        assert prefill["held_caches"] == 0, "an attacker's prefill holds KV cache"
        assert decode["free_kv_tokens"] == free_before
        for ip in (decode_ip, prefill_ip):  # what kubelet and Prometheus call stays open
            assert (await http.get(f"http://{ip}:{WORKER_PORT}/readyz")).status_code == 200
            assert (await http.get(f"http://{ip}:{WORKER_PORT}/metrics")).status_code == 200
