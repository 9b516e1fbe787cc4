"""How many prompt tokens one disaggregated prefill iteration batches: DistServe's L_m, from the profile.

DistServe (docs/planner-method.md, "Prefill latency") batches prefill only up to L_m, the batch
size where the device saturates: past it, batching saves almost nothing and every prompt in the
batch waits for all the others. In the profile's form, a batch of prompts lᵢ takes
`a + b·Σlᵢ + c·Σlᵢ²` (plus `pp × stage overhead` with pipeline stages), so running two batches as
one saves exactly the fixed cost `a` (+ stage hand-offs); the attention term is per prompt and is
paid however the prompts are grouped. A batch of S tokens takes at least `a + b·S` whatever its
prompts are, so the fixed cost's share of it is at most `a / (a + b·S)`, and L_m is the smallest
S where that share is down to FIXED_COST_SHARE:

    L_m = a · (1 − share) / (share · b)

Why the linear part alone (not one prompt of S tokens, whose c·S² would make the batch look
longer and L_m smaller): the batches that profit from a budget are those of short prompts, whose
attention term is small. Held against the CPU measurement (small-llama bf16, one core): batching
two 512-token prompts saved 16 % and two 1024-token ones 0.3 %, so the knee lies between 1024
and 2048 total tokens; the worker's own fitted profile gives 1432 (linear) where one long prompt
would give 886, below what the measurement shows.

A prompt longer than L_m is not refused: the built-in engine and vLLM (chunked prefill, on by
default) split it over iterations of at most the budget, each paying `a` once more, which past
L_m is at most FIXED_COST_SHARE of the chunk's time; the simulator runs such a prompt as one
batch of its own, which is the same time but for those fixed costs.

Pure: a function of the latency coefficients only (no workload, no rate), so the autoscaler's
re-plans (measured lengths, corrected profile: scaling every coefficient by one factor leaves
the ratio a/b alone) keep the budget, and the pod template, as they were.
"""

from __future__ import annotations

import math

from disaggserve.planner.profile import PhaseLatency

# The fixed cost's share of a batch at L_m. 5 %: the budget then holds the device within 5 % of
# its saturated throughput (tokens/ms = S / (a + b·S) = (1 − share) / b), and doubling the budget
# again would buy under 2.5 % more while doubling how long the first prompt of a full batch waits.
FIXED_COST_SHARE = 0.05
# Bounds on the budget. Below MIN a fit whose fixed cost is near zero (a fit artefact: every real
# iteration pays kernel launches, scheduling and sampling) would chunk ordinary prompts into many
# iterations; MIN is also above vLLM's largest max_num_seqs default (256), which the budget may
# not undercut. Above MAX one prefill iteration of a 7B model on one A100 already takes most of a
# second (2 × 7e9 × 16384 FLOPs at 312 TFLOP/s ≈ 0.7 s): a larger batch makes its first prompts
# wait beyond any interactive TTFT SLO whatever the profile's fixed cost says.
MIN_PREFILL_BUDGET = 512
MAX_PREFILL_BUDGET = 16384
# The budget is rounded up to a multiple of this (a whole number of 16-token KV blocks): a
# re-measured profile whose coefficients moved by a percent then renders the same worker flag,
# and does not restart every prefill pod.
BUDGET_STEP = 128


def saturation_tokens(lat: PhaseLatency, share: float = FIXED_COST_SHARE) -> float:
    """Tokens S of one prefill batch at which the fixed cost is `share` of it (L_m, unclamped).

    Infinite when the profile has no per-token cost (b = 0: batching would always help); zero
    when it has no fixed cost (a = 0 and no stage hand-offs: batching never helps)."""
    if not 0 < share < 1:
        raise ValueError(f"share must be in (0, 1), got {share}")
    fixed = lat.prefill_ms(0, 0)  # a + pipeline × stage hand-off: what one batch pays once
    if fixed <= 0:
        return 0.0
    if lat.prefill.b <= 0:
        return math.inf
    return fixed * (1 - share) / (share * lat.prefill.b)


def prefill_token_budget(lat: PhaseLatency) -> int:
    """The token budget of one disaggregated prefill iteration on this instance shape: L_m,
    rounded up to BUDGET_STEP and clamped to [MIN_PREFILL_BUDGET, MAX_PREFILL_BUDGET]."""
    tokens = saturation_tokens(lat)
    if tokens >= MAX_PREFILL_BUDGET:
        return MAX_PREFILL_BUDGET
    stepped = math.ceil(tokens / BUDGET_STEP) * BUDGET_STEP
    return min(MAX_PREFILL_BUDGET, max(MIN_PREFILL_BUDGET, stepped))
