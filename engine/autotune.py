"""Choosing the draft capacity T per step so that speculation never costs time.

On any hardware, verifying a tree of T nodes costs ``cost[T]`` seconds per step
(measured, not assumed: about one decode step for small T on a TPU or GPU,
growing with T on a CPU), and yields ``1 + accepted`` tokens per sequence. The
drafter's proposal carries its own estimate of each node's probability; after
each step the policy compares the predicted accepted tokens with the real ones
and keeps a running calibration factor, so an over-confident drafter is
discounted. Per step it picks the T (0 = a plain step) that maximizes expected
tokens per second, speculating only for a clear expected win (``min_gain``).
When several steps in a row gain nothing (T = 0 chosen, or no draft token
accepted), it stops asking the drafter for proposals and only probes with the
smallest tree now and then, less often after each probe that fails, so a
drafter that never pays costs (almost) nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def capacity_buckets(max_capacity: int) -> tuple[int, ...]:
    """0, then powers of two below max_capacity, then max_capacity: the compiled tree sizes."""
    if max_capacity < 0:
        raise ValueError(f"max_capacity must be >= 0, got {max_capacity}")
    sizes = {0, max_capacity}
    t = 1
    while t < max_capacity:
        sizes.add(t)
        t *= 2
    return tuple(sorted(sizes))


def expected_accepted(node_probs: Sequence[np.ndarray], capacity: int) -> float:
    """Sum over sequences of the drafter's path probabilities of the first ``capacity`` nodes.

    A node is accepted only with its whole path, and ``probs[i]`` estimates
    exactly that path's probability, so the sum is the expected accepted count.
    """
    return float(sum(np.sum(p[:capacity]) for p in node_probs))


@dataclasses.dataclass
class CapacityPolicy:
    """Per-step choice of T from measured step costs and calibrated drafter confidence.

    ``costs[T]`` are seconds per step for each bucket (see ``Engine.warmup``);
    they are refreshed by a running average of the steps actually taken.
    """

    costs: dict[int, float]
    smoothing: float = 0.3
    calibration: float = 1.0
    idle_steps: int = 0  # consecutive steps in which speculation gained nothing (T = 0 or none accepted)
    probe_every: int = 8  # while idle, ask the drafter only every this many steps ...
    max_probe_every: int = 64  # ... doubling after each probe that gains nothing, up to this
    patience: int = 4  # idle steps before drafting is skipped
    min_gain: float = 1.05  # speculate only for a clear expected win over a plain step
    max_cost_jump: float = 2.0  # one step's time counts as at most this many times the bucket's estimate
    _since_probe: int = 0

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self.costs))

    @property
    def paused(self) -> bool:
        return self.idle_steps >= self.patience

    def should_draft(self) -> bool:
        """False while speculation has not paid recently (except periodic probes)."""
        if not self.paused:
            return True
        self._since_probe += 1
        return self._since_probe >= self.probe_every

    def choose(self, node_probs: Sequence[np.ndarray], num_active: int) -> int:
        """The bucket T maximizing expected emitted tokens per second for this step.

        A probe step (drafting had been paused) verifies the smallest tree
        instead: cheap, and enough for the calibration to recover when the
        drafter starts to pay.
        """
        longest = max((len(p) for p in node_probs), default=0)
        if longest and self.paused:
            return self.buckets[1]
        costs = self.monotone_costs()
        best_t, best_rate = 0, self.min_gain * num_active / costs[0]
        for t in self.buckets:
            if t == 0 or (t > longest and t != self._fit(longest)):
                continue
            tokens = num_active + self.calibration * expected_accepted(node_probs, t)
            rate = tokens / costs[t]
            if rate > best_rate:
                best_t, best_rate = t, rate
        return best_t

    def monotone_costs(self) -> dict[int, float]:
        """Costs made non-decreasing in T: a bigger tree never costs less, whatever timing noise says."""
        out, running = {}, 0.0
        for t in self.buckets:
            running = max(running, self.costs[t])
            out[t] = running
        return out

    def _fit(self, n: int) -> int:
        """The smallest bucket holding n nodes (the largest bucket if none does)."""
        return next((t for t in self.buckets if t >= n), self.buckets[-1])

    def record(self, capacity: int, seconds: float, predicted: float, accepted: int) -> None:
        """Fold one step's measured cost and acceptance into the running estimates.

        A stalled step (a compilation, the host pre-empted) counts as at most
        ``max_cost_jump`` times the current estimate: one outlier must not make a
        bucket look so expensive that it is never chosen, and so never re-measured.
        """
        a = self.smoothing
        seconds = min(seconds, self.max_cost_jump * self.costs[capacity])
        self.costs[capacity] = (1 - a) * self.costs[capacity] + a * seconds
        if predicted > 0:
            self.calibration = (1 - a) * self.calibration + a * min(accepted / predicted, 2.0)
        if self.paused and capacity > 0:  # a probe: back off if it gained nothing
            self._since_probe = 0
            self.probe_every = (CapacityPolicy.probe_every if accepted > 0
                                else min(2 * self.probe_every, self.max_probe_every))
        self.idle_steps = 0 if capacity > 0 and accepted > 0 else self.idle_steps + 1


# Below this share of a step's cost, host drafting cannot make two lanes pay.
PIPELINE_MIN_DRAFT_SHARE = 0.25


def pipelined_round_pays(full_step_s: float, half_step_s: float, drafting_s: float, margin: float = 0.95) -> bool:
    """Whether two half-batch lanes in ping-pong beat one batch, per round of all rows.

    Serially a round is one full-batch step plus drafting every row. With two
    lanes the device runs two half steps while the host drafts one lane during
    the other's step: the round is bounded below by the device's work, by the
    host's work, and by one lane's step followed by its own drafting.
    """
    serial = full_step_s + drafting_s
    pipelined = max(2 * half_step_s, drafting_s, half_step_s + drafting_s / 2)
    return pipelined < margin * serial
