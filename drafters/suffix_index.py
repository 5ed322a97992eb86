"""SuffixDecoding on the host: suffix indexes over token sequences and adaptive drafts.

A *global* index holds the responses of finished requests; each active request
has a *local* index over its prompt and its output so far. To draft, every
suffix of the context (up to ``max_depth`` tokens) that occurs in an index is a
candidate; a candidate matching ``m`` tokens may draft up to
``max_spec_factor * m + max_spec_offset`` tokens (at most ``max_spec_tokens``),
grown best-first by estimated probability: the count of the continued pattern
over the count of the pattern, multiplied down the path, dropping nodes below
``min_token_prob``. The candidate with the highest score (sum of the drafted
probabilities) wins; ties go to the longer match, then to the local index.
This is the speculation rule of SuffixDecoding (Oliaro et al., 2024) as
ArcticInference implements it, with these deliberate differences:

- a request's output joins the global index when it finishes; in flight it is
  served by its local index (ArcticInference adds it to both as it grows, so
  its own occurrences also dilute the global probabilities);
- a match may use all ``max_depth`` tokens (there: ``max_depth - 1``), and a
  draft is limited by its budget only (there: by the tree depth too, so a
  match of m tokens drafts at most ``max_depth - m``);
- among equally frequent continuations the most recent wins, and among equally
  likely tree nodes the most recently reached is expanded first.

Each index is a suffix automaton (``specjax.drafters.suffix_reference``, which
says why), with counts exact for patterns of up to ``max_depth +
max_spec_tokens`` tokens, the longest a draft can inspect. Evicted responses
are subtracted from the counts and the automaton is rebuilt from the remaining
responses once they are outnumbered, which bounds memory at about twice the
live index.

The global index changes only when a request finishes or a response is
evicted, so each request keeps an incremental match of its context against it
(amortized O(1) per token) and re-matches only after such a change.

Budgeted mode (``budgeted=True``; the drafter's ``budget_mode``): verifying B
tree nodes costs a TPU/GPU about one decode step, so instead of one candidate
capped by its match length, every candidate of every source (the local index,
the global one, and the local indexes of other requests in flight) adds its
continuations to ONE tree, filled best-first up to B nodes (``draft_merged``).
Count ratios alone over-trust short and rare matches, so each node is ranked
by a calibrated estimate (``NodeCalibration``): per kind of node (source,
matched length, pattern count, ratio), the observed rate at which such nodes
were accepted once their parent was, learned online from what the target
accepts. ``min_token_prob`` still cuts by the plain ratio product.

Compiled core: ``specjax.drafters._suffix_core`` (``csrc/suffix_core.cpp``,
built by ``pip install -e .``) ports the automaton and the draft builders line
by line; an index uses it when it is built, unless ``SPECJAX_SUFFIX_CORE=python``
selects the pure-Python code (``suffix_reference`` and ``SuffixIndex``'s own
draft loops), which stays the reference the compiled drafts are tested against
(bit-identical trees and probabilities). Where the core is not built the
reference serves, unless ``SPECJAX_REQUIRE_SUFFIX_CORE=1`` (set in CI, see
setup.py), which makes importing this module fail instead.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import operator
import os
from array import array
from typing import Hashable, Iterable, NamedTuple, Optional, Sequence, Union

import numpy as np

from specjax.drafters.base import HostDrafter, Proposal
from specjax.drafters.suffix_reference import (NO_EDGE, ROOT, SOURCE_GLOBAL, SOURCE_LOCAL, SOURCE_SHARED,
                                               TIE_TOLERANCE, Draft, NodeCalibration, SuffixAutomaton,
                                               draft_merged)

try:
    from specjax.drafters import _suffix_core
except ImportError as err:  # not built (no C++ compiler at install time): the pure-Python reference serves
    if os.environ.get("SPECJAX_REQUIRE_SUFFIX_CORE") == "1":
        raise ImportError("SPECJAX_REQUIRE_SUFFIX_CORE=1, but the compiled suffix core "
                          f"specjax.drafters._suffix_core does not import ({err}): reinstall with "
                          "`pip install -e .` where a C++ compiler is available") from err
    _suffix_core = None

_MAX_TOKEN_ID = 2**31 - 1  # ids are stored as int32


def token_list(tokens: Iterable[int] | np.ndarray, what: str = "token ids") -> list[int]:
    """Tokens as a list of Python ints; raises ValueError for negative or non-integer ids."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{what} must be a 1-D integer array, got {tokens.dtype} with shape {tokens.shape}")
        out = tokens.tolist()
    else:
        try:
            out = [operator.index(t) for t in tokens]
        except TypeError as err:
            raise ValueError(f"{what} must be integers ({err})") from None
    if out and min(out) < 0:
        raise ValueError(f"{what} must be non-negative, got {min(out)}")
    if out and max(out) > _MAX_TOKEN_ID:
        raise ValueError(f"{what} must be below 2**31, got {max(out)}")
    return out


def compiled_core_enabled() -> bool:
    """Whether new indexes use the compiled core: per ``SPECJAX_SUFFIX_CORE`` (auto, python, compiled)."""
    choice = os.environ.get("SPECJAX_SUFFIX_CORE", "auto")
    if choice not in ("auto", "python", "compiled"):
        raise ValueError(f"SPECJAX_SUFFIX_CORE must be auto, python or compiled, got {choice!r}")
    if choice == "compiled" and _suffix_core is None:
        raise ImportError("SPECJAX_SUFFIX_CORE=compiled, but specjax.drafters._suffix_core is not built "
                          "(reinstall with `pip install -e .` where a C++ compiler is available)")
    return choice != "python" and _suffix_core is not None


class _PackedDraft(NamedTuple):
    """A draft from the compiled core: native int32, int32, float64 and float32 buffers instead of lists.

    The engine wants arrays: wrapping buffers skips the per-element conversion of
    ``np.asarray(list)``, which cost more than the compiled draft itself.
    """

    tokens: bytearray
    parents: bytearray
    probs: bytearray
    probs32: bytearray  # probs rounded to float32, as np.asarray(probs, np.float32) rounds them
    score: float
    match_len: int

    def to_proposal(self) -> Proposal:
        return Proposal(np.frombuffer(self.tokens, np.int32), np.frombuffer(self.parents, np.int32),
                        np.frombuffer(self.probs32, np.float32), score=self.score, match_len=self.match_len)

    def to_draft(self) -> Draft:
        return Draft(np.frombuffer(self.tokens, np.int32).tolist(), np.frombuffer(self.parents, np.int32).tolist(),
                     np.frombuffer(self.probs, np.float64).tolist(), self.score, self.match_len)



@dataclasses.dataclass(frozen=True)
class SpecParams:
    """How much to draft: the SuffixDecoding budget and pruning rule."""

    max_spec_tokens: int
    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1
    tree: bool = False

    def __post_init__(self):
        if self.max_spec_tokens < 1:
            raise ValueError(f"max_spec_tokens must be >= 1, got {self.max_spec_tokens}")
        if not (math.isfinite(self.max_spec_factor) and self.max_spec_factor >= 0):
            raise ValueError(f"max_spec_factor must be a finite number >= 0, got {self.max_spec_factor}")
        if not math.isfinite(self.max_spec_offset):
            raise ValueError(f"max_spec_offset must be finite, got {self.max_spec_offset}")
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {self.min_token_prob}")

    def budget(self, match_len: int, max_tokens: int) -> int:
        """Draft size allowed for a match of ``match_len`` tokens (the 1e-6 guards float truncation).

        The float is compared with the cap before ``int()``: a huge factor may make it infinite.
        """
        cap = min(self.max_spec_tokens, max_tokens)
        allowed = match_len * self.max_spec_factor + self.max_spec_offset + 1e-6
        return max(0, cap if allowed >= cap else int(allowed))


@dataclasses.dataclass
class _ActiveRequest:
    """One request's local index and its incremental match against the global index."""

    local: SuffixAutomaton
    tail: collections.deque  # the last max_depth context tokens, to re-match after global changes
    response: list[int]
    global_state: int = ROOT
    global_matched: int = 0
    global_version: int = -1
    # Budgeted mode: the last draft (tokens, parents, calibration groups) and the tokens accepted after it.
    # The calibration learns from them at the next speculation, so an update stays an index update.
    last_draft: Optional[tuple] = None
    outcome: Optional[list[int]] = None
    # Budgeted mode: id(other request) -> (other, state, matched, own clock): matches in requests in flight.
    shared_matches: dict = dataclasses.field(default_factory=dict)

    def learn_from_last_draft(self, calibration: "NodeCalibration") -> None:
        if self.last_draft is not None and self.outcome is not None:
            tokens, parents, keys = self.last_draft
            if not isinstance(tokens, bytearray):
                calibration.learn(tokens, parents, keys, self.outcome)
            elif type(calibration.stats) is dict:  # a draft of the compiled core: its own learn, same dict
                _suffix_core.learn(calibration.stats, tokens, parents, keys, self.outcome)
            else:  # statistics of another kind (a test's): read by the reference
                calibration.learn(np.frombuffer(tokens, np.int32).tolist(), np.frombuffer(parents, np.int32).tolist(),
                                  np.frombuffer(keys, np.int64).tolist(), self.outcome)
        self.last_draft = self.outcome = None


class SuffixIndex:
    """The global index of finished responses plus one local index per active request.

    Args:
      spec: the draft budget and pruning rule.
      max_depth: longest context suffix matched (the pattern length).
      max_cached_requests: responses kept in the global index; the oldest is
        evicted first (FIFO). None keeps all; 0 disables the global index.
      budgeted: fill the whole ``max_tokens`` of each speculation with one tree
        over both indexes and every matched suffix (``draft_merged``), each
        candidate weighted by its ``NodeCalibration``, instead of the
        SuffixDecoding rule (one candidate, size capped by its match length).
      max_shared_requests: budgeted mode only: how many other active requests
        (the most recently started) a request also drafts from, in flight.
        Each is a candidate source of its own (its prompt and output so far),
        so a request's own occurrences never dilute what the others offer.
      compiled: use the compiled core (same drafts, faster); None decides by
        ``compiled_core_enabled()``, False runs the pure-Python reference.
    """

    def __init__(self, spec: SpecParams, max_depth: int = 64, max_cached_requests: Optional[int] = None,
                 budgeted: bool = False, max_shared_requests: int = 8, compiled: Optional[bool] = None):
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        if max_cached_requests is not None and max_cached_requests < 0:
            raise ValueError(f"max_cached_requests must be >= 0 or None, got {max_cached_requests}")
        if max_shared_requests < 0:
            raise ValueError(f"max_shared_requests must be >= 0, got {max_shared_requests}")
        if compiled is None:
            compiled = compiled_core_enabled()
        elif compiled and _suffix_core is None:
            raise ImportError("compiled=True, but specjax.drafters._suffix_core is not built")
        self.compiled = compiled
        self._new_automaton = _suffix_core.SuffixAutomaton if compiled else SuffixAutomaton
        self.spec = spec
        self.max_depth = max_depth
        self.max_cached_requests = max_cached_requests
        self._count_depth = max_depth + spec.max_spec_tokens
        self._global = self._new_automaton(self._count_depth)
        self._version = 0
        self._cached: collections.deque[array] = collections.deque()
        self._cached_tokens = 0
        self._evicted_tokens = 0  # still inside the automaton until the next rebuild
        self._active: dict[Hashable, _ActiveRequest] = {}
        self.budgeted = budgeted
        self.max_shared_requests = max_shared_requests
        self.calibration = NodeCalibration()

    @property
    def num_cached_requests(self) -> int:
        return len(self._cached)

    @property
    def num_cached_tokens(self) -> int:
        return self._cached_tokens

    @property
    def native_bytes(self) -> int:
        """Bytes the compiled global index holds outside Python's allocator (tracemalloc misses them)."""
        return self._global.memory_bytes if self.compiled else 0

    @property
    def cached_responses(self) -> list[list[int]]:
        """The responses in the global index, oldest first."""
        return [seq.tolist() for seq in self._cached]

    def global_count(self, pattern: Sequence[int]) -> int:
        """Occurrences of a pattern in the cached responses."""
        return self._global.count_of(token_list(pattern, "pattern"))

    def local_count(self, request_id: Hashable, pattern: Sequence[int]) -> int:
        """Occurrences of a pattern in a request's prompt and output so far."""
        return self._request(request_id).local.count_of(token_list(pattern, "pattern"))

    def start_request(self, request_id: Hashable, prompt_ids: Sequence[int]) -> None:
        if request_id in self._active:
            raise ValueError(f"request {request_id!r} is already active")
        prompt = token_list(prompt_ids, "prompt_ids")
        local = self._new_automaton(self._count_depth)
        local.extend(prompt)
        tail = collections.deque(prompt[-self.max_depth:], maxlen=self.max_depth)
        request = _ActiveRequest(local, tail, [])
        self._active[request_id] = request
        self._global_match(request)  # at admission, like the prompt's own index

    def extend(self, request_id: Hashable, token_ids: Sequence[int]) -> None:
        """Append tokens the target produced to the request's context."""
        request = self._request(request_id)
        tokens = token_list(token_ids)
        request.local.extend(tokens)
        request.tail.extend(tokens)
        request.response.extend(tokens)
        if request.last_draft is not None and request.outcome is None:
            request.outcome = tokens
        if request.global_version == self._version:
            request.global_state, request.global_matched = self._global.advance(
                request.global_state, request.global_matched, tokens, self.max_depth)

    def stop_request(self, request_id: Hashable) -> None:
        """Finish a request: its response joins the global index (evicting the oldest if full)."""
        request = self._active.pop(request_id, None)
        if request is None:
            raise ValueError(f"request {request_id!r} is not active")
        request.learn_from_last_draft(self.calibration)
        self.cache_response(request.response)

    def cache_response(self, response_ids: Sequence[int]) -> None:
        """Add a finished response to the global index (also used to pre-fill it)."""
        if self.max_cached_requests == 0:
            return
        tokens = token_list(response_ids, "response_ids")
        self._global.extend(tokens)
        self._global.end_sequence()
        self._cached.append(array("i", tokens))
        self._cached_tokens += len(tokens)
        self._version += 1
        while self.max_cached_requests is not None and len(self._cached) > self.max_cached_requests:
            self.evict_oldest()

    def evict_oldest(self) -> None:
        """Remove the oldest cached response; rebuild once evicted tokens outnumber live ones."""
        if not self._cached:
            raise ValueError("the global index holds no responses")
        oldest = self._cached.popleft()
        self._cached_tokens -= len(oldest)
        self._evicted_tokens += len(oldest)
        self._version += 1
        if self._evicted_tokens > self._cached_tokens:
            self._rebuild()
        else:
            self._global.remove(oldest)

    def _rebuild(self) -> None:
        self._global = self._new_automaton(self._count_depth)
        for tokens in self._cached:
            self._global.extend(tokens)
            self._global.end_sequence()
        self._evicted_tokens = 0

    def _request(self, request_id: Hashable) -> _ActiveRequest:
        request = self._active.get(request_id)
        if request is None:
            raise ValueError(f"request {request_id!r} is not active")
        return request

    def _global_match(self, request: _ActiveRequest) -> tuple[int, int]:
        """The request's match in the global index, redone from its context tail after the index changed."""
        if request.global_version != self._version:
            state, matched = self._global.match(list(request.tail), self.max_depth)
            request.global_state, request.global_matched = state, matched
            request.global_version = self._version
        return request.global_state, request.global_matched

    def speculate(self, request_id: Hashable, max_tokens: Optional[int] = None) -> Draft:
        """The best-scoring draft over both indexes and every matched suffix length."""
        return self._speculate(request_id, max_tokens).to_draft()

    def propose(self, request_id: Hashable, max_tokens: Optional[int] = None) -> Proposal:
        """``speculate`` as the engine's arrays."""
        return self._speculate(request_id, max_tokens).to_proposal()

    def _speculate(self, request_id: Hashable, max_tokens: Optional[int]) -> Union[Draft, _PackedDraft]:
        request = self._request(request_id)
        limit = self.spec.max_spec_tokens if max_tokens is None else min(max_tokens, self.spec.max_spec_tokens)
        if limit <= 0:
            return Draft.empty()
        if self.budgeted:
            return self._budgeted_draft(request, limit)
        if self.compiled:
            return self._compiled_best_draft(request, limit)
        state, matched = request.local.tail_state(self.max_depth)
        best = self._best_draft(request.local, state, matched, limit, Draft.empty())
        state, matched = self._global_match(request)
        return self._best_draft(self._global, state, matched, limit, best)

    def _budgeted_draft(self, request: _ActiveRequest, budget: int) -> Union[Draft, _PackedDraft]:
        """One tree over every matched suffix of every source; keeps the draft to learn from its outcome."""
        sources = [(SOURCE_LOCAL, request.local, *request.local.tail_state(self.max_depth)),
                   (SOURCE_GLOBAL, self._global, *self._global_match(request))]
        if self.max_shared_requests and len(self._active) > 1:
            sources += self._shared_sources(request)
        request.learn_from_last_draft(self.calibration)
        match_len = max(matched for *_, matched in sources)
        if self.compiled:  # the same candidate walk and draft_merged, compiled
            tokens, parents, probs, probs32, keys, score = _suffix_core.budgeted_draft(
                sources, self.calibration.stats, self.calibration.prior_weight, budget, self.spec.min_token_prob)
            request.last_draft = (tokens, parents, keys)
            return _PackedDraft(tokens, parents, probs, probs32, score, match_len if tokens else 0)
        candidates = []
        for source, automaton, state, matched in sources:
            length, link = automaton.length, automaton.link
            while state > ROOT:
                if automaton.ranked_children(state):
                    candidates.append((automaton, state, source, matched))
                state = link[state]
                matched = length[state]
        draft, keys = draft_merged(candidates, self.calibration, budget, self.spec.min_token_prob)
        request.last_draft = (draft.tokens, draft.parents, keys)
        draft.match_len = match_len if draft.tokens else 0
        return draft

    def _shared_sources(self, request: _ActiveRequest) -> list[tuple[int, SuffixAutomaton, int, int]]:
        """The request's matches in the local indexes of the most recently started other requests.

        Each match is carried over from the last speculation and advanced by
        the tokens added since (a state split in the meantime is undone by
        walking to the state that holds the matched length). This finds the
        same match as matching afresh whenever the other request wrote the
        matched text first, the case where it has a continuation to offer;
        text it writes after this request did is found at the next fresh match.
        """
        tail, clock = request.tail, request.local.clock
        previous, current, sources = request.shared_matches, {}, []
        others = (other for other in reversed(self._active.values()) if other is not request)
        for other in itertools.islice(others, self.max_shared_requests):
            automaton = other.local
            entry = previous.get(id(other))
            if entry is not None and entry[0] is other and clock - entry[3] <= len(tail):
                matched = entry[2]
                state = automaton.suffix_of_length(entry[1], matched) if matched else ROOT
                added = itertools.islice(tail, len(tail) - (clock - entry[3]), None)  # tokens since then
                state, matched = automaton.advance(state, matched, added, self.max_depth)
            else:
                state, matched = automaton.match(list(tail), self.max_depth)
            current[id(other)] = (other, state, matched, clock)
            sources.append((SOURCE_SHARED, automaton, state, matched))
        request.shared_matches = current
        return sources

    def _compiled_best_draft(self, request: _ActiveRequest, limit: int) -> Union[Draft, _PackedDraft]:
        """``_best_draft`` over the local, then the global index, in the compiled core."""
        spec, best = self.spec, Draft.empty()
        for automaton, (state, matched) in ((request.local, request.local.tail_state(self.max_depth)),
                                            (self._global, self._global_match(request))):
            found = _suffix_core.best_draft(automaton, state, matched, limit, spec.max_spec_tokens,
                                            spec.max_spec_factor, spec.max_spec_offset, spec.min_token_prob,
                                            spec.tree, best.score)
            if found is not None:
                best = _PackedDraft(*found)
        return best

    def _best_draft(self, automaton: SuffixAutomaton, state: int, matched: int, limit: int, best: Draft) -> Draft:
        """Keep ``best`` unless a candidate of this index scores strictly higher (longest match first).

        The candidates are the states on the match's suffix-link path: each is one
        distinct occurrence set, tried at its longest length (the largest budget).
        """
        spec = self.spec
        draft = automaton.draft_tree if spec.tree else automaton.draft_chain
        length, link, edge_token = automaton.length, automaton.link, automaton.edge_token
        while state > ROOT:
            budget = spec.budget(matched, limit)
            if budget <= best.score + TIE_TOLERANCE:  # budgets only shrink along the path
                break
            if edge_token[state] != NO_EDGE:  # else nothing ever followed this match
                found = draft(state, budget, spec.min_token_prob, best.score)
                if found is not None:
                    found.match_len = matched
                    best = found
            state = link[state]
            matched = length[state]
        return best


class SuffixDecodingDrafter(HostDrafter):
    """SuffixDecoding as a ``HostDrafter``: one instance serves every request of one engine.

    Its global index learns from every finished request, so an instance belongs to the
    first Engine it is given to (see ``HostDrafter``: a second Engine needs a new instance,
    or ``share_drafter_state=True``). ``probs[i]`` is node i's path probability: the
    product of count ratios down its path (calibrated in budget mode), never rising
    from parent to child.

    Args (keyword options, as ``--drafter suffix`` passes them):
      max_depth: longest context suffix matched (default 64).
      max_spec_tokens: draft size cap (default max_depth); ``propose`` may cap it further.
      max_spec_factor, max_spec_offset: adaptive budget, factor * match_len + offset.
      min_token_prob: drop draft nodes whose estimated probability is lower.
      tree: draft a best-first tree instead of a single path.
      max_cached_requests: finished responses kept (FIFO); None = unbounded, 0 = no global index.
      budget_mode: fill up to ``max_tokens`` nodes per ``propose`` (the engine's verify
        budget) with the most probable continuations from both indexes, every
        matched suffix and the other requests in flight (see ``SuffixIndex``); the
        draft is then always a tree, and the factor and offset do not apply.
      max_shared_requests: in budget mode, how many other active requests each one drafts from.
    """

    def __init__(self, *, max_depth: int = 64, max_spec_tokens: Optional[int] = None, max_spec_factor: float = 1.0,
                 max_spec_offset: float = 0.0, min_token_prob: float = 0.1, tree: bool = False,
                 max_cached_requests: Optional[int] = 10_000, budget_mode: bool = False, max_shared_requests: int = 8):
        if max_depth < 1:  # checked here too: max_spec_tokens defaults to it
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        spec = SpecParams(max_depth if max_spec_tokens is None else max_spec_tokens, max_spec_factor,
                          max_spec_offset, min_token_prob, tree)
        self.index = SuffixIndex(spec, max_depth, max_cached_requests, budgeted=budget_mode,
                                 max_shared_requests=max_shared_requests)

    def remember(self, responses: Iterable[Sequence[int]]) -> None:
        """Pre-fill the global index with earlier responses, oldest first (e.g. a saved history:
        see ``specjax.drafters.suffix_history``)."""
        for ids in responses:
            self.index.cache_response(ids)

    @property
    def history(self) -> list[list[int]]:
        """The responses the global index holds, oldest first (what a history file saves)."""
        return self.index.cached_responses

    def start_request(self, request_id: Hashable, prompt_ids: Sequence[int]) -> None:
        self.index.start_request(request_id, prompt_ids)

    def propose(self, request_id: Hashable, max_tokens: int) -> Proposal:
        return self.index.propose(request_id, max_tokens)

    def observe(self, request_id: Hashable, accepted_ids: Sequence[int]) -> None:
        self.index.extend(request_id, accepted_ids)

    def stop_request(self, request_id: Hashable) -> None:
        self.index.stop_request(request_id)
