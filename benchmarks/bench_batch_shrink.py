"""Shrinking a batch to its live rows in the on-device loop, against running the whole batch.

For plain decoding and each device drafter (auto tree size), it generates the same requests
with ``Engine(shrink_batches=False)`` and ``shrink_batches=True``, interleaved ``--repeat``
times after two warm-up calls each, and reports the median wall times (compiling excluded: a
tree size the policy first picks in a timed run compiles there), their ratio, whether
the outputs are identical, and the compile seconds each engine's first call spent (the
shrinking engine runs second, so its count is what the smaller batches add). Prints a table
and writes JSON.

    python benchmarks/bench_batch_shrink.py                        # embedded tiny SQL model, batch 16
    python benchmarks/bench_batch_shrink.py --model smollm2-135m-instruct --prompts chat \\
        --batch-size 8 --requests 8 --max-new-tokens 96 --drafters none token-recycling \\
        --out benchmarks/results/batch_shrink_smollm2.json

Timings on a shared CPU are noisy: rerun before trusting a difference of a few percent.
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from bench_auto_size import bench_prompts, drafter_options, write_results
from specjax.drafters.factory import load_drafter
from specjax.engine.compile_cache import timed_excluding_compiles
from specjax.engine.engine import Engine
from specjax.models.embedded import default_model_dir
from specjax.models.loading import load_model


def measure(model, prompts, name: str, args) -> dict:
    """Whole-batch and shrinking engines for one drafter, side by side."""
    engines, compile_s, walls, outputs = {}, {}, {False: [], True: []}, {}
    for shrink in (False, True):
        drafter = load_drafter(name, model, **drafter_options(args.model, args.max_capacity))
        engines[shrink] = Engine(model, drafter, max_batch_size=args.batch_size, shrink_batches=shrink,
                                 max_draft_capacity=args.max_capacity)
        compile_s[shrink] = timed_excluding_compiles(lambda: generate(engines[shrink], prompts, args))[2]
        generate(engines[shrink], prompts, args)  # the auto policies measure their step costs
    for _ in range(args.repeat):
        for shrink, engine in engines.items():
            if hasattr(engine.drafter, "reset"):  # Token Recycling: every run starts from the same table
                engine.drafter.reset()
            results, wall, _ = timed_excluding_compiles(lambda: generate(engine, prompts, args))
            walls[shrink].append(wall)  # a tree size first chosen late compiles then: not counted
            outputs[shrink] = [r.token_ids for r in results]
    whole, shrunk = (float(np.median(walls[s])) for s in (False, True))
    return {"drafter": name, "batch": args.batch_size, "whole_s": whole, "shrink_s": shrunk,
            "speedup": whole / shrunk, "identical": outputs[False] == outputs[True],
            "compile_s_whole": compile_s[False], "compile_s_extra": compile_s[True],
            "lengths": [len(o) for o in outputs[True]], "walls": {str(k): v for k, v in walls.items()}}


def generate(engine: Engine, prompts, args):
    return engine.generate(prompts, max_new_tokens=args.max_new_tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model directory or registry name (default: the embedded one)")
    p.add_argument("--prompts", choices=("sql", "chat"), default="sql")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-capacity", type=int, default=8, help="the largest T 'auto' may choose")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--drafters", nargs="+", default=["none", "token-recycling", "draft-model"],
                   choices=["none", "token-recycling", "draft-model"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "batch_shrink.json"))
    args = p.parse_args()
    if args.model is not None and "draft-model" in args.drafters:
        p.error("--drafters draft-model runs on the embedded model only (its shipped draft model)")
    model = load_model(args.model or default_model_dir(),
                       dtype=jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16)
    prompts = bench_prompts(model, args.prompts, args.requests, sql_seed=0)  # seed 0: the demo's prompts
    print(f"backend: {jax.default_backend()}  model: {args.model or 'embedded tiny-sql'}  requests: "
          f"{args.requests}  batch: {args.batch_size}  max_new_tokens: {args.max_new_tokens}  "
          f"median of {args.repeat}")
    print(f"{'drafter':<17}{'whole s':>9}{'shrink s':>10}{'speedup':>9}{'identical':>11}{'compile s':>11}"
          f"{'+ shrink':>10}")
    rows = []
    for name in args.drafters:
        r = measure(model, prompts, name, args)
        rows.append(r)
        print(f"{r['drafter']:<17}{r['whole_s']:>9.3f}{r['shrink_s']:>10.3f}{r['speedup']:>9.2f}"
              f"{str(r['identical']):>11}{r['compile_s_whole']:>11.1f}{r['compile_s_extra']:>10.1f}", flush=True)
    print(f"output lengths: {rows[-1]['lengths']}")
    write_results(args, rows)


if __name__ == "__main__":
    main()
