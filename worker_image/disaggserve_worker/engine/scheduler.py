"""What runs in one engine iteration: a pure function of the queues (no torch, no threads).

As in vLLM v1, one iteration is one forward over a token budget: every running sequence
brings its next token (decode), and what is left of the budget goes to prompt chunks of
admitted sequences in arrival order (chunked prefill). Decode first bounds the token gap of
running sequences by one mixed iteration instead of a whole prompt's prefill; chunking keeps
that iteration's size bounded by the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    prompt_ids: list[int]
    num_cached: int


S = TypeVar("S", bound=Schedulable)


@dataclass
class StepPlan(Generic[S]):
    decode: list[S] = field(default_factory=list)  # one new token each
    prefill: list[tuple[S, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)

    @property
    def tokens(self) -> int:
        return len(self.decode) + sum(n for _, n in self.prefill)

    def __bool__(self) -> bool:
        return bool(self.decode or self.prefill)


def plan_step(running: Sequence[S], prefilling: Sequence[S], budget: int) -> StepPlan[S]:
    """Decode every running sequence; fill the rest of `budget` with prompt chunks (FCFS).

    At least one prompt token is scheduled whenever a prompt waits, so a batch of running
    sequences as large as the budget cannot starve admitted prompts.
    """
    plan: StepPlan[S] = StepPlan(decode=list(running))
    left = max(budget - len(plan.decode), 1 if prefilling else 0)
    for seq in prefilling:
        if left <= 0:
            break
        n = min(len(seq.prompt_ids) - seq.num_cached, left)
        if n > 0:
            plan.prefill.append((seq, n))
            left -= n
    return plan
