"""The autoscaling policy: hysteresis, bounds, cooldown while rolling out, stale metrics, GPU budget."""

from __future__ import annotations

from disaggserve.autoscaling.policy import Counts, Limits, PolicyState, Signals, decide

LIMITS = Limits(min=Counts(1, 1), max=Counts(8, 8), gpus_per_instance=Counts(1, 1))
OK = Signals(metrics_available=True, rolling_out=False, attainment=0.95)
WINDOW = 300.0


def run(current, recommended, signals=OK, limits=LIMITS, state=None, now=0.0):
    return decide(current, recommended, signals, limits, state or PolicyState(), now, WINDOW)


def test_scale_up_is_immediate_but_bounded():
    d = run(Counts(1, 1), Counts(8, 2))
    assert d.counts == Counts(5, 2) and d.action == "scale-up", "+4 when small"
    d = run(Counts(6, 2), Counts(20, 2), limits=Limits(Counts(1, 1), Counts(32, 32), Counts(1, 1)))
    assert d.counts == Counts(12, 2), "doubling when large"
    assert "1 prefill / 1 decode -> 5 prefill / 2 decode" in run(Counts(1, 1), Counts(8, 2)).reason


def test_scale_down_waits_for_the_stabilization_window():
    state = PolicyState()
    assert run(Counts(4, 4), Counts(4, 4), state=state, now=0).action == "hold"
    d = run(Counts(4, 4), Counts(1, 1), state=state, now=60)
    assert d.action == "hold" and "scale-down waits" in d.reason, "a higher recommendation is still in the window"
    d = run(Counts(4, 4), Counts(1, 1), state=state, now=301)
    assert d.action == "scale-down" and d.counts == Counts(2, 2), "halving at most per step"
    d = run(Counts(2, 2), Counts(1, 1), state=state, now=330)
    assert d.counts == Counts(1, 1)


def test_a_brief_spike_inside_the_window_keeps_capacity():
    state = PolicyState()
    run(Counts(4, 4), Counts(1, 1), state=state, now=0)
    run(Counts(4, 4), Counts(4, 4), state=state, now=200)  # spike
    assert run(Counts(4, 4), Counts(1, 1), state=state, now=400).action == "hold"
    assert run(Counts(4, 4), Counts(1, 1), state=state, now=501).action == "scale-down"


def test_after_a_restart_scale_down_still_waits_out_the_window():
    state = PolicyState.starting_at(Counts(4, 4), now=1000)
    d = run(Counts(4, 4), Counts(1, 1), state=state, now=1010)
    assert d.action == "hold" and "scale-down waits" in d.reason
    assert run(Counts(4, 4), Counts(1, 1), state=state, now=1301).action == "scale-down"
    # Without the seed, the first decision of a fresh process would shed capacity at once.
    assert run(Counts(4, 4), Counts(1, 1), now=1010).action == "scale-down"
    # Scaling up is not held back by it.
    assert run(Counts(1, 1), Counts(3, 3), state=PolicyState.starting_at(Counts(1, 1), 0), now=1).action == "scale-up"


def test_no_action_while_rolling_out_or_without_metrics():
    rolling = Signals(metrics_available=True, rolling_out=True, attainment=0.1)
    assert run(Counts(1, 1), Counts(8, 8), rolling).action == "hold"
    blind = Signals(metrics_available=False, rolling_out=False)
    d = run(Counts(6, 6), Counts(1, 1), blind, state=PolicyState(), now=10_000)
    assert d.action == "hold" and d.counts == Counts(6, 6) and "never scale down blind" in d.reason


def test_bounds_and_gpu_budget():
    limits = Limits(min=Counts(2, 1), max=Counts(3, 8), gpus_per_instance=Counts(2, 1), max_gpus=8)
    d = run(Counts(2, 1), Counts(1, 1), limits=limits, state=PolicyState(), now=1000)
    assert d.counts.prefill == 2, "never below min"
    d = run(Counts(3, 4), Counts(8, 8), limits=limits)
    assert d.counts.prefill <= 3, "never above max"
    assert d.counts.prefill * 2 + d.counts.decode <= 8 and d.limited and "maxGpus 8" in d.limited


def test_measured_misses_add_capacity_to_the_missing_phase():
    ttft_miss = Signals(True, False, attainment=0.6, target_attainment=0.9, ttft_within_slo=0.6, tpot_within_slo=0.99)
    d = run(Counts(2, 2), Counts(2, 2), ttft_miss)
    assert d.counts == Counts(3, 2) and "TTFT met by 60%" in d.reason
    tpot_miss = Signals(True, False, attainment=0.7, target_attainment=0.9, ttft_within_slo=0.99, tpot_within_slo=0.7)
    assert run(Counts(2, 2), Counts(2, 2), tpot_miss).counts == Counts(2, 3)


def test_a_sustained_drop_in_the_rate_scales_down_before_the_window_ends():
    state = PolicyState()
    for i, rate in enumerate((90.0, 90.0, 60.0, 30.0)):
        state.observe_rate(30.0 * i, rate)
        d = run(Counts(8, 4), Counts(8, 4) if rate == 90 else Counts(2, 1), state=state, now=30.0 * i)
    assert d.action == "scale-down" and "dropped for a sustained period" in d.reason
    assert d.counts == Counts(4, 2), "still at most halving per step"


def test_a_brief_lull_in_the_rate_still_waits_out_the_window():
    state = PolicyState()
    for i, rate in enumerate((90.0, 90.0, 50.0, 90.0, 50.0)):
        state.observe_rate(30.0 * i, rate)
        d = run(Counts(8, 4), Counts(8, 4) if rate == 90 else Counts(2, 1), state=state, now=30.0 * i)
    assert d.action == "hold" and "scale-down waits" in d.reason


def test_without_recorded_rates_the_window_rules_as_before():
    state = PolicyState()
    run(Counts(8, 4), Counts(8, 4), state=state, now=0)
    assert run(Counts(8, 4), Counts(2, 1), state=state, now=60).action == "hold"
    assert state.rate_growth() is None


def test_headroom_follows_the_rate_trend():
    from disaggserve.planner.replan import GROWTH_HEADROOM, MAX_HEADROOM, MIN_HEADROOM, headroom

    assert headroom(None) == GROWTH_HEADROOM  # no trend known: the fixed margin
    assert headroom(0.5) == MIN_HEADROOM == headroom(1.0)  # flat or falling: a small margin
    assert headroom(1.5) > GROWTH_HEADROOM  # a steep ramp: the rate one interval ahead
    assert headroom(10.0) == MAX_HEADROOM
    state = PolicyState()
    state.observe_rate(0, 10.0)
    state.observe_rate(30, 15.0)
    assert state.rate_growth() == 1.5


COLOCATED = Limits(min=Counts(0, 0, 1), max=Counts(0, 0, 6), gpus_per_instance=Counts(0, 0, 2), roles=("colocated",))


def test_colocated_instances_scale_up_down_and_within_bounds():
    state = PolicyState()
    d = run(Counts(0, 0, 1), Counts(0, 0, 9), limits=COLOCATED, state=state, now=0)
    assert d.counts == Counts(0, 0, 5) and d.action == "scale-up" and "1 colocated -> 5 colocated" in d.reason
    d = run(Counts(0, 0, 5), Counts(0, 0, 9), limits=COLOCATED, state=state, now=30)
    assert d.counts == Counts(0, 0, 6) and "bounded by min/max" in d.limited
    assert run(Counts(0, 0, 6), Counts(0, 0, 1), limits=COLOCATED, state=state, now=60).action == "hold"
    d = run(Counts(0, 0, 6), Counts(0, 0, 1), limits=COLOCATED, state=state, now=400)
    assert d.counts == Counts(0, 0, 3) and d.action == "scale-down", "halving at most per step, after the window"
    budget = Limits(COLOCATED.min, COLOCATED.max, COLOCATED.gpus_per_instance, max_gpus=7, roles=("colocated",))
    d = run(Counts(0, 0, 1), Counts(0, 0, 6), limits=budget)
    assert d.counts == Counts(0, 0, 3) and "maxGpus 7 allows 6" in d.limited


def test_a_measured_miss_adds_one_colocated_instance():
    """A colocated instance does both phases: a TTFT miss, a TPOT miss or both add one instance."""
    for ttft, tpot in ((0.5, 0.95), (0.95, 0.5), (0.5, 0.5)):
        signals = Signals(metrics_available=True, rolling_out=False, attainment=0.5,
                          ttft_within_slo=ttft, tpot_within_slo=tpot)
        d = run(Counts(0, 0, 2), Counts(0, 0, 2), signals=signals, limits=COLOCATED)
        assert d.counts == Counts(0, 0, 3), (ttft, tpot, d)
