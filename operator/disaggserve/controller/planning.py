"""Plans computed off the event loop, in worker processes, with a time budget and a cache.

Why processes and not `asyncio.to_thread`: the planner is pure-Python simulation, so a thread
holds the GIL most of the time. Measured here (2 shared cores): with one CPU-bound thread, the
event loop's wake-ups waited 5–15 ms each (the GIL switch interval) instead of 0.3 ms, and a
handler made of 200 awaits ran 2.6× slower — kopf's watches, timers and peering heartbeat all
pay that for the whole length of a plan. A thread also cannot be stopped: a plan past its budget
would keep burning a core. A worker process costs neither and is killed when the budget runs
out (and started again for the next plan).

The cache is keyed by everything a plan depends on (the spec, the profile document, the parts
of the Nodes the topology reads, the rate, the worker limits): reconciles after a child's drift,
a status refresh or an autoscaler step that changes nothing reuse the plan instead of searching
again. Failures are cached too (a spec no configuration serves stays so until an input changes);
a timeout is cached for `TIMEOUT_RETRY_SECONDS` only, since a busy machine may be the cause.

A caller does not wait for a long plan: `plan` returns `Pending` after `wait` seconds while the
computation continues in the background (the next call with the same inputs joins it). So a kopf
handler returns quickly, the resource's own event queue keeps moving (a deletion is handled
within seconds, never behind a plan), and the handler comes back for the result.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from disaggserve.planner import PlanningError, plan_for
from disaggserve.planning_worker import PING, serve
from disaggserve.topology.nodes import KEY_CROSS_GBPS, KEY_INTRA_GBPS

DEFAULT_TIMEOUT_SECONDS = float(os.environ.get("DISAGGSERVE_PLAN_TIMEOUT", "60"))
DEFAULT_WORKERS = int(os.environ.get("DISAGGSERVE_PLAN_WORKERS", "1"))
TIMEOUT_RETRY_SECONDS = 300.0
CACHE_SIZE = 256
REASON_TIMEOUT = "PlanTimeout"
STARTUP_TIMEOUT_SECONDS = 120.0

# Node fields the topology reads; everything else on a Node (heartbeats, images, conditions
# other than these) changes all the time and must not invalidate cached plans.
_NODE_LABEL_PREFIXES = ("nvidia.com/", "disaggserve.io/", "kubernetes.io/hostname", "node.kubernetes.io/")


BANDWIDTH_KEYS = (KEY_CROSS_GBPS, KEY_INTRA_GBPS)


def node_fingerprint(node: dict[str, Any]) -> dict[str, Any]:
    meta, spec, status = node.get("metadata") or {}, node.get("spec") or {}, node.get("status") or {}
    return {
        "name": meta.get("name"),
        "labels": dict(sorted((meta.get("labels") or {}).items())),
        # topology/nodes.py reads the bandwidths from labels or annotations; other annotations
        # change often and plan nothing.
        "bandwidth_annotations": {k: v for k, v in sorted((meta.get("annotations") or {}).items())
                                  if k in BANDWIDTH_KEYS},
        "taints": spec.get("taints") or [],
        "unschedulable": bool(spec.get("unschedulable")),
        "allocatable": status.get("allocatable") or {},
        "capacity": status.get("capacity") or {},
    }


def plan_key(*parts: Any) -> str:
    """A stable hash of JSON-able plan inputs."""
    text = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Pending:
    """The plan is still being computed; ask again later."""

    started: float  # time.monotonic() when the computation started
    budget: float

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


class _Worker:
    """One planner process; killed and replaced when a call outlives its budget."""

    def __init__(self) -> None:
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None

    def _ensure(self) -> multiprocessing.connection.Connection:
        if self._process is None or not self._process.is_alive() or self._conn is None:
            self.stop()
            # spawn, not fork: the operator runs threads (kopf, httpx) that a fork would copy mid-state.
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            self._process = ctx.Process(target=serve, args=(child,), name="disaggserve-planner", daemon=True)
            self._process.start()
            child.close()
            # Starting an interpreter and importing the planner is not the plan's time: wait for
            # the worker to answer before any budget starts.
            parent.send(PING)
            if not parent.poll(STARTUP_TIMEOUT_SECONDS) or parent.recv() != PING:
                self._process.kill()
                raise PlanningError("PlannerFailed", "the planner process did not start")
            self._conn = parent
        return self._conn

    async def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        conn = await asyncio.to_thread(self._ensure)  # starting the interpreter takes a while
        ready: asyncio.Future[None] = loop.create_future()

        def on_readable() -> None:
            if not ready.done():
                ready.set_result(None)

        conn.send((fn, args, kwargs))
        fd = conn.fileno()
        loop.add_reader(fd, on_readable)
        try:
            try:
                await asyncio.wait_for(ready, timeout)
            finally:
                loop.remove_reader(fd)  # before the pipe may be closed: its number is reused
            reply = conn.recv()
        except (TimeoutError, EOFError, OSError) as e:
            await asyncio.to_thread(self.stop)
            if isinstance(e, TimeoutError):
                raise
            raise PlanningError("PlannerFailed", f"the planner process ended unexpectedly: {e!r}") from None
        except BaseException:  # cancelled: the child is still busy with our request
            await asyncio.shield(asyncio.to_thread(self.stop))
            raise
        if reply[0] == "ok":
            return reply[1]
        if reply[0] == "planning":
            raise PlanningError(reply[1], reply[2])
        raise PlanningError("PlannerFailed", f"the planner failed: {reply[1]}")

    def stop(self) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()
        if process is not None and process.is_alive():
            process.kill()
            process.join(5)


class _ThreadWorker:
    """Runs calls in a thread (no isolation, no kill): for callers that cannot start processes."""

    async def call(self, fn: Callable[..., Any], args: tuple, kwargs: dict, timeout: float) -> Any:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), timeout)

    def stop(self) -> None:
        pass


@dataclass
class _Entry:
    value: Any  # a result, or a PlanningError
    expires: float | None


class PlanService:
    """Bounded, cached, off-loop planning shared by every resource of one operator."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        workers: int = DEFAULT_WORKERS,
        isolate: bool = True,
        cache_size: int = CACHE_SIZE,
        plan_function: Callable[..., Any] | None = None,
    ) -> None:
        self.timeout = timeout
        # What `plan` runs: planner.plan_for unless replaced (tests inject slow or stuck planners).
        self.plan_function = plan_function or plan_for
        self._workers: list[_Worker | _ThreadWorker] = [
            _Worker() if isolate else _ThreadWorker() for _ in range(max(1, workers))
        ]
        self._free: asyncio.Queue[_Worker | _ThreadWorker] | None = None
        self._cache: collections.OrderedDict[str, _Entry] = collections.OrderedDict()
        self._cache_size = cache_size
        self._inflight: dict[str, tuple[asyncio.Task[Any], float]] = {}
        self.computed = 0  # plans actually computed (not served from the cache): for tests and metrics

    def _queue(self) -> asyncio.Queue[_Worker | _ThreadWorker]:
        if self._free is None:
            self._free = asyncio.Queue()
            for w in self._workers:
                self._free.put_nowait(w)
        return self._free

    def cached(self, key: str) -> Any:
        """The cached result for `key` (raises its PlanningError), or None."""
        entry = self._cache.get(key)
        if entry is None:
            return None
        if entry.expires is not None and entry.expires < time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        if isinstance(entry.value, PlanningError):
            raise entry.value
        return entry.value

    def _store(self, key: str, value: Any, ttl: float | None = None) -> None:
        self._cache[key] = _Entry(value, None if ttl is None else time.monotonic() + ttl)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def _compute(self, key: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        queue = self._queue()
        worker = await queue.get()
        try:
            self.computed += 1
            try:
                result = await worker.call(fn, args, kwargs, self.timeout)
            except TimeoutError:
                error = PlanningError(
                    REASON_TIMEOUT,
                    f"planning took longer than its budget of {self.timeout:g}s and was stopped; "
                    "a very high spec.workload.requestRate or a very large model makes the search long: "
                    "lower the rate, set spec.parallelism to plan by hand, or raise the operator's "
                    f"DISAGGSERVE_PLAN_TIMEOUT. Tried again in {TIMEOUT_RETRY_SECONDS:g}s.",
                )
                self._store(key, error, TIMEOUT_RETRY_SECONDS)
                raise error from None
            except PlanningError as e:
                self._store(key, e)
                raise
            self._store(key, result)
            return result
        finally:
            queue.put_nowait(worker)

    async def run(
        self, key: str | None, fn: Callable[..., Any], *args: Any, wait: float | None = None, **kwargs: Any
    ) -> Any:
        """fn(*args, **kwargs) in a worker: the result, a raised PlanningError, or Pending after `wait` s.

        `key` None: no cache (each call computes). `fn` and its arguments must be picklable
        (module-level functions, pydantic models, plain data).
        """
        if key is not None:
            hit = self.cached(key)
            if hit is not None:
                return hit
        if key is None:
            return await self._compute_uncached(fn, args, kwargs)
        task_started = self._inflight.get(key)
        if task_started is None:
            task = asyncio.get_running_loop().create_task(self._compute(key, fn, args, kwargs))
            task_started = (task, time.monotonic())
            self._inflight[key] = task_started
            task.add_done_callback(lambda t, k=key: self._finished(k, t))
        task, started = task_started
        done, _ = await asyncio.wait({task}, timeout=wait)
        if not done:
            return Pending(started, self.timeout)
        return task.result()

    def _finished(self, key: str, task: asyncio.Task[Any]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved here: the cache holds it for whoever asks next

    async def _compute_uncached(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        queue = self._queue()
        worker = await queue.get()
        try:
            self.computed += 1
            try:
                return await worker.call(fn, args, kwargs, self.timeout)
            except TimeoutError:
                raise PlanningError(REASON_TIMEOUT, f"planning took longer than {self.timeout:g}s") from None
        finally:
            queue.put_nowait(worker)

    async def plan(self, key: str, *args: Any, wait: float | None = None, **kwargs: Any) -> Any:
        """`plan_function(*args, **kwargs)` (a Plan), cached under `key`; see `run`."""
        return await self.run(key, self.plan_function, *args, wait=wait, **kwargs)

    async def aclose(self) -> None:
        for task, _ in list(self._inflight.values()):
            task.cancel()
        for task, _ in list(self._inflight.values()):
            with contextlib.suppress(BaseException):
                await task
        for worker in self._workers:
            await asyncio.to_thread(worker.stop)
