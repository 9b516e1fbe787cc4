"""Admission control: a bounded queue in front of the workers, and load shedding with 429.

Why here and not in the workers: a request the router dispatches holds a prefill slot, a KV
reservation and a decode slot; dispatching more than the workers can run only moves the queue
into them, where it turns into timeouts (admission waits, token silences) and retries that the
client sees as failures. So the router runs at most `per_worker` requests per available decode
(or colocated) worker and keeps the rest in one FIFO queue:

- a request waits in the queue at most `timeout_s`; the queue holds at most `max_queued`;
- when the queue is full, or the wait it would face (queue length over the recent completion
  rate) exceeds `timeout_s`, it is refused at once with 429 and a `Retry-After` (seconds), which
  OpenAI clients honour;
- a request still queued when `timeout_s` passes gets 429 (workers busy) or, when no worker is
  available at all (all restarting), 503 `no_workers`, both with `Retry-After`.

A router with no worker stays ready (its queue absorbs a worker restart) instead of dropping out
of its Service, which would turn into connection resets for clients.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from .errors import APIError
from .pool import WorkerPool

RATE_WINDOW_S = 10.0
MIN_RETRY_AFTER_S = 1
MAX_RETRY_AFTER_S = 30


class Admission:
    def __init__(self, pool: WorkerPool, *, per_worker: int, max_queued: int, timeout_s: float) -> None:
        self.pool = pool
        self.per_worker = per_worker
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._done: deque[float] = deque()  # completion times within RATE_WINDOW_S
        self.shed_total = 0

    # ---- capacity ------------------------------------------------------------------------------
    def capacity(self) -> int:
        """Requests the available workers run at once; 0 when a phase has no available worker."""
        mode = self.pool.mode
        if mode == "colocated":
            return self.per_worker * sum(w.available for w in self.pool.of_role("colocated"))
        if mode == "disaggregated" and any(w.available for w in self.pool.of_role("prefill")):
            return self.per_worker * sum(w.available for w in self.pool.of_role("decode"))
        return 0

    @property
    def queued(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def completion_rate(self, now: float | None = None) -> float | None:
        """Requests finished per second over the last window; None before there is a window."""
        now = time.monotonic() if now is None else now
        while self._done and self._done[0] < now - RATE_WINDOW_S:
            self._done.popleft()
        if len(self._done) < 5:
            return None
        return len(self._done) / RATE_WINDOW_S

    def retry_after_s(self) -> int:
        """When a retry may find room: the queue ahead drained at the recent completion rate."""
        rate = self.completion_rate()
        wait = (self.queued + 1) / rate if rate else self.timeout_s
        return int(min(MAX_RETRY_AFTER_S, max(MIN_RETRY_AFTER_S, math.ceil(wait))))

    # ---- the queue -----------------------------------------------------------------------------
    async def acquire(self) -> None:
        """Take a slot, waiting in the queue; raises APIError 429/503 (with Retry-After) when shed."""
        if not self._waiters and self.active < self.capacity():
            self.active += 1
            return
        if self.queued >= self.max_queued:
            raise self._shed(f"the router's queue is full ({self.max_queued} requests wait for a worker)")
        rate = self.completion_rate()
        if rate is not None and self.capacity() > 0 and (self.queued + 1) / rate > self.timeout_s:
            raise self._shed(f"{self.queued} requests are queued ahead, more than the workers finish "
                             f"in {self.timeout_s:g} s at their current rate ({rate:.1f}/s)")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            async with asyncio.timeout(self.timeout_s):
                await future
        except TimeoutError:
            if future.done() and not future.cancelled():
                return  # granted just as the time ran out: keep the slot
            raise self._timed_out() from None
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(finished=False)  # granted, but the client left
            raise
        finally:
            if not future.done():
                future.cancel()
            self._prune()

    def release(self, *, finished: bool = True) -> None:
        self.active -= 1
        if finished:
            self._done.append(time.monotonic())
        self.wake()

    def wake(self) -> None:
        """Hand free slots to the oldest waiters (on release, and periodically: capacity changes
        when workers come, go or recover)."""
        self._prune()
        capacity = self.capacity()
        while self._waiters and self.active < capacity:
            future = self._waiters.popleft()
            if future.done():
                continue
            future.set_result(None)
            self.active += 1

    async def run(self, interval_s: float = 0.05) -> None:
        while True:
            self.wake()
            await asyncio.sleep(interval_s)

    def _prune(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()

    # ---- refusals ------------------------------------------------------------------------------
    def _shed(self, why: str) -> APIError:
        self.shed_total += 1
        retry = self.retry_after_s()
        return APIError(429, f"The server is overloaded: {why}. Retry after {retry} s.",
                        type_="rate_limit_error", code="overloaded", headers={"Retry-After": str(retry)})

    def _timed_out(self) -> APIError:
        if self.capacity() == 0:
            retry = MIN_RETRY_AFTER_S * 2
            mode = self.pool.mode
            if mode is None:
                why = "no workers are known to the router (check discovery)"
            else:
                roles = ("prefill", "decode") if mode == "disaggregated" else ("colocated",)
                why = "; ".join(self.pool.why_none(r, frozenset()) for r in roles
                                if not any(w.available for w in self.pool.of_role(r)))
            return APIError(503, f"No worker could take the request within {self.timeout_s:g} s: {why}. "
                            f"Retry after {retry} s.", type_="server_error", code="no_workers",
                            headers={"Retry-After": str(retry)})
        return self._shed(f"no worker slot freed within {self.timeout_s:g} s")
