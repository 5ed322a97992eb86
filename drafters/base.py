"""The contract between the engine and host-side drafters.

A host drafter keeps its own view of each active request's context (prompt plus
every token accepted so far) and proposes a tree for it on demand. The engine
calls, per request: ``start_request`` once, then per step ``propose`` and
``observe`` (with the accepted draft tokens and the bonus token), then
``stop_request`` once the request is finished. Drafters that learn across
requests (the suffix index) keep what they need on ``stop_request``.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Protocol, Sequence

import numpy as np


@dataclasses.dataclass
class Proposal:
    """One request's draft tree, unpadded: parents[i] < i, -1 = child of the context's end.

    ``probs[i]`` is the drafter's estimate of node i's probability given its path
    (used for ranking, pruning and routing). ``score`` is the drafter's total
    expected number of accepted tokens; ``match_len`` how much context matched.
    """

    tokens: np.ndarray
    parents: np.ndarray
    probs: np.ndarray
    score: float = 0.0
    match_len: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def empty(cls) -> "Proposal":
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32))


class HostDrafter(Protocol):
    """A drafter that runs on the host (numpy / Python), between device steps."""

    def start_request(self, request_id: Hashable, prompt_ids: Sequence[int]) -> None: ...

    def propose(self, request_id: Hashable, max_tokens: int) -> Proposal:
        """A tree of at most ``max_tokens`` nodes continuing the request's context."""
        ...

    def observe(self, request_id: Hashable, accepted_ids: Sequence[int]) -> None:
        """Append tokens the target accepted (draft tokens plus the bonus token)."""
        ...

    def stop_request(self, request_id: Hashable) -> None: ...
