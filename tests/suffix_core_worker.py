"""Runs fuzzed call programs against the compiled suffix core, one JSON program per stdin line.

Started by tests/test_suffix_core_fuzz.py as a separate process, so a crash of the core (a signal, an
abort) ends this process, not pytest. It loads the core straight from its file (argv[1]) without
importing specjax. For each program it answers one JSON line: how many calls returned, which Python
exceptions the others raised, and the calls that raised SystemError (the C code broke the C-API
contract: returned NULL without an exception, or a value with one set), which the test counts as bugs.

A program is {"automata": [[count_depth, [tokens, end_sequence], ...], ...], "calls": [[name, target, args]]}.
Values are JSON, NaN and Infinity included, with tags for what JSON cannot hold ({"automaton": i},
{"tuple": [...]}, {"bytes": [...]}, {"packed": [typecode, values, offset]}, {"cycle": [n, k]},
{"stats": [[key, value], ...]}, {"reentrant": i}, {"evil": i}).
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
from array import array

MEMORY_LIMIT = 2 << 30  # a hostile size must fail as MemoryError, not take the machine's memory


class ReentrantStats(dict):
    """Calibration statistics whose lookup mutates every automaton and empties the draft's sources list."""

    def __init__(self, automata: list, sources: list | None = None):
        super().__init__()
        self.automata, self.sources = automata, sources

    def get(self, key, default=None):
        for automaton in self.automata:
            for call in (lambda: automaton.remove([1, 2]), lambda: automaton.extend([1, 2, 3]), automaton.end_sequence):
                try:
                    call()
                except Exception:  # refusing to be mutated mid-draft is the right answer
                    pass
        if isinstance(self.sources, list):
            self.sources.clear()
        return [1.0, 2.0]


class EvilIndex:
    """A token id whose conversion empties the list holding it and extends every automaton."""

    def __init__(self, automata: list, value: int):
        self.automata, self.value, self.holder = automata, value, None

    def __index__(self) -> int:
        if isinstance(self.holder, list):
            self.holder.clear()
        for automaton in self.automata:
            try:
                automaton.extend([self.value % 4] * 3)
            except Exception:
                pass
        return self.value


def decode(value, automata: list):
    """A tagged JSON value as the hostile Python object it stands for."""
    if isinstance(value, list):
        items = [decode(item, automata) for item in value]
        for item in items:
            if isinstance(item, EvilIndex):
                item.holder = items
        return items
    if not isinstance(value, dict):
        return value
    (tag, arg), = value.items()
    if tag == "automaton":
        return automata[arg % len(automata)] if automata else None
    if tag == "tuple":
        return tuple(decode(item, automata) for item in arg)
    if tag == "bytes":
        return bytes(arg)
    if tag == "packed":  # a native buffer, shifted by `offset` bytes to misalign it
        typecode, values, offset = arg
        return memoryview(bytes(offset) + array(typecode, values).tobytes())[offset:]
    if tag == "cycle":  # n tokens 0, 1, ..., k-1, 0, 1, ...: a long sequence without a long JSON line
        n, k = arg
        return [i % k for i in range(n)]
    if tag == "stats":
        return {decode(key, automata): decode(item, automata) for key, item in arg}
    if tag == "reentrant":
        return ReentrantStats(automata)
    if tag == "evil":
        return EvilIndex(automata, arg)
    raise ValueError(f"unknown tag {tag!r}")


def run(program: dict, core) -> dict:
    automata, raised, system_errors, returned = [], {}, [], 0
    for depth, sequences in program["automata"]:
        automaton = core.SuffixAutomaton(depth)
        for tokens, end in sequences:
            automaton.extend(tokens)
            if end:
                automaton.end_sequence()
        automata.append(automaton)
    for name, target, args in program["calls"]:
        args = decode(args, automata)
        if name == "SuffixAutomaton":
            function = core.SuffixAutomaton
        elif target is None:
            function = getattr(core, name)
        else:
            automaton = automata[target % len(automata)]
            function = (lambda automaton=automaton, attr=name[4:]: getattr(automaton, attr)) if name.startswith("get_") \
                else getattr(automaton, name)
        if name == "budgeted_draft" and len(args) > 1 and isinstance(args[1], ReentrantStats):
            args[1].sources = args[0]
        try:
            result = function(*args)
            returned += 1
            if name == "SuffixAutomaton":
                automata.append(result)
        except SystemError as err:
            system_errors.append(f"{name}: {err}")
        except Exception as err:  # a clean Python exception is a correct answer to hostile input
            raised[type(err).__name__] = raised.get(type(err).__name__, 0) + 1
    return {"returned": returned, "raised": raised, "system_errors": system_errors}


def main() -> None:
    if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # AddressSanitizer reserves terabytes of address space
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    spec = importlib.util.spec_from_file_location("_suffix_core", sys.argv[1])
    core = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(core)
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line), core)), flush=True)


if __name__ == "__main__":
    main()
