"""The engine loop: admission, prefill chunks, continuous decode batches, sampling.

All torch work happens on one engine thread, so the asyncio loop (HTTP, KV transfer
control) never blocks on a forward pass; results come back through `RequestStream`s.

Roles share the loop:
- prefill: prompts are prefilled (chunked to the token budget), the first token is sampled
  and the prompt's KV cache is *held* under a handle until a decode worker pulls it (or a
  TTL passes);
- decode: sequences arrive with their prompt KV already written (by a KV pull into a
  reservation) and join the running batch between steps;
- colocated: both, vLLM style — each iteration is ONE forward: a decode token for every
  running sequence plus (chunked) prompt tokens of admitted ones up to the token budget.

The pieces are split the way vLLM v1 splits them: `scheduler.plan_step` (pure: what runs this
iteration), `runner.ModelRunner` (tensors and the forward), this module (the loop: intake,
admission, sampling, emitting), and the KV connector (`kv.transport`) that moves held caches.
Token events of one iteration are handed to the event loop in one batch (one wake-up per
iteration, not per token).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
from tokenizers import Tokenizer

from disaggserve_worker.engine.detokenizer import IncrementalDetokenizer
from disaggserve_worker.engine.kv_cache import BlockAllocator
from disaggserve_worker.engine.runner import ModelRunner
from disaggserve_worker.engine.sampling import SampleContext, SamplingParams, sample_rows
from disaggserve_worker.engine.scheduler import StepPlan, plan_step
from disaggserve_worker.engine.types import RequestError, RequestStream, TokenEvent, push_many
from disaggserve_worker.kv import shared_memory
from disaggserve_worker.kv.layout import block_runs
from disaggserve_worker.kv.shared_memory import Leases, SegmentInfo
from disaggserve_worker.model import cpu_kernels, packed_linear
from disaggserve_worker.model.kv_pool import KVPool
from disaggserve_worker.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    from disaggserve_worker.speculation.speculator import Speculator

log = logging.getLogger(__name__)

IterationObserver = Callable[[str, float, int, int], None]  # phase, seconds, tokens, sequences


@dataclass
class EngineConfig:
    role: str = "colocated"
    kv_cache_tokens: int = 16384
    block_size: int = 16
    max_batch_tokens: int = 2048
    max_model_len: int = 4096
    kv_ttl_seconds: float = 60.0
    # Put a CPU pool in shared memory (`kv.shared_memory`), so decode workers on this host copy held
    # caches out of it instead of pulling them over TCP; what prefill workers ask for.
    shared_kv: bool = False


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    detok: IncrementalDetokenizer
    generator: torch.Generator
    hold_kv: bool
    tokens: list[int] = field(default_factory=list)
    num_cached: int = 0
    blocks: list[int] = field(default_factory=list)
    slot_table: torch.Tensor | None = None
    aborted: bool = False
    first_logprobs: dict[str, object] | None = None

    @property
    def reserve_tokens(self) -> int:
        if self.hold_kv:
            return len(self.prompt_ids)
        return len(self.prompt_ids) + self.params.max_tokens


@dataclass
class Reservation:
    """Blocks set aside for a request before its KV cache arrives (decode role)."""

    blocks: list[int]
    slot_table: torch.Tensor
    tokens: int


class NativePin(Protocol):
    """A held cache's pin taken outside Python (the KV port's native path, `kv.native`)."""

    def revoke(self) -> bool:
        """Allow no more such pins; False while one is held (the cache must not be freed)."""

    def finish(self, keep: bool) -> None:
        """End the pin held: such pins may be taken again if `keep`, else never again."""


@dataclass
class HeldCache:
    """A prefilled prompt's KV cache kept for a decode worker to pull."""

    handle: str
    request_id: str
    blocks: list[int]
    slot_table: torch.Tensor
    num_tokens: int
    expires_at: float
    pins: int = 0
    wire: object = None  # the KV port's prepared reply (`Engine.on_hold`), opaque to the engine
    # Where the KV port sends it from outside Python (`kv.native.HeldEntry`, set by `on_hold`):
    # such a send counts as a pin, which the engine asks about before it frees the cache.
    native: NativePin | None = None
    shared: dict[str, object] | None = None  # where it lies in the shared pool, under which lease


class Engine:
    def __init__(self, model: LlamaForCausalLM, tokenizer: Tokenizer, eos_token_ids: list[int],
                 config: EngineConfig, observer: IterationObserver | None = None,
                 speculator: Speculator | None = None):
        if config.role not in ("prefill", "decode", "colocated"):
            raise ValueError(f"unknown engine role {config.role!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.config = config
        self.observer = observer
        self.allocator = BlockAllocator(-(-config.kv_cache_tokens // config.block_size), config.block_size)
        self.kv_segment: SegmentInfo | None = None  # where the pool lives when it is shared
        self.kv_leases: Leases | None = None  # and which held cache each of its blocks belongs to
        self.kv_pool = self._new_pool(model, config)
        self.runner = ModelRunner(model, self.kv_pool)
        self.device = model.device
        if any(device.type == "cpu" for device in model.devices):
            # Build or load the CPU kernels now, before the worker reports ready: at the first
            # forward they stalled that request ~1 s in every pod with a cold cache (HOME=/tmp).
            cpu_kernels.kernel()
            # And oneDNN's primitives for decode-sized row counts: each count's first step paid
            # ~2 ms for them (small-llama), under load (`packed_linear.warm`).
            packed_linear.warm(model.projections())
        self._pending: list[tuple[RequestStream, TokenEvent]] = []  # this iteration's events
        self._inbox: deque[Sequence] = deque()
        self._aborts: set[str] = set()
        self._waiting: deque[Sequence] = deque()
        self._prefilling: list[Sequence] = []
        self._running: list[Sequence] = []
        self._held: dict[str, HeldCache] = {}
        self._held_lock = threading.Lock()
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.busy = False
        # Called on the engine thread with each cache it holds for a pull, before the handle is
        # out: the KV port prepares its reply there, off the critical path of the pull.
        self.on_hold: Callable[[HeldCache], None] | None = None
        # Speculative decoding (decode and colocated roles): replaces the plain decode forward.
        self.speculator = speculator
        if speculator is not None:
            speculator.attach(self.kv_pool, config.max_model_len, self._sync, self.allocator)

    def _new_pool(self, model: LlamaForCausalLM, config: EngineConfig) -> KVPool:
        capacity = self.allocator.capacity_tokens
        if config.shared_kv and model.tensor_parallel == 1 and all(d.type == "cpu" for d in model.devices):
            c = model.config
            made = shared_memory.shared_pool(c.num_hidden_layers, capacity, c.kv_heads, c.dim_per_head, model.dtype,
                                             block_size=config.block_size)
            if made is not None:
                self.kv_segment, self.kv_leases = made.info, made.leases
                return made.pool
        return model.new_kv_pool(capacity)

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            # Two engine threads over one scheduler corrupt it (a sequence prefilled twice, "engine
            # step failed" for every request): refuse rather than race.
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._run, name="disaggserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # ---- asyncio-facing API ----------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise RequestError("prompt_token_ids must not be empty")
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"prompt_token_ids hold ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        total = len(prompt_ids) + (0 if self.config.role == "prefill" else params.max_tokens)
        if total > self.config.max_model_len:
            raise RequestError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"model length limit {self.config.max_model_len}; shorten the prompt or lower max_tokens")
        if self.speculator is not None and (params.shapes_logits or params.logprobs is not None):
            raise RequestError("this worker decodes speculatively, which does not apply penalties, logit_bias, "
                               "allowed_token_ids, min_tokens or logprobs; send the request without them or "
                               "serve it from workers with speculation off")
        if total > self.allocator.capacity_tokens:
            raise RequestError(f"request needs {total} KV-cache tokens but this worker holds only "
                               f"{self.allocator.capacity_tokens}; lower max_tokens or raise "
                               "--kv-cache-tokens")

    def _new_sequence(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                      stream: RequestStream, hold_kv: bool, first: list[int]) -> Sequence:
        return Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params, stream=stream,
                        detok=IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop, first),
                        generator=params.generator(), hold_kv=hold_kv, tokens=list(first))

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
               stream: RequestStream) -> None:
        """Queue a prompt (prefill and colocated roles)."""
        if self.config.role == "decode":
            raise RequestError("a decode worker takes /internal/decode requests with a KV handle, "
                               "not prompts")
        self.check_request(prompt_ids, params)
        seq = self._new_sequence(request_id, prompt_ids, params, stream,
                                 hold_kv=self.config.role == "prefill", first=[])
        self._post(seq)

    def reserve(self, prompt_ids: list[int], params: SamplingParams) -> Reservation | None:
        """Cache room for a decode request (prompt + completion), or None when full now."""
        self.check_request(prompt_ids, params)
        tokens = len(prompt_ids) + params.max_tokens
        blocks = self.allocator.try_allocate(tokens)
        if blocks is None:
            return None
        return Reservation(blocks, self.allocator.slot_table(blocks, self.device), tokens)

    def cancel_reservation(self, reservation: Reservation) -> None:
        self.allocator.free(reservation.blocks)
        self._notify()

    def submit_decode(self, request_id: str, prompt_ids: list[int], first_token_id: int,
                      params: SamplingParams, reservation: Reservation, stream: RequestStream) -> None:
        """Join the decode batch with the prompt's KV already written into `reservation`."""
        seq = self._new_sequence(request_id, prompt_ids, params, stream, hold_kv=False,
                                 first=[first_token_id])
        seq.blocks, seq.slot_table = reservation.blocks, reservation.slot_table
        seq.num_cached = len(prompt_ids)
        self._post(seq)

    def abort(self, request_id: str) -> None:
        with self._wake:
            self._aborts.add(request_id)
            self._wake.notify()

    def _post(self, seq: Sequence) -> None:
        with self._wake:
            if not self._stop:
                self._inbox.append(seq)
                self._wake.notify()
                return
        seq.stream.push(TokenEvent(None, "", None, error={
            "type": "shutdown", "message": "worker is shutting down", "retryable": True}))

    def _notify(self) -> None:
        """Memory was freed outside the engine thread: waiting requests may fit now.

        Only when some wait: waking an idle engine thread costs the GIL (and on a busy host a
        scheduler slice) to the KV port and the event loop for nothing — it tripled the latency
        of a 1 MB KV pull, whose ACK frees the cache."""
        if not (self._waiting or self._inbox):
            return
        with self._wake:
            self._wake.notify()

    # ---- held caches (prefill role) ----------------------------------------------------------
    def pin_held(self, handle: str) -> HeldCache | None:
        """Take a held cache for transfer; None if unknown or expired (retryable upstream)."""
        with self._held_lock:
            held = self._held.get(handle)
            if held is None or held.expires_at < time.monotonic():
                return None
            held.pins += 1
            return held

    def unpin_held(self, handle: str, release: bool) -> None:
        """End a transfer; `release` frees the cache (it was delivered)."""
        with self._held_lock:
            held = self._held.get(handle)
            if held is None:
                return
            held.pins -= 1
            if release:
                release = self._drop_held(held)
        if release:
            self._notify()

    def finish_native(self, handle: str, release: bool) -> HeldCache | None:
        """End a transfer the KV port took outside Python (`HeldCache.native`); `release` frees
        the cache (it was delivered). The cache, or None if unknown."""
        with self._held_lock:
            held = self._held.get(handle)
            if held is None or held.native is None:
                return held
            held.native.finish(keep=not release and held.expires_at >= time.monotonic())
            if release:
                release = self._drop_held(held)
        if release:
            self._notify()
        return held

    def release_held(self, handle: str) -> bool:
        """Free a held cache nobody will pull (the router gave its request up): without this it
        would hold KV memory, and keep a draining worker waiting, until its TTL. A cache being
        sent is freed when that transfer ends (it expires at once). False: unknown handle."""
        with self._held_lock:
            held = self._held.get(handle)
            if held is None:
                return False
            natively_free = self._unpinned_natively(held)  # no native takes from here on, either way
            if held.pins or not natively_free:
                held.expires_at = 0.0
                return True
            self._drop_held(held)
        self._notify()
        return True

    def expire_held(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        with self._held_lock:
            expired = [h for h in self._held.values()
                       if h.expires_at < now and h.pins == 0 and self._unpinned_natively(h)]
            for held in expired:
                self._drop_held(held)
        return len(expired)

    @staticmethod
    def _unpinned_natively(held: HeldCache) -> bool:
        """Whether no native pin holds `held` (under `_held_lock`); from here none can be taken."""
        return held.native is None or held.native.revoke()

    def _drop_held(self, held: HeldCache) -> bool:
        """Free a held cache (under `_held_lock`): its leases go first, so a decode worker copying
        it out of the shared pool finds them gone (`kv.shared_memory`). A native pin on it (the
        KV port sending it outside Python) defers that: it expires at once instead, and goes when
        that send ends. Whether it was freed."""
        if not self._unpinned_natively(held):
            held.expires_at = 0.0
            return False
        del self._held[held.handle]
        if self.kv_leases is not None:
            self.kv_leases.revoke(held.blocks)
        self.allocator.free(held.blocks)
        return True

    @property
    def held_count(self) -> int:
        with self._held_lock:
            return len(self._held)

    def load(self) -> dict[str, int]:
        queued = sum(len(s.prompt_ids) - s.num_cached for s in list(self._waiting) + list(self._inbox)
                     + list(self._prefilling) if not s.tokens)
        return {"queued_tokens": queued, "queued_requests": len(self._waiting) + len(self._inbox),
                "running": len(self._running) + len(self._prefilling),
                "free_kv_tokens": self.allocator.free_tokens, "held_caches": self.held_count}

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def idle(self) -> bool:
        return not (self._inbox or self._waiting or self._prefilling or self._running or self.busy)

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                # Sleep unless there is compute to do. Waiting requests alone are no reason to
                # spin: they need memory, and whoever frees memory outside this thread notifies.
                if not self._stop and not self.has_compute:
                    self._wake.wait(timeout=0.25)
                if self._stop:
                    break
            self.run_iteration()
        with self._wake:
            leftover = list(self._inbox) + list(self._waiting) + self._prefilling + self._running
            self._inbox.clear()
        for seq in leftover:
            self._fail(seq, "shutdown", "worker is shutting down", retryable=True)
        self._flush()

    def run_iteration(self) -> None:
        """One pass of the loop: take in what arrived, run one step, hand its events out. The
        engine thread calls it; so may a caller that owns the clock instead of that thread (the
        speculation bench's replay on the engine's CPU clock), on an engine it never started:
        one thread at a time, never both."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise RuntimeError("the engine thread runs this engine: run_iteration is for an engine never started")
        with self._wake:
            inbox, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = self._aborts, set()
            self.busy = True
        try:
            self._intake(inbox, aborts)
            self.expire_held()
            self._step()
        except Exception as error:  # a fault must reach every affected client
            log.exception("engine step failed")
            for seq in self._prefilling + self._running:
                self._fail(seq, "engine_error", f"engine step failed: {error}", retryable=True)
            self._prefilling, self._running = [], []
        finally:
            self._flush()
            self.busy = False

    @property
    def has_compute(self) -> bool:
        """Whether an iteration now would do anything: requests to take in, prompts, decodes."""
        return bool(self._inbox or self._aborts or self._prefilling or self._running)

    def _intake(self, inbox: list[Sequence], aborts: set[str]) -> None:
        for seq in inbox:
            if seq.num_cached:  # decode role: KV already in place
                self._running.append(seq)
            else:
                self._waiting.append(seq)
        if aborts:
            for group in (self._waiting, self._prefilling, self._running):
                for seq in list(group):
                    if seq.request_id in aborts:
                        group.remove(seq)
                        self._free(seq)
        # FCFS admission: the head waits for room so large prompts are not starved.
        while self._waiting:
            seq = self._waiting[0]
            blocks = self.allocator.try_allocate(seq.reserve_tokens)
            if blocks is None:
                break
            self._waiting.popleft()
            seq.blocks, seq.slot_table = blocks, self.allocator.slot_table(blocks, self.device)
            self._prefilling.append(seq)

    def _step(self) -> None:
        budget = self.config.max_batch_tokens
        if self.speculator is not None and self._running and self._speculative_step():
            # The speculator ran its own verification forward over the running batch; prompt
            # chunks get what is left of the budget in a second one.
            plan = plan_step([], self._prefilling, budget - len(self._running))
        else:
            # No speculator, or it proposes nothing this step: one fused forward, as without one.
            plan = plan_step(self._running, self._prefilling, budget)
            if self.speculator is not None and plan.decode and not plan.prefill:
                # A plain decode step, timed as the speculator times its own: what it must beat.
                context = sum(seq.num_cached + 1 for seq in plan.decode)
                start = time.perf_counter()
                self._run_plan(plan)
                self.speculator.observe_plain(time.perf_counter() - start, context, len(plan.decode))
                return
        if plan:
            self._run_plan(plan)

    def _run_plan(self, plan: StepPlan[Sequence]) -> None:
        """One forward for the plan; sample where a token is due; emit, hold or continue."""
        logits, seconds = self.runner.execute(plan)
        n_decode = len(plan.decode)
        if self.observer:
            if plan.decode:
                self.observer("decode", seconds, n_decode, n_decode)
            if plan.prefill:
                self.observer("prefill", seconds, sum(n for _, n in plan.prefill), len(plan.prefill))
        # Rows that get a token: every decode row, and prompts whose last chunk this was. A
        # chunk that does not finish its prompt samples nothing (its generator is untouched,
        # so a seeded request gives the same tokens however its prompt was chunked).
        due = list(range(n_decode))
        due += [n_decode + i for i, (seq, n) in enumerate(plan.prefill)
                if seq.num_cached + n >= len(seq.prompt_ids)]
        seqs = [*plan.decode, *(seq for seq, _ in plan.prefill)]
        logprobs: list[dict[str, object] | None] = []
        picked = sample_rows(logits[due] if len(due) != len(seqs) else logits,
                             [seqs[i].params for i in due], [seqs[i].generator for i in due],
                             [self._context(seqs[i]) for i in due], logprobs)
        token_of = {row: (token, lp) for row, token, lp in zip(due, picked, logprobs, strict=True)}
        for row, seq in enumerate(plan.decode):
            seq.num_cached += 1
            if self._accept_token(seq, *token_of[row]):
                self._running.remove(seq)
        for i, (seq, n) in enumerate(plan.prefill):
            seq.num_cached += n
            if seq.num_cached < len(seq.prompt_ids):
                continue  # more chunks to go
            self._prefilling.remove(seq)
            if self._accept_token(seq, *token_of[n_decode + i]):
                continue
            if seq.hold_kv:
                self._hold(seq)
            else:
                self._running.append(seq)

    def _speculative_step(self) -> bool:
        """One verification step: each sequence emits its accepted proposal plus the target's token.
        False, having run nothing, when the speculator proposes nothing this step: the plain fused
        step then decodes the batch (a verification forward of the last tokens alone would cost a
        second forward beside the prompt chunk's; on non-repetitive text, where adaptive k is 0
        almost always, that made requests 1.1-1.4x slower than with speculation off)."""
        batch = list(self._running)
        start = time.perf_counter()
        emitted = self.speculator.step(batch, split=bool(self._prefilling))  # type: ignore[union-attr]
        if emitted is None:
            return False
        if self.observer:  # before emitting, so a client that saw its last token sees it counted
            count = sum(min(len(out), seq.params.max_tokens - len(seq.tokens))
                        for seq, out in zip(batch, emitted, strict=True))
            self.observer("decode", time.perf_counter() - start, count, len(batch))
        for seq, tokens in zip(batch, emitted, strict=True):
            for token in tokens:  # tokens after a stop are dropped
                seq.num_cached += 1
                if self._accept_token(seq, token):
                    self._running.remove(seq)
                    break
        self.speculator.finish_step()  # type: ignore[union-attr]  # timed to here, as a plain step
        return True

    def _sync(self) -> None:
        """Wait for every pipeline stage and tensor shard so iteration timings measure the GPU work."""
        self.model.synchronize()

    def _context(self, seq: Sequence) -> SampleContext:
        # Tokens before `first_output` arrived inside the prompt (a router resume), as in vLLM.
        return SampleContext(seq.prompt_ids, seq.tokens, frozenset(self.eos))

    def _accept_token(self, seq: Sequence, token: int, logprobs: dict[str, object] | None = None) -> bool:
        """Detokenise and emit a sampled token; True when the sequence finished (cache freed)."""
        seq.tokens.append(token)
        finish: str | None = None
        if token in seq.params.stop_token_ids or (token in self.eos and not seq.params.ignore_eos):
            finish = "stop"
            text = seq.detok.flush()
        else:
            text, stopped = seq.detok.add(token)
            if stopped:
                finish = "stop"
            elif (len(seq.tokens) >= seq.params.max_tokens
                  or len(seq.prompt_ids) + len(seq.tokens) >= self.config.max_model_len):
                finish = "length"
            if finish == "length":
                text += seq.detok.flush()
        if finish is not None:
            self._emit(seq.stream, TokenEvent(token, text, finish, logprobs=logprobs))
            self._free(seq)
            return True
        if seq.hold_kv:
            seq.first_logprobs = logprobs
            return False  # the prefill path emits the first token together with the KV handle
        self._emit(seq.stream, TokenEvent(token, text, None, logprobs=logprobs))
        return False

    def _emit(self, stream: RequestStream, event: TokenEvent) -> None:
        self._pending.append((stream, event))

    def _flush(self) -> None:
        """Hand this iteration's events to their event loops, one wake-up per loop."""
        if self._pending:
            pending, self._pending = self._pending, []
            push_many(pending)

    def _hold(self, seq: Sequence) -> None:
        handle = f"{seq.request_id}-{uuid.uuid4().hex[:12]}"
        held = HeldCache(handle, seq.request_id, seq.blocks, seq.slot_table,  # type: ignore[arg-type]
                         len(seq.prompt_ids), time.monotonic() + self.config.kv_ttl_seconds)
        if self.kv_leases is not None and self.kv_segment is not None:
            held.shared = {"segment": self.kv_segment.id, "lease": self.kv_leases.grant(held.blocks),
                           "runs": [list(run) for run in block_runs(held.blocks, self.config.block_size,
                                                                    held.num_tokens)]}
        if self.on_hold is not None:
            self.on_hold(held)
        with self._held_lock:
            self._held[handle] = held
        seq.blocks = []
        token = seq.tokens[-1]
        self._emit(seq.stream, TokenEvent(token, seq.detok.settled(), None, kv_handle=handle,
                                          logprobs=seq.first_logprobs, kv_shared=held.shared))

    def _free(self, seq: Sequence) -> None:
        if self.speculator is not None:
            self.speculator.release(seq)
        if seq.blocks:
            self.allocator.free(seq.blocks)
            seq.blocks = []

    def _fail(self, seq: Sequence, kind: str, message: str, retryable: bool) -> None:
        self._free(seq)
        self._emit(seq.stream, TokenEvent(None, "", None,
                                          error={"type": kind, "message": message, "retryable": retryable}))


__all__ = ["Engine", "EngineConfig", "HeldCache", "RequestError", "RequestStream", "Reservation"]
