"""Suffix drafting on recorded traces: specjax's SuffixIndex next to ArcticInference's C++ cache.

Replays the shared Spider traces (chain and tree drafts) through both in one
process, taking turns request by request so that both see the same machine;
repeats the whole replay ``--rounds`` times and reports the median of each
timing. Two workloads: the file as recorded, and the same file with verbatim
repeated responses dropped (repeats flatter any suffix method). Then memory
per cached token on three corpora: Spider responses, Spider prompts (highly
repetitive), and random Zipf-distributed tokens (no structure at all).

    python benchmarks/bench_suffix_replay.py [--rounds 3] [--traces FILE]

Prints tables and writes benchmarks/results/suffix_replay.json. ArcticInference
(``pip install arctic-inference``) is optional; without it only specjax runs.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics

import numpy as np

from specjax.engine.replay import (ArcticBackend, ReplayConfig, SpecjaxBackend, TraceRequest, arctic_cache_class,
                                   load_traces, measure_bytes_per_token, run)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_TRACES = ROOT.parent / "shared" / "data" / "spider_train_others_gold.jsonl.gz"
TIMINGS = ("spec_us_p50", "spec_us_p99", "update_us_p50")


def unique_responses(requests: list[TraceRequest]) -> list[TraceRequest]:
    """The first request of each distinct response, in file order."""
    seen: set[tuple[int, ...]] = set()
    kept = []
    for request in requests:
        key = tuple(request.response_ids)
        if key not in seen:
            seen.add(key)
            kept.append(request)
    return kept


def replay_rounds(requests: list[TraceRequest], config: ReplayConfig, rounds: int) -> dict[str, dict]:
    """Per backend: the first round's result with each timing replaced by its median over rounds."""
    cache_class = arctic_cache_class()
    per_round = []
    for _ in range(rounds):
        backends = [SpecjaxBackend(config)] + ([ArcticBackend(config, cache_class)] if cache_class else [])
        per_round.append({backend.name: result for backend, result in zip(backends, run(requests, backends))})
    merged = {}
    for name, first in per_round[0].items():
        merged[name] = dict(first, rounds={key: [r[name][key] for r in per_round] for key in TIMINGS})
        for key in TIMINGS:
            merged[name][key] = statistics.median(merged[name]["rounds"][key])
    return merged


def arctic_bytes_per_token(sequences: list[list[int]], max_depth: int) -> float | None:
    """ArcticInference's own estimate (SuffixTree.estimate_memory) for a global tree of ``sequences``."""
    cache_class = arctic_cache_class()
    if cache_class is None:
        return None
    cache = cache_class(max_tree_depth=max_depth, max_cached_requests=-1)
    for i, tokens in enumerate(sequences):
        cache.start_request(i, [0])
        cache.add_active_response(i, tokens)
        cache.stop_request(i)
    return cache._global_tree.estimate_memory() / sum(map(len, sequences))


def memory_corpora(requests: list[TraceRequest]) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(0)
    return {
        "spider responses": [r.response_ids for r in requests],
        "spider prompts": [r.prompt_ids for r in requests[:500]],
        "zipf random": [(rng.zipf(1.2, 200) % 50_000).tolist() for _ in range(500)],
    }


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header] + rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", default=str(DEFAULT_TRACES))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "suffix_replay.json"))
    args = p.parse_args()
    requests = load_traces(args.traces)
    workloads = {"spider": requests, "spider unique": unique_responses(requests)}
    results: dict = {"traces": args.traces, "rounds": args.rounds, "machine": platform.processor() or platform.machine(),
                     "arctic": arctic_cache_class() is not None, "replay": {}, "memory": {}}
    rows = []
    for workload, reqs in workloads.items():
        for mode in ("chain", "tree"):
            config = ReplayConfig(tree=mode == "tree")
            by_backend = replay_rounds(reqs, config, args.rounds)
            results["replay"][f"{workload} {mode}"] = by_backend
            for name, r in by_backend.items():
                rows.append([workload, mode, name, str(len(reqs)), f"{r['tokens_per_step']:.3f}",
                             f"{r['mean_accepted']:.3f}", f"{r['spec_us_p50']:.1f}", f"{r['spec_us_p99']:.1f}",
                             f"{r['update_us_p50']:.1f}", f"{r['bytes_per_token']:.0f}"])
    print(f"max_depth 64, max_spec_factor 1.0, min_token_prob 0.1, global index growing online; "
          f"timings: median of {args.rounds} rounds")
    print(table(["workload", "mode", "backend", "requests", "tokens/step", "accepted", "spec p50 us", "spec p99 us",
                 "update p50 us", "bytes/token"], rows))
    print()
    memory_rows = []
    for corpus, sequences in memory_corpora(requests).items():
        ours = measure_bytes_per_token(sequences, ReplayConfig())
        theirs = arctic_bytes_per_token(sequences, 64)
        results["memory"][corpus] = {"tokens": sum(map(len, sequences)), "specjax": ours, "arctic": theirs}
        memory_rows.append([corpus, str(sum(map(len, sequences))), f"{ours:.0f}",
                            "-" if theirs is None else f"{theirs:.0f}"])
    print("bytes per cached token (specjax: tracemalloc; arctic: its own estimate_memory)")
    print(table(["corpus", "tokens", "specjax", "arctic"], memory_rows))
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
