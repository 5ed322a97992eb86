"""The per-step reductions over a vocabulary: XLA's argmax and top-k against specjax's.

Every greedy step takes an argmax over the vocabulary (``sampling.first_argmax``:
a max, then the first index reaching it), and Token Recycling and the model
drafters take a top-k over it each step (``sampling.vocab_top_k``: the exact
top-k read from the k groups with the best maxima). Both give what
``jnp.argmax`` and ``lax.top_k`` give, bit for bit (checked here on every
shape, ties included); this times them at the shapes the engine runs: the
embedded model's batch 16 (one token a row, and two: a one-node tree), SmolLM2
at batch 8, and a Qwen2.5 vocabulary at batch 1.

Each timing runs the op ``--iters`` times inside one jitted fori_loop (the
input carried, so nothing is hoisted) and takes the median of ``--repeats``
runs: no Python dispatch in the numbers. Ratios are measured side by side in
one run.

  python benchmarks/bench_vocab_ops.py          # table + benchmarks/results/vocab_ops.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from specjax.engine.sampling import first_argmax, vocab_top_k

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "vocab_ops.json"
SHAPES = {"embedded model, batch 16, plain step": (16, 1, 1024),
          "embedded model, batch 16, one-node tree": (16, 2, 1024),
          "SmolLM2, batch 8, plain step": (8, 1, 49152),
          "Qwen2.5, batch 1, plain step": (1, 1, 151936)}
TOP_K = 8  # Token Recycling's successors per token


def seconds_per_call(op: Callable[[jax.Array], jax.Array], x: jax.Array, iters: int, repeats: int) -> float:
    """Median seconds of one ``op(x)``, timed over ``iters`` calls fused into one program."""
    def body(_, carry):
        return carry + jnp.sum(op(carry)).astype(carry.dtype) * 1e-30  # depends on the op: not hoisted

    loop = jax.jit(lambda x: lax.fori_loop(0, iters, body, x))
    jax.block_until_ready(loop(x))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(loop(x))
        times.append(time.perf_counter() - start)
    return statistics.median(times) / iters


def test_input(shape: tuple[int, ...], seed: int) -> jax.Array:
    """Random logits with ties: a quarter of the rows rounded to a few values."""
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    x[: max(shape[0] // 4, 1)] = np.round(x[: max(shape[0] // 4, 1)] * 2)
    return jnp.asarray(x)


def measure(shape: tuple[int, ...], iters: int, repeats: int) -> dict:
    x = test_input(shape, seed=0)
    same_argmax = bool(np.array_equal(first_argmax(x), jnp.argmax(x, axis=-1)))
    ours, xla = vocab_top_k(x, TOP_K), lax.top_k(x, TOP_K)
    same_top_k = all(np.array_equal(a, b) for a, b in zip(ours, xla))
    row = {"shape": list(shape), "argmax_identical": same_argmax, "top_k_identical": same_top_k}
    ops = {"jnp.argmax": lambda v: jnp.argmax(v, axis=-1), "first_argmax": first_argmax,
           "lax.top_k": lambda v: lax.top_k(v, TOP_K)[0], "vocab_top_k": lambda v: vocab_top_k(v, TOP_K)[0]}
    for name, op in ops.items():
        row[name + "_us"] = seconds_per_call(op, x, iters, repeats) * 1e6
    row["argmax_speedup"] = row["jnp.argmax_us"] / row["first_argmax_us"]
    row["top_k_speedup"] = row["lax.top_k_us"] / row["vocab_top_k_us"]
    return row


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}); top-k k = {TOP_K}; microseconds per call")
    print(f"{'where':40s} {'shape':16s} {'argmax':>9s} {'first_':>9s} {'x':>5s} {'top_k':>9s} {'vocab_':>9s} "
          f"{'x':>5s}  same")
    rows = {}
    for label, shape in SHAPES.items():
        r = rows[label] = measure(shape, args.iters, args.repeats)
        print(f"{label:40s} {str(shape):16s} {r['jnp.argmax_us']:9.1f} {r['first_argmax_us']:9.1f} "
              f"{r['argmax_speedup']:5.1f} {r['lax.top_k_us']:9.1f} {r['vocab_top_k_us']:9.1f} "
              f"{r['top_k_speedup']:5.1f}  {r['argmax_identical'] and r['top_k_identical']}")
    report = {"backend": jax.default_backend(), "device": device.device_kind, "top_k": TOP_K,
              "iters": args.iters, "repeats": args.repeats, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
