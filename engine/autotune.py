"""Choosing the draft capacity T per step so that speculation never costs time.

On any hardware, verifying a tree of T nodes costs ``cost[T]`` seconds per step
(measured, not assumed: about one decode step for small T on a TPU or GPU,
growing with T on a CPU), and yields ``1 + accepted`` tokens per sequence. The
drafter's proposal carries its own estimate of each node's probability; after
each step the policy compares the predicted accepted tokens with the real ones
and keeps a running calibration factor, so an over-confident drafter is
discounted. Per step it picks the T (0 = a plain step) that maximizes expected
tokens per second, speculating only for a clear expected win (``min_gain``).
Host drafting time counts as part of a speculative step's cost. When several
steps in a row gain nothing (T = 0 chosen, or no draft token accepted), or when
asking the drafter has recently been worth less than its own drafting time, it
stops asking the drafter for proposals and only probes with the smallest tree
now and then, less often after each probe that fails (a probe that proposes
nothing fails too), so a drafter that never pays costs (almost) nothing.

``ChunkPolicy`` makes the same choice per host sync for the on-device loop,
whose drafters run inside the compiled step (see ``engine/device_loop.py``).

Both policies compile lazily: a tree size is measured (and so compiled) only
once the choice reaches it. Besides the measured sizes, a choice considers the
smallest unmeasured one (the *frontier*) at the cost of the largest measured
size below it (a lower bound: a bigger tree never costs less). Sizes above
the frontier wait until it is measured, so the choice grows one size at a
time (a few steps to reach a large tree), and sizes that never look worth
trying never compile. ``ChunkPolicy`` also waits for evidence: it opens the
frontier only once the largest tree it ran paid in tokens actually accepted,
not merely in the drafter's calibrated claims (both the frontier's cost and the
claims are optimistic, and one program compile per size is too dear to spend
on a drafter that has not yet been right).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

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

    ``costs[T]`` are seconds per step of the measured buckets (0 at least; see
    ``Engine.warmup``), refreshed by a running average of the steps actually
    taken. ``sizes`` are all the buckets it may choose (default: the measured
    ones); an unmeasured one is chosen only as the frontier (see the module
    docstring). The ``Engine`` measures a chosen bucket before its first step
    (``Engine._measure_step_costs``: the compile stays out of the timing).
    """

    costs: dict[int, float]
    sizes: tuple[int, ...] = ()
    smoothing: float = 0.3
    calibration: float = 1.0
    idle_steps: int = 0  # consecutive steps in which speculation gained nothing (T = 0 or none accepted)
    probe_every: int = 8  # while idle, ask the drafter only every this many steps ...
    max_probe_every: int = 64  # ... doubling after each probe that gains nothing, up to this
    patience: int = 4  # idle steps before drafting is skipped
    min_gain: float = 1.05  # speculate only for a clear expected win over a plain step
    max_cost_jump: float = 2.0  # one step's time counts as at most this many times the bucket's estimate
    history: list = dataclasses.field(default_factory=list)  # T of each recorded step, in order
    draft_s: float = 0.0  # host drafting seconds per drafted step (running average, see ``record_drafting``)
    ask_gain: float = 1.0  # recent value of asking the drafter: the chosen rate after drafting / a plain step's
    # Seconds per plain step fused into on-device chunks (the Engine runs those while drafting is
    # paused, see ``plain_steps_ahead``): once measured, what asking the drafter competes with.
    fused_plain_s: Optional[float] = None
    _since_probe: int = 0
    _probing: bool = False

    @property
    def buckets(self) -> tuple[int, ...]:
        return self.sizes or tuple(sorted(self.costs))

    @property
    def paused(self) -> bool:
        return self.idle_steps >= self.patience or self.ask_gain < 1.0

    def should_draft(self) -> bool:
        """False while speculation has not paid recently, except for a periodic probe.

        The probe counter restarts whenever a probe is granted, whatever the
        probe then proposes (an empty proposal is a failed probe, not a reason
        to ask again at once)."""
        if not self.paused:
            return True
        self._since_probe += 1
        if self._since_probe < self.probe_every:
            return False
        self._since_probe, self._probing = 0, True
        return True

    def plain_steps_ahead(self) -> int:
        """How many next steps ``should_draft`` will refuse (0 unless paused): the steps before the
        next probe, which the Engine fuses into on-device plain chunks (``record_plain_chunk``)."""
        return max(self.probe_every - self._since_probe - 1, 0) if self.paused else 0

    def record_plain_chunk(self, seconds: float, steps: int) -> None:
        """Fold ``steps`` fused plain steps taken while paused (as many refused asks) into the estimates."""
        if steps <= 0:
            return
        self.history.extend([0] * steps)
        self._since_probe += steps
        self.idle_steps += steps
        per_step = seconds / steps
        if self.fused_plain_s is None:
            self.fused_plain_s = per_step
        else:
            per_step = min(per_step, self.max_cost_jump * self.fused_plain_s)
            self.fused_plain_s = (1 - self.smoothing) * self.fused_plain_s + self.smoothing * per_step

    def choose(self, node_probs: Sequence[np.ndarray], num_active: int) -> int:
        """The bucket T maximizing expected emitted tokens per second for this step.

        The drafting time is already spent (it counts in every option's time);
        whether asking was worth it (the chosen rate against a plain step that
        drafts nothing) feeds ``ask_gain``. A probe step (drafting had been
        paused) verifies the smallest tree instead: cheap, and enough for the
        calibration to recover when the drafter starts to pay.
        """
        longest = max((len(p) for p in node_probs), default=0)
        costs = self.monotone_costs()
        best_t, best_rate = 0, num_active / (costs[0] + self.draft_s)
        for t in costs:
            if t == 0 or (t > longest and t != self._fit(longest)):
                continue
            tokens = num_active + self.calibration * expected_accepted(node_probs, t)
            rate = tokens / (costs[t] + self.draft_s)
            if rate > max(best_rate, self.min_gain * num_active / (costs[0] + self.draft_s)):
                best_t, best_rate = t, rate
        # Asking pays only against plain decoding at its fastest: fused plain steps, once measured.
        plain_s = costs[0] if self.fused_plain_s is None else min(costs[0], self.fused_plain_s)
        gain = best_rate * plain_s / max(num_active, 1)
        probe = self._probing or self.paused
        self.ask_gain = gain if probe else (1 - self.smoothing) * self.ask_gain + self.smoothing * gain
        if longest and probe:
            return self.buckets[1]
        return best_t

    def record_drafting(self, seconds: float) -> None:
        """Fold one drafted step's host drafting time into the cost model."""
        a = self.smoothing
        self.draft_s = seconds if self.draft_s == 0.0 else (1 - a) * self.draft_s + a * seconds

    def monotone_costs(self) -> dict[int, float]:
        """Costs made non-decreasing in T: a bigger tree never costs less, whatever timing noise says.
        The buckets a choice may consider: the measured ones up to the frontier, which it ends with."""
        return _costs_to_frontier(self.costs, self.buckets)

    def _fit(self, n: int) -> int:
        """The smallest bucket holding n nodes (the largest bucket if none does)."""
        return next((t for t in self.buckets if t >= n), self.buckets[-1])

    def record(self, capacity: int, seconds: float, predicted: float, accepted: int) -> None:
        """Fold one step's measured cost and acceptance into the running estimates.

        A stalled step (a compilation, the host pre-empted) counts as at most
        ``max_cost_jump`` times the current estimate: one outlier must not make a
        bucket look so expensive that it is never chosen, and so never re-measured.
        """
        self.history.append(capacity)
        a = self.smoothing
        if capacity not in self.costs:  # a frontier nobody measured: its first timing is its cost
            self.costs[capacity] = seconds
        else:
            seconds = min(seconds, self.max_cost_jump * self.costs[capacity])
            self.costs[capacity] = (1 - a) * self.costs[capacity] + a * seconds
        if predicted > 0:
            self.calibration = (1 - a) * self.calibration + a * min(accepted / predicted, 2.0)
        gained = capacity > 0 and accepted > 0
        if self._probing:  # back off after a probe that gained nothing (proposing nothing included)
            self._probing = False
            self.probe_every = (CapacityPolicy.probe_every if gained
                                else min(2 * self.probe_every, self.max_probe_every))
        self.idle_steps = 0 if gained else self.idle_steps + 1


def _costs_to_frontier(costs: dict[int, float], buckets: Sequence[int]) -> dict[int, float]:
    """Non-decreasing costs of the measured buckets up to the first unmeasured one (the frontier),
    which gets the cost of the largest measured bucket below it: a lower bound for it."""
    out, running = {}, 0.0
    for t in buckets:
        running = max(running, costs.get(t, running))
        out[t] = running
        if t not in costs:
            break
    return out


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


@dataclasses.dataclass
class ChunkPolicy:
    """The on-device loop's T per host sync: one chunk of fused steps runs one bucket's program.

    ``costs[T]`` are seconds per fused step of bucket T's program at this batch
    bucket, the drafter's own work included (its proposal and update in a
    speculative step, its update on the emitted token in a plain one), timed on
    the chunks the loop runs: plain steps and the smallest tree run first (the
    smallest tree's chunk brings claims for every size), larger buckets once the
    choice reaches them as the frontier (see the module docstring); the loop
    compiles each bucket's program just before its first chunk. ``claimed[T]``
    is the drafter's own estimate of accepted
    tokens per row and step if the best T nodes were verified (their path
    probabilities, from the last speculative chunk), and ``calibration`` is
    accepted / claimed at the chunks' T. A chunk goes to the T maximizing
    expected tokens per second, speculating only for a clear win
    (``min_gain``); the frontier competes only once the largest measured tree
    has paid in accepted tokens (``observed``), so how far a drafter that is
    never right grows does not depend on timing noise. After a plain choice it
    runs plain chunks, then probes the smallest tree to refresh the claims;
    each probe that still finds plain best doubles the wait (up to
    ``max_probe_every`` chunks), and the wait is never so short that probes
    would cost more than ``probe_share`` of the plain chunks' time (a drafter
    whose smallest tree costs ten plain steps, like a deep draft-model tree,
    is probed rarely). A lazy drafter's prefill (the draft model reads a
    batch's prompts before its first tree, ``setup_per_step``) counts in the
    probes' spacing and, until the batch's first tree, in every tree's cost:
    the first tree of a batch must pay for it within its chunk, so a tree that
    gains a few percent never starts one. A drafter whose one-node draft is free to look at
    (``first_guess``: Token Recycling's table) is never probed: each plain
    chunk reports how often that draft was the emitted token (``shadow``, T =
    1's acceptance measured without verifying, smoothed over chunks weighed by
    their row-steps), and the next chunk leaves plain steps for the smallest
    tree as soon as that acceptance pays for it; each batch starts with a
    plain chunk (its own guesses, not the last batch's long tail rows).
    """

    costs: dict[int, float]
    buckets: tuple[int, ...]
    claimed: dict[int, float] = dataclasses.field(default_factory=dict)
    observed: dict[int, float] = dataclasses.field(default_factory=dict)  # accepted per row-step, last chunk at T
    calibration: float = 1.0
    smoothing: float = 0.3
    min_gain: float = 1.05
    probe_every: int = 2  # plain chunks after a plain choice before the next probe ...
    max_probe_every: int = 16  # ... doubling after each probe that still finds plain best, up to this
    probe_share: float = 0.05  # ... or more: probes' extra time at most this share of the plain chunks'
    max_cost_jump: float = 2.0  # one chunk's step time counts as at most this many times the estimate
    history: list = dataclasses.field(default_factory=list)  # (T, fused steps) per chunk, in order
    shadow: Optional[float] = None  # first guesses right per plain row-step, smoothed (drafters with ``first_guess``)
    warmed: set = dataclasses.field(default_factory=set)  # buckets whose first (untimed) chunk has run
    setup_per_step: float = 0.0  # a lazy drafter's prefill before a batch's first tree, per step of its chunk
    # cost per step over a plain step's, of trees measured only at a bigger batch (``continue_batch``)
    prior: dict[int, float] = dataclasses.field(default_factory=dict)
    _plain_left: int = 0
    _probe_next: bool = False
    _batch_start: bool = False
    _setup_pending: bool = False

    def start_batch(self) -> None:
        """A new batch begins: a drafter with first guesses starts it with plain steps, and a lazy
        drafter has yet to read its prompts (a tree must pay for that prefill within its chunk)."""
        self._batch_start, self._setup_pending = True, self.setup_per_step > 0

    def continue_batch(self, other: "ChunkPolicy") -> None:
        """The batch ``other`` was choosing for goes on with fewer rows (the device loop shrinks it):
        what ``other`` learned of its drafts (claims, acceptance, calibration, first guesses,
        whether a lazy drafter's prefill is still due) and its probe schedule carry over; the
        step costs are this row count's own."""
        self.claimed, self.observed = dict(other.claimed), dict(other.observed)
        self.calibration, self.shadow = other.calibration, other.shadow
        self._batch_start, self._setup_pending = False, other._setup_pending
        # the probes go on as scheduled: each row count backing off afresh would probe far more often
        self.probe_every, self._plain_left, self._probe_next = other.probe_every, other._plain_left, other._probe_next
        self.setup_per_step = self.setup_per_step or other.setup_per_step
        known = other.estimated_costs()
        if 0 in known:  # a tree's cost over plain's, taken as is: it is smaller at fewer rows, if anything
            self.prior = {t: c / known[0] for t, c in known.items() if t > 0}

    def estimated_costs(self) -> dict[int, float]:
        """Cost per step of each bucket known here, in bucket order: measured, or for a tree measured
        only at a bigger batch, its cost ratio there (``prior``) times this batch's plain step. A
        shrunk batch then tries a tree only where the bigger batch's costs say it could pay, instead
        of timing every size again while its few rows finish."""
        plain = self.costs.get(0)
        return {t: self.costs[t] if t in self.costs else plain * self.prior[t] for t in self.buckets
                if t in self.costs or (plain is not None and t in self.prior)}

    def unmeasured(self) -> list[int]:
        return [t for t in self.buckets if t not in self.costs]

    def choose(self) -> int:
        """T for the next chunk (0 = plain steps)."""
        first = [t for t in self.buckets[:2] if t not in self.costs and t not in self.prior]
        if first:
            return first[0]
        if self._plain_left > 0:
            self._plain_left -= 1
            return 0
        if self._probe_next:
            self._probe_next = False
            return self.buckets[1]
        if self.shadow is not None and self._batch_start:  # a new batch's own guesses first: the last
            self._batch_start = False  # batch's tail (a few long rows) says little about its head
            return 0
        if self.shadow is not None and self.history[-1][0] == 0:
            return self._shadow_choice()
        best = self.best_bucket()
        if best == 0 and self.shadow is None:
            self._plain_left, self._probe_next = max(self.probe_every, self._affordable_wait()) - 1, True
            self.probe_every = min(2 * self.probe_every, self.max_probe_every)
        elif best > 0:
            self.probe_every = ChunkPolicy.probe_every
        return best

    def _shadow_choice(self) -> int:
        """After a plain chunk of a drafter with first guesses: the smallest tree if the acceptance
        those guesses showed pays for its cost, else plain steps again."""
        smallest, costs = self.buckets[1], _costs_to_frontier(self.estimated_costs(), self.buckets)  # >= plain
        pays = (1.0 + self.shadow) / costs[smallest] > self.min_gain / costs[0]
        return smallest if pays else 0

    def _affordable_wait(self) -> int:
        """Plain chunks per probe for the probes' extra time to stay within ``probe_share`` of theirs
        (a probe runs as many fused steps as a plain chunk, and may first pay a lazy drafter's prefill)."""
        costs = self.estimated_costs()
        extra = costs[self.buckets[1]] - costs[0] + self.setup_per_step
        return math.ceil(extra / (self.probe_share * costs[0]))

    def best_bucket(self) -> int:
        """The bucket with the most expected tokens per second (per active row: the batch's rows
        step together, so row counts cancel), among the measured ones and the frontier."""
        known = self.estimated_costs()
        costs = _costs_to_frontier(known, self.buckets)  # a bigger tree never costs less
        if len(known) < len(self.buckets) and not self._frontier_earned(costs):
            costs.pop(max(costs))
        best_t, best_rate = 0, self.min_gain / costs[0]
        setup = self.setup_per_step if self._setup_pending else 0.0  # its first chunk pays the prefill
        for t in list(costs)[1:]:
            rate = (1.0 + self.calibration * self.claimed.get(t, 0.0)) / (costs[t] + setup)
            if rate > best_rate:
                best_t, best_rate = t, rate
        return best_t

    def _frontier_earned(self, costs: dict[int, float]) -> bool:
        """Whether the largest measured tree beat a plain step by ``min_gain`` in measured tokens."""
        top = max((t for t in costs if t in self.costs and t > 0), default=None)
        if top is None:
            return False
        return (1.0 + self.observed.get(top, 0.0)) / costs[top] > self.min_gain / costs[0]

    def record(self, capacity: int, seconds: float, steps: int, row_steps: int, claimed: Sequence[float],
               accepted: int, shadow: Optional[tuple[int, int]] = None, setup_s: float = 0.0) -> None:
        """Fold one chunk into the estimates: its time over ``steps`` fused steps and, for a
        speculative chunk, the drafter's claims per bucket (``claimed[i]`` for ``buckets[i]``,
        summed over ``row_steps`` active row-steps) and the draft tokens accepted; for a plain
        chunk, ``shadow``: (first guesses that were the emitted token, row-steps guessed).
        ``setup_s``: the drafter's prefill the chunk needed first (a lazy drafter's, before a
        batch's first tree), which spaces the probes further."""
        self.history.append((capacity, steps))
        if setup_s > 0 and steps > 0:
            self.setup_per_step = setup_s / steps
        if capacity > 0:
            self._setup_pending = False
        if shadow is not None and shadow[1] > 0:  # first guesses stand in for probes from now on
            self._plain_left, self._probe_next = 0, False
            rate = shadow[0] / shadow[1]  # weighted as shadow[1] / 8 chunks of one row: one lucky chunk
            a = 1 - (1 - self.smoothing) ** (shadow[1] / 8)  # of a single row does not switch alone
            self.shadow = rate if self.shadow is None else (1 - a) * self.shadow + a * rate
        if steps <= 0:
            return
        per_step = seconds / steps
        if capacity not in self.warmed:  # a program's first run pays one-time costs (a CPU's kernels
            self.warmed.add(capacity)  # set up on first call: 2-4x a step): its second chunk is timed
        elif capacity not in self.costs:
            self.costs[capacity] = per_step
        else:  # timing noise on a shared host only adds time: follow drops fast, rises slowly
            per_step = min(per_step, self.max_cost_jump * self.costs[capacity])
            a = self.smoothing if per_step < self.costs[capacity] else self.smoothing / 3
            self.costs[capacity] = (1 - a) * self.costs[capacity] + a * per_step
        if capacity == 0 or row_steps <= 0:
            return
        self.claimed = {t: float(c) / row_steps for t, c in zip(self.buckets, claimed)}
        self.observed[capacity] = accepted / row_steps
        predicted = self.claimed.get(capacity, 0.0) * row_steps
        if predicted > 0:  # weighted as ``steps`` of the host policy's per-step updates
            a = 1 - (1 - self.smoothing) ** steps
            self.calibration = (1 - a) * self.calibration + a * min(accepted / predicted, 2.0)
