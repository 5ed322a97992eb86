"""The chat side of the command line: ``specjax generate`` on the shipped tasks, and ``specjax chat``.

``run_tasks`` is the main job on a chat model: each everyday task (see
``specjax.models.tasks``) runs alone (batch 1, where a CPU has room to verify
drafts), speculative and plain interleaved ``--repeat`` times, so every task
gets its own tokens per pass, wall-time speedup and equality check.

``chat_main`` is the interactive loop: replies stream as the engine accepts
tokens, and the conversation stays in one ``Engine.session`` (its KV cache),
so each turn prefills only what is new.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

import numpy as np

from specjax.engine.cli import _comparison, _forget_outputs, _save_suffix_history, choose_model, drafter_from_args
from specjax.models.chat import encode_chat, has_chat_template


def _fresh_drafter(engine, args, model, earlier: list[list[int]]) -> None:
    """The drafter as it stands before a task: it has seen the run's earlier tasks' outputs (a suffix
    index's "earlier requests"), never this task's own earlier repetitions."""
    if args.drafter == "none":
        return
    _forget_outputs(engine, args.drafter, model, args)
    if hasattr(engine.drafter, "remember"):
        engine.drafter.remember(earlier)


def _warm(engine, prompt_ids: list[int], max_new_tokens: int, compiled: set, sampling: dict) -> None:
    """Compile this request's shapes once per shape bucket, before timing: ``warmup`` of the plain step
    (and its measured cost) for the host loop, a whole generation for device and hybrid drafters' own
    loops. Tree sizes compile when the auto size first reaches them, outside the timing (``_timed``)."""
    width = engine.prompt_bucket(len(prompt_ids))
    bucket = (width, engine.cache_bucket(len(prompt_ids), max_new_tokens))
    if bucket in compiled:
        return
    if engine.on_device or hasattr(engine.drafter, "generate_hybrid"):
        engine.generate([prompt_ids], max_new_tokens, **sampling)
    else:
        engine.warmup(batch_size=1, prompt_len=len(prompt_ids), max_new_tokens=max_new_tokens,
                      sizes=(0,) if engine.auto else None)
    compiled.add(bucket)


def run_tasks(model, args, out: Optional[TextIO] = None) -> int:
    """``specjax generate`` without ``--prompt`` on a chat model: the shipped tasks, one at a time."""
    import json

    from tqdm.auto import tqdm

    from specjax.engine.engine import Engine
    from specjax.models.tasks import load_tasks

    if not has_chat_template(model):
        raise SystemExit(f"specjax generate: {model.path} has no chat template, so the shipped chat tasks do "
                         "not apply: pass --prompt TEXT (with --raw)")
    out = out or sys.stdout
    tasks = load_tasks()[: args.num_demo_prompts]
    if not tasks:
        raise SystemExit(f"specjax generate: --num-demo-prompts {args.num_demo_prompts} leaves no task to run")
    options = dict(draft_capacity=args.draft_capacity, max_draft_capacity=args.max_draft_capacity,
                   attention=args.attention, max_batch_size=1)
    spec = Engine(model, drafter_from_args(args.drafter, model, args), **options)
    base = Engine(model, None, **options) if args.compare_baseline else None
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    compiled: set = set()
    for engine in (spec, base) if base is not None else (spec,):  # the loop's small per-batch programs
        engine.generate(messages=tasks[0]["messages"], max_new_tokens=tasks[0]["max_new_tokens"], **sampling)
    earlier: list[list[int]] = []
    rows = []
    for task in tqdm(tasks, desc="tasks", unit="task", disable=args.json, file=sys.stderr):
        ids, limit = encode_chat(model, task["messages"]), task["max_new_tokens"]
        _warm(spec, ids, limit, compiled, sampling)
        runs = {"spec": [], "base": []}
        for _ in range(args.repeat):  # interleaved, so a noisy stretch of the machine hits both alike
            _fresh_drafter(spec, args, model, earlier)
            runs["spec"].append(_timed(spec, ids, limit, sampling))
            if base is not None:
                runs["base"].append(_timed(base, ids, limit, sampling))
        rows.append(_task_row(task, runs))
        earlier.append(runs["spec"][-1][0].token_ids)
    if args.save_suffix_history:
        _save_suffix_history(spec.drafter, model, args.save_suffix_history)
    summary = _tasks_summary(model, args, rows)
    if args.json:
        print(json.dumps(summary), file=out)
        return 0
    for row in rows:
        print(f"\n>>> [{row['id']}] {row['request'][-100:]!r}\n{row['text']}", file=out)
    print("\n" + _tasks_table(summary), file=out)
    return 0


def _timed(engine, ids, limit, sampling) -> tuple:
    """One generation and its wall time, less what it spent compiling (a tree size reached for the
    first time: a one-off cost, not the steady state the speedup describes)."""
    from specjax.engine.compile_cache import timed_excluding_compiles

    results, wall, _ = timed_excluding_compiles(lambda: engine.generate([ids], limit, **sampling))
    return results[0], wall


def _task_row(task: dict, runs: dict) -> dict:
    spec = [r for r, _ in runs["spec"]]
    result = spec[-1]
    row = {"id": task["id"], "category": task["category"], "request": task["messages"][-1]["content"],
           "text": result.text, "token_ids": result.token_ids, "tokens": len(result.token_ids),
           "target_passes": result.target_passes, "tokens_per_pass": result.tokens_per_pass,
           "wall_s": float(np.median([w for _, w in runs["spec"]])), "wall_s_runs": [w for _, w in runs["spec"]],
           "repeatable": all(r.token_ids == result.token_ids for r in spec)}
    if runs["base"]:
        base = [r for r, _ in runs["base"]]
        row.update(baseline_wall_s=float(np.median([w for _, w in runs["base"]])),
                   baseline_wall_s_runs=[w for _, w in runs["base"]],
                   identical=all(b.token_ids == result.token_ids for b in base) and row["repeatable"])
        row["speedup"] = row["baseline_wall_s"] / max(row["wall_s"], 1e-9)
    return row


def _tasks_summary(model, args, rows: list[dict]) -> dict:
    """The run in the shape of ``specjax generate --json`` (totals at the top), plus one entry per task."""
    tokens = sum(r["tokens"] for r in rows)
    passes = sum(r["target_passes"] for r in rows)
    wall = sum(r["wall_s"] for r in rows)
    summary = {"model": model.path, "drafter": args.drafter, "mode": "one task at a time (batch 1)",
               "text": [r["text"] for r in rows], "token_ids": [r["token_ids"] for r in rows], "tokens": tokens,
               "target_passes": passes, "tokens_per_pass": tokens / max(passes, 1), "wall_s": wall,
               "tokens_per_s": tokens / max(wall, 1e-9), "repeat": args.repeat,
               "tasks": [{k: v for k, v in r.items() if k not in ("token_ids", "request")} for r in rows]}
    if rows and "speedup" in rows[0]:
        base_wall = sum(r["baseline_wall_s"] for r in rows)
        summary.update(baseline={"tokens": tokens, "target_passes": tokens, "tokens_per_pass": 1.0,
                                 "wall_s": base_wall, "tokens_per_s": tokens / max(base_wall, 1e-9)},
                       speedup=base_wall / max(wall, 1e-9), sampled=args.temperature > 0,
                       identical_to_baseline=all(r["identical"] for r in rows))
    return summary


def _tasks_table(summary: dict) -> str:
    compared = "speedup" in summary
    header = f"{'task':<24}{'category':<15}{'tokens':>7}{'tok/pass':>10}{'spec s':>9}"
    header += f"{'plain s':>9}{'speedup':>9}  same" if compared else ""
    lines = [f"{summary['model']}: {len(summary['tasks'])} shipped tasks, {summary['mode']}, drafter "
             f"{summary['drafter']}", header, "-" * len(header)]
    for r in summary["tasks"] + [dict(summary, id="all tasks", category="", identical=summary.get(
            "identical_to_baseline"), baseline_wall_s=summary.get("baseline", {}).get("wall_s"))]:
        line = f"{r['id']:<24}{r['category']:<15}{r['tokens']:>7}{r['tokens_per_pass']:>10.2f}{r['wall_s']:>9.2f}"
        if compared:
            same = "n/a" if summary["sampled"] else "yes" if r["identical"] else "NO"  # sampled: other draws
            line += f"{r['baseline_wall_s']:>9.2f}{r['speedup']:>8.2f}x  {same}"
        lines.append(line)
    if compared:
        lines.append(f"wall times: median of {summary['repeat']} interleaved runs per task and side; the total "
                     f"speedup is the plain total over the speculative total; {_comparison(summary)}")
    return "\n".join(lines)


# ------------------------------------------------------------------ specjax chat


class _Streamer:
    """``on_tokens`` for one reply: prints the text as tokens arrive (holding back a partial UTF-8
    character, which a byte-level tokenizer decodes as U+FFFD until its last byte comes)."""

    def __init__(self, engine, out: TextIO):
        self.engine, self.out = engine, out
        self.ids: list[int] = []
        self.shown = ""

    def __call__(self, index: int, tokens: list) -> None:
        self.ids.extend(tokens)
        text = self.engine.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._show(text)

    def finish(self, text: str) -> None:
        """Print what the final text adds (a stop string's cut can only shorten it)."""
        self._show(text)
        self.out.write("\n")
        self.out.flush()

    def _show(self, text: str) -> None:
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def chat_main(args, stdin: Optional[TextIO] = None, out: Optional[TextIO] = None) -> int:
    """``specjax chat``: read a user turn per line, stream the reply, keep the history (``/exit`` or
    end of input ends). After each reply: tokens, target passes, tokens per pass, tokens per second."""
    from specjax.drafters.factory import default_max_capacity
    from specjax.engine.cli import _load, resolve_drafter_args
    from specjax.engine.engine import Engine

    stdin, out = stdin or sys.stdin, out or sys.stdout
    if choose_model(args) is not None:
        raise SystemExit("specjax chat: the default chat model cannot be pulled (see above), and the embedded "
                         "model is not a chat model; pass --model DIR_OR_GGUF")
    resolve_drafter_args(args)
    if args.max_draft_capacity is None:
        args.max_draft_capacity = default_max_capacity()
    model = _load(args)
    if not has_chat_template(model):
        raise SystemExit(f"specjax chat: {model.path} has no chat template (not an instruct model?)")
    engine = Engine(model, drafter_from_args(args.drafter, model, args), draft_capacity=args.draft_capacity,
                    max_draft_capacity=args.max_draft_capacity, attention=args.attention, max_batch_size=1)
    keeps_cache = not engine.on_device and not hasattr(engine.drafter, "generate_hybrid")
    session = engine.session(max_len=min(4096, model.config.max_position_embeddings)) if keeps_cache else None
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    print(f"specjax chat: {model.path}, drafter {args.drafter}. One message per line; /exit or end of input "
          "ends.", file=sys.stderr)
    for line in stdin:
        text = line.rstrip("\n")
        if text.strip() == "/exit":
            break
        if not text.strip():
            continue
        history.append({"role": "user", "content": text})
        streamer = _Streamer(engine, out)
        start = time.perf_counter()
        try:
            result = engine.generate([encode_chat(model, history)], args.max_new_tokens, session=session,
                                     on_tokens=streamer, **sampling)[0]
        except ValueError as e:
            if session is None or "session cache overflow" not in str(e):
                raise
            print("[the conversation no longer fits the context: starting a new one with this message]",
                  file=sys.stderr)
            history, session = system + history[-1:], engine.session(max_len=session.max_len)
            result = engine.generate([encode_chat(model, history)], args.max_new_tokens, session=session,
                                     on_tokens=streamer, **sampling)[0]
        streamer.finish(result.text)
        wall = time.perf_counter() - start
        history.append({"role": "assistant", "content": result.text})
        print(f"[{len(result.token_ids)} tokens in {result.target_passes} target passes: "
              f"{result.tokens_per_pass:.2f} tokens/pass, {len(result.token_ids) / max(wall, 1e-9):.1f} tokens/s]",
              file=sys.stderr)
    return 0
