"""The compiled suffix core (csrc/suffix_core.cpp) against its pure-Python reference: bit-identical drafts."""

from __future__ import annotations

import math
import os
import pathlib
import subprocess
import sys
from array import array

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specjax.drafters import suffix_index
from specjax.drafters.suffix_index import SpecParams, SuffixDecodingDrafter, SuffixIndex
from specjax.drafters.suffix_reference import NodeCalibration, SuffixAutomaton
from specjax.engine import replay

SAMPLE = pathlib.Path(__file__).resolve().parent / "data" / "agentic_sample.jsonl.gz"
ROOT = pathlib.Path(__file__).resolve().parents[1]
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


# ---------------------------------------------------------------- hostile input (the crashes themselves: test_suffix_core_fuzz.py)


def both_automata(sequences: list[list[int]], depth: int = 4) -> list:
    automata = [SuffixAutomaton(depth)] + ([core.SuffixAutomaton(depth)] if core is not None else [])
    for automaton in automata:
        for tokens in sequences:
            automaton.extend(tokens)
            automaton.end_sequence()
    return automata


def counts_of(automaton) -> list[int]:
    return list(automaton.count)


@pytest.mark.parametrize("removed, message", [
    ([1, 9], r"tokens\[1\] does not continue"),  # a missing transition
    ([1, 2, 3], r"would fall below zero"),  # added once, removed twice (the first removal below succeeds)
])
def test_removing_tokens_never_added_raises_and_changes_nothing(removed, message):
    """Both cores: before, the reference read link[-1] (the last state) and the compiled core out of bounds."""
    for automaton in both_automata([[1, 2, 3], [4, 1, 2]]):
        if removed == [1, 2, 3]:
            automaton.remove(removed)
        before = counts_of(automaton)
        with pytest.raises(ValueError, match=message):
            automaton.remove(removed)
        assert counts_of(automaton) == before, type(automaton)


@pytest.mark.parametrize("max_len", [0, -1, -5])
def test_a_match_cap_below_one_is_refused(max_len):
    """A cap below one walked past the root (link -1) in both cores."""
    for automaton in both_automata([[1, 2, 3, 1, 2]]):
        with pytest.raises(ValueError, match="max_len must be"):
            automaton.match([1, 2, 3], max_len)
        with pytest.raises(ValueError, match="max_len must be"):
            automaton.advance(0, 0, [1, 2], max_len)


@pytest.mark.parametrize("factor, offset", [(math.nan, 0.0), (math.inf, 0.0), (1.0, math.nan), (1.0, -math.inf)])
def test_spec_params_refuse_non_finite_budgets(factor, offset):
    with pytest.raises(ValueError, match="must be (a )?finite"):
        SpecParams(4, max_spec_factor=factor, max_spec_offset=offset)


@pytest.mark.parametrize("prior", [math.nan, -1.0, math.inf])
def test_calibration_refuses_a_prior_no_estimate_can_use(prior):
    with pytest.raises(ValueError, match="prior_weight must be a finite number >= 0"):
        NodeCalibration(prior)


@pytest.mark.parametrize("factor, offset, size", [(1e300, 0.0, 5), (1.7e308, 1e308, 5), (0.0, 1e19, 5),
                                                  (0.5, -1e300, 0)])
def test_budgets_past_the_int64_range_equal_the_reference(factor, offset, size):
    """The compiled core converted such a budget to an integer with an undefined cast; the reference
    overflowed on an infinite one. Both cap it now: bit-identical drafts."""
    spec = SpecParams(6, max_spec_factor=factor, max_spec_offset=offset, tree=True, min_token_prob=0.0)
    assert spec.budget(3, 4) == min(size, 4)
    indexes = [SuffixIndex(spec, max_depth=4, compiled=compiled) for compiled in (False, True)[:1 + (core is not None)]]
    drafts = []
    for index in indexes:
        index.cache_response([1, 2, 3, 4, 5, 1, 2, 3, 6])
        index.start_request("r", [7, 1, 2])
        drafts.append(index.propose("r", 5))
    assert len(drafts[0].tokens) == size  # capped by the 5 asked for
    for draft in drafts[1:]:
        assert_same_proposal(draft, drafts[0], 0)


@needs_core
@pytest.mark.parametrize("call, message", [
    (lambda: core.learn({}, array("i", [5]).tobytes(), array("i", [2**30]).tobytes(), array("q", [0]).tobytes(),
                        [5, 6]), r"parents\[0\] = 1073741824"),
    (lambda: core.learn({}, b"\0" * 4, b"\0" * 4, b"\0" * 4, []), "differ in length|8-byte items"),
    (lambda: core.best_draft(core.SuffixAutomaton(4), 0, 0, 4, 4, math.nan, 0.0, 0.1, False, 0.0),
     "factor must be a finite float"),
    (lambda: core.best_draft(core.SuffixAutomaton(4), 3, 0, 4, 4, 1.0, 0.0, 0.1, False, 0.0), "state 3 out of range"),
    (lambda: core.budgeted_draft([(0, "automaton", 0, 0)], {}, 4.0, 8, 0.1), "must be a _suffix_core.SuffixAutomaton"),
    (lambda: core.budgeted_draft([], {}, -1.0, 8, 0.1), "prior must be a finite float"),
    (lambda: core.SuffixAutomaton(4).advance(0, -1, [1], 4), r"matched must be in \[0, 2147483647\]"),
    (lambda: core.SuffixAutomaton(4).extend([1, "x"]), r"tokens\[1\] must be an int token id, got str"),
    (lambda: core.SuffixAutomaton(4).tail_state(None), "max_len must be an int, got NoneType"),
])
def test_bad_arguments_get_errors_naming_them(call, message):
    with pytest.raises((TypeError, ValueError, IndexError), match=message):
        call()


@needs_core
def test_a_huge_budget_drafts_what_the_automata_hold():
    """``reserve(budget)`` threw std::length_error past the old ``guarded`` (an abort); the budget only bounds."""
    local = core.SuffixAutomaton(8)
    local.extend([1, 2, 3, 1, 2, 4, 1, 2])
    state, matched = local.tail_state(4)
    tokens, *_ = core.budgeted_draft([(0, local, state, matched)], {}, 4.0, 2**62, 0.0)
    small, *_ = core.budgeted_draft([(0, local, state, matched)], {}, 4.0, 64, 0.0)
    assert bytes(tokens) == bytes(small) and len(tokens) > 0


@needs_core
def test_a_statistics_lookup_cannot_mutate_the_automata_a_draft_reads():
    """A dict subclass's get() runs Python code in the middle of a draft: mutations are refused, not UB."""
    local = core.SuffixAutomaton(8)
    local.extend([1, 2, 3, 1, 2, 4, 1, 2, 5, 1, 2])
    refused = []

    class Meddling(dict):
        def get(self, key, default=None):
            for mutate in (lambda: local.remove([1, 2]), lambda: local.extend([9]), local.end_sequence):
                with pytest.raises(RuntimeError, match="being read by a draft") as err:
                    mutate()
                refused.append(err)
            return [1.0, 2.0]

    state, matched = local.tail_state(4)
    tokens, *_ = core.budgeted_draft([(0, local, state, matched), (1, local, state, matched)], Meddling(), 4.0, 8, 0.0)
    assert len(tokens) > 0 and refused
    local.extend([9])  # usable again once the draft is done


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "SPECJAX_REQUIRE_SUFFIX_CORE"} | env
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


@pytest.mark.parametrize("required", ["1", "0"])
def test_a_required_core_fails_the_import_instead_of_falling_back(required):
    """SPECJAX_REQUIRE_SUFFIX_CORE=1 (CI) turns a missing core into an ImportError; 0 keeps the fallback."""
    blocked = ("import sys\nsys.modules['specjax.drafters._suffix_core'] = None  # as if it was never built\n"
               "from specjax.drafters import suffix_index\nprint(suffix_index._suffix_core is None)\n")
    result = run_python(blocked, SPECJAX_REQUIRE_SUFFIX_CORE=required)
    if required == "1":
        assert result.returncode != 0 and "ImportError: SPECJAX_REQUIRE_SUFFIX_CORE=1" in result.stderr, result.stderr
    else:
        assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr


@pytest.mark.parametrize("required", ["1", "0"])
def test_a_required_core_fails_the_build_without_a_compiler(required, tmp_path):
    """setup.py with a compiler that always fails: the required build fails, the optional one only warns."""
    result = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(tmp_path / "lib"), "--build-temp",
         str(tmp_path / "tmp")], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env=os.environ | {"SPECJAX_REQUIRE_SUFFIX_CORE": required, "CC": "false", "CXX": "false"})
    assert (result.returncode != 0) == (required == "1"), result.stderr[-2000:]
    assert not list((tmp_path / "lib").rglob("_suffix_core*"))
