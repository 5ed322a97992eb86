"""Trace replay: how suffix drafting would do on recorded requests, without a model.

Each recorded response is replayed as if the target produced it (SuffixDecoding's
own simulator protocol): start the request with its prompt; per step draft from
the context, accept the longest draft path the recorded response continues
with, add the next recorded token as the bonus token, and feed both back; the
finished response joins the global index. Requests run in file order, so the
global index grows online; ``--prefill`` caches another file's responses first.

If ``arctic_inference`` (ArcticInference's C++ SuffixDecodingCache) is
importable, the same replay runs through it in the same process with the same
settings and both are reported side by side. It is an optional peer, never a
dependency.

``--budget B`` replays specjax's budgeted trees (up to B nodes per step) and
runs ArcticInference at its factor (default 1, at most B tokens) and again at
the factor that gives it the same mean drafted nodes per step.
``--concurrency N`` keeps N sessions in flight, stepping in turn like a batch,
so that concurrent requests can draft from each other's partial outputs.

    python -m specjax.engine.replay --traces FILE.jsonl[.gz] [--tree] [--budget B] [--json]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gzip
import json
import sys
import time
import tracemalloc
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from specjax.drafters.suffix_index import SuffixDecodingDrafter, token_list


@dataclasses.dataclass(frozen=True)
class TraceRequest:
    prompt_ids: list[int]
    response_ids: list[int]
    task: str = "default"
    session: str = ""  # calls of one agent run; "" = a session of its own


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """The drafting settings, shared by every backend of one run."""

    tree: bool = False
    max_depth: int = 64
    max_spec_tokens: Optional[int] = None  # None: max_depth
    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1
    max_cached_requests: Optional[int] = None  # None: unbounded
    budget: Optional[int] = None  # nodes per step for specjax's budgeted trees; None: the SuffixDecoding rule
    max_shared_requests: int = 8  # budgeted trees: other requests in flight each one drafts from

    @property
    def spec_tokens(self) -> int:
        if self.max_spec_tokens is not None:
            return self.max_spec_tokens
        return self.max_depth if self.budget is None else self.budget


def load_traces(path: str) -> list[TraceRequest]:
    """Read a JSONL (optionally gzipped) of {prompt_ids, response_ids, task?} objects."""
    opener = gzip.open if path.endswith(".gz") else open
    requests = []
    with opener(path, "rt", encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                requests.append(TraceRequest(token_list(row["prompt_ids"], "prompt_ids"),
                                             token_list(row["response_ids"], "response_ids"),
                                             str(row.get("task", "default")), str(row.get("session", ""))))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: not a trace row ({type(err).__name__}: {err})") from err
    return requests


def accepted_length(tokens: Sequence[int], parents: Sequence[int], truth: Sequence[int]) -> int:
    """Length of the longest draft path that ``truth`` starts with (what greedy verification keeps)."""
    children: dict[tuple[int, int], int] = {(parent, token): i for i, (token, parent) in enumerate(zip(tokens, parents))}
    node, accepted = -1, 0
    for token in truth:
        node = children.get((node, token), -2)
        if node == -2:
            break
        accepted += 1
    return accepted


class Backend(Protocol):
    """A suffix drafter under replay; the timed calls return their own duration (seconds)."""

    name: str

    def start(self, request_id: int, prompt: list[int]) -> None: ...

    def speculate(self, request_id: int) -> tuple[list[int], list[int], float]: ...

    def extend(self, request_id: int, tokens: list[int]) -> float: ...

    def stop(self, request_id: int) -> None: ...

    def prefill(self, request_id: int, request: TraceRequest) -> None: ...

    def bytes_per_token(self) -> Optional[float]: ...


class SpecjaxBackend:
    """This package's SuffixDecodingDrafter, timed through the engine's HostDrafter calls."""

    name = "specjax"

    def __init__(self, config: ReplayConfig):
        self.config = config
        self.drafter = SuffixDecodingDrafter(
            max_depth=config.max_depth, max_spec_tokens=config.spec_tokens, max_spec_factor=config.max_spec_factor,
            max_spec_offset=config.max_spec_offset, min_token_prob=config.min_token_prob, tree=config.tree,
            max_cached_requests=config.max_cached_requests, budget_mode=config.budget is not None,
            max_shared_requests=config.max_shared_requests)

    def start(self, request_id: int, prompt: list[int]) -> None:
        self.drafter.start_request(request_id, prompt)

    def speculate(self, request_id: int) -> tuple[list[int], list[int], float]:
        start = time.perf_counter()
        proposal = self.drafter.propose(request_id, self.config.spec_tokens if self.config.budget is None
                                        else self.config.budget)
        elapsed = time.perf_counter() - start
        return proposal.tokens.tolist(), proposal.parents.tolist(), elapsed

    def extend(self, request_id: int, tokens: list[int]) -> float:
        start = time.perf_counter()
        self.drafter.observe(request_id, tokens)
        return time.perf_counter() - start

    def stop(self, request_id: int) -> None:
        self.drafter.stop_request(request_id)

    def prefill(self, request_id: int, request: TraceRequest) -> None:
        self.drafter.index.cache_response(request.response_ids)

    def bytes_per_token(self) -> Optional[float]:
        responses = self.drafter.index.cached_responses
        return measure_bytes_per_token(responses, self.config)


def measure_bytes_per_token(responses: list[list[int]], config: ReplayConfig) -> Optional[float]:
    """Python heap growth (tracemalloc) while a fresh global index caches ``responses``, per token.

    Counts everything the index allocates and keeps (with the compiled core, the
    bytes its automaton reports, which tracemalloc cannot see): automaton arrays and dicts,
    the int objects they hold (the responses go in as int32 arrays, so even the
    token ids are created under tracing), and the stored responses.
    """
    tokens = sum(len(r) for r in responses)
    if not tokens:
        return None
    packed = [np.asarray(r, np.int32) for r in responses]
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = SpecjaxBackend(dataclasses.replace(config, max_cached_requests=None)).drafter.index
    for response in packed:
        index.cache_response(response)
    grown = tracemalloc.get_traced_memory()[0] - before + index.native_bytes  # plus the compiled core's heap
    if not was_tracing:
        tracemalloc.stop()
    return grown / tokens


class ArcticBackend:
    """ArcticInference's SuffixDecodingCache (C++), driven like its own simulator."""

    name = "arctic"

    def __init__(self, config: ReplayConfig, cache_class: type):
        self.config = config
        limit = -1 if config.max_cached_requests is None else config.max_cached_requests
        self.cache = cache_class(max_tree_depth=config.max_depth, max_cached_requests=limit)
        self._contexts: dict[int, list[int]] = {}
        self._cached_tokens: dict[int, int] = {}

    def start(self, request_id: int, prompt: list[int]) -> None:
        self.cache.start_request(request_id, np.asarray(prompt, np.int32))
        self._contexts[request_id] = list(prompt)
        self._cached_tokens[request_id] = 0

    def speculate(self, request_id: int) -> tuple[list[int], list[int], float]:
        context = np.asarray(self._contexts[request_id], np.int32)  # not timed, as in its simulator
        c = self.config
        start = time.perf_counter()
        draft = self.cache.speculate(request_id, context, max_spec_tokens=c.spec_tokens,
                                     max_spec_factor=c.max_spec_factor, max_spec_offset=c.max_spec_offset,
                                     min_token_prob=c.min_token_prob, use_tree_spec=c.tree)
        elapsed = time.perf_counter() - start
        return list(draft.token_ids), list(draft.parents), elapsed

    def extend(self, request_id: int, tokens: list[int]) -> float:
        self._contexts[request_id].extend(tokens)
        self._cached_tokens[request_id] += len(tokens)
        start = time.perf_counter()
        self.cache.add_active_response(request_id, tokens)
        return time.perf_counter() - start

    def stop(self, request_id: int) -> None:
        self.cache.stop_request(request_id)
        del self._contexts[request_id]

    def prefill(self, request_id: int, request: TraceRequest) -> None:
        self.cache.start_request(request_id, request.prompt_ids)
        self.cache.add_active_response(request_id, request.response_ids)
        self.cache.stop_request(request_id)
        self._cached_tokens[request_id] = len(request.response_ids)

    def bytes_per_token(self) -> Optional[float]:
        """ArcticInference's own estimate (``SuffixTree.estimate_memory``) per cached response token."""
        tokens = sum(self._cached_tokens[r] for r in self.cache.cached_requests)
        return self.cache._global_tree.estimate_memory() / tokens if tokens else None


def arctic_cache_class() -> Optional[type]:
    """ArcticInference's SuffixDecodingCache if it is installed and loads, else None."""
    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    except (ImportError, OSError):
        return None
    return SuffixDecodingCache


@dataclasses.dataclass
class TaskStats:
    """Per-step measurements of one task."""

    response_tokens: int = 0
    accepted: list[int] = dataclasses.field(default_factory=list)
    drafted: list[int] = dataclasses.field(default_factory=list)
    spec_s: list[float] = dataclasses.field(default_factory=list)
    update_s: list[float] = dataclasses.field(default_factory=list)

    def add(self, other: "TaskStats") -> None:
        self.response_tokens += other.response_tokens
        self.accepted += other.accepted
        self.drafted += other.drafted
        self.spec_s += other.spec_s
        self.update_s += other.update_s

    def summary(self) -> dict[str, float]:
        steps = max(len(self.accepted), 1)
        spec_us = np.asarray(self.spec_s) * 1e6
        update_us = np.asarray(self.update_s) * 1e6
        return {
            "steps": len(self.accepted),
            "response_tokens": self.response_tokens,
            "tokens_per_step": self.response_tokens / steps,
            "mean_accepted": float(np.sum(self.accepted)) / steps,
            "mean_drafted": float(np.sum(self.drafted)) / steps,
            "spec_us_p50": _percentile(spec_us, 50),
            "spec_us_p99": _percentile(spec_us, 99),
            "update_us_p50": _percentile(update_us, 50),
        }


def _percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else 0.0


def replay_step(backend: Backend, request_id: int, truth: Sequence[int], stats: TaskStats) -> int:
    """One draft-verify-accept step against the rest of a recorded response; returns the tokens emitted."""
    tokens, parents, spec_s = backend.speculate(request_id)
    accepted = accepted_length(tokens, parents, truth)
    emitted = list(truth[: accepted + 1])  # plus the bonus token, unless the response ended
    stats.update_s.append(backend.extend(request_id, emitted))
    stats.spec_s.append(spec_s)
    stats.accepted.append(accepted)
    stats.drafted.append(len(tokens))
    return len(emitted)


def replay_request(backend: Backend, request_id: int, request: TraceRequest, stats: TaskStats) -> None:
    """Replay one recorded response through a backend, step by step."""
    truth = request.response_ids
    backend.start(request_id, request.prompt_ids)
    done = 0
    while done < len(truth):
        done += replay_step(backend, request_id, truth[done:], stats)
    backend.stop(request_id)
    stats.response_tokens += len(truth)


def replay_sessions(backend: Backend, requests: Sequence[TraceRequest], concurrency: int,
                    stats: dict[str, TaskStats]) -> None:
    """Replay with up to ``concurrency`` sessions in flight, one step each in turn, like a batch.

    A session's calls run one after the other (each prompt holds the previous
    response); sessions start in file order as others finish, so concurrent
    requests (the trials of one task, parallel agents) can draft from each
    other's partial outputs.
    """
    sessions: dict[str, collections.deque] = {}
    for request_id, request in enumerate(requests):
        sessions.setdefault(request.session or f"#{request_id}", collections.deque()).append((request_id, request))
    waiting = collections.deque(sessions.values())
    active: list[list] = []  # [calls left, request id, request, tokens done]

    def start_next(calls: collections.deque) -> None:
        request_id, request = calls.popleft()
        backend.start(request_id, request.prompt_ids)
        active.append([calls, request_id, request, 0])

    while active or waiting:
        while waiting and len(active) < concurrency:
            start_next(waiting.popleft())
        for entry in list(active):
            calls, request_id, request, done = entry
            truth = request.response_ids
            task = stats.setdefault(request.task, TaskStats())
            entry[3] = done = done + replay_step(backend, request_id, truth[done:], task)
            if done >= len(truth):
                backend.stop(request_id)
                task.response_tokens += len(truth)
                active.remove(entry)
                if calls:
                    start_next(calls)


def replay(requests: Sequence[TraceRequest], backends: Sequence[Backend], prefill: Sequence[TraceRequest] = (),
           progress: Optional[Callable[[int], None]] = None, concurrency: int = 1) -> list[dict[str, TaskStats]]:
    """Replay every request in order through every backend; per backend, per-task step statistics.

    One request at a time, the backends take turns request by request, so that
    their timings see the same machine conditions (a shared machine's speed
    drifts within seconds). With ``concurrency`` > 1, see ``replay_sessions``.
    """
    for backend in backends:
        for i, request in enumerate(prefill):
            backend.prefill(-1 - i, request)  # negative ids never collide with the replayed requests
    stats: list[dict[str, TaskStats]] = [{} for _ in backends]
    if concurrency > 1:
        for backend, tasks in zip(backends, stats):
            replay_sessions(backend, requests, concurrency, tasks)
        return stats
    for request_id, request in enumerate(requests):
        for backend, tasks in zip(backends, stats):
            replay_request(backend, request_id, request, tasks.setdefault(request.task, TaskStats()))
        if progress is not None:
            progress(1)
    return stats


def report(stats: dict[str, TaskStats], bytes_per_token: Optional[float]) -> dict:
    """Overall numbers at the top level, plus a per-task breakdown."""
    overall = TaskStats()
    for task in stats.values():
        overall.add(task)
    return dict(overall.summary(), bytes_per_token=bytes_per_token,
                tasks={name: task.summary() for name, task in stats.items()})


def run(requests: Sequence[TraceRequest], backends: Sequence[Backend], prefill: Sequence[TraceRequest] = (),
        show_progress: bool = False, concurrency: int = 1) -> list[dict]:
    """Replay and report, one result per backend."""
    bar = None
    if show_progress and concurrency == 1:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="replay", unit="req", file=sys.stderr)
    stats = replay(requests, backends, prefill, bar.update if bar else None, concurrency)
    if bar:
        bar.close()
    return [report(tasks, backend.bytes_per_token()) for backend, tasks in zip(backends, stats)]


def arctic_at_equal_nodes(requests: Sequence[TraceRequest], config: ReplayConfig, cache_class: type,
                          target_nodes: float, prefill: Sequence[TraceRequest] = (), concurrency: int = 1,
                          tolerance: float = 0.01, max_runs: int = 8) -> dict:
    """ArcticInference at the budget factor whose mean drafted nodes per step equal ``target_nodes``.

    Its drafts grow with the factor (factor x match length, capped at
    ``config.spec_tokens``), so the factor is bisected (geometrically) between
    1 and the cap until the mean is within ``tolerance``; tokens per step is
    then interpolated linearly in drafted nodes between the two closest runs
    that bracket the target. Returns those runs, the factor and the
    interpolated tokens per step (None when no factor reaches the target).
    """
    def at(factor: float) -> dict:
        backend = ArcticBackend(dataclasses.replace(config, max_spec_factor=factor), cache_class)
        result = run(requests, [backend], prefill, concurrency=concurrency)[0]
        return dict(result, max_spec_factor=factor)

    low, high = at(1.0), at(float(config.spec_tokens))
    runs = [low, high]
    if not low["mean_drafted"] <= target_nodes <= high["mean_drafted"]:
        closest = low if target_nodes < low["mean_drafted"] else high
        return dict(runs=runs, max_spec_factor=closest["max_spec_factor"], tokens_per_step=None)
    while len(runs) < max_runs and abs(high["mean_drafted"] - target_nodes) > tolerance * target_nodes \
            and abs(low["mean_drafted"] - target_nodes) > tolerance * target_nodes:
        middle = at((low["max_spec_factor"] * high["max_spec_factor"]) ** 0.5)
        runs.append(middle)
        if middle["mean_drafted"] < target_nodes:
            low = middle
        else:
            high = middle
    span = high["mean_drafted"] - low["mean_drafted"]
    weight = 0.5 if span <= 0 else (target_nodes - low["mean_drafted"]) / span
    closest = low if abs(low["mean_drafted"] - target_nodes) <= abs(high["mean_drafted"] - target_nodes) else high
    return dict(runs=runs, max_spec_factor=closest["max_spec_factor"],
                tokens_per_step=low["tokens_per_step"] + weight * (high["tokens_per_step"] - low["tokens_per_step"]),
                bracket=[low, high])


_COLUMNS = [("tokens/step", "tokens_per_step", "{:.3f}"), ("accepted", "mean_accepted", "{:.3f}"),
            ("drafted", "mean_drafted", "{:.2f}"),
            ("spec p50 us", "spec_us_p50", "{:.1f}"), ("spec p99 us", "spec_us_p99", "{:.1f}"),
            ("update p50 us", "update_us_p50", "{:.1f}"), ("bytes/token", "bytes_per_token", "{:.0f}")]


def format_table(results: dict[str, dict]) -> str:
    """One row per (backend, task) plus each backend's overall row."""
    header = ["backend", "task"] + [title for title, _, _ in _COLUMNS]
    rows = []
    for name, result in results.items():
        rows.append([name, "all"] + [_cell(result.get(key), fmt) for _, key, fmt in _COLUMNS])
        if len(result["tasks"]) > 1:
            for task, summary in result["tasks"].items():
                rows.append([name, task] + [_cell(summary.get(key), fmt) for _, key, fmt in _COLUMNS])
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)) for row in [header] + rows]
    return "\n".join(lines)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="specjax replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", required=True, help="JSONL(.gz) of {prompt_ids, response_ids, task?, session?}")
    p.add_argument("--tree", action="store_true", help="draft best-first trees instead of single paths")
    p.add_argument("--budget", type=int, default=None,
                   help="nodes per step: specjax fills them with one tree over every source (budget mode); "
                        "ArcticInference runs at the factor given and at the one giving it as many nodes")
    p.add_argument("--max-depth", type=int, default=64, help="longest context suffix matched")
    p.add_argument("--max-spec-tokens", type=int, default=None, help="draft size cap (default: budget or max depth)")
    p.add_argument("--max-spec-factor", type=float, default=1.0, help="draft budget per matched token")
    p.add_argument("--max-spec-offset", type=float, default=0.0, help="draft budget offset")
    p.add_argument("--min-token-prob", type=float, default=0.1, help="drop draft nodes below this probability")
    p.add_argument("--max-cached-requests", type=int, default=None, help="FIFO cap on cached responses")
    p.add_argument("--concurrency", type=int, default=1, help="sessions in flight at once (default: one request)")
    p.add_argument("--max-shared-requests", type=int, default=8,
                   help="budget mode: other requests in flight each one drafts from (0: none)")
    p.add_argument("--prefill", help="JSONL(.gz) whose responses fill the global index first")
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    p.add_argument("--no-reference", action="store_true", help="skip ArcticInference even if it is installed")
    p.add_argument("--output", help="also write the JSON result to this file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    for name, low in (("max_depth", 1), ("limit", 0), ("budget", 1), ("concurrency", 1), ("max_shared_requests", 0)):
        value = getattr(args, name)
        if value is not None and value < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    config = ReplayConfig(args.tree, args.max_depth, args.max_spec_tokens, args.max_spec_factor,
                          args.max_spec_offset, args.min_token_prob, args.max_cached_requests, args.budget,
                          args.max_shared_requests)
    requests = load_traces(args.traces)[: args.limit]
    prefill = load_traces(args.prefill) if args.prefill else []
    backends: list[Backend] = [SpecjaxBackend(config)]
    cache_class = None if args.no_reference else arctic_cache_class()
    if cache_class is not None:
        backends.append(ArcticBackend(config, cache_class))
    results = run(requests, backends, prefill, show_progress=not args.json, concurrency=args.concurrency)
    result = dict(traces=args.traces, prefill=args.prefill, requests=len(requests),
                  config=dataclasses.asdict(config), **results[0],
                  reference=dict(name="arctic_inference SuffixDecodingCache", **results[1]) if cache_class else None)
    table = {backend.name: r for backend, r in zip(backends, results)}
    if cache_class is not None and args.budget is not None:
        equal = arctic_at_equal_nodes(requests, config, cache_class, results[0]["mean_drafted"], prefill,
                                      args.concurrency)
        result["reference_equal_nodes"] = equal
        closest = min(equal["runs"], key=lambda r: abs(r["mean_drafted"] - results[0]["mean_drafted"]))
        table[f"arctic x{closest['max_spec_factor']:.3g}"] = closest
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    if args.json:
        print(json.dumps(result))
        return 0
    print(format_table(table))
    if cache_class is None and not args.no_reference:
        print("(arctic_inference is not installed: no reference run)")
    elif cache_class is not None:
        print(f"specjax / arctic at factor {config.max_spec_factor:g}: "
              f"{results[0]['tokens_per_step'] / results[1]['tokens_per_step']:.3f}x tokens per step")
        equal = result.get("reference_equal_nodes")
        if equal is not None and equal["tokens_per_step"] is not None:
            print(f"specjax / arctic at equal drafted nodes ({results[0]['mean_drafted']:.2f}, factor "
                  f"~{equal['max_spec_factor']:.3g}, interpolated): "
                  f"{results[0]['tokens_per_step'] / equal['tokens_per_step']:.3f}x tokens per step")
        elif equal is not None:
            closest = min(equal["runs"], key=lambda r: abs(r["mean_drafted"] - results[0]["mean_drafted"]))
            print(f"arctic drafts {closest['mean_drafted']:.2f} nodes per step at most (factor "
                  f"{closest['max_spec_factor']:g}), not {results[0]['mean_drafted']:.2f}; there: "
                  f"{results[0]['tokens_per_step'] / closest['tokens_per_step']:.3f}x tokens per step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
