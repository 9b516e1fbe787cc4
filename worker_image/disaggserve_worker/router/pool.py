"""The router's view of its workers and how it picks them.

Workers come and go (discovery adds and removes them); each carries the load it last reported on
`/internal/load` (polled) and the router's own in-flight counts (exact and immediate, but blind to
other router replicas). A pick scores a worker by the larger of the two, so a burst of requests
spreads at once instead of piling onto the worker that looked idle at the last poll.

Prefill is picked by queued prompt tokens (its latency is proportional to them), decode by running
sequences, among workers with room for the request's KV cache. For plans that keep the two phases
on one node (placement units), a decode worker in the same unit as the chosen prefill wins, since
its KV transfer stays on the node's fast links.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import aiohttp

from ..contract import PATH_LOAD, ROLES

log = logging.getLogger(__name__)

# After a connection failure a worker sits out this long unless a poll shows it alive again.
FAILURE_COOLDOWN_S = 5.0
# A load poll that times out is a busy worker more often than a dead one (a CPU vLLM server answers
# /metrics between engine steps; on a loaded host that took over a second and one slow poll sent a
# whole burst to the other decode server). Only this many timeouts in a row take a worker out;
# a refused or reset connection still does at once, and a request that fails marks it failed too.
SLOW_POLLS_BEFORE_FAILED = 3


@dataclass
class Worker:
    """One worker process as the router knows it."""

    url: str
    role: str
    unit: str | None = None
    name: str | None = None
    # Reported by the worker on /internal/load:
    queued_tokens: int = 0
    running: int = 0
    free_kv_tokens: int | None = None
    draining: bool = False
    # The router's own bookkeeping:
    inflight_requests: int = 0
    inflight_tokens: int = 0
    failed_until: float = 0.0
    last_poll_ok: float | None = None
    poll_failing: bool = False
    slow_polls: int = 0  # load polls in a row that timed out
    refused_token: bool = False  # the worker answered 401/403: not our DisaggServe's token

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker {self.url}: role {self.role!r} is not one of {ROLES}")
        self.url = self.url.rstrip("/")

    @property
    def available(self) -> bool:
        return not self.draining and time.monotonic() >= self.failed_until

    def prefill_score(self) -> int:
        return max(self.queued_tokens, self.inflight_tokens)

    def decode_score(self) -> int:
        return max(self.running, self.inflight_requests)

    def mark_failed(self) -> None:
        self.failed_until = time.monotonic() + FAILURE_COOLDOWN_S


class NoWorkerAvailable(Exception):
    """No worker of a role can take the request now (none discovered, all failed or draining)."""


@dataclass
class WorkerPool:
    """Workers keyed by URL; discovery calls `replace`/`upsert`/`remove`, requests call `pick_*`."""

    workers: dict[str, Worker] = field(default_factory=dict)
    forced_mode: str | None = None  # --mode; None: decided by which workers exist

    def upsert(self, worker: Worker) -> None:
        known = self.workers.get(worker.url)
        if known is None or known.role != worker.role:
            if known is None:
                log.info("worker added: %s (%s, unit=%s)", worker.url, worker.role, worker.unit)
            self.workers[worker.url] = worker
        else:
            known.unit, known.name = worker.unit, worker.name

    def remove(self, url: str) -> None:
        if self.workers.pop(url.rstrip("/"), None) is not None:
            log.info("worker removed: %s", url)

    def replace(self, workers: Iterable[Worker]) -> None:
        """A full resync: keep state for workers still present, drop the rest."""
        fresh = {w.url: w for w in workers}
        for url in list(self.workers):
            if url not in fresh:
                self.remove(url)
        for worker in fresh.values():
            self.upsert(worker)

    def of_role(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.role == role]

    @property
    def mode(self) -> str | None:
        """Disaggregated when both phases are present, colocated when only that is; None when empty."""
        if self.forced_mode is not None:
            return self.forced_mode
        if self.of_role("prefill") and self.of_role("decode"):
            return "disaggregated"
        if self.of_role("colocated"):
            return "colocated"
        return None

    def ready(self) -> bool:
        mode = self.mode
        if mode == "disaggregated":
            return any(w.available for w in self.of_role("prefill")) and any(
                w.available for w in self.of_role("decode"))
        return mode == "colocated" and any(w.available for w in self.of_role("colocated"))

    def has_available(self, role: str, exclude: AbstractSet[str] = frozenset()) -> bool:
        return any(w.available and w.url not in exclude for w in self.of_role(role))

    def pick_prefill(self, exclude: AbstractSet[str] = frozenset()) -> Worker:
        return self._pick("prefill", exclude, key=lambda w: (w.prefill_score(), w.inflight_requests))

    def pick_colocated(self, exclude: AbstractSet[str] = frozenset()) -> Worker:
        return self._pick("colocated", exclude, key=lambda w: (w.decode_score(), w.prefill_score()))

    def pick_decode(
        self, context_tokens: int, unit: str | None = None, exclude: AbstractSet[str] = frozenset()
    ) -> Worker:
        def fits(w: Worker) -> bool:
            return w.free_kv_tokens is None or w.free_kv_tokens >= context_tokens

        candidates = [w for w in self.of_role("decode") if w.available and w.url not in exclude]
        roomy = [w for w in candidates if fits(w)] or candidates  # all full: the worker queues it
        if unit is not None:
            roomy = [w for w in roomy if w.unit == unit] or roomy
        if not roomy:
            raise NoWorkerAvailable(self.why_none("decode", exclude))
        return min(roomy, key=lambda w: (w.decode_score(), -(w.free_kv_tokens or 0)))

    def _pick(self, role: str, exclude: AbstractSet[str], key: Callable[[Worker], tuple[int, int]]) -> Worker:
        candidates = [w for w in self.of_role(role) if w.available and w.url not in exclude]
        if not candidates:
            raise NoWorkerAvailable(self.why_none(role, exclude))
        return min(candidates, key=key)

    def why_none(self, role: str, exclude: AbstractSet[str]) -> str:
        known = self.of_role(role)
        if not known:
            return f"no {role} worker is known to the router (check discovery and that {role} pods are ready)"
        draining = sum(w.draining for w in known)
        tried = sum(w.url in exclude for w in known)
        refused = sum(w.refused_token for w in known)
        auth = (f", {refused} refused the router's worker token (router and workers must share "
                "DISAGGSERVE_WORKER_TOKEN)") if refused else ""
        return (f"no {role} worker can take the request: {len(known)} known, {draining} draining, "
                f"{tried} already failed for this request{auth}, the rest recently unreachable")


class LoadPoller:
    """Refreshes every worker's reported load; marks unreachable ones so picks skip them."""

    def __init__(self, pool: WorkerPool, session: aiohttp.ClientSession, interval_s: float = 0.5,
                 engine: str = "builtin", timeout_s: float | None = None) -> None:
        self.pool = pool
        self.session = session
        self.interval_s = interval_s
        self.engine = engine
        self.timeout_s = timeout_s if timeout_s is not None else max(1.0, 2 * interval_s)

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval_s)

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in list(self.pool.workers.values())))

    async def _poll(self, worker: Worker) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            if self.engine == "vllm":
                from .vllm_flow import fetch_load

                load = await fetch_load(self.session, worker, timeout)
            else:
                async with self.session.get(worker.url + PATH_LOAD, timeout=timeout) as resp:
                    resp.raise_for_status()
                    load = await resp.json()
        except TimeoutError:
            worker.slow_polls += 1
            if worker.slow_polls < SLOW_POLLS_BEFORE_FAILED:
                log.debug("load poll of %s timed out (%d in a row): keeping its last load", worker.url,
                          worker.slow_polls)
                return
            self._failed(worker, f"{worker.slow_polls} load polls in a row timed out after {self.timeout_s:.1f}s")
            return
        except (aiohttp.ClientError, ValueError) as exc:
            worker.refused_token = isinstance(exc, aiohttp.ClientResponseError) and exc.status in (401, 403)
            self._failed(worker, str(exc))
            return
        worker.slow_polls = 0
        if worker.poll_failing:
            log.info("worker %s answers again", worker.url)
            worker.poll_failing = False
        worker.refused_token = False
        worker.queued_tokens = int(load.get("queued_tokens", 0))
        worker.running = int(load.get("running", 0))
        free = load.get("free_kv_tokens")
        worker.free_kv_tokens = int(free) if free is not None else None
        worker.draining = bool(load.get("draining", False))
        worker.failed_until = 0.0
        worker.last_poll_ok = time.monotonic()

    @staticmethod
    def _failed(worker: Worker, reason: str) -> None:
        if not worker.poll_failing:  # log the transition, not every poll of a dead worker
            if worker.refused_token:
                log.error("worker %s refuses this router's worker token (%s): check that both get "
                          "DISAGGSERVE_WORKER_TOKEN from the same DisaggServe's Secret", worker.url, reason)
            else:
                log.warning("load poll of %s failed: %s", worker.url, reason)
        worker.poll_failing = True
        worker.mark_failed()
