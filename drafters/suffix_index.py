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
ArcticInference implements it.

Why a suffix automaton rather than a suffix tree: it has at most 2n states for
n tokens and appends in amortized O(1) instead of touching one node per depth
level, and its suffix links list every suffix of the context that occurs, one
state per distinct occurrence set. Suffixes in the same state have the same
continuations, so only the longest of each state can win: speculation scores a
handful of candidates instead of one per match length.

Counts are occurrences (end positions) and are kept exact for patterns of up to
``max_depth + max_spec_tokens`` tokens, the longest a draft can inspect; that
bound keeps the cost of an append bounded on degenerate input (long repeated
runs). Evicted responses are subtracted from the counts and the automaton is
rebuilt from the remaining responses once they are outnumbered, which bounds
memory at about twice the live index.

The global index changes only when a request finishes or a response is
evicted, so each request keeps an incremental match of its context against it
(amortized O(1) per token) and re-matches only after such a change.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from array import array
from typing import Hashable, Iterable, Iterator, Optional, Sequence

import numpy as np

from specjax.drafters.base import Proposal

_ROOT = 0
# Pruning compares an upper bound with the best score so far; the slack keeps float
# rounding in the bound from discarding a draft that would win by an ulp.
_PRUNE_SLACK = 1e-9


def token_list(tokens: Iterable[int] | np.ndarray, what: str = "token ids") -> list[int]:
    """Tokens as a list of Python ints; raises ValueError for negative or non-integer ids."""
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"{what} must be a 1-D integer array, got {tokens.dtype} with shape {tokens.shape}")
        out = tokens.tolist()
    else:
        out = list(tokens)
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in out):
            raise ValueError(f"{what} must be integers, got {out[:8]}")
        out = [int(t) for t in out]
    if out and min(out) < 0:
        raise ValueError(f"{what} must be non-negative, got {min(out)}")
    return out


@dataclasses.dataclass
class Draft:
    """A draft tree in construction order (parents[i] < i, -1 = child of the context end)."""

    tokens: list[int]
    parents: list[int]
    probs: list[float]
    score: float
    match_len: int

    @classmethod
    def empty(cls) -> "Draft":
        return cls([], [], [], 0.0, 0)

    def to_proposal(self) -> Proposal:
        return Proposal(np.asarray(self.tokens, np.int32), np.asarray(self.parents, np.int32),
                        np.asarray(self.probs, np.float32), score=float(self.score), match_len=self.match_len)


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
        if self.max_spec_factor < 0:
            raise ValueError(f"max_spec_factor must be >= 0, got {self.max_spec_factor}")
        if not 0.0 <= self.min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {self.min_token_prob}")

    def budget(self, match_len: int, max_tokens: int) -> int:
        """Draft size allowed for a match of ``match_len`` tokens (the 1e-6 guards float truncation)."""
        allowed = int(match_len * self.max_spec_factor + self.max_spec_offset + 1e-6)
        return max(0, min(allowed, self.max_spec_tokens, max_tokens))


class SuffixAutomaton:
    """A generalized suffix automaton over token sequences, with occurrence counts.

    Each state is a set of substrings with the same end positions; ``count`` is
    how many end positions (occurrences) they have, ``stamp`` the clock of the
    latest one (ties between equally frequent continuations go to the most
    recent). Sequences are appended token by token (``extend``) and separated
    with ``end_sequence``; ``remove`` subtracts a previously added sequence.
    """

    def __init__(self, count_depth: int):
        if count_depth < 2:
            raise ValueError(f"count_depth must be >= 2, got {count_depth}")
        self.count_depth = count_depth
        self.length = array("i", [0])
        self.link = array("i", [-1])
        self.count = array("i", [0])
        self.stamp = array("q", [0])
        self.next: list[dict[int, int]] = [{}]
        self.clock = 0
        self._last = _ROOT  # state of the whole sequence being written
        self._window = _ROOT  # state of its suffix of min(length, count_depth) tokens
        self._written = 0

    @property
    def num_states(self) -> int:
        return len(self.length)

    def end_sequence(self) -> None:
        """Start a new sequence: later tokens do not continue the previous one."""
        self._last = self._window = _ROOT
        self._written = 0

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the current sequence (ids already validated)."""
        for token in tokens:
            self._append(token)

    def _new_state(self, length: int, link: int, count: int, stamp: int, nxt: dict[int, int]) -> int:
        self.length.append(length)
        self.link.append(link)
        self.count.append(count)
        self.stamp.append(stamp)
        self.next.append(nxt)
        return len(self.length) - 1

    def _split(self, p: int, q: int, token: int) -> int:
        """Clone q as the state of its suffixes up to length(p) + 1; redirect p's chain to it."""
        nxt, link = self.next, self.link
        clone = self._new_state(self.length[p] + 1, link[q], self.count[q], self.stamp[q], dict(nxt[q]))
        link[q] = clone
        while p != -1 and nxt[p].get(token) == q:
            nxt[p][token] = clone
            p = link[p]
        return clone

    def _append(self, token: int) -> None:
        nxt, length, link = self.next, self.length, self.link
        last = self._last
        q = nxt[last].get(token)
        if q is not None:  # the sequence so far already occurred: reuse or split
            cur = q if length[q] == length[last] + 1 else self._split(last, q, token)
        else:
            cur = self._new_state(length[last] + 1, 0, 0, 0, {})
            p = last
            while p != -1 and token not in nxt[p]:
                nxt[p][token] = cur
                p = link[p]
            if p != -1:
                q = nxt[p][token]
                link[cur] = q if length[p] + 1 == length[q] else self._split(p, q, token)
        self._last = cur
        self._written += 1
        self._window = cur if self._written <= self.count_depth else self._slide(self._window, token)
        self.clock += 1
        self._add_occurrence(self._window, 1)

    def _slide(self, window: int, token: int) -> int:
        """The state of the new last ``count_depth`` tokens, from the previous window state."""
        length, link = self.length, self.link
        shorter = self.count_depth - 1
        while length[link[window]] >= shorter:  # at most two steps (one split per append)
            window = link[window]
        return self.next[window][token]

    def _add_occurrence(self, state: int, delta: int) -> None:
        """Add delta to the count of every suffix of ``state``'s strings (one end position)."""
        count, stamp, link, clock = self.count, self.stamp, self.link, self.clock
        while state > _ROOT:
            count[state] += delta
            if delta > 0:
                stamp[state] = clock
            state = link[state]

    def remove(self, tokens: Sequence[int]) -> None:
        """Subtract one previously added sequence from the counts (the states stay)."""
        nxt, length, link, depth = self.next, self.length, self.link, self.count_depth
        state, matched = _ROOT, 0
        for token in tokens:
            state = nxt[state][token]
            matched += 1
            if matched > depth:
                matched = depth
                if length[link[state]] >= depth:
                    state = link[state]
            self._add_occurrence(state, -1)

    def count_of(self, pattern: Sequence[int]) -> int:
        """Occurrences of a pattern (exact up to ``count_depth`` tokens)."""
        state = _ROOT
        for token in pattern:
            state = self.next[state].get(token, -1)
            if state < 0:
                return 0
        return self.count[state] if pattern else sum(self.count[s] for s in self.next[_ROOT].values())

    def advance(self, state: int, matched: int, token: int, max_len: int) -> tuple[int, int]:
        """Extend a match of the context by one token: the longest suffix still occurring, capped."""
        nxt, count, link, length = self.next, self.count, self.link, self.length
        while True:
            child = nxt[state].get(token)
            if child is not None and count[child] > 0:
                state, matched = child, matched + 1
                break
            if state == _ROOT:
                return _ROOT, 0
            state = link[state]
            matched = length[state]
        if matched > max_len:
            matched = max_len
            if length[link[state]] >= max_len:
                state = link[state]
        return state, matched

    def match(self, context: Sequence[int], max_len: int) -> tuple[int, int]:
        """The state and length of the longest suffix of ``context`` (<= max_len tokens) that occurs."""
        state, matched = _ROOT, 0
        for token in context[-max_len:]:
            state, matched = self.advance(state, matched, token, max_len)
        return state, matched

    def suffix_of_length(self, state: int, max_len: int) -> int:
        """The state on ``state``'s suffix path that holds its suffix of ``max_len`` tokens."""
        length, link = self.length, self.link
        while length[link[state]] >= max_len:
            state = link[state]
        return state

    def candidates(self, state: int, matched: int) -> Iterable[tuple[int, int]]:
        """(state, match length) for each distinct occurrence set among the match's suffixes, longest first."""
        length, link = self.length, self.link
        while state > _ROOT:
            yield state, matched
            state = link[state]
            matched = length[state]

    def ranked_children(self, state: int) -> list[tuple[int, int, int, int]]:
        """Live continuations as (count, stamp, token, state), most frequent (then most recent) first."""
        count, stamp = self.count, self.stamp
        ranked = [(count[s], stamp[s], t, s) for t, s in self.next[state].items() if count[s] > 0]
        ranked.sort(reverse=True)
        return ranked

    def draft_chain(self, state: int, budget: int, min_prob: float, to_beat: float) -> Optional[Draft]:
        """The most likely path from ``state``, or None when it cannot score above ``to_beat``."""
        nxt, count, stamp = self.next, self.count, self.stamp
        tokens: list[int] = []
        probs: list[float] = []
        prob, score = 1.0, 0.0
        while len(tokens) < budget:
            children = nxt[state]
            if len(children) == 1:
                (token, child), = children.items()
                best = count[child]
            else:
                best, best_stamp, token, child = 0, -1, -1, -1
                for t, s in children.items():
                    c = count[s]
                    if c > best or (c == best and c > 0 and stamp[s] > best_stamp):
                        best, best_stamp, token, child = c, stamp[s], t, s
            if best == 0:
                break
            prob = prob * best / count[state]
            if prob < min_prob:
                break
            if score + prob * (budget - len(tokens)) + _PRUNE_SLACK <= to_beat:
                return None
            tokens.append(token)
            probs.append(prob)
            score += prob
            state = child
        if score <= to_beat:
            return None
        return Draft(tokens, list(range(-1, len(tokens) - 1)), probs, score, 0)

    def draft_tree(self, state: int, budget: int, min_prob: float, to_beat: float) -> Optional[Draft]:
        """Best-first tree of up to ``budget`` nodes from ``state``, or None when it cannot beat ``to_beat``.

        Among equally likely nodes the most recently pushed is expanded first
        (the best sibling is pushed last), so a continuation that keeps the
        whole probability is drafted at once, without a heap round trip.
        """
        nxt, count = self.next, self.count
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        score = 0.0
        heap: list[tuple[float, int, int, int, int]] = []  # (-prob, -push number, token, state, parent)
        pushes = itertools.count()
        self._push_children(heap, pushes, state, 1.0, -1, min_prob)
        while heap and len(tokens) < budget:
            neg_prob, _, token, state, parent = heap[0]
            prob = -neg_prob
            if score + prob * (budget - len(tokens)) + _PRUNE_SLACK <= to_beat:
                return None
            heapq.heappop(heap)
            while True:
                parents.append(parent)
                tokens.append(token)
                probs.append(prob)
                score += prob
                parent = len(tokens) - 1
                children = nxt[state]
                if len(tokens) == budget or len(children) != 1:
                    break
                (token, child), = children.items()
                if count[child] != count[state]:
                    break
                state = child
            if len(tokens) < budget:
                self._push_children(heap, pushes, state, prob, parent, min_prob)
        if score <= to_beat:
            return None
        return Draft(tokens, parents, probs, score, 0)

    def _push_children(self, heap: list, pushes: Iterator[int], state: int, prob: float, parent: int,
                       min_prob: float) -> None:
        total = self.count[state]
        # Least likely first: among equal probabilities the last pushed pops first.
        for c, _, token, child in reversed(self.ranked_children(state)):
            child_prob = prob * c / total
            if child_prob >= min_prob:
                heapq.heappush(heap, (-child_prob, -next(pushes), token, child, parent))

    def tail_state(self, max_len: int) -> tuple[int, int]:
        """State and length of the current sequence's suffix of at most ``max_len`` tokens (<= count_depth)."""
        return self.suffix_of_length(self._window, max_len), min(self._written, max_len)


@dataclasses.dataclass
class _ActiveRequest:
    """One request's local index and its incremental match against the global index."""

    local: SuffixAutomaton
    tail: collections.deque  # the last max_depth context tokens, to re-match after global changes
    response: list[int]
    global_state: int = _ROOT
    global_matched: int = 0
    global_version: int = -1


class SuffixIndex:
    """The global index of finished responses plus one local index per active request.

    Args:
      max_depth: longest context suffix matched (the pattern length).
      spec: the draft budget and pruning rule.
      max_cached_requests: responses kept in the global index; the oldest is
        evicted first (FIFO). None keeps all; 0 disables the global index.
    """

    def __init__(self, spec: SpecParams, max_depth: int = 64, max_cached_requests: Optional[int] = None):
        if max_depth < 1:
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        if max_cached_requests is not None and max_cached_requests < 0:
            raise ValueError(f"max_cached_requests must be >= 0 or None, got {max_cached_requests}")
        self.spec = spec
        self.max_depth = max_depth
        self.max_cached_requests = max_cached_requests
        self._count_depth = max_depth + spec.max_spec_tokens
        self._global = SuffixAutomaton(self._count_depth)
        self._version = 0
        self._cached: collections.deque[array] = collections.deque()
        self._cached_tokens = 0
        self._evicted_tokens = 0  # still inside the automaton until the next rebuild
        self._active: dict[Hashable, _ActiveRequest] = {}

    @property
    def num_cached_requests(self) -> int:
        return len(self._cached)

    @property
    def num_cached_tokens(self) -> int:
        return self._cached_tokens

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
        local = SuffixAutomaton(self._count_depth)
        local.extend(prompt)
        tail = collections.deque(prompt[-self.max_depth:], maxlen=self.max_depth)
        self._active[request_id] = _ActiveRequest(local, tail, [])

    def extend(self, request_id: Hashable, token_ids: Sequence[int]) -> None:
        """Append tokens the target produced to the request's context."""
        request = self._request(request_id)
        tokens = token_list(token_ids)
        request.local.extend(tokens)
        request.tail.extend(tokens)
        request.response.extend(tokens)
        if request.global_version == self._version:
            state, matched, automaton = request.global_state, request.global_matched, self._global
            for token in tokens:
                state, matched = automaton.advance(state, matched, token, self.max_depth)
            request.global_state, request.global_matched = state, matched

    def stop_request(self, request_id: Hashable) -> None:
        """Finish a request: its response joins the global index (evicting the oldest if full)."""
        request = self._active.pop(request_id, None)
        if request is None:
            raise ValueError(f"request {request_id!r} is not active")
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
        self._global = SuffixAutomaton(self._count_depth)
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
        if request.global_version != self._version:
            state, matched = self._global.match(list(request.tail), self.max_depth)
            request.global_state, request.global_matched = state, matched
            request.global_version = self._version
        return request.global_state, request.global_matched

    def speculate(self, request_id: Hashable, max_tokens: Optional[int] = None) -> Draft:
        """The best-scoring draft over both indexes and every matched suffix length."""
        request = self._request(request_id)
        limit = self.spec.max_spec_tokens if max_tokens is None else min(max_tokens, self.spec.max_spec_tokens)
        if limit <= 0:
            return Draft.empty()
        state, matched = request.local.tail_state(self.max_depth)
        best = self._best_draft(request.local, state, matched, limit, Draft.empty())
        state, matched = self._global_match(request)
        return self._best_draft(self._global, state, matched, limit, best)

    def _best_draft(self, automaton: SuffixAutomaton, state: int, matched: int, limit: int, best: Draft) -> Draft:
        """Keep ``best`` unless a candidate of this index scores strictly higher (longest match first)."""
        spec = self.spec
        draft = automaton.draft_tree if spec.tree else automaton.draft_chain
        for candidate, match_len in automaton.candidates(state, matched):
            budget = spec.budget(match_len, limit)
            if budget <= best.score:  # budgets only shrink along the candidates
                break
            found = draft(candidate, budget, spec.min_token_prob, best.score)
            if found is not None:
                found.match_len = match_len
                best = found
        return best


class SuffixDecodingDrafter:
    """SuffixDecoding as a ``HostDrafter``: one instance serves every request of an engine.

    Args (keyword options, as ``--drafter suffix`` passes them):
      max_depth: longest context suffix matched (default 64).
      max_spec_tokens: draft size cap (default max_depth); ``propose`` may cap it further.
      max_spec_factor, max_spec_offset: adaptive budget, factor * match_len + offset.
      min_token_prob: drop draft nodes whose estimated probability is lower.
      tree: draft a best-first tree instead of a single path.
      max_cached_requests: finished responses kept (FIFO); None = unbounded, 0 = no global index.
    """

    def __init__(self, *, max_depth: int = 64, max_spec_tokens: Optional[int] = None, max_spec_factor: float = 1.0,
                 max_spec_offset: float = 0.0, min_token_prob: float = 0.1, tree: bool = False,
                 max_cached_requests: Optional[int] = 10_000):
        if max_depth < 1:  # checked here too: max_spec_tokens defaults to it
            raise ValueError(f"max_depth must be >= 1, got {max_depth}")
        spec = SpecParams(max_depth if max_spec_tokens is None else max_spec_tokens, max_spec_factor,
                          max_spec_offset, min_token_prob, tree)
        self.index = SuffixIndex(spec, max_depth, max_cached_requests)

    def start_request(self, request_id: Hashable, prompt_ids: Sequence[int]) -> None:
        self.index.start_request(request_id, prompt_ids)

    def propose(self, request_id: Hashable, max_tokens: int) -> Proposal:
        return self.index.speculate(request_id, max_tokens).to_proposal()

    def observe(self, request_id: Hashable, accepted_ids: Sequence[int]) -> None:
        self.index.extend(request_id, accepted_ids)

    def stop_request(self, request_id: Hashable) -> None:
        self.index.stop_request(request_id)
