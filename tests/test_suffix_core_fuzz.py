"""Hostile input never kills the interpreter: every entry point of the compiled suffix core, fuzzed.

The calls run in a worker process (tests/suffix_core_worker.py), so a crash of the core (a segfault, an
abort from an escaped C++ exception) is a dead worker, reported here as a failing example with the
program that killed it, and hypothesis shrinks it. Every call must return or raise a Python exception;
a SystemError (the C code broke the C-API contract) fails too. Arguments are mostly well typed with
hostile values (negative, huge and out-of-range ints, NaN and infinite floats, out-of-range states and
parents, misaligned buffers, long sequences, removals of never-added tokens), sometimes of the wrong
type or count, and sometimes re-entrant (a token id or a statistics lookup that mutates the automata
and the argument lists while the core reads them).

SPECJAX_FUZZ_SUFFIX_CORE=path/to/_suffix_core.so fuzzes another build of the core (an older one, or one
built with -fsanitize=address and run with LD_PRELOAD=libasan).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import select
import signal
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specjax.drafters import suffix_index

WORKER = pathlib.Path(__file__).resolve().parent / "suffix_core_worker.py"
CORE_FILE = os.environ.get("SPECJAX_FUZZ_SUFFIX_CORE") or getattr(suffix_index._suffix_core, "__file__", None)
PROGRAM_TIMEOUT_S = 30.0

pytestmark = pytest.mark.skipif(CORE_FILE is None, reason="specjax.drafters._suffix_core is not built")

# ---------------------------------------------------------------- hostile values

EDGE_INTS = [-1, -2, -2**31, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, -2**63, -2**63 - 1, 2**64, 10**30]
EDGE_FLOATS = [math.nan, math.inf, -math.inf, 1e300, -1e300, 1e19, -0.0, 0.0, 1e-320, 0.1, 0.5, 1.0, 2.0, -1.0]


def weighted(*choices):
    """One of the strategies, picked with the given weights: calls with ten arguments reach the core's
    deep paths only when most arguments are well typed, so each hostile value is rare on its own."""
    return st.sampled_from([strategy for weight, strategy in choices for _ in range(weight)]).flatmap(lambda s: s)


nat = st.integers(0, 24)
junk = st.one_of(st.none(), st.text(max_size=3), st.sampled_from(EDGE_FLOATS), st.just({"tuple": []}),
                 st.just([1, "x"]), st.just({"bytes": [1, 2]}), st.just({"stats": []}), st.just({"automaton": 0}))
ints = weighted((12, nat), (2, st.integers(-3, -1)), (3, st.sampled_from(EDGE_INTS)), (1, junk))
floats = weighted((10, st.floats(0, 4)), (4, st.sampled_from(EDGE_FLOATS)), (1, st.floats()), (1, nat), (1, junk))
unit = weighted((10, st.sampled_from([0.0, 0.05, 0.1, 0.3, 1.0])), (3, floats))
token = weighted((16, st.integers(0, 5)), (2, st.sampled_from(EDGE_INTS)),
                 (1, st.builds(lambda v: {"evil": v}, st.integers(0, 5))), (1, junk))
tokens = weighted(
    (10, st.lists(st.integers(0, 5), max_size=30)),  # valid ids: real paths through the automaton
    (4, st.lists(token, max_size=8)),
    (1, st.builds(lambda n, k: {"cycle": [n, k]}, st.sampled_from([1_000, 100_000]), st.integers(1, 6))),  # long
    (1, st.builds(lambda items: {"tuple": items}, st.lists(st.integers(0, 5), max_size=8))),
    (1, st.builds(lambda items: {"bytes": items}, st.lists(st.integers(0, 5), max_size=8))),
    (1, junk))
automaton = weighted((12, st.builds(lambda i: {"automaton": i}, st.integers(0, 3))), (1, junk))
record = st.tuples(st.integers(0, 8), st.integers(1, 8)).map(lambda r: [float(min(r)), float(r[1])])
stats_value = weighted((10, record), (2, st.lists(floats, min_size=2, max_size=2)), (1, st.lists(nat, max_size=3)),
                       (1, junk))
stats = weighted(
    (10, st.builds(lambda pairs: {"stats": pairs}, st.lists(st.tuples(st.integers(0, 2**12), stats_value), max_size=6))),
    (1, st.just({"reentrant": 0})), (1, junk))


def packed(typecode: str, values):
    return weighted((8, st.builds(lambda v, offset: {"packed": [typecode, v, offset]}, values,
                                  st.sampled_from([0, 0, 1, 3]))), (1, junk))


class Spread(tuple):
    """Several arguments drawn together (a draft's tokens, parents and keys)."""


def call(name: str, *arguments, on_automaton: bool = True):
    """A call of one entry point; its argument list is now and then one short or one too long."""

    def build(target, args, change):
        args = [item for arg in args for item in (arg if isinstance(arg, Spread) else (arg,))]
        if change < 0 and args:
            args.pop()
        elif change > 0:
            args.append(0)
        return [name, target if on_automaton else None, args]

    arity = weighted((14, st.just(0)), (1, st.just(-1)), (1, st.just(1)))
    return st.tuples(st.integers(0, 3), st.tuples(*arguments), arity).map(lambda drawn: build(*drawn))


source = weighted((10, st.builds(lambda s, a, state, m: {"tuple": [s, a, state, m]},
                                 weighted((10, st.integers(0, 2)), (1, ints)), automaton, ints,
                                 weighted((10, st.integers(0, 8)), (1, ints)))), (1, junk))
parents = weighted((8, st.lists(st.integers(-1, 6), max_size=8)), (1, st.lists(st.integers(-2**31, 2**31 - 1),
                                                                               max_size=8)))
node_keys = st.lists(st.integers(-2**63, 2**63 - 1), max_size=8)
learned = weighted(  # a draft's (tokens, parents, keys), of one length, with parents before their children
    (8, st.integers(0, 8).flatmap(lambda n: st.tuples(
        packed("i", st.lists(st.integers(0, 5), min_size=n, max_size=n)),
        packed("i", st.tuples(*(st.integers(-1, i - 1) for i in range(n))).map(list)),
        packed("q", st.lists(st.integers(0, 2**12), min_size=n, max_size=n))))),
    (1, st.tuples(packed("i", st.lists(st.integers(0, 5), max_size=8)), packed("i", parents), packed("q", node_keys))))
# Well-typed calls with in-range values (as the index makes them), to reach the drafts and their edge cases.
state = st.integers(0, 40)
budget = st.integers(0, 12)
good_source = st.builds(lambda s, a, state, m: {"tuple": [s, a, state, m]}, st.integers(0, 2),
                        st.builds(lambda i: {"automaton": i}, st.integers(0, 3)), state, st.integers(0, 8))
good_stats = st.builds(lambda pairs: {"stats": pairs}, st.lists(st.tuples(st.integers(0, 2**12), record), max_size=6))
good_calls = st.one_of(
    call("advance", state, st.integers(0, 8), st.lists(st.integers(0, 5), max_size=12), st.integers(1, 8)),
    call("match", st.lists(st.integers(0, 5), max_size=12), st.integers(1, 8)),
    call("remove", st.lists(st.integers(0, 5), max_size=12)),
    call("best_draft", st.builds(lambda i: {"automaton": i}, st.integers(0, 3)), state, st.integers(0, 8), budget,
         budget, st.sampled_from([0.0, 0.5, 1.0, 2.0, 1e300]), st.sampled_from([0.0, 1.0, -1e300, 1e300]),
         st.sampled_from([0.0, 0.1, 1.0]), st.booleans(), st.sampled_from([0.0, 0.5, 3.0]), on_automaton=False),
    call("budgeted_draft", st.lists(good_source, max_size=4), weighted((6, good_stats), (1, st.just({"reentrant": 0}))),
         st.sampled_from([0.0, 4.0]), weighted((8, budget), (1, st.sampled_from([2**31, 2**62, 2**63 - 1]))),
         st.sampled_from([0.0, 0.1, 0.5]), on_automaton=False),
)
calls = st.one_of(
    good_calls, good_calls, good_calls,
    call("SuffixAutomaton", ints, on_automaton=False),
    call("extend", tokens), call("end_sequence"), call("remove", tokens), call("remove", tokens),
    call("count_of", tokens),
    call("advance", ints, ints, tokens, ints), call("match", tokens, ints),
    call("suffix_of_length", ints, ints), call("tail_state", ints),
    call("ranked_children", ints), call("children", ints),
    *(call(f"get_{name}") for name in ("num_states", "memory_bytes", "clock", "count_depth", "length", "link",
                                       "count")),
    call("best_draft", automaton, ints, ints, ints, ints, floats, floats, unit,
         weighted((10, st.booleans()), (1, junk)), floats, on_automaton=False),
    call("budgeted_draft", weighted((10, st.lists(source, max_size=4)), (1, junk)), stats, floats, ints, unit,
         on_automaton=False),
    call("learn", stats, learned.map(Spread), tokens, on_automaton=False),
)
setup_automaton = st.tuples(st.integers(2, 8), st.lists(st.tuples(st.lists(st.integers(0, 5), max_size=40),
                                                                   st.booleans()), max_size=4))
programs = st.fixed_dictionaries({"automata": st.lists(setup_automaton, min_size=1, max_size=3),
                                  "calls": st.lists(calls, min_size=1, max_size=12)})

# ---------------------------------------------------------------- the worker


class WorkerDied(Exception):
    pass


class Worker:
    """The worker process, restarted after it dies (hypothesis replays and shrinks a failing program)."""

    def __init__(self):
        self.process = None

    def run(self, program: dict) -> dict:
        if self.process is None or self.process.poll() is not None:
            self.process = subprocess.Popen([sys.executable, str(WORKER), CORE_FILE], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, text=True)
        process = self.process
        try:
            process.stdin.write(json.dumps(program) + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([process.stdout], [], [], PROGRAM_TIMEOUT_S)
        line = process.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if not ready:
            process.kill()
        code = process.wait()
        self.process = None
        if not ready:
            raise WorkerDied(f"the core hung for {PROGRAM_TIMEOUT_S:.0f} s")
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        raise WorkerDied(f"the core killed the interpreter ({how})")

    def close(self):
        if self.process is not None and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=10)


@pytest.fixture(scope="module")
def worker():
    worker = Worker()
    yield worker
    worker.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=programs)
def test_hostile_calls_return_or_raise_a_python_exception(worker, program):
    result = worker.run(program)
    assert result["system_errors"] == []


# Issue 24, item 8: each of these killed the interpreter (a segfault, an abort) or read out of bounds silently.
REVIEWED = {
    "learn-parent-out-of-range": (["learn", None, [{"stats": []}, {"packed": ["i", [5], 0]},
                                                   {"packed": ["i", [2**30], 0]}, {"packed": ["q", [0], 0]}, [5, 6]]],
                                  "ValueError"),
    "budgeted-draft-huge-budget": (["budgeted_draft", None, [[{"tuple": [0, {"automaton": 0}, 1, 1]}], {"stats": []},
                                                             4.0, 2**62, 0.1]], None),
    "remove-never-added": (["remove", 0, [[9, 9, 9]]], "ValueError"),
    "advance-negative-max-len": (["advance", 0, [2, 1, [9, 1, 2], -5]], "ValueError"),  # 9: no transition
    "match-negative-max-len": (["match", 0, [[1, 2, 9, 1], -3]], "ValueError"),
    "nan-factor": (["best_draft", None, [{"automaton": 0}, 2, 1, 4, 4, math.nan, 0.0, 0.1, False, 0.0]], "ValueError"),
    "huge-factor": (["best_draft", None, [{"automaton": 0}, 2, 1, 4, 4, 1e300, 0.0, 0.1, False, 0.0]], None),
}


@pytest.mark.parametrize("name", REVIEWED)
def test_the_reviewed_crashes_raise_or_return(worker, name):
    called, error = REVIEWED[name]
    result = worker.run({"automata": [[4, [[[1, 2, 3, 1, 2], True]]]], "calls": [called]})
    assert result == {"returned": 0 if error else 1, "raised": {error: 1} if error else {}, "system_errors": []}


def test_the_fuzzer_sees_a_crash_as_a_failure(worker, tmp_path):
    """Negative control: a worker killed by a signal is reported, not mistaken for a clean run."""
    dying = tmp_path / "dying.py"
    dying.write_text("import os, signal, sys\nsys.stdin.readline()\nos.kill(os.getpid(), signal.SIGSEGV)\n")
    control = Worker()
    control.process = subprocess.Popen([sys.executable, str(dying)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True)
    with pytest.raises(WorkerDied, match="signal SIGSEGV"):
        control.run({"automata": [], "calls": []})
