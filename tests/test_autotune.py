"""draft_capacity="auto": T per step from measured costs and calibrated drafter confidence."""

import numpy as np
import pytest

from engine_helpers import tiny_model
from specjax.drafters.base import Proposal
from specjax.engine.autotune import CapacityPolicy, capacity_buckets, expected_accepted
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate

COSTS = {0: 1.0, 1: 1.05, 2: 1.1, 4: 1.2, 8: 1.6, 16: 2.4}


def test_buckets_and_expected_accepted():
    assert capacity_buckets(16) == (0, 1, 2, 4, 8, 16)
    assert capacity_buckets(12) == (0, 1, 2, 4, 8, 12)
    assert capacity_buckets(0) == (0,)
    probs = [np.array([0.9, 0.8, 0.5, 0.1]), np.array([0.3])]
    assert expected_accepted(probs, 2) == pytest.approx(0.9 + 0.8 + 0.3)
    assert expected_accepted(probs, 16) == pytest.approx(2.6)


def test_choice_maximizes_expected_tokens_per_second():
    policy = CapacityPolicy(costs=dict(COSTS))
    confident = [np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4])] * 4
    # T=8: (4 + 4 * 5.7) / 1.6 = 16.75 beats T=4 (4 + 4 * 3.5) / 1.2 = 15 and T=0: 4.
    assert policy.choose(confident, num_active=4) == 8
    hopeless = [np.array([0.01, 0.005])] * 4
    assert policy.choose(hopeless, num_active=4) == 0
    assert policy.choose([], num_active=4) == 0
    # A bucket bigger than the longest proposal only adds cost.
    assert policy.choose([np.array([0.99])] * 4, num_active=4) == 1


def test_calibration_discounts_an_overconfident_drafter():
    policy = CapacityPolicy(costs=dict(COSTS))
    claims = [np.array([0.9, 0.9, 0.9, 0.9])] * 4
    assert policy.choose(claims, 4) == 4
    for _ in range(20):  # it claims 14.4 accepted tokens per step, delivers none
        policy.record(4, 1.2, predicted=expected_accepted(claims, 4), accepted=0)
    assert policy.calibration < 0.01
    assert not policy.should_draft()  # nothing gained for many steps: drafting paused
    policy.idle_steps = 0  # even when not paused, the discounted claims no longer pay
    assert policy.choose(claims, 4) == 0


def test_paused_drafting_probes_and_recovers():
    policy = CapacityPolicy(costs=dict(COSTS), calibration=0.0)
    drafted = []
    for _ in range(40):
        drafted.append(policy.should_draft())
        t = policy.choose([np.array([0.9, 0.9])] if drafted[-1] else [], 1)
        policy.record(t, COSTS[t], expected_accepted([np.array([0.9, 0.9])], t), accepted=2 * (t > 0))
        if policy.calibration > 0.5:
            break
    assert not all(drafted)  # drafting was paused ...
    assert policy.calibration > 0.5  # ... and probes found that the drafter now pays


class GarbageDrafter:
    """Confident proposals that are never right: speculation can only cost time."""

    def __init__(self, vocab):
        self.vocab, self.calls = vocab, 0

    def start_request(self, rid, prompt_ids):
        pass

    def observe(self, rid, accepted_ids):
        pass

    def stop_request(self, rid):
        pass

    def propose(self, rid, max_tokens):
        self.calls += 1
        n = min(max_tokens, 8)
        return Proposal(np.full(n, self.vocab - 1, np.int32), np.arange(-1, n - 1, dtype=np.int32),
                        np.full(n, 0.9, np.float32))


def test_auto_engine_stops_paying_for_a_useless_drafter_and_stays_lossless():
    model = tiny_model(5)
    prompts = [[3, 9, 4, 3, 9], [17, 2, 5]]
    expected = greedy_generate(model, prompts, 64)
    assert all(model.config.vocab_size - 1 not in out for out in expected)  # the drafts are always wrong
    drafter = GarbageDrafter(model.config.vocab_size)
    engine = Engine(model, drafter, max_draft_capacity=8)
    report = engine.warmup(batch_size=2, prompt_len=5, max_new_tokens=64)
    rows, _, max_len = report["bucket"]
    # Costs on the measured scale, with a deterministic shape (CPU timings are noisy).
    base = report["step_s"][0]
    engine._step_costs[(rows, max_len)] = {t: base * COSTS[t] for t in (0, 1, 2, 4, 8)}
    results = engine.generate(prompts, max_new_tokens=64)
    assert [r.token_ids for r in results] == expected
    steps = max(r.target_passes for r in results) - 1
    assert drafter.calls < 0.5 * 2 * steps  # asked for drafts on a minority of row-steps


def test_one_stalled_step_does_not_price_a_bucket_out_for_good():
    policy = CapacityPolicy(costs=dict(COSTS))
    confident = [np.array([0.95, 0.9, 0.85, 0.8])] * 4
    assert policy.choose(confident, 4) == 4
    policy.record(4, 100 * COSTS[4], predicted=3.5 * 4, accepted=14)  # a recompile or a pre-empted host
    assert policy.costs[4] <= COSTS[4] * (0.7 + 0.3 * policy.max_cost_jump) + 1e-9
    assert policy.choose(confident, 4) == 4  # still the best bucket
    # Negative control: folding the raw time in would price T=4 out.
    unclamped = CapacityPolicy(costs=dict(COSTS), max_cost_jump=float("inf"))
    unclamped.record(4, 100 * COSTS[4], predicted=3.5 * 4, accepted=14)
    assert unclamped.choose(confident, 4) != 4


def test_measured_costs_are_of_the_programs_the_loop_runs():
    """The step costs are timed on the very compiled step the generation loop dispatches (same
    static arguments, same host-array inputs), so the loop's first step of a bucket is not a
    compilation that the policy would take for the bucket's cost."""
    from specjax.drafters.prompt_lookup import PromptLookupDrafter
    from specjax.engine import steps

    model = tiny_model(6, eos=(0,))
    prompts = [[3, 9, 4, 3, 9, 4, 3, 9], [17, 2, 5, 17, 2, 5]]
    engine = Engine(model, PromptLookupDrafter(), max_draft_capacity=2)
    rows, width = engine.batch_bucket(len(prompts)), engine.prompt_bucket(max(map(len, prompts)))
    engine._measure_step_costs(rows, engine.cache_bucket(width, 16))
    compiled = steps.step._cache_size()
    results = engine.generate(prompts, max_new_tokens=16)
    assert sum(r.target_passes for r in results) > len(prompts)  # the loop ran steps
    assert steps.step._cache_size() == compiled
