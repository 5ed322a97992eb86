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
selects this module's pure-Python code, which stays the reference the compiled
drafts are tested against (bit-identical trees and probabilities).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import operator
import os
from array import array
from typing import Hashable, Iterable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np

from specjax.drafters.base import Proposal

try:
    from specjax.drafters import _suffix_core
except ImportError:  # not built (no C++ compiler at install time): the pure-Python reference serves
    _suffix_core = None

_ROOT = 0
_NO_EDGE, _BRANCHES = -1, -2  # edge_token values for states without a single inline transition
# Scores closer than this are ties: float rounding makes mathematically equal
# scores (sums of count ratios) differ by an ulp, and ties must follow the rule
# (longer match, then the local index), not the rounding.
_TIE_TOLERANCE = 1e-9
_MAX_TOKEN_ID = 2**31 - 1  # ids are stored as int32
_RANKED_CACHE_LIMIT = 1 << 16  # states whose ranked continuations an automaton keeps


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

    def to_draft(self) -> "Draft":
        return self


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

    Storage is flat arrays. Most states have exactly one outgoing transition,
    so it lives inline in ``edge_token``/``edge_target``; only states with
    several get a dict (in ``branches``), which is what keeps memory per
    token below a pointer-based suffix tree's.
    """

    def __init__(self, count_depth: int):
        if count_depth < 2:
            raise ValueError(f"count_depth must be >= 2, got {count_depth}")
        self.count_depth = count_depth
        self.length = array("i", [0])
        self.link = array("i", [-1])
        self.count = array("i", [0])
        self.stamp = array("q", [0])
        self.edge_token = array("i", [_NO_EDGE])  # the only transition's token, or _NO_EDGE / _BRANCHES
        self.edge_target = array("i", [0])
        self.branches: dict[int, dict[int, int]] = {}  # token -> state, for states with several transitions
        self.clock = 0
        # state -> (clock when ranked, ranking); see ranked_children for when it is still valid
        self._ranked: dict[int, tuple[int, list[tuple[int, int, int, int]]]] = {}
        self._last = _ROOT  # state of the whole sequence being written
        self._window = _ROOT  # state of its suffix of min(length, count_depth) tokens
        self._written = 0

    @property
    def num_states(self) -> int:
        return len(self.length)

    def child(self, state: int, token: int) -> int:
        """The transition from ``state`` on ``token``, or -1."""
        edge = self.edge_token[state]
        if edge == token:
            return self.edge_target[state]
        if edge == _BRANCHES:
            return self.branches[state].get(token, -1)
        return -1

    def children(self, state: int) -> Iterable[tuple[int, int]]:
        """(token, state) for every transition, dead ones (count 0) included."""
        edge = self.edge_token[state]
        if edge >= 0:
            return ((edge, self.edge_target[state]),)
        if edge == _BRANCHES:
            return self.branches[state].items()
        return ()

    def _link_new_state(self, p: int, token: int, cur: int) -> None:
        """Give every state on p's suffix path without a ``token`` transition one to ``cur``; set cur's link.

        The lookup and the insert share one branch per state: this is the hot loop of appending.
        """
        edge_token, edge_target, branches, length, link = (self.edge_token, self.edge_target, self.branches,
                                                           self.length, self.link)
        while p != -1:
            edge = edge_token[p]
            if edge == _NO_EDGE:
                edge_token[p] = token
                edge_target[p] = cur
            elif edge == _BRANCHES:
                q = branches[p].get(token, -1)
                if q >= 0:
                    break
                branches[p][token] = cur
            elif edge == token:
                q = edge_target[p]
                break
            else:
                branches[p] = {edge: edge_target[p], token: cur}
                edge_token[p] = _BRANCHES
            p = link[p]
        else:
            return  # cur's link stays the root
        link[cur] = q if length[p] + 1 == length[q] else self._split(p, q, token)

    def end_sequence(self) -> None:
        """Start a new sequence: later tokens do not continue the previous one."""
        self._last = self._window = _ROOT
        self._written = 0

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the current sequence (ids already validated).

        One loop with the transition lookups, the new state and the window
        slide inlined: this runs per prompt and per accepted token, and
        Python's call overhead was most of its cost.
        """
        length, link, count, stamp = self.length, self.link, self.count, self.stamp
        edge_token, edge_target, branches = self.edge_token, self.edge_target, self.branches
        count_depth, shorter = self.count_depth, self.count_depth - 1
        last, window, written, clock = self._last, self._window, self._written, self.clock
        for token in tokens:
            edge = edge_token[last]  # q = self.child(last, token)
            if edge == token:
                q = edge_target[last]
            elif edge == _BRANCHES:
                q = branches[last].get(token, -1)
            else:
                q = -1
            if q >= 0:  # the sequence so far already occurred: reuse or split
                cur = q if length[q] == length[last] + 1 else self._split(last, q, token)
            else:
                cur = len(length)  # a new state, as _new_state(length[last] + 1, 0, 0, 0)
                length.append(length[last] + 1)
                link.append(0)
                count.append(0)
                stamp.append(0)
                edge_token.append(_NO_EDGE)
                edge_target.append(0)
                self._link_new_state(last, token, cur)
            last = cur
            written += 1
            if written <= count_depth:
                window = cur
            else:  # the state of the new last count_depth tokens (see _slide)
                while length[link[window]] >= shorter:
                    window = link[window]
                edge = edge_token[window]
                if edge == token:
                    window = edge_target[window]
                elif edge == _BRANCHES:
                    window = branches[window].get(token, -1)
                else:
                    window = -1
            # The new end position is an occurrence of every suffix up to count_depth tokens.
            clock += 1
            state = window
            while state > _ROOT:
                count[state] += 1
                stamp[state] = clock
                state = link[state]
        self._last, self._window, self._written, self.clock = last, window, written, clock

    def _new_state(self, length: int, link: int, count: int, stamp: int) -> int:
        self.length.append(length)
        self.link.append(link)
        self.count.append(count)
        self.stamp.append(stamp)
        self.edge_token.append(_NO_EDGE)
        self.edge_target.append(0)
        return len(self.length) - 1

    def _split(self, p: int, q: int, token: int) -> int:
        """Clone q as the state of its suffixes up to length(p) + 1; redirect p's chain to it.

        The redirect loop has the transition lookup inlined: about half of all appends split.
        """
        length, link, edge_token, edge_target, branches = (self.length, self.link, self.edge_token,
                                                            self.edge_target, self.branches)
        clone = self._new_state(length[p] + 1, link[q], self.count[q], self.stamp[q])
        edge_token[clone] = edge_token[q]
        edge_target[clone] = edge_target[q]
        if edge_token[q] == _BRANCHES:
            branches[clone] = dict(branches[q])
        link[q] = clone
        while p != -1:  # while p's transition on token leads to q, redirect it to the clone
            edge = edge_token[p]
            if edge == token:
                if edge_target[p] != q:
                    break
                edge_target[p] = clone
            elif edge == _BRANCHES:
                targets = branches[p]
                if targets.get(token, -1) != q:
                    break
                targets[token] = clone
            else:
                break
            p = link[p]
        return clone

    def remove(self, tokens: Sequence[int]) -> None:
        """Subtract one previously added sequence from the counts (the states stay)."""
        self._ranked.clear()
        length, link, count, depth = self.length, self.link, self.count, self.count_depth
        state, matched = _ROOT, 0
        for token in tokens:
            state = self.child(state, token)
            matched += 1
            if matched > depth:
                matched = depth
                if length[link[state]] >= depth:
                    state = link[state]
            suffix = state
            while suffix > _ROOT:
                count[suffix] -= 1
                suffix = link[suffix]

    def count_of(self, pattern: Sequence[int]) -> int:
        """Occurrences of a non-empty pattern (exact up to ``count_depth`` tokens)."""
        if not pattern:
            raise ValueError("count_of needs a non-empty pattern")
        state = _ROOT
        for token in pattern:
            state = self.child(state, token)
            if state < 0:
                return 0
        return self.count[state]

    def advance(self, state: int, matched: int, tokens: Iterable[int], max_len: int) -> tuple[int, int]:
        """Extend a match of the context by tokens: after each, the longest suffix still occurring, capped.

        The transition lookup is inlined and the loop runs here rather than per call: this runs per
        context token.
        """
        edge_token, edge_target, branches = self.edge_token, self.edge_target, self.branches
        count, link, length = self.count, self.link, self.length
        for token in tokens:
            while True:
                edge = edge_token[state]  # self.child(state, token)
                if edge == token:
                    child = edge_target[state]
                elif edge == _BRANCHES:
                    child = branches[state].get(token, -1)
                else:
                    child = -1
                if child >= 0 and count[child] > 0:
                    state, matched = child, matched + 1
                    break
                if state == _ROOT:
                    matched = 0
                    break
                state = link[state]
                matched = length[state]
            if matched > max_len:
                matched = max_len
                if length[link[state]] >= max_len:
                    state = link[state]
        return state, matched

    def match(self, context: Sequence[int], max_len: int) -> tuple[int, int]:
        """The state and length of the longest suffix of ``context`` (<= max_len tokens) that occurs."""
        return self.advance(_ROOT, 0, context[-max_len:], max_len)

    def suffix_of_length(self, state: int, max_len: int) -> int:
        """The state on ``state``'s suffix path that holds its suffix of ``max_len`` tokens."""
        length, link = self.length, self.link
        while state > _ROOT and length[link[state]] >= max_len:  # the root has no suffix (link -1)
            state = link[state]
        return state

    def tail_state(self, max_len: int) -> tuple[int, int]:
        """State and length of the current sequence's suffix of at most ``max_len`` tokens (<= count_depth)."""
        return self.suffix_of_length(self._window, max_len), min(self._written, max_len)

    def ranked_children(self, state: int) -> list[tuple[int, int, int, int]]:
        """Live continuations as (count, stamp, token, state), most frequent (then most recent) first.

        A ranking stays valid while the state does not occur again: a child's
        count, a new transition and a split all follow an occurrence of the
        state itself (one token earlier), which moves its stamp. So appends
        leave most rankings valid (and all of them until the next append), and
        only ``remove`` clears them all.
        """
        cached = self._ranked.get(state)
        if cached is not None and (self.stamp[state] < cached[0] or cached[0] == self.clock):
            return cached[1]
        count, stamp = self.count, self.stamp
        ranked = [(count[s], stamp[s], t, s) for t, s in self.children(state) if count[s] > 0]
        ranked.sort(reverse=True)
        if len(self._ranked) >= _RANKED_CACHE_LIMIT:  # bounds its memory on a long-lived global index
            self._ranked.clear()
        self._ranked[state] = (self.clock, ranked)
        return ranked

    def draft_chain(self, state: int, budget: int, min_prob: float, to_beat: float) -> Optional[Draft]:
        """The most likely path from ``state``, or None unless it scores above ``to_beat`` (beyond a tie).

        The probability (and with it the pruning bound) only changes where the
        count drops, so a continuation that keeps the whole count costs a lookup.
        """
        edge_token, edge_target, count = self.edge_token, self.edge_target, self.count
        tokens: list[int] = []
        probs: list[float] = []
        prob, score = 1.0, 0.0
        total = count[state]
        for drafted in range(budget):
            token = edge_token[state]
            if token >= 0:
                child = edge_target[state]
                c = count[child]
                if c == 0:
                    break
            elif token == _BRANCHES:
                ranked = self.ranked_children(state)
                if not ranked:
                    break
                c, _, token, child = ranked[0]
            else:
                break
            if c != total:
                prob = prob * c / total
                if prob < min_prob:
                    break
                if score + prob * (budget - drafted) <= to_beat:
                    return None
            tokens.append(token)
            probs.append(prob)
            score += prob
            state, total = child, c
        if score <= to_beat + _TIE_TOLERANCE:
            return None
        return Draft(tokens, list(range(-1, len(tokens) - 1)), probs, score, 0)

    def draft_tree(self, state: int, budget: int, min_prob: float, to_beat: float) -> Optional[Draft]:
        """Best-first tree of up to ``budget`` nodes from ``state``, or None when it cannot beat ``to_beat``.

        Among equally likely nodes the most recently pushed is expanded first
        (the best sibling is pushed last), so a continuation that keeps the
        whole probability is drafted at once, without a heap round trip.
        """
        edge_token, edge_target, count = self.edge_token, self.edge_target, self.count
        tokens: list[int] = []
        parents: list[int] = []
        probs: list[float] = []
        score, prob, parent = 0.0, 1.0, -1
        heap: list[tuple[float, int, int, int, int]] = []  # (-prob, -push number, token, state, parent)
        pushes = itertools.count()
        while True:
            # ``state`` is expanded: follow its continuation while it keeps the whole count.
            while len(tokens) < budget:
                token = edge_token[state]
                if token < 0:
                    break
                child = edge_target[state]
                if count[child] != count[state]:
                    break
                parents.append(parent)
                tokens.append(token)
                probs.append(prob)
                score += prob
                parent, state = len(tokens) - 1, child
            if len(tokens) == budget:
                break
            self._push_children(heap, pushes, state, prob, parent, min_prob)
            if not heap:
                break
            neg_prob, _, token, state, parent = heap[0]
            prob = -neg_prob
            if score + prob * (budget - len(tokens)) <= to_beat:
                return None
            heapq.heappop(heap)
            parents.append(parent)
            tokens.append(token)
            probs.append(prob)
            score += prob
            parent = len(tokens) - 1
        if score <= to_beat + _TIE_TOLERANCE:
            return None
        return Draft(tokens, parents, probs, score, 0)

    def _push_children(self, heap: list, pushes: Iterator[int], state: int, prob: float, parent: int,
                       min_prob: float) -> None:
        total = self.count[state]
        token = self.edge_token[state]
        if token >= 0:
            child = self.edge_target[state]
            ranked = [(self.count[child], 0, token, child)] if self.count[child] else []
        elif token == _BRANCHES:
            ranked = self.ranked_children(state)
        else:
            return
        # Least likely first: among equal probabilities the last pushed pops first.
        for c, _, token, child in reversed(ranked):
            child_prob = prob if c == total else prob * c / total
            if child_prob >= min_prob:
                heapq.heappush(heap, (-child_prob, -next(pushes), token, child, parent))


def _ratio_bin(ratio: float) -> int:
    return 4 if ratio >= 1.0 else 3 if ratio >= 0.5 else 2 if ratio >= 0.25 else 1 if ratio >= 0.1 else 0


def calibration_prefix(source: int, matched: int, count: int) -> int:
    """A node's calibration group, less its ratio bin: source, matched length and count by powers of two."""
    return ((source << 5 | matched.bit_length()) << 5 | count.bit_length()) << 3


class NodeCalibration:
    """How often a drafted node is accepted once its parent is, learned online per kind of node.

    A suffix of m tokens that occurred once predicts its continuation with
    count ratio 1 whether m is 2 or 60: the ratio alone over-trusts short and
    rare matches, and says nothing about which index is more reliable on this
    workload. Nodes are grouped by source, matched length at the node and
    pattern count (by powers of two) and ratio bin; each group's estimate is
    its acceptance rate with the ratio itself as the prior (``prior_weight``
    pseudo-tests), so a fresh index drafts by the plain ratios.
    """

    def __init__(self, prior_weight: float = 4.0):
        self.prior_weight = prior_weight
        self.stats: dict[int, list[float]] = {}  # group -> [accepted, tested]

    def learn(self, draft_tokens: Sequence[int], draft_parents: Sequence[int], keys: Sequence[int],
              accepted_ids: Sequence[int]) -> None:
        """Count every tested node: a child of the root or of an accepted node whose next token is known.

        Parents precede their children in a draft, so one pass in node order
        meets every accepted node before its children.
        """
        stats = self.stats
        next_truth = {-1: 0}  # the root and each accepted node -> index of the token after it in accepted_ids
        known = len(accepted_ids)
        for node, parent in enumerate(draft_parents):
            at = next_truth.get(parent)
            if at is None or at >= known:
                continue
            hit = draft_tokens[node] == accepted_ids[at]
            if hit:
                next_truth[node] = at + 1
            seen = stats.get(keys[node])
            if seen is None:
                stats[keys[node]] = [float(hit), 1.0]
            else:
                seen[0] += hit
                seen[1] += 1.0


SOURCE_LOCAL, SOURCE_GLOBAL, SOURCE_SHARED = 0, 1, 2  # sources of a budgeted draft's candidates


def draft_merged(candidates: Sequence[tuple[SuffixAutomaton, int, int, int]], calibration: NodeCalibration,
                 budget: int, min_prob: float) -> tuple[Draft, list[int]]:
    """One best-first tree of up to ``budget`` nodes over several (automaton, state, source, match length) candidates.

    A candidate gives a path the product of its calibrated count ratios (a
    drafted token that is accepted extends the match, so a node at depth d of
    a candidate matching m tokens is calibrated as a match of m + d); nodes
    whose plain ratio product falls below ``min_prob`` are not drafted. A
    node's value is the largest any candidate gives its path (values only
    shrink down a path, so parents are placed before their children).
    Candidates that agree on a path share its nodes; where they disagree, each
    adds its own branches. Returns the draft and each node's calibration group.

    A single continuation that is at least as likely as anything waiting in
    the heap is drafted at once (the heap would pop it next), so long copied
    spans cost no heap round trips.
    """
    tokens: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    keys: list[int] = []
    nodes: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    heap: list = []  # (-value, -push number, parent node, token, candidate, state, depth, key, prob)
    pushes = itertools.count()
    heappush, heappop, heappushpop = heapq.heappush, heapq.heappop, heapq.heappushpop
    stats, prior = calibration.stats, calibration.prior_weight
    # Per candidate, what a span reads: its automaton's arrays, source (shifted as in a group) and match length.
    spans = [(automaton.edge_token, automaton.edge_target, automaton.count, source << 5, matched)
             for automaton, _, source, matched in candidates]

    def push_children(candidate: int, state: int, value: float, prob: float, parent: int, depth: int) -> None:
        automaton, _, source, matched = candidates[candidate]
        total = automaton.count[state]
        prefix = calibration_prefix(source, matched + depth, total)
        kept = []
        for c, _, token, child in automaton.ranked_children(state):  # most frequent first
            child_prob = prob * c / total
            if child_prob < min_prob:
                break
            kept.append((c, token, child, child_prob))
        for c, token, child, child_prob in reversed(kept):  # the best is pushed last, to pop first among equals
            ratio = c / total
            key = prefix | _ratio_bin(ratio)
            seen = stats.get(key)
            estimate = ratio if seen is None else (seen[0] + prior * ratio) / (seen[1] + prior)
            child_value = value * estimate if estimate < 1.0 else value
            heappush(heap, (-child_value, -next(pushes), parent, token, candidate, child, depth + 1, key, child_prob))

    for i, (_, state, _, _) in enumerate(candidates):
        push_children(i, state, 1.0, 1.0, -1, 0)
    item = heappop(heap) if heap else None
    while item is not None:
        neg_value, _, parent, token, candidate, state, depth, key, prob = item
        item = None
        value = -neg_value
        top = -heap[0][0] if heap else -1.0  # the heap only changes when this span ends
        edge_token, edge_target, count, source_bits, matched = spans[candidate]
        # A span that keeps the whole count keeps its calibration group until the count or the
        # matched length's bit length changes: the group and its estimate are reused until then.
        span_total = -1  # no group yet
        node = nodes.get((parent, token))
        while True:
            fresh = node is None
            if fresh:
                node = nodes[parent, token] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                probs.append(value)
                keys.append(key)
                if node + 1 == budget:
                    break
            token = edge_token[state]
            if token < 0:  # none or several continuations
                if token == _BRANCHES:
                    push_children(candidate, state, value, prob, node, depth)
                break
            child = edge_target[state]
            total, c = count[state], count[child]
            if c == total:
                at_length = matched + depth
                if total != span_total or at_length >= span_limit:
                    span_total, span_limit = total, 1 << at_length.bit_length()
                    span_key = ((source_bits | at_length.bit_length()) << 5 | total.bit_length()) << 3 | 4
                    seen = stats.get(span_key)
                    span_estimate = 1.0 if seen is None else (seen[0] + prior) / (seen[1] + prior)
                key, estimate = span_key, span_estimate
            else:
                if c == 0:
                    break
                prob = prob * c / total
                if prob < min_prob:
                    break
                ratio = c / total
                key = ((source_bits | (matched + depth).bit_length()) << 5 | total.bit_length()) << 3
                key |= _ratio_bin(ratio)
                seen = stats.get(key)
                estimate = ratio if seen is None else (seen[0] + prior * ratio) / (seen[1] + prior)
            child_value = value * estimate if estimate < 1.0 else value
            depth += 1
            if child_value < top:  # push it and pop the top in one heap operation
                item = heappushpop(heap, (-child_value, -next(pushes), node, token, candidate, child, depth, key,
                                          prob))
                break
            parent, state, value = node, child, child_value
            node = None if fresh else nodes.get((parent, token))  # a new node has no children yet
        if len(tokens) == budget:
            break
        if item is None and heap:
            item = heappop(heap)
    return Draft(tokens, parents, probs, sum_in_order(probs), 0), keys


def sum_in_order(values: Iterable[float]) -> float:
    """Left-to-right float sum: Python 3.12's ``sum`` compensates rounding, the compiled core does not."""
    total = 0.0
    for value in values:
        total += value
    return total


@dataclasses.dataclass
class _ActiveRequest:
    """One request's local index and its incremental match against the global index."""

    local: SuffixAutomaton
    tail: collections.deque  # the last max_depth context tokens, to re-match after global changes
    response: list[int]
    global_state: int = _ROOT
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
            while state > _ROOT:
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
                state = automaton.suffix_of_length(entry[1], matched) if matched else _ROOT
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
        while state > _ROOT:
            budget = spec.budget(matched, limit)
            if budget <= best.score + _TIE_TOLERANCE:  # budgets only shrink along the path
                break
            if edge_token[state] != _NO_EDGE:  # else nothing ever followed this match
                found = draft(state, budget, spec.min_token_prob, best.score)
                if found is not None:
                    found.match_len = matched
                    best = found
            state = link[state]
            matched = length[state]
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
