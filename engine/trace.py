"""Per-pass traces of a generation (``GenerationResult.trace``) and what they add up to.

The loops record them on the host from values they read back anyway (the step's
``Accepted`` counts, the tree size chosen, their own timers): tracing adds no
device sync.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class TraceStep:
    """One target pass of one request after prefill.

    ``drafted``: the request's draft nodes in the verified tree. The host loop counts the
    proposal's nodes within T; the on-device loop reads no tree back and reports T, the tree's
    slots (a drafter may leave some empty). ``draft_s``: host drafting time, this request's share
    of the step's (0 on the device, where drafting is part of the step). ``step_s``: the device
    step's time: in the host loop from dispatch to the results being ready; in the on-device loop
    its chunk's time divided by the chunk's steps (an average: steps of one chunk are not timed
    apart), the drafter's proposal and update included.
    """

    capacity: int  # T, the tree size verified (0: a plain step)
    drafted: int
    accepted: int  # draft tokens accepted
    emitted: int  # tokens emitted: accepted + the bonus token, fewer at EOS or the budget's end
    draft_s: float
    step_s: float


def speculative_passes(results: Sequence) -> list[TraceStep]:
    """The passes of ``results``' traces that verified at least one draft node."""
    return [s for r in results for s in r.trace if s.capacity > 0 and s.drafted > 0]


def acceptance_by_depth(results: Sequence) -> np.ndarray:
    """float64[D]: entry d - 1 is the share of speculative passes that accepted at least d draft tokens.

    D is the largest tree size among them (empty without one). Entry d - 1 over entry d - 2 is the
    acceptance rate at depth d given depth d - 1 (its conditional form); the sum of the entries is
    the mean accepted length per speculative pass.
    """
    passes = speculative_passes(results)
    if not passes:
        return np.zeros(0)
    accepted = np.array([s.accepted for s in passes])
    depths = np.arange(1, max(s.capacity for s in passes) + 1)
    return (accepted[None, :] >= depths[:, None]).mean(axis=1)


def passes_by_tree_size(results: Sequence) -> dict[int, int]:
    """Passes of ``results``' traces per tree size T verified (0: plain steps), sizes in order."""
    counts = collections.Counter(s.capacity for r in results for s in r.trace)
    return dict(sorted(counts.items()))
