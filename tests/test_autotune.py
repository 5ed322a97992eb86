"""draft_capacity="auto": T per step from measured costs and calibrated drafter confidence."""

import dataclasses

import numpy as np
import pytest

from engine_helpers import GarbageDrafter, tiny_model
from specjax.engine.autotune import CapacityPolicy, ChunkPolicy, capacity_buckets, expected_accepted
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
    engine.warmup(batch_size=len(prompts), prompt_len=max(map(len, prompts)), max_new_tokens=16)
    compiled = steps.step._cache_size()
    results = engine.generate(prompts, max_new_tokens=16)
    assert sum(r.target_passes for r in results) > len(prompts)  # the loop ran steps
    assert steps.step._cache_size() == compiled


# ------------------------------------------------------------------ probing and the drafter's own cost


class NoProbeRestart(CapacityPolicy):
    """Control: the old rule, which restarted the probe counter only when a probe verified a tree."""

    def should_draft(self) -> bool:
        if not self.paused:
            return True
        self._since_probe += 1
        return self._since_probe >= self.probe_every

    def record(self, capacity, seconds, predicted, accepted):
        if self.paused and capacity > 0:
            self._since_probe = 0
        super().record(capacity, seconds, predicted, accepted)


def asks_in_200_steps(policy: CapacityPolicy, proposal: np.ndarray, accepted: int = 0) -> int:
    """Steps (of 200, one row) in which the policy asks a drafter that always proposes ``proposal``."""
    asked = 0
    for _ in range(200):
        drafted = policy.should_draft()
        asked += drafted
        t = policy.choose([proposal], 1) if drafted else 0
        policy.record(t, COSTS[t], expected_accepted([proposal], t), accepted * (t > 0))
    return asked


@pytest.mark.parametrize("policy_class, most", [(CapacityPolicy, 20), (NoProbeRestart, None)])
def test_a_drafter_proposing_nothing_is_asked_rarely(policy_class, most):
    empty = np.zeros(0, np.float32)
    asked = asks_in_200_steps(policy_class(costs=dict(COSTS)), empty)
    wrong = asks_in_200_steps(policy_class(costs=dict(COSTS)), np.array([0.9, 0.9]))
    if most is None:  # the control: an empty probe never restarted the counter, so it asked every step
        assert asked > 150
    else:
        assert asked <= most and wrong <= most


def test_drafting_time_counts_against_speculation():
    claims = [np.array([0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4])] * 4
    free = CapacityPolicy(costs=dict(COSTS))
    assert free.choose(claims, 4) == 8 and free.should_draft()
    slow = CapacityPolicy(costs=dict(COSTS))
    slow.record_drafting(10 * COSTS[8])  # drafting alone costs ten verify steps
    slow.choose(claims, 4)  # (4 + 22.8) / 17.6 tokens/s after drafting < 4 / 1.0 for a plain step
    assert slow.ask_gain < 1.0
    assert not any(slow.should_draft() for _ in range(slow.probe_every - 1))  # not asked before the probe
    # The drafter becomes cheap again: the next probe sees it and drafting resumes.
    slow.draft_s = 0.0
    assert slow.should_draft()
    assert slow.choose(claims, 4) == 1  # a probe verifies the smallest tree ...
    slow.record(1, COSTS[1], expected_accepted(claims, 1), accepted=4)
    assert slow.should_draft() and slow.choose(claims, 4) == 8  # ... then the best one again
    # Control: a cost model without the drafting time keeps asking the slow drafter.
    blind = CapacityPolicy(costs=dict(COSTS))
    blind.choose(claims, 4)
    assert blind.ask_gain > 1.0 and blind.should_draft()


# ------------------------------------------------------------------ the device loop's per-chunk policy


def test_chunk_policy_grows_to_the_fastest_bucket():
    policy = ChunkPolicy(costs={}, buckets=(0, 1, 2, 4))
    measured = []
    for _ in range(8):
        t = policy.choose()
        measured.append(t)
        policy.record(t, 8 * COSTS[t], steps=8, row_steps=8, claimed=[0.0, 8 * 0.9, 8 * 1.7, 8 * 3.0],
                      accepted=int(8 * 0.9 * (t == 1)) + int(8 * 1.7 * (t == 2)) + int(8 * 3.0 * (t == 4)))
    assert measured == [0, 0, 1, 1, 2, 2, 4, 4]  # each bucket's first chunk warms it, its second is timed
    # (1 + 3.0) / 1.2 = 3.3 tokens per unit of time at T=4, against 2.45 at T=2 and 1 for plain steps.
    assert policy.choose() == 4
    policy.calibration = 0.2  # (1 + 0.6) / 1.2 = 1.33 still beats 1.05 ...
    assert policy.best_bucket() == 4
    policy.costs[4] = 2.0  # ... until that tree costs more: 0.8, and T=2 gives (1 + 0.34) / 1.1 = 1.22
    assert policy.best_bucket() == 2
    policy.calibration = 0.02  # claims worth almost nothing: no tree beats 1.05
    assert policy.best_bucket() == 0


def test_chunk_policy_probes_less_often_while_plain_stays_best():
    # A probe costing 2% more than a plain chunk: cheap, so the doubling schedule alone spaces them.
    policy = ChunkPolicy(costs={0: 1.0, 1: 1.02, 2: 2.0}, buckets=(0, 1, 2), claimed={1: 0.03, 2: 0.06})
    choices = []
    for _ in range(24):
        t = policy.choose()
        choices.append(t)
        policy.record(t, COSTS[0] * 8, 8, 8 * (t > 0), [0.0, 0.8, 1.6], accepted=0)
    probes = [i for i, t in enumerate(choices) if t > 0]
    assert probes == [2, 7, 16]  # waits of 2, 4, 8 chunks: a drafter that never pays runs plain steps
    assert policy.calibration < 0.01  # eight steps of nothing per probe: calibrated down at once


@pytest.mark.parametrize("probe_cost,setup", [(4.0, 0.0), (10.0, 0.0), (1.5, 24.0)])
def test_chunk_probes_cost_at_most_their_share_of_plain_time(probe_cost, setup):
    """A smallest tree costing several plain steps (a deep draft-model tree on a CPU) that never
    pays: over a long run, the probes' extra time stays within ``probe_share`` of the plain time,
    a lazy drafter's prefill before each probe (``setup``, in plain steps' time) included."""

    def extra_share(policy, told_setup: bool = True) -> float:
        plain = extra = 0.0
        for _ in range(400):
            t = policy.choose()
            cost = probe_cost if t else 1.0
            plain, extra = plain + 8.0, extra + 8.0 * (cost - 1.0) + setup * (t > 0)
            policy.record(t, 8.0 * cost, 8, 8 * (t > 0), [0.0, 0.8, 1.6], accepted=0,
                          setup_s=setup * (t > 0) * told_setup)
        return extra / plain

    budgeted = ChunkPolicy(costs={0: 1.0, 1: probe_cost, 2: 2 * probe_cost}, buckets=(0, 1, 2))
    assert extra_share(budgeted) <= budgeted.probe_share * 1.1
    # Control: the doubling schedule alone (up to 16 chunks) spends more than that on probes.
    doubling = ChunkPolicy(costs={0: 1.0, 1: probe_cost, 2: 2 * probe_cost}, buckets=(0, 1, 2), probe_share=1e9)
    assert extra_share(doubling) > budgeted.probe_share * 1.1
    if setup:  # Control: spacing probes by the tree's cost alone, the prefills overspend the budget.
        untold = ChunkPolicy(costs={0: 1.0, 1: probe_cost, 2: 2 * probe_cost}, buckets=(0, 1, 2))
        assert extra_share(untold, told_setup=False) > budgeted.probe_share * 1.1


def test_a_bucket_is_timed_on_its_second_chunk_not_its_first():
    """A program's first run pays one-time costs (on a CPU, 2-4x a step); timing it would overstate
    the bucket for good, since a bucket the policy then avoids is seldom timed again."""
    policy = ChunkPolicy(costs={}, buckets=(0, 1, 2))
    for t, seconds in [(0, 8 * 3.0), (0, 8 * 1.0), (1, 8 * 4.0), (1, 8 * 1.2)]:
        assert policy.choose() == t
        policy.record(t, seconds, 8, 8 * (t > 0), [0.0, 0.0, 0.0], accepted=0)
    assert policy.costs == {0: pytest.approx(1.0), 1: pytest.approx(1.2)}
    # Control: timing the first chunk (and smoothing the second into it) keeps most of the 3x.
    first_timed = ChunkPolicy(costs={0: 3.0}, buckets=(0, 1, 2), warmed={0})
    first_timed.record(0, 8 * 1.0, 8, 0, [0.0, 0.0, 0.0], accepted=0)
    assert first_timed.costs[0] > 2.0


def plain_chunks_with_first_guesses(policy: ChunkPolicy, right_per_step: float, chunks: int,
                                    guesses: bool = True) -> list[int]:
    """The policy's choices while each plain chunk reports first guesses right ``right_per_step`` of
    its 8 row-steps (none reported without ``guesses``); a speculative chunk accepts nothing."""
    choices = []
    for _ in range(chunks):
        t = policy.choose()
        choices.append(t)
        shadow = (round(8 * right_per_step), 8) if t == 0 and guesses else None
        policy.record(t, 8 * COSTS[t] * (1.2 if t else 1.0), 8, 8 * (t > 0), [0.0, 0.8, 1.6], accepted=0,
                      shadow=shadow)
    return choices


def test_first_guesses_replace_probes_and_switch_to_trees_only_when_they_pay():
    """A drafter with a free one-node guess (Token Recycling) is never probed: plain chunks say how
    often the guess was the emitted token, and the smallest tree runs once that pays for its cost."""
    costs = {0: 1.0, 1: 1.2 * COSTS[1], 2: 1.2 * COSTS[2]}
    never = ChunkPolicy(costs=dict(costs), buckets=(0, 1, 2), warmed={0, 1, 2})
    assert plain_chunks_with_first_guesses(never, 0.0, 24) == [0] * 24
    # Control: the same drafter without first guesses is probed (waits of 2, 4, 8 chunks).
    probed = ChunkPolicy(costs=dict(costs), buckets=(0, 1, 2), warmed={0, 1, 2})
    assert sum(t > 0 for t in plain_chunks_with_first_guesses(probed, 0.0, 24, guesses=False)) >= 3
    # T = 1 costs 1.26 plain steps: a guess right 25% of the time gives 1.25 / 1.26 (plain stays) ...
    quarter = ChunkPolicy(costs=dict(costs), buckets=(0, 1, 2), warmed={0, 1, 2})
    assert plain_chunks_with_first_guesses(quarter, 0.25, 6) == [0] * 6
    # ... 7 of 8 gives 1.875 / 1.26 = 1.49 tokens per plain step's time: the next chunk speculates.
    assert plain_chunks_with_first_guesses(quarter, 7 / 8, 1) == [0] and quarter.choose() == 1
    # A chunk of one row is weighed as one: after guesses that were never right, 5 of 8 right in a
    # row's chunk (a burst) keeps plain steps (a rule reading the last chunk alone would switch) ...
    burst = ChunkPolicy(costs=dict(costs), buckets=(0, 1, 2), warmed={0, 1, 2})
    plain_chunks_with_first_guesses(burst, 0.0, 6)
    burst.record(0, 8.0, 8, 0, [0.0, 0.0, 0.0], accepted=0, shadow=(5, 8))
    assert burst.choose() == 0 and (1 + 5 / 8) / costs[1] > burst.min_gain / costs[0]
    # ... while 80 of 128 row-steps (16 rows) are evidence enough to switch at once.
    burst.record(0, 8.0, 8, 0, [0.0, 0.0, 0.0], accepted=0, shadow=(80, 128))
    assert burst.choose() == 1
    # A new batch starts with a plain chunk of its own guesses, whatever the last batch's tail showed.
    burst.start_batch()
    assert burst.choose() == 0
    burst.record(0, 8.0, 8, 0, [0.0, 0.0, 0.0], accepted=0, shadow=(80, 128))
    assert burst.choose() == 1


def shrunk(big: ChunkPolicy, plain_cost: float) -> ChunkPolicy:
    """The policy of a batch shrunk from ``big``'s, once it has timed its own plain step."""
    small = ChunkPolicy(costs={}, buckets=big.buckets)
    small.continue_batch(big)
    assert small.choose() == 0  # its own plain cost first
    small.costs, small.warmed = {0: plain_cost}, {0}
    small.record(0, 8 * plain_cost, 8, 0, [0.0] * len(big.buckets), accepted=0)
    return small


def test_a_shrunk_batch_keeps_what_was_learned_of_its_drafts_and_times_only_trees_that_could_pay():
    """The device loop shrinks a batch to its live rows (a new row count, a new policy): the drafts'
    claims, calibration and first-guess rate carry over, a tree's cost over a plain step's stands in
    until the smaller batch times it, and the batch goes on where it was (no batch-start plain chunk)."""
    big = ChunkPolicy(costs={0: 4.0, 1: 4.8}, buckets=(0, 1, 2), claimed={1: 0.5, 2: 0.9}, observed={1: 0.4},
                      calibration=0.7, shadow=0.6, setup_per_step=0.3, warmed={0, 1})
    big.start_batch()
    small = shrunk(big, 1.0)
    assert (small.claimed, small.observed, small.calibration, small.shadow) == (big.claimed, big.observed, 0.7, 0.6)
    assert small.unmeasured() == [1, 2] and small.estimated_costs() == {0: 1.0, 1: pytest.approx(1.2)}
    big.claimed[1] = 5.0
    assert small.claimed[1] == 0.5  # a copy: the bigger batch's policy goes on for the next batch
    assert small.choose() == 1  # (1 + 0.6) / 1.2 > 1.05 / 1.0, from the guesses the bigger batch counted
    # Control: a policy that starts the batch afresh runs a plain chunk of first guesses first.
    fresh = ChunkPolicy(costs={0: 1.0, 1: 1.2}, buckets=(0, 1, 2), shadow=0.6, warmed={0, 1})
    fresh.start_batch()
    fresh.record(0, 8.0, 8, 0, [0.0, 0.0, 0.0], accepted=0)
    assert fresh.choose() == 0
    # Guesses right 10% of the time do not pay for a tree costing 1.2 plain steps: the shrunk batch
    # stays plain without timing one (a fresh policy times T = 1 on its second and third chunks).
    wrong = dataclasses.replace(big, shadow=0.1)
    small = shrunk(wrong, 1.0)
    assert [small.choose() for _ in range(4)] == [0] * 4 and small.unmeasured() == [1, 2]
    unknown = ChunkPolicy(costs={0: 1.0}, buckets=(0, 1, 2), shadow=0.1, warmed={0})
    assert unknown.choose() == 1
    # A drafter without first guesses keeps the bigger batch's probe schedule (3 plain chunks to go,
    # then a probe; waits of 8 since): every row count backing off from 2 would probe far more often.
    probed = ChunkPolicy(costs={0: 4.0, 1: 4.8}, buckets=(0, 1, 2), probe_every=8, _plain_left=3, _probe_next=True,
                         warmed={0, 1})
    small = shrunk(probed, 1.0)
    assert [small.choose() for _ in range(4)] == [0, 0, 0, 1] and small.probe_every == 8


def test_a_batch_speculates_only_if_its_first_tree_pays_for_the_drafters_prefill():
    """A lazy drafter (the draft model) reads a batch's prompts before its first tree. T = 1 gaining 14%
    per step does not cover a prefill costing half a step per step of the chunk; once a tree has run
    in the batch (the prefill paid), the same claims speculate."""
    policy = ChunkPolicy(costs={0: 1.0, 1: 1.1}, buckets=(0, 1), claimed={1: 0.25}, warmed={0, 1})
    assert policy.best_bucket() == 1  # (1 + 0.25) / 1.1 = 1.14 > 1.05
    policy.record(1, 8 * 1.1, 8, 8, [0.0, 8 * 0.25], accepted=2, setup_s=4.0)  # a tree that paid 4.0
    policy.start_batch()
    assert policy.best_bucket() == 0  # 1.25 / (1.1 + 0.5) = 0.78
    policy.record(1, 8 * 1.1, 8, 8, [0.0, 8 * 0.25], accepted=2)  # this batch's first tree (a probe)
    assert policy.best_bucket() == 1
    # Control: the prefill counted on every tree, paid or not, would keep plain steps.
    always = ChunkPolicy(costs={0: 1.0, 1: 1.1 + 0.5}, buckets=(0, 1), claimed={1: 0.25}, warmed={0, 1})
    assert always.best_bucket() == 0


def test_chunk_calibration_counts_a_chunk_as_its_steps():
    one, eight = (ChunkPolicy(costs={0: 1.0, 1: 1.0}, buckets=(0, 1)) for _ in range(2))
    one.record(1, 1.0, steps=1, row_steps=1, claimed=[0.0, 1.0], accepted=0)
    eight.record(1, 8.0, steps=8, row_steps=8, claimed=[0.0, 8.0], accepted=0)
    assert one.calibration == pytest.approx(0.7)
    assert eight.calibration == pytest.approx(0.7 ** 8)


# ------------------------------------------------------------------ fused plain chunks while paused


class LateProbe(CapacityPolicy):
    """Control: a chunk that runs one step too many, over the step that should have probed."""

    def plain_steps_ahead(self) -> int:
        ahead = super().plain_steps_ahead()
        return ahead + 1 if ahead else 0


def probe_steps(policy: CapacityPolicy, chunked: bool, steps: int = 300) -> list[int]:
    """The steps at which a policy asks an always-wrong drafter, stepping one at a time or, with
    ``chunked``, fusing the plain steps before each probe as the Engine does."""
    asked, step, wrong = [], 0, [np.array([0.9, 0.9])]
    while step < steps:
        ahead = policy.plain_steps_ahead() if chunked else 0
        if ahead:
            policy.record_plain_chunk(ahead * COSTS[0], ahead)
            step += ahead
            continue
        drafted = policy.should_draft()
        if drafted:
            asked.append(step)
        t = policy.choose(wrong, 1) if drafted else 0
        policy.record(t, COSTS[t], expected_accepted(wrong, t), 0)
        step += 1
    return asked


def test_fused_plain_chunks_keep_the_probe_schedule():
    """Fusing the plain steps of a paused drafter changes how they run, not when it is asked."""
    per_step = probe_steps(CapacityPolicy(costs=dict(COSTS)), chunked=False)
    assert len(per_step) < 20 and per_step[-1] > 200  # paused, probing ever more rarely, until the end
    assert probe_steps(CapacityPolicy(costs=dict(COSTS)), chunked=True) == per_step
    assert probe_steps(LateProbe(costs=dict(COSTS)), chunked=True) != per_step  # the control is caught


def test_asking_the_drafter_competes_with_fused_plain_steps():
    """A drafter worth 1.03x a host-loop plain step loses to plain steps fused on the device (10%
    cheaper): once their cost is measured, drafting pauses."""
    claims = [np.array([0.3])]  # (1 + 0.3) / 1.05 = 1.24 tokens per host plain step's time ...
    slow = CapacityPolicy(costs=dict(COSTS))
    slow.record_drafting(0.2)  # ... minus the drafting: 1.3 / 1.25 = 1.04x
    slow.choose(claims, 1)
    assert slow.ask_gain > 1.0 and not slow.paused  # against the host loop's plain step: worth asking
    fused = CapacityPolicy(costs=dict(COSTS), fused_plain_s=0.9 * COSTS[0])
    fused.record_drafting(0.2)
    fused.choose(claims, 1)
    assert fused.ask_gain < 1.0 and fused.paused and fused.plain_steps_ahead() > 0
