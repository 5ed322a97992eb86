"""The pure-Python reference of the suffix index: the suffix automaton, the budgeted tree builder and its calibration.

``specjax.drafters.suffix_index`` drafts with these, or with the compiled core
(``csrc/suffix_core.cpp``, a line-by-line port) when it is built; the compiled
drafts are tested bit-identical to these (tests/test_suffix_core.py).

Why a suffix automaton rather than a suffix tree: it has at most 2n states for
n tokens and appends in amortized O(1) instead of touching one node per depth
level, and its suffix links list every suffix of the context that occurs, one
state per distinct occurrence set. Suffixes in the same state have the same
continuations, so only the longest of each state can win: speculation scores a
handful of candidates instead of one per match length.

Counts are occurrences (end positions) and are kept exact for patterns of up to
``count_depth`` tokens (the index uses ``max_depth + max_spec_tokens``, the
longest a draft can inspect); that bound keeps the cost of an append bounded on
degenerate input (long repeated runs).
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from array import array
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from specjax.drafters.base import Proposal

ROOT = 0
NO_EDGE, BRANCHES = -1, -2  # edge_token values for states without a single inline transition
# Scores closer than this are ties: float rounding makes mathematically equal
# scores (sums of count ratios) differ by an ulp, and ties must follow the rule
# (longer match, then the local index), not the rounding.
TIE_TOLERANCE = 1e-9
_RANKED_CACHE_LIMIT = 1 << 16  # states whose ranked continuations an automaton keeps


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
        self.edge_token = array("i", [NO_EDGE])  # the only transition's token, or NO_EDGE / BRANCHES
        self.edge_target = array("i", [0])
        self.branches: dict[int, dict[int, int]] = {}  # token -> state, for states with several transitions
        self.clock = 0
        # state -> (clock when ranked, ranking); see ranked_children for when it is still valid
        self._ranked: dict[int, tuple[int, list[tuple[int, int, int, int]]]] = {}
        self._last = ROOT  # state of the whole sequence being written
        self._window = ROOT  # state of its suffix of min(length, count_depth) tokens
        self._written = 0

    @property
    def num_states(self) -> int:
        return len(self.length)

    def child(self, state: int, token: int) -> int:
        """The transition from ``state`` on ``token``, or -1."""
        edge = self.edge_token[state]
        if edge == token:
            return self.edge_target[state]
        if edge == BRANCHES:
            return self.branches[state].get(token, -1)
        return -1

    def children(self, state: int) -> Iterable[tuple[int, int]]:
        """(token, state) for every transition, dead ones (count 0) included."""
        edge = self.edge_token[state]
        if edge >= 0:
            return ((edge, self.edge_target[state]),)
        if edge == BRANCHES:
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
            if edge == NO_EDGE:
                edge_token[p] = token
                edge_target[p] = cur
            elif edge == BRANCHES:
                q = branches[p].get(token, -1)
                if q >= 0:
                    break
                branches[p][token] = cur
            elif edge == token:
                q = edge_target[p]
                break
            else:
                branches[p] = {edge: edge_target[p], token: cur}
                edge_token[p] = BRANCHES
            p = link[p]
        else:
            return  # cur's link stays the root
        link[cur] = q if length[p] + 1 == length[q] else self._split(p, q, token)

    def end_sequence(self) -> None:
        """Start a new sequence: later tokens do not continue the previous one."""
        self._last = self._window = ROOT
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
            elif edge == BRANCHES:
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
                edge_token.append(NO_EDGE)
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
                elif edge == BRANCHES:
                    window = branches[window].get(token, -1)
                else:
                    window = -1
            # The new end position is an occurrence of every suffix up to count_depth tokens.
            clock += 1
            state = window
            while state > ROOT:
                count[state] += 1
                stamp[state] = clock
                state = link[state]
        self._last, self._window, self._written, self.clock = last, window, written, clock

    def _new_state(self, length: int, link: int, count: int, stamp: int) -> int:
        self.length.append(length)
        self.link.append(link)
        self.count.append(count)
        self.stamp.append(stamp)
        self.edge_token.append(NO_EDGE)
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
        if edge_token[q] == BRANCHES:
            branches[clone] = dict(branches[q])
        link[q] = clone
        while p != -1:  # while p's transition on token leads to q, redirect it to the clone
            edge = edge_token[p]
            if edge == token:
                if edge_target[p] != q:
                    break
                edge_target[p] = clone
            elif edge == BRANCHES:
                targets = branches[p]
                if targets.get(token, -1) != q:
                    break
                targets[token] = clone
            else:
                break
            p = link[p]
        return clone

    def remove(self, tokens: Sequence[int]) -> None:
        """Subtract one previously added sequence from the counts (the states stay).

        Tokens that were never added (a missing transition, or a count that would
        fall below zero) raise ValueError and change nothing.
        """
        for _ in self._removal_states(tokens):  # every transition exists before a count changes
            pass
        count, link, lowered = self.count, self.link, 0
        for state in self._removal_states(tokens):
            while state > ROOT:
                if count[state] <= 0:
                    self._restore(tokens, lowered)
                    raise ValueError(f"remove: the count of state {state} would fall below zero: the sequence was "
                                     "not added (or was already removed)")
                count[state] -= 1
                lowered += 1
                state = link[state]
        self._ranked.clear()

    def _restore(self, tokens: Sequence[int], lowered: int) -> None:
        """Undo the first ``lowered`` count decrements of removing ``tokens`` (the same walk, as far as it went)."""
        count, link = self.count, self.link
        for state in self._removal_states(tokens):
            while state > ROOT:
                if lowered == 0:
                    return
                count[state] += 1
                lowered -= 1
                state = link[state]

    def _removal_states(self, tokens: Sequence[int]) -> Iterator[int]:
        """Per token of a sequence being removed, the state whose suffix path loses an occurrence."""
        length, link, depth = self.length, self.link, self.count_depth
        state, matched = ROOT, 0
        for i, token in enumerate(tokens):
            state = self.child(state, token)
            if state < 0:
                raise ValueError(f"remove: tokens[{i}] does not continue the tokens before it in this automaton: "
                                 "the sequence was never added")
            matched += 1
            if matched > depth:
                matched = depth
                if length[link[state]] >= depth:
                    state = link[state]
            yield state

    def count_of(self, pattern: Sequence[int]) -> int:
        """Occurrences of a non-empty pattern (exact up to ``count_depth`` tokens)."""
        if not pattern:
            raise ValueError("count_of needs a non-empty pattern")
        state = ROOT
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
        if max_len < 1:  # the cap would walk past the root
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        edge_token, edge_target, branches = self.edge_token, self.edge_target, self.branches
        count, link, length = self.count, self.link, self.length
        for token in tokens:
            while True:
                edge = edge_token[state]  # self.child(state, token)
                if edge == token:
                    child = edge_target[state]
                elif edge == BRANCHES:
                    child = branches[state].get(token, -1)
                else:
                    child = -1
                if child >= 0 and count[child] > 0:
                    state, matched = child, matched + 1
                    break
                if state == ROOT:
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
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        return self.advance(ROOT, 0, context[-max_len:], max_len)

    def suffix_of_length(self, state: int, max_len: int) -> int:
        """The state on ``state``'s suffix path that holds its suffix of ``max_len`` tokens."""
        length, link = self.length, self.link
        while state > ROOT and length[link[state]] >= max_len:  # the root has no suffix (link -1)
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
            elif token == BRANCHES:
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
        if score <= to_beat + TIE_TOLERANCE:
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
        if score <= to_beat + TIE_TOLERANCE:
            return None
        return Draft(tokens, parents, probs, score, 0)

    def _push_children(self, heap: list, pushes: Iterator[int], state: int, prob: float, parent: int,
                       min_prob: float) -> None:
        total = self.count[state]
        token = self.edge_token[state]
        if token >= 0:
            child = self.edge_target[state]
            ranked = [(self.count[child], 0, token, child)] if self.count[child] else []
        elif token == BRANCHES:
            ranked = self.ranked_children(state)
        else:
            return
        # Least likely first: among equal probabilities the last pushed pops first.
        for c, _, token, child in reversed(ranked):
            child_prob = prob if c == total else prob * c / total
            if child_prob >= min_prob:
                heapq.heappush(heap, (-child_prob, -next(pushes), token, child, parent))


def ratio_bin(ratio: float) -> int:
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
        if not (math.isfinite(prior_weight) and prior_weight >= 0):
            raise ValueError(f"prior_weight must be a finite number >= 0, got {prior_weight}")
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
            key = prefix | ratio_bin(ratio)
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
                if token == BRANCHES:
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
                key |= ratio_bin(ratio)
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
