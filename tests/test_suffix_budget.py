"""Budgeted suffix trees: one tree over every source and matched suffix, calibrated online, shared in flight."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specjax.drafters.suffix_index import SpecParams, SuffixDecodingDrafter, SuffixIndex
from specjax.drafters.suffix_reference import (SOURCE_GLOBAL, SOURCE_LOCAL, NodeCalibration, calibration_prefix,
                                               ratio_bin)

# ---------------------------------------------------------------- brute force


def occurrences(texts: list[list[int]], pattern: list[int]) -> int:
    n = len(pattern)
    return sum(text[end - n:end] == pattern for text in texts for end in range(n, len(text) + 1))


def brute_values(sources: list[list[list[int]]], context: list[int], max_depth: int, budget: int,
                 min_prob: float) -> dict[tuple[int, ...], float]:
    """Every path any (source, matched suffix) candidate drafts, valued at the best ratio product it gets."""
    values: dict[tuple[int, ...], float] = {}
    alphabet = sorted({t for texts in sources for text in texts for t in text})
    for texts in sources:
        for m in range(1, min(max_depth, len(context)) + 1):
            pattern = context[-m:]
            if not occurrences(texts, pattern):
                continue

            def visit(path: list[int], prob: float) -> None:
                if len(path) == budget:
                    return
                total = occurrences(texts, pattern + path)
                for t in alphabet:
                    p = prob * occurrences(texts, pattern + path + [t]) / total
                    if p > 0 and p >= min_prob:
                        key = tuple(path + [t])
                        values[key] = max(values.get(key, 0.0), p)
                        visit(path + [t], p)

            visit([], 1.0)
    return values


def path_of(draft, i: int) -> tuple[int, ...]:
    path = []
    while i >= 0:
        path.append(draft.tokens[i])
        i = draft.parents[i]
    return tuple(path[::-1])


def budget_index(max_depth=8, max_spec_tokens=8, min_prob=0.1, shared=8) -> SuffixIndex:
    return SuffixIndex(SpecParams(max_spec_tokens, min_token_prob=min_prob, tree=True), max_depth, None,
                       budgeted=True, max_shared_requests=shared)


def nodes_of(draft) -> dict[tuple[int, ...], float]:
    return {path_of(draft, i): p for i, p in enumerate(draft.probs)}


# ---------------------------------------------------------------- hand-built examples


def test_local_and_global_continuations_share_one_tree():
    index = budget_index()
    index.cache_response([1, 2, 7, 8])  # the global index continues "1 2" with 7 8
    index.start_request("r", [1, 2, 5, 6, 0, 1, 2])  # the prompt continues it with 5 6
    draft = index.speculate("r", max_tokens=8)
    nodes = nodes_of(draft)
    assert {(5,), (5, 6), (7,), (7, 8)} <= set(nodes)  # the rule would keep only one source's path
    assert len(draft.tokens) <= 8
    # The default rule: one candidate wins whole.
    rule = SuffixIndex(SpecParams(8, tree=True), 8, None)
    rule.cache_response([1, 2, 7, 8])
    rule.start_request("r", [1, 2, 5, 6, 0, 1, 2])
    rule_paths = set(nodes_of(rule.speculate("r")))
    assert not ({(5,), (7,)} <= rule_paths)


def test_shorter_matches_add_branches_where_they_disagree():
    index = budget_index(min_prob=0.0)
    # "9 1 2" continues with 3 (once); the shorter "1 2" mostly continues with 4.
    for response in ([9, 1, 2, 3], [5, 1, 2, 4], [6, 1, 2, 4]):
        index.cache_response(response)
    index.start_request("r", [9, 1, 2])
    nodes = nodes_of(index.speculate("r", max_tokens=4))
    assert nodes[(3,)] == pytest.approx(1.0)  # the longest match: 3 always follows "9 1 2"
    assert nodes[(4,)] == pytest.approx(2 / 3)  # "1 2": 4 in 2 of 3 occurrences
    # Agreeing candidates share nodes: 3 is drafted once, valued at its best candidate.
    assert list(nodes).count((3,)) == 1


def test_the_budget_is_filled_when_continuations_allow():
    index = budget_index(max_depth=8, max_spec_tokens=16, min_prob=0.0)
    for i in range(8):
        index.cache_response([1, 2] + [10 + i] * 3 + [30 + i])
    index.start_request("r", [0, 1, 2])
    for budget in (1, 5, 16):
        draft = index.speculate("r", max_tokens=budget)
        assert len(draft.tokens) == budget
        assert all(-1 <= p < i for i, p in enumerate(draft.parents))
        # Values never grow down a path: parents are drafted before their children.
        assert all(draft.probs[i] <= draft.probs[p] for i, p in enumerate(draft.parents) if p >= 0)
    assert len(index.speculate("r", max_tokens=0).tokens) == 0


def test_min_token_prob_still_cuts_by_the_plain_ratios():
    index = budget_index(min_prob=0.5)
    for response in ([1, 2, 3], [1, 2, 4], [1, 2, 5]):
        index.cache_response(response)
    index.start_request("r", [1, 2])
    assert index.speculate("r", max_tokens=8).tokens == []  # each continuation has ratio 1/3


# ---------------------------------------------------------------- calibration


def test_calibration_counts_exactly_the_tested_nodes():
    # root -> a(0) -> c(2) -> d(3); a -> e(4); root -> b(1) -> f(5). Truth: a, c, then 99 (the bonus).
    tokens, keys = [10, 11, 12, 13, 14, 15], [100, 101, 102, 103, 104, 105]
    parents = [-1, -1, 0, 2, 0, 1]
    calibration = NodeCalibration()
    calibration.learn(tokens, parents, keys, [10, 12, 99])
    got = {key: tuple(stats) for key, stats in calibration.stats.items()}
    # Tested: a, b (root's children), c, e (a's), d (c's, whose next token 99 is known); not f.
    assert got == {100: (1.0, 1.0), 101: (0.0, 1.0), 102: (1.0, 1.0), 104: (0.0, 1.0), 103: (0.0, 1.0)}
    wrong_variants = [
        {100: (1.0, 1.0), 101: (0.0, 1.0), 102: (1.0, 1.0), 104: (0.0, 1.0)},  # forgets the bonus level
        {key: (float(key in (100, 102)), 1.0) for key in keys},  # every node counted as tested
        {100: (1.0, 1.0), 102: (1.0, 1.0)},  # only the accepted path
    ]
    assert all(got != wrong for wrong in wrong_variants)
    # Without a known next token (the response ended), the accepted node's children are not tested.
    ended = NodeCalibration()
    ended.learn(tokens, parents, keys, [10])
    assert {key: tuple(s) for key, s in ended.stats.items()} == {100: (1.0, 1.0), 101: (0.0, 1.0)}


def test_estimates_move_from_the_ratio_to_the_observed_rate():
    calibration = NodeCalibration(prior_weight=4.0)
    key = calibration_prefix(0, 3, 1) | 4
    for _ in range(12):
        calibration.learn([7], [-1], [key], [8])  # drafted 7, the target said 8
    accepted, tested = calibration.stats[key]
    assert (accepted, tested) == (0.0, 12.0)
    assert (accepted + 4.0 * 1.0) / (tested + 4.0) == pytest.approx(0.25)


def test_calibration_reorders_the_sources():
    """Global says 7 (ratio 1), local says 5 (ratio 1/2): once global nodes of this kind are seen to
    fail, local's branch comes first; failures recorded for another kind change nothing."""
    def first_token(failing_key=None) -> list[int]:
        index = budget_index(min_prob=0.0)
        index.cache_response([1, 2, 7])
        index.start_request("r", [1, 2, 5, 0, 1, 2])
        if failing_key is not None:
            index.calibration.stats[failing_key] = [0.0, 100.0]
        return index.speculate("r", max_tokens=1).tokens

    # Both candidates matched "1 2" (m = 2); global's pattern occurs once, local's twice.
    global_key = calibration_prefix(SOURCE_GLOBAL, 2, 1) | 4
    assert first_token() == [7]
    assert first_token(global_key) == [5]
    assert first_token(calibration_prefix(SOURCE_LOCAL, 2, 2) | 3) == [7]
    assert first_token(calibration_prefix(SOURCE_GLOBAL, 4, 1) | 4) == [7]  # another match length


# ---------------------------------------------------------------- in flight


def test_requests_in_flight_draft_from_each_others_output():
    index = budget_index()
    index.start_request("a", [0])
    index.extend("a", [40, 41, 42, 43, 44])  # a is still running: nothing is in the global index
    index.start_request("b", [5, 5, 5, 40, 41])
    index.extend("b", [9, 40, 41, 50])  # b's own "40 41" continues with 9 and 50
    index.extend("b", [3, 40, 41])
    nodes = nodes_of(index.speculate("b", max_tokens=8))
    # a's output is a source of its own: b's own occurrences do not dilute it.
    assert nodes[(42,)] == pytest.approx(1.0)
    assert nodes[(42, 43)] == pytest.approx(1.0)
    assert {(9,), (50,)} <= set(nodes)
    alone = budget_index(shared=0)
    alone.start_request("a", [0])
    alone.extend("a", [40, 41, 42, 43, 44])
    alone.start_request("b", [5, 5, 5, 40, 41])
    alone.extend("b", [9, 40, 41, 50, 3, 40, 41])
    assert (42,) not in nodes_of(alone.speculate("b", max_tokens=8))


def test_drafter_option_and_bad_values():
    drafter = SuffixDecodingDrafter(budget_mode=True, tree=True, max_depth=8)
    drafter.start_request(0, [1, 2, 3, 1, 2, 4, 1, 2])
    proposal = drafter.propose(0, max_tokens=6)
    assert 2 <= len(proposal) <= 6 and set(proposal.tokens[proposal.parents == -1].tolist()) == {3, 4}
    with pytest.raises(ValueError, match="max_shared_requests"):
        SuffixDecodingDrafter(budget_mode=True, max_shared_requests=-1)


# ---------------------------------------------------------------- properties against brute force

small_texts = st.lists(st.integers(0, 3), min_size=0, max_size=16)


@settings(max_examples=40, deadline=None)
@given(cached=st.lists(small_texts, max_size=3), prompt=small_texts, response=small_texts,
       depth=st.integers(1, 5), budget=st.integers(1, 6), min_prob=st.sampled_from([0.0, 0.1, 0.4]))
def test_a_fresh_budgeted_tree_is_the_top_of_every_candidates_paths(cached, prompt, response, depth, budget,
                                                                    min_prob):
    """Before any calibration: node values are the best ratio product over (source, matched suffix)
    candidates, and the tree holds the ``budget`` best of them (ties at the cut may go either way)."""
    index = budget_index(max_depth=depth, max_spec_tokens=6, min_prob=min_prob)
    for text in cached:
        index.cache_response(text)
    index.start_request("r", prompt)
    index.extend("r", response)
    draft = index.speculate("r", max_tokens=budget)
    context = prompt + response
    expected = brute_values([[context], cached], context, depth, 6, min_prob)
    nodes = nodes_of(draft)
    assert len(nodes) == len(draft.tokens) == min(budget, len(expected))
    for path, value in nodes.items():
        assert value == pytest.approx(expected[path])
        assert path[:-1] == () or path[:-1] in nodes
    best = sorted(expected.values(), reverse=True)[: len(nodes)]
    assert sorted(nodes.values(), reverse=True) == pytest.approx(best)


class ScrambledStats(dict):
    """Calibration statistics that exist for every group: a fixed pseudo-random acceptance record."""

    def get(self, key, default=None):
        return [float(key * 2654435761 % 7), 6.0]


def reference_values(index: SuffixIndex, request_id, budget: int) -> dict[tuple[int, ...], float]:
    """Best calibrated value of every path any candidate reaches, by plain depth-first enumeration."""
    request = index._active[request_id]
    calibration, min_prob = index.calibration, index.spec.min_token_prob
    sources = [(SOURCE_LOCAL, request.local, *request.local.tail_state(index.max_depth)),
               (SOURCE_GLOBAL, index._global, *index._global.match(list(request.tail), index.max_depth))]
    values: dict[tuple[int, ...], float] = {}
    for source, automaton, state, matched in sources:
        while state > 0:
            def visit(s, path, value, prob):
                if len(path) == budget:
                    return
                total = automaton.count[s]
                for token, child in automaton.children(s):
                    c = automaton.count[child]
                    if c == 0 or prob * c / total < min_prob:
                        continue
                    key = calibration_prefix(source, matched + len(path), total) | ratio_bin(c / total)
                    seen = calibration.stats.get(key)
                    estimate = (seen[0] + calibration.prior_weight * c / total) / (seen[1] + calibration.prior_weight)
                    child_value = value * min(1.0, estimate)
                    extended = path + (token,)
                    values[extended] = max(values.get(extended, 0.0), child_value)
                    visit(child, extended, child_value, prob * c / total)

            visit(state, (), 1.0, 1.0)
            state = automaton.link[state]
            matched = automaton.length[state]
    return values


@settings(max_examples=40, deadline=None)
@given(cached=st.lists(small_texts, max_size=3), prompt=small_texts, response=small_texts,
       budget=st.integers(1, 8), min_prob=st.sampled_from([0.0, 0.2]))
def test_a_calibrated_tree_is_the_top_of_every_candidates_calibrated_paths(cached, prompt, response, budget,
                                                                           min_prob):
    """The inlined chains and the heap of ``draft_merged`` against a plain enumeration, with calibration
    estimates that differ per group (so values decay along chains and reorder siblings)."""
    index = budget_index(max_depth=4, max_spec_tokens=8, min_prob=min_prob)
    index.calibration.stats = ScrambledStats()
    for text in cached:
        index.cache_response(text)
    index.start_request("r", prompt)
    index.extend("r", response)
    draft = index.speculate("r", max_tokens=budget)
    expected = reference_values(index, "r", budget)
    nodes = nodes_of(draft)
    assert len(nodes) == len(draft.tokens) == min(budget, len(expected))
    for path, value in nodes.items():
        assert value == pytest.approx(expected[path])
        assert path[:-1] == () or path[:-1] in nodes
    best = sorted(expected.values(), reverse=True)[: len(nodes)]
    assert sorted(nodes.values(), reverse=True) == pytest.approx(best)


@settings(max_examples=100, deadline=None)
@given(text=st.lists(st.integers(0, 3), min_size=1, max_size=40), prompt=small_texts,
       chunks=st.lists(st.tuples(st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=20))
def test_carried_shared_matches_equal_fresh_ones_when_the_other_writes_first(text, prompt, chunks):
    """Request b writes what request a wrote before it (a stays ahead): b's match in a's index,
    carried from step to step, is the one a fresh match finds."""
    index = budget_index(max_depth=6, max_spec_tokens=6)
    index.start_request("a", prompt)
    index.start_request("b", [])
    written_a = written_b = 0
    for ahead, behind in chunks:
        index.extend("a", text[written_a: written_a + ahead])
        written_a = min(len(text), written_a + ahead)
        step = min(behind, written_a - written_b)
        index.extend("b", text[written_b: written_b + step])
        written_b += step
        index.speculate("b", max_tokens=4)
        request_b, request_a = index._active["b"], index._active["a"]
        _, state, matched, _ = request_b.shared_matches[id(request_a)]
        assert (state, matched) == request_a.local.match(list(request_b.tail), 6)
