"""The suffix index: counts, matches and drafts checked against brute force over the raw text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specjax.drafters.base import Proposal
from specjax.drafters.suffix_index import SpecParams, SuffixDecodingDrafter, SuffixIndex, token_list
from specjax.drafters.suffix_reference import SuffixAutomaton

# ---------------------------------------------------------------- brute force


def occurrences(texts: list[list[int]], pattern: list[int]) -> int:
    n = len(pattern)
    return sum(text[end - n:end] == pattern for text in texts for end in range(n, len(text) + 1))


def last_end(texts: list[list[int]], pattern: list[int]) -> int:
    """Clock (tokens appended so far, all texts in order) at the latest occurrence's end; -1 if none."""
    n, clock, latest = len(pattern), 0, -1
    for text in texts:
        for end in range(n, len(text) + 1):
            if text[end - n:end] == pattern:
                latest = clock + end
        clock += len(text)
    return latest


def brute_chain(texts, pattern, budget, min_prob):
    """Greedy path: most frequent continuation, ties to the most recent; stop below min_prob."""
    tokens, probs, prob = [], [], 1.0
    alphabet = sorted({t for text in texts for t in text})
    while len(tokens) < budget:
        here = pattern + tokens
        scored = [(occurrences(texts, here + [t]), last_end(texts, here + [t]), t) for t in alphabet]
        count, _, token = max(scored)
        if count == 0:
            break
        total = occurrences(texts, here)
        prob = prob if count == total else prob * count / total
        if prob < min_prob:
            break
        tokens.append(token)
        probs.append(prob)
    return tokens, probs


def brute_tree_score(texts, pattern, budget, min_prob):
    """Sum of the ``budget`` most likely continuations (probabilities shrink down a path,
    so this is what best-first growth collects whatever its tie order)."""
    alphabet = sorted({t for text in texts for t in text})
    found = []

    def visit(path, prob):
        if len(path) == budget:
            return
        for t in alphabet:
            c, total = occurrences(texts, pattern + path + [t]), occurrences(texts, pattern + path)
            p = prob if c == total else prob * c / total
            if c and p >= min_prob:
                found.append(p)
                visit(path + [t], p)

    visit([], 1.0)
    return sum(sorted(found, reverse=True)[:budget])


def brute_best(local_text, cached, spec: SpecParams, max_depth: int, limit: int):
    """(score, match_len, source) over every matched suffix length of both indexes, as the drafter ranks them."""
    best = (0.0, 0, "none")
    for source, texts in (("local", [local_text]), ("global", cached)):
        for m in range(1, min(max_depth, len(local_text)) + 1):
            pattern = local_text[-m:]
            if not occurrences(texts, pattern):
                continue
            budget = spec.budget(m, limit)
            if spec.tree:
                score = brute_tree_score(texts, pattern, budget, spec.min_token_prob)
            else:
                score = sum(brute_chain(texts, pattern, budget, spec.min_token_prob)[1])
            if score > best[0] + 1e-9 or (abs(score - best[0]) <= 1e-9 and source == best[2] and m > best[1]):
                best = (score, m, source)
    return best


def path_of(draft, i):
    path = []
    while i >= 0:
        path.append(draft.tokens[i])
        i = draft.parents[i]
    return path[::-1]


def make_index(max_depth=8, max_spec_tokens=8, tree=False, min_prob=0.1, factor=1.0, offset=0.0, max_cached=None):
    spec = SpecParams(max_spec_tokens, factor, offset, min_prob, tree)
    return SuffixIndex(spec, max_depth, max_cached)


# ---------------------------------------------------------------- hand-built examples


def test_counts_and_match_in_a_small_text():
    automaton = SuffixAutomaton(count_depth=8)
    automaton.extend([1, 2, 3, 1, 2, 4, 1, 2, 3])
    assert automaton.count_of([1, 2]) == 3
    assert automaton.count_of([1, 2, 3]) == 2
    assert automaton.count_of([2, 4]) == 1
    assert automaton.count_of([4, 4]) == 0
    state, matched = automaton.match([9, 9, 2, 4, 1], max_len=8)
    assert matched == 3  # "2 4 1" occurs, "9 2 4 1" does not
    assert automaton.count[state] == 1


def test_chain_draft_probabilities_are_count_ratios():
    index = make_index(max_depth=4, max_spec_tokens=4)
    for response in ([5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 1, 2]):
        index.cache_response(response)
    index.start_request("r", [0, 0, 5, 6])
    draft = index.speculate("r")
    # "5 6" occurs 3 times: 7 follows twice (p = 2/3); after "5 6 7", 8 and 9 tie and the
    # most recent (9) wins with p = 2/3 * 1/2. The budget is match_len = 2.
    assert draft.tokens == [7, 9]
    assert draft.parents == [-1, 0]
    assert draft.probs == pytest.approx([2 / 3, 1 / 3])
    assert draft.score == pytest.approx(1.0)
    assert draft.match_len == 2


def test_tree_draft_grows_best_first():
    index = make_index(max_depth=4, max_spec_tokens=4, tree=True, factor=2.0)
    for response in [[5, 6, 7, 8]] * 3 + [[5, 6, 1, 2]] * 2 + [[5, 6, 7, 9]]:
        index.cache_response(response)
    index.start_request("r", [0, 5, 6])
    draft = index.speculate("r", max_tokens=3)
    # After "5 6": 7 (4/6), then 7 8 (4/6 * 3/4), then 1 (2/6); 1 2 (2/6) and 7 9 (1/6) miss the cut.
    nodes = {tuple(path_of(draft, i)): p for i, p in enumerate(draft.probs)}
    assert nodes == pytest.approx({(7,): 2 / 3, (7, 8): 1 / 2, (1,): 1 / 3})
    assert draft.score == pytest.approx(1.5)
    assert draft.match_len == 2


def test_min_token_prob_cuts_unlikely_continuations():
    index = make_index(max_depth=4, max_spec_tokens=4, min_prob=0.5)
    for response in ([5, 6, 7, 8], [5, 6, 7, 9], [5, 6, 1, 2]):
        index.cache_response(response)
    index.start_request("r", [0, 5, 6])
    assert index.speculate("r").tokens == [7]  # 7 then (8 or 9) at 1/3 < 0.5


def test_budget_grows_with_the_match():
    index = make_index(max_depth=16, max_spec_tokens=16, factor=0.5, offset=1)
    index.cache_response(list(range(20)))
    index.start_request("short", [3])
    index.start_request("long", [0, 1, 2, 3, 4, 5])
    assert index.speculate("short").tokens == [4]  # 0.5 * 1 + 1 = 1.5 -> 1
    assert index.speculate("long").tokens == [6, 7, 8, 9]  # 0.5 * 6 + 1 = 4
    assert index.speculate("long", max_tokens=2).tokens == [6, 7]


def test_local_index_drafts_from_the_prompt_and_output():
    index = make_index()
    index.start_request("r", [1, 2, 3, 4, 9, 9])
    index.extend("r", [1, 2])
    draft = index.speculate("r")
    # "1 2" occurs twice locally, once followed by 3 and once at the end (no continuation yet).
    assert draft.tokens[:2] == [3, 4]
    assert draft.probs[0] == pytest.approx(0.5)
    assert index.local_count("r", [1, 2]) == 2


def test_a_response_joins_the_global_index_when_the_request_stops():
    index = make_index()
    index.start_request("a", [7, 7])
    index.extend("a", [1, 2, 3])
    assert index.global_count([1, 2, 3]) == 0
    index.stop_request("a")
    assert index.global_count([1, 2, 3]) == 1
    index.start_request("b", [8, 1, 2])
    assert index.speculate("b").tokens == [3]


def test_ties_between_indexes_go_to_the_local_one():
    index = make_index(max_depth=2, max_spec_tokens=2)
    index.cache_response([1, 2, 5])
    index.start_request("r", [1, 2, 6, 0, 1, 2])
    draft = index.speculate("r")
    assert draft.tokens == [6, 0] and draft.score == pytest.approx(1.0)  # local: 1/2 + 1/2 beats nothing
    assert index.speculate("r").score == brute_best([1, 2, 6, 0, 1, 2], [[1, 2, 5]], index.spec, 2, 2)[0]


def test_fifo_eviction_keeps_the_newest_responses():
    index = make_index(max_cached=2)
    for response in ([1, 2], [3, 4], [5, 6]):
        index.cache_response(response)
    assert index.cached_responses == [[3, 4], [5, 6]]
    assert index.global_count([1, 2]) == 0
    assert index.global_count([3, 4]) == 1


def test_zero_cached_requests_disables_the_global_index():
    index = make_index(max_cached=0)
    index.cache_response([1, 2, 3])
    assert index.num_cached_requests == 0 and index.global_count([1]) == 0


def test_degenerate_repetition_stays_cheap_and_exact():
    automaton = SuffixAutomaton(count_depth=16)
    automaton.extend([7] * 5000)
    assert automaton.count_of([7] * 16) == 5000 - 15
    assert automaton.num_states <= 5001


# ---------------------------------------------------------------- input errors


@pytest.mark.parametrize("bad", [[1, -2], [1.5], ["a"], [2**31], np.array([[1, 2]]), np.array([0.5])])
def test_bad_token_ids_are_rejected(bad):
    with pytest.raises(ValueError, match="token ids|prompt_ids"):
        make_index().start_request("r", bad)


def test_numpy_token_ids_are_accepted():
    assert token_list(np.array([3, 4], np.int32)) == [3, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_depth=0), "max_depth"),
    (dict(max_spec_tokens=0), "max_spec_tokens"),
    (dict(max_spec_factor=-1.0), "max_spec_factor"),
    (dict(min_token_prob=1.5), "min_token_prob"),
    (dict(max_cached_requests=-1), "max_cached_requests"),
])
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SuffixDecodingDrafter(**kwargs)


def test_unknown_and_duplicate_requests_are_errors():
    drafter = SuffixDecodingDrafter()
    drafter.start_request(1, [1, 2])
    with pytest.raises(ValueError, match="already active"):
        drafter.start_request(1, [3])
    for call in (lambda: drafter.propose(2, 4), lambda: drafter.observe(2, [1]), lambda: drafter.stop_request(2)):
        with pytest.raises(ValueError, match="not active"):
            call()


# ---------------------------------------------------------------- the HostDrafter contract


def test_drafter_returns_a_valid_proposal():
    drafter = SuffixDecodingDrafter(tree=True, max_depth=8)
    drafter.start_request(0, [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 3, 6])
    drafter.observe(0, [1, 2])
    proposal = drafter.propose(0, max_tokens=3)
    assert isinstance(proposal, Proposal)
    assert proposal.tokens.dtype == np.int32 and proposal.parents.dtype == np.int32
    assert proposal.probs.dtype == np.float32
    assert 1 <= len(proposal) <= 3
    assert all(-1 <= p < i for i, p in enumerate(proposal.parents))
    assert proposal.tokens[0] == 3 and proposal.match_len >= 2
    assert len(drafter.propose(0, max_tokens=0)) == 0
    drafter.stop_request(0)
    assert drafter.index.cached_responses == [[1, 2]]


# ---------------------------------------------------------------- properties against brute force

small_texts = st.lists(st.integers(0, 3), min_size=0, max_size=24)


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(small_texts, min_size=1, max_size=4), depth=st.integers(2, 6), data=st.data())
def test_counts_match_brute_force_with_removals(texts, depth, data):
    automaton = SuffixAutomaton(count_depth=depth)
    for text in texts:
        automaton.extend(text)
        automaton.end_sequence()
    removed = data.draw(st.sets(st.integers(0, len(texts) - 1)))
    for i in sorted(removed):
        automaton.remove(texts[i])
    live = [text for i, text in enumerate(texts) if i not in removed]
    patterns = {tuple(text[s:e]) for text in texts for s in range(len(text))
                for e in range(s + 1, min(len(text), s + depth) + 1)}
    for pattern in patterns:
        assert automaton.count_of(list(pattern)) == occurrences(live, list(pattern)), pattern


@settings(max_examples=40, deadline=None)
@given(cached=st.lists(small_texts, max_size=3), prompt=small_texts, response=small_texts,
       tree=st.booleans(), depth=st.integers(1, 6), spec_tokens=st.integers(1, 6),
       factor=st.sampled_from([0.5, 1.0, 2.0]), min_prob=st.sampled_from([0.0, 0.1, 0.4]))
def test_drafts_occur_in_the_text_with_brute_force_probabilities(cached, prompt, response, tree, depth, spec_tokens,
                                                                factor, min_prob):
    index = make_index(depth, spec_tokens, tree, min_prob, factor)
    for text in cached:
        index.cache_response(text)
    index.start_request("r", prompt)
    context = list(prompt)
    for token in response:  # speculate at every step, as the engine does
        draft = index.speculate("r")
        expected = brute_best(context, cached, index.spec, depth, spec_tokens)
        assert draft.score == pytest.approx(expected[0], abs=1e-9)
        if draft.tokens:
            assert (draft.match_len, "local") == expected[1:] or (draft.match_len, "global") == expected[1:]
            source = [context] if expected[2] == "local" else cached
            pattern = context[-draft.match_len:]
            assert len(draft.tokens) <= index.spec.budget(draft.match_len, spec_tokens)
            for i, parent in enumerate(draft.parents):
                assert -1 <= parent < i
                path = path_of(draft, i)
                assert occurrences(source, pattern + path) > 0  # the drafted path follows the match in the text
                ratio = occurrences(source, pattern + path) / occurrences(source, pattern + path[:-1])
                parent_prob = draft.probs[parent] if parent >= 0 else 1.0
                assert draft.probs[i] == pytest.approx(parent_prob * ratio)
                assert draft.probs[i] >= min_prob
            if not tree:
                assert (draft.tokens, draft.probs) == brute_chain(source, pattern, len(draft.tokens), min_prob)
        index.extend("r", [token])
        context.append(token)


@settings(max_examples=40, deadline=None)
@given(responses=st.lists(small_texts, min_size=1, max_size=8), max_cached=st.integers(1, 4),
       probes=st.lists(small_texts, min_size=1, max_size=4), tree=st.booleans())
def test_eviction_equals_a_rebuild_from_the_remaining_responses(responses, max_cached, probes, tree):
    evicting = make_index(max_depth=5, max_spec_tokens=5, tree=tree, max_cached=max_cached)
    for response in responses:
        evicting.cache_response(response)
    remaining = responses[-max_cached:]
    assert evicting.cached_responses == remaining
    rebuilt = make_index(max_depth=5, max_spec_tokens=5, tree=tree)
    for response in remaining:
        rebuilt.cache_response(response)
    patterns = {tuple(r[s:e]) for r in responses for s in range(len(r)) for e in range(s + 1, min(len(r), s + 5) + 1)}
    for pattern in patterns:
        assert evicting.global_count(list(pattern)) == rebuilt.global_count(list(pattern))
    for i, probe in enumerate(probes):
        evicting.start_request(i, probe)
        rebuilt.start_request(i, probe)
        assert evicting.speculate(i) == rebuilt.speculate(i)



@settings(max_examples=40, deadline=None)
@given(prompts=st.lists(small_texts, min_size=2, max_size=3), events=st.lists(st.tuples(st.integers(0, 2),
       st.integers(0, 3)), max_size=40), max_cached=st.sampled_from([None, 1, 2]), tree=st.booleans())
def test_interleaved_requests_match_brute_force(prompts, events, max_cached, tree):
    """Requests finish (and get evicted) while others are mid-flight: their global matches must follow."""
    index = make_index(max_depth=4, max_spec_tokens=4, tree=tree, max_cached=max_cached)
    contexts = {i: list(p) for i, p in enumerate(prompts)}
    responses = {i: [] for i in contexts}
    for i, prompt in enumerate(prompts):
        index.start_request(i, prompt)
    for who, token in events:
        if who not in contexts:
            continue
        if token == 3 and responses[who]:  # finish this request, start a fresh one in its place
            index.stop_request(who)
            index.start_request(who, contexts[who][:2])
            contexts[who], responses[who] = contexts[who][:2], []
            continue
        cached = index.cached_responses
        assert index.speculate(who).score == pytest.approx(brute_best(contexts[who], cached, index.spec, 4, 4)[0],
                                                           abs=1e-9)
        index.extend(who, [token])
        contexts[who].append(token)
        responses[who].append(token)
