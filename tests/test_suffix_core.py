"""The compiled suffix core (csrc/suffix_core.cpp) against its pure-Python reference: bit-identical drafts."""

from __future__ import annotations

import os
import pathlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specjax.drafters import replay, suffix_index
from specjax.drafters.suffix_index import SpecParams, SuffixAutomaton, SuffixDecodingDrafter, SuffixIndex

SAMPLE = pathlib.Path(__file__).resolve().parent / "data" / "agentic_sample.jsonl.gz"
core = suffix_index._suffix_core
needs_core = pytest.mark.skipif(core is None, reason="specjax.drafters._suffix_core is not built")


def test_the_compiled_core_is_built():
    """`pip install -e .` builds it wherever a C++ compiler exists (CI included); only an explicit opt-out skips."""
    if os.environ.get("SPECJAX_SUFFIX_CORE") == "python":
        pytest.skip("SPECJAX_SUFFIX_CORE=python")
    assert core is not None, "the compiled suffix core was not built: reinstall with `pip install -e .`"
    assert SuffixIndex(SpecParams(4)).compiled


def test_the_environment_variable_selects_the_core(monkeypatch):
    monkeypatch.setenv("SPECJAX_SUFFIX_CORE", "python")
    assert not SuffixIndex(SpecParams(4)).compiled
    monkeypatch.setenv("SPECJAX_SUFFIX_CORE", "fast")
    with pytest.raises(ValueError, match="SPECJAX_SUFFIX_CORE must be auto, python or compiled, got 'fast'"):
        SuffixIndex(SpecParams(4))
    monkeypatch.setattr(suffix_index, "_suffix_core", None)
    monkeypatch.setenv("SPECJAX_SUFFIX_CORE", "auto")
    assert not SuffixIndex(SpecParams(4)).compiled  # not built: the reference serves
    monkeypatch.setenv("SPECJAX_SUFFIX_CORE", "compiled")
    with pytest.raises(ImportError, match="_suffix_core is not built"):
        SuffixIndex(SpecParams(4))


# ---------------------------------------------------------------- lockstep drafters


class Lockstep:
    """A replay backend running the compiled and the Python drafter side by side, asserting equal drafts."""

    name = "lockstep"

    def __init__(self, config: replay.ReplayConfig):
        self.config = config
        self.drafters = [self._drafter(compiled) for compiled in (True, False)]
        self.steps = 0

    def _drafter(self, compiled: bool) -> SuffixDecodingDrafter:
        c = self.config
        drafter = SuffixDecodingDrafter(max_depth=c.max_depth, max_spec_tokens=c.spec_tokens, tree=c.tree,
                                        min_token_prob=c.min_token_prob, max_cached_requests=c.max_cached_requests,
                                        budget_mode=c.budget is not None, max_shared_requests=c.max_shared_requests)
        index = drafter.index
        drafter.index = SuffixIndex(index.spec, index.max_depth, index.max_cached_requests, index.budgeted,
                                    index.max_shared_requests, compiled=compiled)
        return drafter

    def start(self, request_id, prompt):
        for drafter in self.drafters:
            drafter.start_request(request_id, prompt)

    def speculate(self, request_id):
        size = self.config.spec_tokens if self.config.budget is None else self.config.budget
        compiled, reference = (drafter.propose(request_id, size) for drafter in self.drafters)
        assert_same_proposal(compiled, reference, self.steps)
        self.steps += 1
        return compiled.tokens.tolist(), compiled.parents.tolist(), 0.0

    def extend(self, request_id, tokens):
        for drafter in self.drafters:
            drafter.observe(request_id, tokens)
        return 0.0

    def stop(self, request_id):
        for drafter in self.drafters:
            drafter.stop_request(request_id)

    def prefill(self, request_id, request):
        for drafter in self.drafters:
            drafter.index.cache_response(request.response_ids)

    def bytes_per_token(self):
        return None


def assert_same_proposal(compiled, reference, step: int) -> None:
    where = f"step {step}"
    assert compiled.tokens.tolist() == reference.tokens.tolist(), where
    assert compiled.parents.tolist() == reference.parents.tolist(), where
    assert compiled.probs.tobytes() == reference.probs.tobytes(), where
    assert (compiled.score, compiled.match_len) == (reference.score, reference.match_len), where


@needs_core
@pytest.mark.parametrize("config, concurrency", [
    (replay.ReplayConfig(), 1),  # the SuffixDecoding rule, chain
    (replay.ReplayConfig(tree=True), 1),
    (replay.ReplayConfig(tree=True, budget=64), 1),  # budgeted trees
    (replay.ReplayConfig(tree=True, budget=64), 4),  # with in-flight sharing between the 4 tau trials
    (replay.ReplayConfig(tree=True, budget=16, max_cached_requests=2), 4),  # evictions: remove and rebuild
    # No pruning: every continuation is a node, past the core's cached top-16 rankings.
    (replay.ReplayConfig(tree=True, min_token_prob=0.0), 1),
    (replay.ReplayConfig(tree=True, budget=64, min_token_prob=0.0), 1),
], ids=["chain", "tree", "budget64", "budget64-shared", "budget16-evicting", "tree-unpruned", "budget64-unpruned"])
def test_compiled_drafts_equal_the_reference_on_the_agentic_sample(config, concurrency):
    requests = replay.load_traces(str(SAMPLE))
    backend = Lockstep(config)
    replay.replay(requests, [backend], concurrency=concurrency)
    assert backend.steps > 1000
    compiled, reference = (drafter.index for drafter in backend.drafters)
    assert compiled.calibration.stats == reference.calibration.stats
    assert compiled.cached_responses == reference.cached_responses


@needs_core
def test_replay_reports_equal_tokens_per_step_with_either_core(monkeypatch):
    requests = replay.load_traces(str(SAMPLE))
    config = replay.ReplayConfig(tree=True, budget=64)
    results = []
    for choice in ("compiled", "python"):
        monkeypatch.setenv("SPECJAX_SUFFIX_CORE", choice)
        backend = replay.SpecjaxBackend(config)
        assert backend.drafter.index.compiled == (choice == "compiled")
        stats = replay.replay(requests, [backend], concurrency=4)[0]
        results.append({task: (s.response_tokens, s.accepted, s.drafted) for task, s in stats.items()})
    assert results[0] == results[1]


# ---------------------------------------------------------------- randomized


texts = st.lists(st.integers(0, 3), max_size=24)


@needs_core
@settings(max_examples=60, deadline=None)
@given(sequences=st.lists(st.tuples(texts, st.booleans()), min_size=1, max_size=5), removed=st.integers(0, 4),
       depth=st.integers(2, 6), probe=texts)
def test_compiled_automaton_equals_the_reference(sequences, removed, depth, probe):
    """Same states, links, counts, rankings and matches after appends, sequence ends and a removal."""
    automata = [core.SuffixAutomaton(depth), SuffixAutomaton(depth)]
    for automaton in automata:
        for tokens, end in sequences:
            automaton.extend(tokens)
            if end:
                automaton.end_sequence()
        whole = removed < len(sequences) and sequences[removed][1] and (removed == 0 or sequences[removed - 1][1])
        if whole:  # a sequence written on its own, as cached responses are
            automaton.remove(sequences[removed][0])
    compiled, reference = automata
    assert compiled.num_states == reference.num_states and compiled.clock == reference.clock
    assert compiled.length == reference.length.tolist() and compiled.link == reference.link.tolist()
    assert compiled.count == reference.count.tolist()
    for state in range(reference.num_states):
        assert compiled.ranked_children(state) == reference.ranked_children(state)
        assert compiled.children(state) == sorted(reference.children(state))
    for max_len in (1, 3, 64):
        assert compiled.tail_state(max_len) == reference.tail_state(max_len)
        assert compiled.match(probe, max_len) == reference.match(probe, max_len)
    if probe:
        assert compiled.count_of(probe) == reference.count_of(probe)


@needs_core
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), budgeted=st.booleans(), tree=st.booleans(),
       min_prob=st.sampled_from([0.0, 0.1, 0.3]), factor=st.sampled_from([0.5, 1.0, 2.0]))
def test_compiled_index_drafts_equal_the_reference_on_random_requests(seed, budgeted, tree, min_prob, factor):
    """Three interleaved requests over a 4-token alphabet (many ties), accepting random draft prefixes."""
    rng = np.random.default_rng(seed)
    spec = SpecParams(8, max_spec_factor=factor, min_token_prob=min_prob, tree=tree)
    indexes = [SuffixIndex(spec, max_depth=5, max_cached_requests=3, budgeted=budgeted, max_shared_requests=2,
                           compiled=compiled) for compiled in (True, False)]
    for request in range(8):
        active = [(request, r) for r in range(3)]
        for rid in active:
            prompt = rng.integers(0, 4, rng.integers(0, 12)).tolist()
            for index in indexes:
                index.start_request(rid, prompt)
        for step in range(12):
            for rid in active:
                budget = int(rng.integers(1, 10))
                compiled, reference = (index.speculate(rid, budget).to_proposal() for index in indexes)
                assert_same_proposal(compiled, reference, step)
                accepted = compiled.tokens[:int(rng.integers(0, len(compiled.tokens) + 1))].tolist()
                emitted = accepted + rng.integers(0, 4, 1).tolist()
                for index in indexes:
                    index.extend(rid, emitted)
        for rid in active:
            for index in indexes:
                index.stop_request(rid)
    assert indexes[0].calibration.stats == indexes[1].calibration.stats


@needs_core
@pytest.mark.parametrize("tokens", [[2**31], [-1]])
def test_the_compiled_automaton_rejects_ids_outside_int32(tokens):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 2\*\*31\)"):
        core.SuffixAutomaton(4).extend(tokens)
