"""Prometheus series of speculation, registered in the worker's own registry.

`disaggserve_spec_tokens_per_step` is what the planner/autoscaler needs: a decode step of a
speculating worker emits that many tokens per sequence on average, so its TPOT is the step
time divided by it.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

K_BUCKETS = [0.5 + i for i in range(17)]  # one bucket per k in 0..16


class SpecMetrics:
    def __init__(self, registry: CollectorRegistry, role: str, ema: float = 0.05):
        labels = {"role": role}
        self.proposed = Counter("disaggserve_spec_proposed_tokens", "Tokens proposed for verification.",
                                ["role"], registry=registry).labels(**labels)
        self.accepted = Counter("disaggserve_spec_accepted_tokens", "Proposed tokens the target accepted.",
                                ["role"], registry=registry).labels(**labels)
        self.chosen_k = Histogram("disaggserve_spec_chosen_k", "Proposal length chosen per request and step.",
                                  ["role"], buckets=K_BUCKETS, registry=registry).labels(**labels)
        self.tokens_per_step = Gauge("disaggserve_spec_tokens_per_step",
                                     "Moving average of tokens emitted per sequence per decode step.",
                                     ["role"], registry=registry).labels(**labels)
        self.goodput = Gauge("disaggserve_spec_goodput_tokens_per_second",
                             "Moving average of emitted tokens per second of decode step (with proposing).",
                             ["role"], registry=registry).labels(**labels)
        self.acceptance = Gauge("disaggserve_spec_acceptance_rate",
                                "Moving average of the per-token acceptance rate.", ["role"],
                                registry=registry).labels(**labels)
        self._ema = ema
        self._tps: float | None = None
        self._goodput: float | None = None

    def _smooth(self, old: float | None, value: float) -> float:
        return value if old is None else (1 - self._ema) * old + self._ema * value

    def observe_step(self, ks: list[int], proposed: int, accepted: int, emitted: int, sequences: int,
                     seconds: float, acceptance: float) -> None:
        self.proposed.inc(proposed)
        self.accepted.inc(accepted)
        for k in ks:
            self.chosen_k.observe(k)
        if sequences:
            self._tps = self._smooth(self._tps, emitted / sequences)
            self.tokens_per_step.set(self._tps)
        if seconds > 0:
            self._goodput = self._smooth(self._goodput, emitted / seconds)
            self.goodput.set(self._goodput)
        self.acceptance.set(acceptance)
