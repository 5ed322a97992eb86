"""The contract between the engine and host-side drafters.

A host drafter keeps its own view of each active request's context (prompt plus
every token accepted so far) and proposes a tree for it on demand. The engine
calls, per request: ``start_request`` once, then per step ``propose`` and
``observe`` (with the accepted draft tokens and the bonus token), then
``stop_request`` once the request is finished. Drafters that learn across
requests (the suffix index) keep what they need on ``stop_request``.

The engine checks every proposal (``check_proposals``) before it reaches the
device: a malformed one raises ``InvalidProposal`` naming the drafter and the
field, instead of being padded, cut or cast into some other tree.
"""

from __future__ import annotations

import abc
import dataclasses
import weakref
from typing import Hashable, Optional, Sequence

import numpy as np

HOST_DRAFTER_METHODS = ("start_request", "propose", "observe", "stop_request")


@dataclasses.dataclass
class Proposal:
    """One request's draft tree, unpadded, in an order where every parent comes before its children.

    - ``tokens``: 1-D integer array of token ids in ``[0, vocab_size)``.
    - ``parents``: 1-D integer array, same length: ``parents[i]`` is the index of node i's
      parent, ``-1 <= parents[i] < i``; -1 = a child of the context's last token.
    - ``probs``: 1-D float array, same length, in [0, 1]: the drafter's estimate of the
      probability that the target's continuation starts with node i's whole path (node i
      and all its ancestors). It is a path probability, not a per-edge one, so it never
      rises from parent to child (``probs[i] <= probs[parents[i]]``), and its sum over
      the first T nodes is the expected number of accepted draft tokens: the auto tree
      size (``engine.autotune.expected_accepted``) and hybrid ranking read it that way.

    The engine asks for at most ``max_tokens`` nodes; when it verifies fewer, it keeps the
    first ones, so order nodes best first. ``score`` is the drafter's total expected
    number of accepted tokens; ``match_len`` how much context matched.
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


class InvalidProposal(TypeError, ValueError):
    """A drafter's ``propose`` broke the ``Proposal`` contract (a wrong type or a wrong value)."""


class DrafterAlreadyAttached(ValueError):
    """A host drafter that learns across requests was given to a second Engine."""


class HostDrafter(abc.ABC):
    """A drafter that runs on the host (numpy / Python), between device steps.

    Subclasses implement ``propose``; ``start_request``, ``observe`` and
    ``stop_request`` default to doing nothing (a drafter that keeps no context).

    One drafter, one Engine: a drafter whose state outlives its requests
    (``learns_across_requests``, True unless a subclass says otherwise, as the
    suffix index's global index of finished responses) is bound to the first
    Engine it is given to. Giving it to a second Engine raises
    ``DrafterAlreadyAttached``: the second engine would start with what the
    first one taught it, so its runs would look better than a fresh drafter's.
    Give each Engine a new instance (same settings, empty state), or pass
    ``Engine(..., share_drafter_state=True)`` to share the state on purpose.
    Drafters whose state is per request only (prompt lookup) set
    ``learns_across_requests = False`` and may serve several engines in turn.
    Objects that only have the four methods, without subclassing, still run,
    but without this check.
    """

    learns_across_requests: bool = True

    def start_request(self, request_id: Hashable, prompt_ids: Sequence[int]) -> None:
        """A new request with this prompt; its tokens follow through ``observe``."""

    @abc.abstractmethod
    def propose(self, request_id: Hashable, max_tokens: int) -> Proposal:
        """A tree of at most ``max_tokens`` nodes continuing the request's context (see ``Proposal``)."""

    def observe(self, request_id: Hashable, accepted_ids: Sequence[int]) -> None:
        """Append tokens the target accepted (draft tokens plus the bonus token)."""

    def stop_request(self, request_id: Hashable) -> None:
        """The request is finished: drop its context (or learn from it)."""

    def attach(self, engine: object, *, share_state: bool = False) -> None:
        """Bind this drafter to ``engine``; refuse a second engine unless sharing is explicit (see above)."""
        owner: Optional[weakref.ref] = getattr(self, "_attached_engine", None)
        if owner is None or not self.learns_across_requests:
            self._attached_engine = weakref.ref(engine)
            return
        if owner() is engine or share_state:
            return
        name = type(self).__name__
        raise DrafterAlreadyAttached(
            f"this {name} was already given to another Engine and learns across requests, so its state "
            f"would carry over into this one (the second engine's runs would look better than a fresh "
            f"drafter's). Give each Engine a fresh {name}(...) with the same settings, or pass "
            f"Engine(..., share_drafter_state=True) to share its state on purpose")


def attach_host_drafter(drafter: object, engine: object, *, share_state: bool = False) -> None:
    """Check that ``drafter`` has the host drafter methods, and bind it to ``engine`` (``HostDrafter.attach``)."""
    missing = [m for m in HOST_DRAFTER_METHODS if not callable(getattr(drafter, m, None))]
    if missing:
        raise TypeError(f"the Engine's drafter must be a HostDrafter (subclass specjax.drafters.base.HostDrafter), "
                        f"a DeviceDrafter or None; {type(drafter).__name__} lacks {', '.join(missing)}")
    if isinstance(drafter, HostDrafter):
        drafter.attach(engine, share_state=share_state)


def check_proposals(proposals: Sequence[object], drafter: object, max_tokens: int, vocab_size: int) -> None:
    """Raise ``InvalidProposal`` unless every one of a step's ``drafter.propose(rid, max_tokens)`` results
    keeps the ``Proposal`` contract.

    The types and sizes are checked per proposal; the values in a few vector operations over all of
    them at once, so checking stays small next to drafting. Only when those find a problem is each
    proposal checked alone, for a message naming the drafter, the field and the node.
    """
    for proposal in proposals:
        _check_structure(proposal, drafter, max_tokens)
    if not any(len(p.tokens) for p in proposals):
        return
    tokens = np.concatenate([p.tokens for p in proposals])
    parents = np.concatenate([p.parents for p in proposals])
    probs = np.concatenate([p.probs for p in proposals])
    upto = np.arange(max_tokens)
    local = np.concatenate([upto[: len(p.tokens)] for p in proposals])  # each node's index in its proposal
    if (tokens.min() >= 0 and tokens.max() < vocab_size and parents.min() >= -1 and (local - parents).min() > 0
            and probs.min() >= 0 and probs.max() <= 1  # (NaN fails these)
            and (np.where(parents >= 0, probs[parents + (np.arange(len(local)) - local)], 1) - probs).min() >= 0):
        return
    for proposal in proposals:
        _check_values(proposal, drafter, vocab_size)
    raise AssertionError(f"check_proposals rejected {type(drafter).__name__}'s step, but no single proposal")


def _refuse(drafter: object, problem: str) -> None:
    raise InvalidProposal(f"{type(drafter).__name__}.propose returned {problem}")


def _check_structure(proposal: object, drafter: object, max_tokens: int) -> None:
    """Return type, array types, dtypes, ranks, lengths and the node budget."""
    if proposal is None:
        _refuse(drafter, "None, not a Proposal (return Proposal.empty() to draft nothing)")
    if not isinstance(proposal, Proposal):
        _refuse(drafter, f"a {type(proposal).__name__}, not a Proposal")
    for field, kinds, what in (("tokens", "iu", "integer"), ("parents", "i", "signed integer"),
                               ("probs", "f", "float")):
        value = getattr(proposal, field)
        if not isinstance(value, np.ndarray):
            _refuse(drafter, f"{field} as a {type(value).__name__}, not a numpy array")
        if value.ndim != 1:
            _refuse(drafter, f"{field} of shape {value.shape}, not 1-D")
        if value.dtype.kind not in kinds:
            _refuse(drafter, f"{field} of dtype {value.dtype}, not {what}")
    n = len(proposal.tokens)
    for field in ("parents", "probs"):
        if len(getattr(proposal, field)) != n:
            _refuse(drafter, f"{field} of length {len(getattr(proposal, field))} for {n} tokens")
    if n > max_tokens:
        _refuse(drafter, f"{n} nodes, more than the max_tokens={max_tokens} it was asked for")


def _check_values(proposal: Proposal, drafter: object, vocab_size: int) -> None:
    """The value rules, one proposal at a time, naming the first node that breaks one."""
    tokens, parents, probs = proposal.tokens, proposal.parents, proposal.probs
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if len(bad):
        _refuse(drafter, f"tokens[{bad[0]}] = {tokens[bad[0]]}, outside the vocabulary [0, {vocab_size})")
    bad = np.flatnonzero((parents < -1) | (parents >= np.arange(len(parents))))
    if len(bad):
        _refuse(drafter, f"parents[{bad[0]}] = {parents[bad[0]]}: need -1 <= parents[i] < i")
    bad = np.flatnonzero(~((probs >= 0) & (probs <= 1)))
    if len(bad):
        _refuse(drafter, f"probs[{bad[0]}] = {probs[bad[0]]}, not a probability in [0, 1]")
    bad = np.flatnonzero((parents >= 0) & (probs > probs[parents]))
    if len(bad):
        i = bad[0]
        _refuse(drafter, f"probs[{i}] = {probs[i]} above its parent's probs[{parents[i]}] = {probs[parents[i]]}: "
                         "probs are path probabilities, so they never rise from parent to child")
