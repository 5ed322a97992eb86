"""Serving under an agentic arrival pattern: continuous batching against static batching, in one run.

One request stream, four modes side by side, each driven in-process and timed
against the same arrival clock:

- ``continuous-suffix``: the ``Scheduler`` (paged KV, chunked prefill, requests
  joining and leaving between steps) with the suffix tree drafter;
- ``continuous-plain``: the same without drafting;
- ``static-suffix`` / ``static-plain``: ``Engine.generate`` on batches formed as
  requests arrive, a batch starting when the previous one finished (finished
  rows ride along until the batch's longest request ends);
- with ``--http``, ``http-continuous-suffix``: continuous-suffix through the
  OpenAI-compatible server on a loopback port (one client thread per request).

Reported per mode: throughput (output tokens / time from the first arrival to
the last completion), p50 / p99 request latency (arrival to completion), tokens
per target pass. Untimed rehearsals of the same stream compile the shapes a
mode meets until one compiles nothing (the fused plain loop compiles per
max_new_tokens, so static batches meet new shapes); compile time left in the
timed run is taken out of its clock (``RunClock``) and reported, though what
JAX's compile events miss (about 0.03 s per new program on the 2-core CPU)
stays in. The requests arrive over each of ``--windows`` seconds in turn (a
shorter window is a higher load).
Greedy outputs are checked equal across modes.

The stream: the agentic traces (``/work/shared/data``: SWE-agent and tau-bench
calls) carry no timestamps, so the arrival pattern is derived from their
structure: ``--agents`` agents run concurrently, each replaying one trajectory's
calls in order; a call arrives when the agent's previous call would have ended
upstream (its recorded response length, in token-times) plus a tool time; a new
trajectory starts when an agent finishes one. The first ``--requests`` arrivals
are kept and their clock rescaled so the last arrives at the window's end.
Prompt and output lengths are the traces' scaled down to the model (prompts by
``--prompt-scale``, outputs by ``--output-scale``, capped); prompt contents
are each trajectory's growing context built from SQL prompts, so a trajectory's
calls share prefixes. EOS is ignored, as serving load generators do, so every
request runs to its recorded length. Without the traces the shipped pattern
``benchmarks/serving_pattern.json`` (the per-call lengths of their first 24
trajectories) is used.

    python benchmarks/bench_serving.py                       # embedded tiny SQL model, CPU ok
    python benchmarks/bench_serving.py --model smollm2-135m-instruct --requests 64 --http

Prints a table and writes benchmarks/results/serving.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import json
import os
import pathlib
import platform
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.suffix_index import SuffixDecodingDrafter
from specjax.engine.compile_cache import CompileClock
from specjax.engine.engine import Engine
from specjax.engine.scheduler import Request, Scheduler
from specjax.models.embedded import default_model_dir
from specjax.models.embedded.toy_corpus import sql_prompts
from specjax.models.loading import Model, load_model

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRACE_DIR = ROOT.parent / "shared" / "data"
TRACE_FILES = ("swe_minisweagent_gemini3pro_public.jsonl.gz", "tau_airline_gpt4o_public.jsonl.gz")
SHIPPED_PATTERN = ROOT / "benchmarks" / "serving_pattern.json"
MODES = ("continuous-suffix", "continuous-plain", "static-suffix", "static-plain")
HTTP_MODE = "http-continuous-suffix"  # with --http: continuous-suffix through the server on a loopback port


@dataclasses.dataclass(frozen=True)
class Arrival:
    """One request of the stream: when it arrives (seconds), its trajectory, prompt and output lengths."""

    at: float
    session: int
    prompt_len: int
    output_len: int


# ------------------------------------------------------------------ the arrival pattern


def trace_calls(paths: Sequence[pathlib.Path]) -> list[list[tuple[int, int]]]:
    """Per trajectory, its calls' (prompt tokens, response tokens), in order; the files' trajectories
    interleaved so that a prefix of the list mixes the workloads."""
    per_file = []
    for path in paths:
        sessions: dict[str, list[tuple[int, int]]] = {}
        with gzip.open(path, "rt", encoding="utf-8") as lines:
            for line in lines:
                row = json.loads(line)
                sessions.setdefault(row["session"], []).append((len(row["prompt_ids"]), len(row["response_ids"])))
        per_file.append(list(sessions.values()))
    return [s for group in itertools.zip_longest(*per_file) for s in group if s is not None]


def load_calls(trace_dir: Optional[pathlib.Path]) -> tuple[list[list[tuple[int, int]]], str]:
    """The traces' per-trajectory lengths when the files are there, else the shipped copy; and the source."""
    paths = [trace_dir / name for name in TRACE_FILES] if trace_dir is not None else []
    if paths and all(p.is_file() for p in paths):
        return trace_calls(paths), ", ".join(str(p) for p in paths)
    return json.loads(SHIPPED_PATTERN.read_text())["sessions"], str(SHIPPED_PATTERN)


def arrival_times(sessions: list[list[tuple[int, int]]], agents: int, tool_tokens: int) -> list[tuple[float, int, int]]:
    """(time in token-times, session, call) of every call: ``agents`` agents replay trajectories in
    order, each call arriving when the previous one's response (its recorded length) and a tool call
    would have ended; agent j starts at j tool times."""
    clocks = [float(j * tool_tokens) for j in range(agents)]
    arrivals = []
    for s, calls in enumerate(sessions):
        agent = int(np.argmin(clocks))
        for c, (_, response) in enumerate(calls):
            arrivals.append((clocks[agent], s, c))
            clocks[agent] += response + tool_tokens
    return sorted(arrivals)


def build_stream(sessions: list[list[tuple[int, int]]], *, requests: int, agents: int, tool_tokens: int,
                 window: float, prompt_scale: float, max_prompt: int, output_scale: float,
                 max_new: int) -> list[Arrival]:
    """The first ``requests`` arrivals, lengths scaled to the model, clock rescaled to end at ``window`` s."""
    chosen = arrival_times(sessions, agents, tool_tokens)[:requests]
    last = chosen[-1][0] or 1.0
    stream = []
    for t, s, c in chosen:
        prompt, response = sessions[s][c]
        stream.append(Arrival(window * t / last, s, int(np.clip(round(prompt * prompt_scale), 4, max_prompt)),
                              int(np.clip(round(response * output_scale), 1, max_new))))
    return stream


def session_prompts(model: Model, stream: list[Arrival]) -> list[list[int]]:
    """Each request's prompt: the first ``prompt_len`` tokens of its trajectory's context (SQL prompts
    one after another, seeded by the trajectory), so calls of one trajectory share a prefix."""
    contexts: dict[int, list[int]] = {}
    need = max(a.prompt_len for a in stream)
    for s in sorted({a.session for a in stream}):
        ids: list[int] = []
        for text in sql_prompts(64, seed=1000 + s):
            ids += model.tokenizer.encode(text).ids
            if len(ids) >= need:
                break
        contexts[s] = ids
    return [contexts[a.session][: a.prompt_len] for a in stream]


# ------------------------------------------------------------------ the modes


@dataclasses.dataclass
class Run:
    """One mode's timed run: each request's tokens and completion time, passes, compile seconds."""

    tokens: list[list[int]]
    finished_at: list[float]
    passes: int
    emitted: int  # tokens the passes produced (static: rows run to the batch's longest budget)
    compile_s: float


class RunClock:
    """Seconds since the run started, less the seconds spent compiling so far (``CompileClock``).

    A program compiled on first use (a new batch size, prompt bucket or row bucket) is a one-off cost,
    not the serving steady state, and which shapes a run meets depends on its own timing, so
    rehearsals cannot compile them all: each mode runs on this clock, as if compiling took no time.
    """

    def __init__(self, compiles: CompileClock):
        self.compiles, self.start = compiles, time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start - self.compiles.seconds

    def wait_until(self, at: float) -> None:
        time.sleep(max(0.0, at - self.now()))


def drive_continuous(make: Callable[[], Scheduler], stream: list[Arrival], prompts: list[list[int]]) -> Run:
    """Submit each request when it arrives and step the scheduler while it has work."""
    sched, n = make(), len(stream)
    finished_at = [0.0] * n
    with CompileClock() as compiles:
        clock, arrived = RunClock(compiles), 0
        while arrived < n or sched.has_work():
            while arrived < n and stream[arrived].at <= clock.now():
                sched.submit(Request(prompts[arrived], stream[arrived].output_len), rid=arrived)
                arrived += 1
            if not sched.has_work():
                clock.wait_until(stream[arrived].at)
                continue
            events = sched.step()
            now = clock.now()
            for event in events:
                if event.finished:
                    finished_at[event.rid] = now
    results = [sched.results[i] for i in range(n)]
    return Run([r.tokens for r in results], finished_at, sum(r.passes for r in results),
               sum(len(r.tokens) for r in results), compiles.seconds)


def drive_static(make: Callable[[], Engine], stream: list[Arrival], prompts: list[list[int]]) -> Run:
    """When the engine is idle, the requests that have arrived (up to its batch size) form a batch,
    generated to the batch's longest budget; each request completes when its batch does."""
    engine, n = make(), len(stream)
    tokens: list[list[int]] = [[] for _ in range(n)]
    finished_at = [0.0] * n
    passes = emitted = 0
    with CompileClock() as compiles:
        clock, next_i = RunClock(compiles), 0
        while next_i < n:
            clock.wait_until(stream[next_i].at)
            now = clock.now()
            batch = [i for i in range(next_i, n) if stream[i].at <= now][: engine.max_batch_size]
            results = engine.generate([prompts[i] for i in batch],
                                      max_new_tokens=max(stream[i].output_len for i in batch))
            done = clock.now()
            for i, result in zip(batch, results):
                tokens[i] = result.token_ids[: stream[i].output_len]
                finished_at[i] = done
                passes += result.target_passes
                emitted += len(result.token_ids)
            next_i = batch[-1] + 1
    return Run(tokens, finished_at, passes, emitted, compiles.seconds)


def serve_in_thread(sched: Scheduler, name: str):
    """Start the OpenAI-compatible server over ``sched`` on a free loopback port; returns (url, stop)."""
    import uvicorn

    from specjax.engine.server import ServingLoop, create_app

    loop = ServingLoop(sched)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(sched.model, loop, name), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)

    def stop() -> dict:
        server.should_exit = True
        thread.join()
        metrics = loop.metrics()
        loop.close()
        return metrics

    return f"http://127.0.0.1:{port}", stop


def drive_http(make: Callable[[], Scheduler], stream: list[Arrival], prompts: list[list[int]]) -> Run:
    """The same requests through the server: one client thread per request posts a non-streaming
    ``/v1/completions`` (prompt as token ids, greedy) when it arrives. Measures what HTTP, JSON and
    the serving thread add to the in-process scheduler."""
    url, stop = serve_in_thread(make(), "bench")

    def call(i: int) -> tuple[list[int], float]:
        clock.wait_until(stream[i].at)
        body = {"model": "bench", "prompt": prompts[i], "max_tokens": stream[i].output_len, "temperature": 0.0}
        request = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            tokens = json.loads(response.read())["choices"][0]["token_ids"]
        return tokens, clock.now()

    try:
        with CompileClock() as compiles, ThreadPoolExecutor(len(stream)) as pool:
            clock = RunClock(compiles)
            done = list(pool.map(call, range(len(stream))))
    finally:
        metrics = stop()
    return Run([t for t, _ in done], [f for _, f in done], int(metrics["passes"]), int(metrics["emitted"]),
               compiles.seconds)


def mode_runner(mode: str, model: Model, args: argparse.Namespace, stream: list[Arrival]):
    """A function (stream, prompts) -> Run for ``mode``, each call with a fresh drafter (no memory of the
    rehearsal's outputs)."""
    suffix = mode.endswith("suffix")
    drafter = (lambda: SuffixDecodingDrafter(tree=True)) if suffix else (lambda: None)
    if mode.startswith(("continuous", "http")):
        page_size = 16
        pages_per_seq = -(-(max(a.prompt_len + a.output_len for a in stream)) // page_size)
        make = lambda: Scheduler(model, max_slots=args.slots, num_pages=args.slots * pages_per_seq,
                                 page_size=page_size, max_pages_per_seq=pages_per_seq, max_tree=args.max_tree,
                                 prefill_budget=args.prefill_budget, drafter=drafter(),
                                 auto_tree=args.tree_size == "auto")
        return lambda s, p: (drive_http if mode == HTTP_MODE else drive_continuous)(make, s, p)
    capacity = ("auto" if args.tree_size == "auto" else args.max_tree) if suffix else 0
    make = lambda: Engine(model, drafter(), draft_capacity=capacity, max_draft_capacity=args.max_tree,
                          max_batch_size=args.slots)
    return lambda s, p: drive_static(make, s, p)


# ------------------------------------------------------------------ measuring and reporting


def summarize(mode: str, run: Run, stream: list[Arrival], reference: Optional[Run]) -> dict:
    """Throughput, latency percentiles, tokens per pass, and equality with the reference mode."""
    latency = np.array([f - a.at for f, a in zip(run.finished_at, stream)])
    tokens = sum(len(t) for t in run.tokens)
    makespan = max(run.finished_at) - stream[0].at
    return {"mode": mode, "tokens": tokens, "makespan_s": makespan, "tokens_per_s": tokens / makespan,
            "latency_p50_s": float(np.percentile(latency, 50)), "latency_p99_s": float(np.percentile(latency, 99)),
            "passes": run.passes, "tokens_per_pass": run.emitted / max(run.passes, 1),
            "compile_s_excluded": run.compile_s,
            "outputs_equal": reference is None or run.tokens == reference.tokens,
            "complete": all(len(t) == a.output_len for t, a in zip(run.tokens, stream))}


def speedups(rows: list[dict]) -> dict[str, float]:
    """Continuous over static batching's throughput, per drafter and best against best (rows of one window)."""
    rate = {r["mode"]: r["tokens_per_s"] for r in rows}
    ratios = {kind: rate[f"continuous-{kind}"] / rate[f"static-{kind}"] for kind in ("suffix", "plain")
              if f"continuous-{kind}" in rate and f"static-{kind}" in rate}
    continuous = [v for m, v in rate.items() if m.startswith("continuous")]
    static = [v for m, v in rate.items() if m.startswith("static")]
    if continuous and static:
        ratios["best"] = max(continuous) / max(static)
    return ratios


def table(rows: list[dict]) -> str:
    header = ["window s", "offered tok/s", "mode", "tokens", "tok/s", "vs static-plain", "p50 s", "p99 s",
              "tok/pass", "compile s", "equal"]
    base = {r["window_s"]: r["tokens_per_s"] for r in rows if r["mode"] == "static-plain"}
    cells = [[f"{r['window_s']:g}", "-" if r["offered_tokens_per_s"] is None else f"{r['offered_tokens_per_s']:.0f}",
              r["mode"], str(r["tokens"]),
              f"{r['tokens_per_s']:.1f}",
              f"{r['tokens_per_s'] / base[r['window_s']]:.2f}x" if r["window_s"] in base else "-",
              f"{r['latency_p50_s']:.2f}", f"{r['latency_p99_s']:.2f}", f"{r['tokens_per_pass']:.2f}",
              f"{r['compile_s_excluded']:.1f}", str(r["outputs_equal"])] for r in rows]
    widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header] + cells)


def machine() -> dict:
    """What the numbers were measured on, with the load average (the machine may be shared)."""
    return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "loadavg_1_5_15": list(os.getloadavg())}


def load_target(name: Optional[str]) -> Model:
    """The model in float32 on CPU (paged and contiguous attention sum in other orders; bfloat16 could
    flip a near tie between modes), with EOS ignored so requests run to their recorded lengths."""
    from specjax.models.pull import resolve_model

    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    model = load_model(resolve_model(name) if name else default_model_dir(), dtype=dtype)
    return dataclasses.replace(model, config=dataclasses.replace(model.config, eos_token_ids=()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a registry name (smollm2-135m-instruct) or model dir; default: embedded tiny SQL")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--windows", type=float, nargs="+", default=[0.25, 1.0, 5.0],
                   help="seconds over which the requests arrive; every mode runs once per window (shorter: more load)")
    p.add_argument("--agents", type=int, default=16, help="concurrent agents replaying trajectories")
    p.add_argument("--tool-tokens", type=int, default=64, help="a tool call's time, in upstream token-times")
    p.add_argument("--prompt-scale", type=float, default=1 / 64)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--output-scale", type=float, default=0.5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--slots", type=int, default=8, help="scheduler slots = static batch size")
    p.add_argument("--max-tree", type=int, default=8, help="draft nodes per request per step (both kinds)")
    p.add_argument("--tree-size", choices=("auto", "max"), default="max",
                   help="both kinds: the auto tree size (per slot / per step) or whole proposals up to --max-tree")
    p.add_argument("--prefill-budget", type=int, default=128)
    p.add_argument("--rehearsals", type=int, default=3,
                   help="at most this many untimed runs of the stream before each timed one (until one compiles nothing)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--http", action="store_true", help=f"also run {HTTP_MODE} (needs the serve extra)")
    p.add_argument("--traces", default=str(TRACE_DIR), help="folder of the agentic traces ('' : the shipped pattern)")
    p.add_argument("--note", default="", help="recorded in the JSON (for example: the machine was shared)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    model = load_target(args.model)
    sessions, source = load_calls(pathlib.Path(args.traces) if args.traces else None)
    unit = build_stream(sessions, requests=args.requests, agents=args.agents, tool_tokens=args.tool_tokens,
                        window=1.0, prompt_scale=args.prompt_scale, max_prompt=args.max_prompt,
                        output_scale=args.output_scale, max_new=args.max_new_tokens)
    prompts = session_prompts(model, unit)
    output_tokens = sum(a.output_len for a in unit)
    load_before = os.getloadavg()
    runners = {mode: mode_runner(mode, model, args, unit) for mode in args.modes + [HTTP_MODE] * args.http}
    rows, reference, ratios = [], None, {}
    for window in args.windows:
        stream = [dataclasses.replace(a, at=a.at * window) for a in unit]
        for mode, run in runners.items():
            for _ in range(args.rehearsals):  # compile the shapes the timed run meets, until one compiles nothing
                if run(stream, prompts).compile_s < 0.05:
                    break
            result = run(stream, prompts)
            reference = reference or result
            rows.append(dict(summarize(mode, result, stream, reference), window_s=window,
                             offered_tokens_per_s=output_tokens / window if window > 0 else None))
        ratios[f"{window:g}"] = speedups([r for r in rows if r["window_s"] == window])
    report = {"args": vars(args), "machine": dict(machine(), loadavg_before=list(load_before)), "pattern_source": source,
              "stream": {"requests": len(unit), "sessions": len({a.session for a in unit}),
                         "prompt_tokens": sum(a.prompt_len for a in unit), "output_tokens": output_tokens,
                         "output_len_p50_p99_max": [float(np.percentile([a.output_len for a in unit], q))
                                                    for q in (50, 99, 100)],
                         "arrivals_in_windows": [round(a.at, 4) for a in unit]},
              "rows": rows, "continuous_over_static_by_window": ratios}
    print(f"model: {args.model or 'embedded tiny-sql'}  backend: {report['machine']['backend']}  "
          f"requests: {len(unit)}  slots: {args.slots}  max_tree: {args.max_tree} ({args.tree_size})  "
          f"load avg: {report['machine']['loadavg_1_5_15'][0]:.1f}")
    print(table(rows))
    for window, r in ratios.items():
        print(f"window {window} s: continuous / static throughput: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
