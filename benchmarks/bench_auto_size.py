"""The auto tree size against plain decoding, per drafter kind (host and device) and batch size.

For each drafter (host: prompt lookup, suffix index; device: Token Recycling, the
embedded model's shipped draft model) and each batch size it generates the same
requests with ``draft_capacity="auto"`` and with plain decoding, interleaved
``--repeat`` times after a warm-up on the same shapes (bucket measurement
excluded, and compiling too: a timed run that meets a new shape, say a
shrunk batch's first tree, has its compile seconds taken out as the CLI
does), and reports tokens per target pass, the chosen T over time (share of
host steps / device chunks per T, and the run-length timeline),
the speedup of median wall times, and whether greedy outputs are identical.
The row ``none`` is the control: a second plain engine timed against the
first the same way, so its "speedup" is what this machine's noise alone makes
of two identical runs (read the drafters' rows against it). Prints a table and
writes JSON.

    python benchmarks/bench_auto_size.py                              # embedded tiny SQL model
    python benchmarks/bench_auto_size.py --batch-sizes 1 --requests 4 --max-new-tokens 96 \\
        --model smollm2-135m-instruct --prompts chat --drafters token-recycling

Timings on a shared CPU are noisy: read the medians, and rerun before trusting a
difference of a few percent.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.factory import load_drafter
from specjax.engine.compile_cache import timed_excluding_compiles
from specjax.engine.engine import Engine
from specjax.models.embedded import default_model_dir, embedded_drafter_dir
from specjax.models.loading import load_model
from specjax.models.embedded.toy_corpus import sql_prompts

HOST, DEVICE = ("prompt-lookup", "suffix"), ("token-recycling", "draft-model")
CONTROL = "none"  # plain decoding timed against plain decoding: the noise floor of a speedup
CHAT = ["Write a short poem about the sea.", "Explain what a hash table is in two sentences.",
        "List three tips for staying focused while studying.", "What is the capital of France? Answer briefly.",
        "Give me a recipe for a simple tomato salad.", "Summarize the plot of Romeo and Juliet in three lines.",
        "Write a Python function that reverses a string.", "Why is the sky blue?"]


def bench_prompts(model, kind: str, n: int, sql_seed: int) -> list:
    """``n`` requests: the chat tasks (``CHAT``, cycled, rendered with the model's chat template) or
    the embedded model's demo SQL prompts of ``sql_seed``."""
    if kind == "chat":
        chat = Engine(model, None)
        return [chat.encode_chat([{"role": "user", "content": c}]) for c in itertools.islice(itertools.cycle(CHAT), n)]
    return sql_prompts(n, seed=sql_seed)


def write_results(args, rows: list) -> None:
    """``rows`` with the backend, device and arguments, as JSON at ``args.out``."""
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "args": vars(args),
                   "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


def drafter_options(model_dir, max_capacity: int) -> dict:
    """What ``specjax generate`` passes to ``load_drafter`` for an auto-sized drafter."""
    shipped = embedded_drafter_dir() if model_dir is None else None
    return dict(draft_capacity="auto", max_draft_capacity=max_capacity, drafter_model=shipped, suffix_history="none")


def chosen_sizes(engine: Engine, collected: list) -> list[int]:
    """T per host step (host drafters) or per device chunk (device drafters), in order."""
    if engine.on_device:
        return [t for p in engine.__dict__.get("_chunk_policies", {}).values() for t, _ in p.history]
    return [t for p in collected for t in p.history]


def measure(model, prompts, name: str, batch: int, args) -> dict:
    options = drafter_options(args.model, args.max_capacity)
    drafter = None if name == CONTROL else load_drafter(name, model, **options)
    engine = Engine(model, drafter, max_draft_capacity=args.max_capacity,
                    max_batch_size=batch, lazy_compile=False)  # no timed run compiles a size the warm-up missed
    plain = Engine(model, None, max_batch_size=batch)
    collected: list = []
    if not engine.on_device:  # keep the host policies (one per batch) to read their choices
        make_policy = engine._policy
        engine._policy = lambda rows, max_len: collected.append(make_policy(rows, max_len)) or collected[-1]
    kwargs = dict(max_new_tokens=args.max_new_tokens)
    engine.generate(prompts, **kwargs)  # compile, and measure every bucket
    plain.generate(prompts, **kwargs)
    warm = len(chosen_sizes(engine, collected))
    walls, plain_walls = [], []
    for _ in range(args.repeat):  # interleaved: a noisy stretch of the machine hits both alike
        if engine.on_device and hasattr(engine.drafter, "reset"):
            engine.drafter.reset()  # Token Recycling forgets the warm-up's table
        elif not engine.on_device and name != CONTROL:
            engine.drafter = load_drafter(name, model, **options)
        results, wall, _ = timed_excluding_compiles(lambda: engine.generate(prompts, **kwargs))
        walls.append(wall)
        base, wall, _ = timed_excluding_compiles(lambda: plain.generate(prompts, **kwargs))
        plain_walls.append(wall)
    sizes = chosen_sizes(engine, collected)[warm:]
    share = {str(t): round(n / max(len(sizes), 1), 3) for t, n in sorted(Counter(sizes).items())}
    timeline = [[t, len(list(g))] for t, g in itertools.groupby(sizes)]
    tokens = sum(len(r.token_ids) for r in results)
    kind = "control" if name == CONTROL else "device" if engine.on_device else "host"
    return {"drafter": name, "kind": kind, "batch": batch,
            "tokens_per_pass": tokens / sum(r.target_passes for r in results),
            "wall_s": float(np.median(walls)), "plain_wall_s": float(np.median(plain_walls)),
            "speedup": float(np.median(plain_walls) / np.median(walls)), "wall_s_runs": walls,
            "plain_wall_s_runs": plain_walls, "chosen_T_share": share, "chosen_T_timeline": timeline,
            "unit": "device chunk" if engine.on_device else "host step",
            "identical_to_plain": [r.token_ids for r in results] == [r.token_ids for r in base]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory (default: the embedded tiny SQL model)")
    p.add_argument("--prompts", choices=("sql", "chat"), default="sql")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-capacity", type=int, default=8, help="the largest T 'auto' may choose")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--drafters", nargs="+", default=[CONTROL, *HOST, *DEVICE], choices=[CONTROL, *HOST, *DEVICE],
                   help=f"{CONTROL!r}: plain decoding against itself, the control")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "auto_size.json"))
    args = p.parse_args()
    if args.model is not None and "draft-model" in args.drafters:
        p.error("--drafters draft-model runs on the embedded model only (its shipped draft model)")
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    model = load_model(args.model or default_model_dir(), dtype=dtype)
    prompts = bench_prompts(model, args.prompts, args.requests, sql_seed=1)
    rows = []
    print(f"backend: {jax.default_backend()}  model: {args.model or 'embedded tiny-sql'}  requests: "
          f"{args.requests}  max_new_tokens: {args.max_new_tokens}  median of {args.repeat}")
    print(f"{'drafter':<17}{'kind':>7}{'batch':>6}{'tok/pass':>10}{'wall s':>8}{'plain s':>9}{'speedup':>9}"
          f"{'identical':>10}  chosen T (share of steps or chunks)")
    for batch in args.batch_sizes:
        for name in args.drafters:
            r = measure(model, prompts, name, batch, args)
            rows.append(r)
            print(f"{r['drafter']:<17}{r['kind']:>7}{r['batch']:>6}{r['tokens_per_pass']:>10.2f}{r['wall_s']:>8.2f}"
                  f"{r['plain_wall_s']:>9.2f}{r['speedup']:>9.2f}{str(r['identical_to_plain']):>10}  "
                  f"{r['chosen_T_share']}", flush=True)
    write_results(args, rows)


if __name__ == "__main__":
    main()
