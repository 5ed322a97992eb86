"""The auto tree size per slot of a continuous batch: how many draft nodes each slot verifies.

A static batch picks one tree size T per step (``autotune.CapacityPolicy``). In
continuous batching the slots share one packed step whose cost depends on its
row bucket (``paged_steps.row_bucket``: the packed rows of every slot's root and
tree plus the prefill chunks, padded to a power of two), not on one T. So the
choice is which draft nodes, over all slots, earn their rows:

- each node's expected accepted tokens is its path probability (``Proposal.probs``)
  times its slot's calibration (accepted / claimed so far, drawn toward the
  drafter's calibration over every request while a request is young);
- a slot's nodes are taken in proposal order (the engine keeps a proposal's first
  nodes, so parents come first), and the next node of whichever slot offers the
  most is taken first;
- of those cuts the policy takes the one with the most expected tokens per
  second, ``(emitting slots + expected accepted) / cost[bucket]``, and drafts at
  all only for a clear win (``min_gain``) over the step without nodes. Rows that
  fill a bucket the prefill chunks already opened are free, and are taken.

Costs are seconds per step, measured per bucket on the steps actually run (a
bucket's first step compiles and is not a timing). As in ``autotune``, a choice
considers the measured buckets plus the next unmeasured one (the frontier) at
the cost of the largest measured bucket below it, so the packed size grows one
bucket at a time and buckets that never look worth it never compile.
"""

from __future__ import annotations

import dataclasses
import heapq
from typing import Sequence

import numpy as np


def row_buckets(max_rows: int, minimum: int = 8) -> tuple[int, ...]:
    """The powers of two from ``minimum`` up to the first that holds ``max_rows``."""
    sizes, size = [minimum], minimum
    while size < max_rows:
        size *= 2
        sizes.append(size)
    return tuple(sizes)


@dataclasses.dataclass
class RowPolicy:
    """Per-step draft nodes for each slot of a ragged batch (see the module docstring)."""

    buckets: tuple[int, ...]
    costs: dict[int, float] = dataclasses.field(default_factory=dict)
    smoothing: float = 0.3
    min_gain: float = 1.05
    max_cost_jump: float = 2.0  # one step's time counts as at most this many times the bucket's estimate
    prior_claims: float = 4.0  # claimed tokens' weight of the drafter-wide calibration in a young slot's
    probe_every: int = 16  # after this many steps whose proposals were all cut, verify the best node anyway
    claimed: float = 0.0  # over every request: draft tokens the drafter's probabilities claimed ...
    accepted: float = 0.0  # ... and those accepted
    _compiled: set = dataclasses.field(default_factory=set)  # buckets whose first (compiling) step ran
    _cut_steps: int = 0  # consecutive steps with proposals and no node kept

    def bucket(self, rows: int) -> int:
        return next((b for b in self.buckets if b >= rows), self.buckets[-1])

    def calibration(self, slot_claimed: float, slot_accepted: float) -> float:
        """Accepted per claimed token for one request: its own record, drawn toward the drafter's."""
        overall = (self.accepted + self.prior_claims) / (self.claimed + self.prior_claims)
        return (slot_accepted + self.prior_claims * overall) / (slot_claimed + self.prior_claims)

    def cut(self, base_rows: int, emitting: int, gains: Sequence[np.ndarray]) -> list[int]:
        """Nodes to verify per slot: ``gains[s]`` are slot s's calibrated path probabilities in
        proposal order; ``base_rows`` the step's rows without any node (roots and prefill chunks);
        ``emitting`` the slots that emit tokens without drafts."""
        keep = [0] * len(gains)
        base = self.bucket(base_rows)
        costs = self._step_costs(base)
        if base not in costs or not emitting:
            return keep
        plain_rate = emitting / costs[base]
        best_k, best_rate, tokens = 0, plain_rate * self.min_gain, float(emitting)
        order = self._best_first(gains)
        for k, (gain, slot) in enumerate(order, 1):
            size = self.bucket(base_rows + k)
            if size not in costs or base_rows + k > self.buckets[-1]:
                break  # past the frontier, or more rows than the largest bucket
            tokens += gain
            if tokens / costs[size] > best_rate:
                best_k, best_rate = k, tokens / costs[size]
        if order and best_k == 0:  # a drafter the calibration has given up on is still tried now and
            self._cut_steps += 1   # then (its one best node), so it can earn its rows back
            if self._cut_steps >= self.probe_every and self.bucket(base_rows + 1) in costs:
                best_k = 1
        if best_k:
            self._cut_steps = 0
        for _, slot in order[:best_k]:
            keep[slot] += 1
        return keep

    def _step_costs(self, base: int) -> dict[int, float]:
        """Costs of the buckets a step at ``base`` may grow to: the measured ones, made
        non-decreasing, up to the first unmeasured one (the frontier), which gets the cost of the
        largest measured bucket below it (a lower bound). Empty before any bucket is measured."""
        out, running = {}, 0.0
        for size in self.buckets:
            running = max(running, self.costs.get(size, 0.0))
            if size < base:
                continue
            if running <= 0.0:
                break
            out[size] = running
            if size not in self.costs:
                break
        return out

    @staticmethod
    def _best_first(gains: Sequence[np.ndarray]) -> list[tuple[float, int]]:
        """(gain, slot) of every node, each slot's in proposal order, the slots' next nodes merged
        best first."""
        heap = [(-float(g[0]), slot, 0) for slot, g in enumerate(gains) if len(g)]
        heapq.heapify(heap)
        order = []
        while heap:
            neg, slot, i = heapq.heappop(heap)
            order.append((-neg, slot))
            if i + 1 < len(gains[slot]):
                heapq.heappush(heap, (-float(gains[slot][i + 1]), slot, i + 1))
        return order

    def record(self, rows: int, seconds: float, claimed: float, accepted: int) -> None:
        """Fold one step's time (at its row bucket) and its drafts' claims and acceptance in."""
        size = self.bucket(rows)
        self.claimed += claimed
        self.accepted += accepted
        if size not in self._compiled:  # its first step compiled the bucket's program: not a timing
            self._compiled.add(size)
            return
        if size not in self.costs:
            self.costs[size] = seconds
        else:
            seconds = min(seconds, self.max_cost_jump * self.costs[size])
            self.costs[size] = (1 - self.smoothing) * self.costs[size] + self.smoothing * seconds
