"""The scheduler's auto tree size per slot (``engine.row_policy.RowPolicy``): which slots' draft
nodes earn their rows in a shared packed step.

Each rule is checked against the wrong variant it replaces (kept here as negative controls): keeping
whole proposals (no cut), dealing rows out to slots in turn instead of ranking nodes across slots,
and trusting the drafter's claims without calibration.
"""

from __future__ import annotations

import numpy as np
import pytest

from specjax.engine.row_policy import RowPolicy, row_buckets

BUCKETS = row_buckets(64)


def measured(costs: dict[int, float]) -> RowPolicy:
    return RowPolicy(BUCKETS, costs=dict(costs), _compiled=set(costs))


def test_scheduler_row_buckets_are_powers_of_two_up_to_the_largest_step():
    assert row_buckets(64) == (8, 16, 32, 64)
    assert row_buckets(65) == (8, 16, 32, 64, 128)
    assert row_buckets(3) == (8,)


def test_scheduler_row_policy_drafts_nothing_before_a_step_was_timed():
    assert RowPolicy(BUCKETS).cut(3, 3, [np.ones(7)] * 3) == [0, 0, 0]


def test_scheduler_row_policy_ranks_nodes_across_slots_best_first():
    # Room for 5 nodes in the 8-row bucket (3 roots); the next bucket costs far more.
    policy = measured({8: 1.0, 16: 10.0})
    gains = [np.array([0.9, 0.8, 0.7]), np.array([0.95, 0.1]), np.array([0.2])]
    keep = policy.cut(3, 3, gains)
    assert keep == [3, 1, 1]
    share = equal_share(gains, room=5)  # the wrong variant: slot 1's 0.1 node over slot 0's 0.7 node
    assert share == [2, 2, 1] and expected(gains, share) < expected(gains, keep)


def equal_share(gains, room: int) -> list[int]:
    """Negative control: the free rows dealt out one per slot in turn, whatever the nodes offer."""
    keep = [0] * len(gains)
    while room and any(k < len(g) for k, g in zip(keep, gains)):
        for slot, g in enumerate(gains):
            if room and keep[slot] < len(g):
                keep[slot], room = keep[slot] + 1, room - 1
    return keep


def expected(gains, keep) -> float:
    return float(sum(g[:k].sum() for g, k in zip(gains, keep)))


def test_scheduler_row_policy_takes_rows_a_prefill_chunk_already_opened():
    """Nodes that fit the bucket the prefill rows opened cost nothing: even weak ones are taken."""
    policy = measured({8: 1.0, 16: 1.6, 32: 50.0})
    weak = [np.full(7, 0.05)] * 2
    assert sum(policy.cut(8, 2, weak)) == 0  # 2 roots and 6 prefill rows fill 8: a node opens 16 rows
    assert sum(policy.cut(2 + 9, 2, weak)) == 16 - 11  # a 9-row chunk opened the 16-row bucket


def test_scheduler_row_policy_grows_only_where_the_tokens_pay_for_the_bucket():
    policy = measured({8: 1.0, 16: 1.5, 32: 4.0, 64: 8.0})
    strong = [np.full(7, 0.9)] * 8  # 8 slots: every node opens a bigger bucket
    keep = policy.cut(8, 8, strong)
    # 16 rows: (8 + 7.2) / 1.5 = 10.1 tokens/s beats plain (8) and 32 rows (8 + 21.6) / 4 = 7.4.
    assert sum(keep) == 8
    assert sum(measured({8: 1.0, 16: 3.0, 32: 9.0}).cut(8, 8, strong)) == 0  # (8 + 7.2) / 3 < 8
    rate = lambda nodes: (8 + 0.9 * nodes) / policy.costs[policy.bucket(8 + nodes)]  # noqa: E731
    assert rate(sum(keep)) > 8 > rate(56)  # the wrong variant (no cut, all 56 nodes) is slower than plain


def test_scheduler_row_policy_considers_one_unmeasured_bucket_at_a_lower_bound():
    policy = measured({8: 1.0})
    keep = policy.cut(8, 8, [np.full(7, 0.9)] * 8)
    assert sum(keep) == 8  # the 16-row frontier at the 8-row cost; 32 rows and up wait for it
    policy.record(16, 2.0, 7.2, 7)  # its first step compiles: not a timing
    assert 16 not in policy.costs
    policy.record(16, 1.5, 7.2, 7)
    assert policy.costs[16] == 1.5


def test_scheduler_row_policy_calibration_discounts_a_slot_whose_claims_fail():
    policy = measured({8: 1.0, 16: 1.3, 32: 100.0})
    claims = [np.full(7, 0.9)] * 8
    fresh = policy.calibration(0.0, 0)
    assert fresh == pytest.approx(1.0)
    liar = policy.calibration(40.0, 0)
    assert liar < 0.1
    assert sum(policy.cut(8, 8, [c * fresh for c in claims])) == 8
    assert sum(policy.cut(8, 8, [c * liar for c in claims])) == 0
    # The drafter-wide record moves a new request's starting point too.
    policy.record(8, 1.0, claimed=40.0, accepted=0)
    assert policy.calibration(0.0, 0) < 0.1
    trusting = Trusting(BUCKETS, costs=dict(policy.costs), _compiled=set(policy.costs))
    assert sum(trusting.cut(8, 8, [c * trusting.calibration(40.0, 0) for c in claims])) == 8


class Trusting(RowPolicy):
    """Negative control: the drafter's claims taken as they are."""

    def calibration(self, slot_claimed: float, slot_accepted: float) -> float:
        return 1.0


def test_scheduler_row_policy_probes_a_drafter_it_gave_up_on():
    policy = measured({8: 1.0, 16: 100.0})
    weak = [np.full(7, 0.001)] * 8
    kept = [sum(policy.cut(8, 8, weak)) for _ in range(2 * policy.probe_every)]
    assert kept.count(1) == 2 and kept.count(0) == 2 * policy.probe_every - 2
    assert kept[policy.probe_every - 1] == 1


def test_scheduler_row_policy_timing_outliers_are_capped():
    policy = measured({8: 1.0})
    policy.record(8, 50.0, 0.0, 0)  # a stall (the host pre-empted): at most max_cost_jump x the estimate
    assert policy.costs[8] == pytest.approx(0.7 * 1.0 + 0.3 * 2.0)
