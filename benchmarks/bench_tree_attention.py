"""Tree attention speed: Pallas kernel vs the XLA reference vs jax.nn.dot_product_attention.

For each prefix length L and tree size T at Llama-3-8B head shapes (32 query
heads, 8 KV heads, head_dim 128) it times one attention layer and reports the
kernel's achieved memory bandwidth against the device's peak.  The kernel reads
the K/V prefix once, so at small T it should be memory-bound: the target is
T=64 within 1.3x of T=1 at L=8k.

The dot_product_attention column is the naive way: the tree's K/V appended to
the prefix and a dense [T, L+T] mask (prepared outside the timed loop), with
implementation="cudnn"; it is left empty where cuDNN does not run.

Each timing runs the op `--iters` times inside one jitted fori_loop (output fed
back as the next query, so nothing is hoisted) and takes the median of
`--repeats` such runs: no Python dispatch in the numbers.

  python benchmarks/bench_tree_attention.py                # accelerator, full grid
  python benchmarks/bench_tree_attention.py --smoke        # tiny, CPU interpret mode
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

from specjax.tpu_kernels.tree_attention import tree_attention

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "tree_attention.json"

# Peak HBM bandwidth in bytes/s, by a substring of jax's device_kind (first match wins).
PEAK_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("A100", 2.0e12),
    ("L4", 3.0e11),
    ("TPU v5 lite", 8.19e11),
    ("TPU v5", 2.765e12),
    ("TPU v6 lite", 1.64e12),
    ("TPU v4", 1.2e12),
)


def peak_bandwidth(device_kind: str) -> Optional[float]:
    return next((bw for name, bw in PEAK_BANDWIDTH if name in device_kind), None)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192, 32768], help="prefix lengths L")
    p.add_argument("--trees", type=int, nargs="+", default=[1, 16, 64], help="tree sizes T")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--backend", choices=["tpu", "gpu"], default=None, help="kernel backend (default: the platform's)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one iteration: checks the script runs (CPU ok)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.smoke:
        args.lengths, args.trees, args.batch = [40], [1, 4], 2
        args.q_heads, args.kv_heads, args.head_dim = 4, 2, 32
        args.iters, args.repeats = 1, 1
    return args


def chain_mask(batch: int, num_tree: int) -> jax.Array:
    """A causal chain: every tree token sees all earlier ones (the densest tree)."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((num_tree, num_tree), bool)), (batch, num_tree, num_tree))


def make_inputs(args: argparse.Namespace, length: int, num_tree: int, seed: int = 0):
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(seed), 5)
    b, hq, hkv, d = args.batch, args.q_heads, args.kv_heads, args.head_dim
    normal = lambda key, shape: jax.random.normal(key, shape, dtype)
    return (
        normal(keys[0], (b, num_tree, hq, d)),
        normal(keys[1], (b, hkv, length, d)),
        normal(keys[2], (b, hkv, length, d)),
        jnp.full((b,), length, jnp.int32),
        normal(keys[3], (b, num_tree, hkv, d)),
        normal(keys[4], (b, num_tree, hkv, d)),
        chain_mask(b, num_tree),
    )


def dense_inputs(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask):
    """The naive layout: tree K/V appended to the prefix, the mask widened to [T, L+T]."""
    b, t = q.shape[:2]
    length = k_cache.shape[2]
    keys = jnp.concatenate([k_cache.transpose(0, 2, 1, 3), tree_k], axis=1)
    values = jnp.concatenate([v_cache.transpose(0, 2, 1, 3), tree_v], axis=1)
    mask = jnp.concatenate([jnp.ones((b, t, length), bool), tree_mask], axis=2)[:, None]
    return q, keys, values, mask


def time_op(fn: Callable, args: tuple, iters: int, repeats: int) -> float:
    """Median seconds per call of fn(q, *rest) -> like q, looped on device."""
    looped = jax.jit(lambda q, *rest: lax.fori_loop(0, iters, lambda _, x: fn(x, *rest), q))
    looped(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        looped(*args).block_until_ready()
        times.append((time.perf_counter() - start) / iters)
    return statistics.median(times)


def time_cudnn(inputs: tuple, iters: int, repeats: int) -> Optional[float]:
    """dot_product_attention on cuDNN, or None where it does not run."""
    if jax.default_backend() != "gpu":
        return None
    fn = lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="cudnn")
    try:
        return time_op(fn, dense_inputs(*inputs), iters, repeats)
    except Exception as err:  # cuDNN rejects some shapes/dtypes; report and go on
        print(f"  cudnn skipped: {type(err).__name__}: {str(err)[:120]}")
        return None


def bytes_moved(inputs: tuple) -> int:
    """HBM traffic of an ideal kernel: each operand read once (prefix only), output written once."""
    q, k_cache, v_cache, lengths, tree_k, tree_v, _ = inputs
    prefix = 2 * int(np.sum(np.asarray(lengths))) * k_cache.shape[1] * k_cache.shape[3] * k_cache.dtype.itemsize
    return prefix + 2 * q.nbytes + tree_k.nbytes + tree_v.nbytes


def measure(args: argparse.Namespace, length: int, num_tree: int, peak: Optional[float]) -> dict:
    inputs = make_inputs(args, length, num_tree)
    kernel = lambda q, *rest: tree_attention(q, *rest, impl="pallas", backend=args.backend)
    xla = lambda q, *rest: tree_attention(q, *rest, impl="xla")
    kernel_s = time_op(kernel, inputs, args.iters, args.repeats)
    xla_s = time_op(xla, inputs, args.iters, args.repeats)
    cudnn_s = time_cudnn(inputs, args.iters, args.repeats)
    bandwidth = bytes_moved(inputs) / kernel_s
    return {
        "L": length,
        "T": num_tree,
        "kernel_ms": kernel_s * 1e3,
        "xla_ms": xla_s * 1e3,
        "cudnn_ms": None if cudnn_s is None else cudnn_s * 1e3,
        "kernel_GBps": bandwidth / 1e9,
        "fraction_of_peak": None if peak is None else bandwidth / peak,
    }


def format_table(rows: list[dict]) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"{'L':>6} {'T':>4} {'kernel ms':>10} {'xla ms':>10} {'cudnn ms':>10} {'kernel GB/s':>12} {'of peak':>8}"]
    for r in rows:
        lines.append(
            f"{r['L']:>6} {r['T']:>4} {cell(r['kernel_ms'], '10.4f')} {cell(r['xla_ms'], '10.4f')} "
            f"{cell(r['cudnn_ms'], '10.4f')} {cell(r['kernel_GBps'], '12.1f')} {cell(r['fraction_of_peak'], '8.1%')}"
        )
    return "\n".join(lines)


def tree_cost_ratios(rows: list[dict]) -> dict:
    """Kernel time at the largest T over T=1, per L (the target: <= 1.3 at L=8k)."""
    ratios = {}
    for length in sorted({r["L"] for r in rows}):
        by_tree = {r["T"]: r["kernel_ms"] for r in rows if r["L"] == length}
        if 1 in by_tree and len(by_tree) > 1:
            ratios[str(length)] = by_tree[max(by_tree)] / by_tree[1]
    return ratios


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = jax.devices()[0]
    peak = peak_bandwidth(device.device_kind)
    print(f"device: {device.device_kind} ({jax.default_backend()}), peak bandwidth: "
          f"{'unknown' if peak is None else f'{peak / 1e9:.0f} GB/s'}, dtype {args.dtype}, batch {args.batch}")
    rows = [measure(args, length, t, peak) for length in args.lengths for t in args.trees]
    print(format_table(rows))
    ratios = tree_cost_ratios(rows)
    for length, ratio in ratios.items():
        print(f"L={length}: kernel T={max(args.trees)} / T=1 = {ratio:.2f}x")
    result = {
        "device": device.device_kind,
        "platform": jax.default_backend(),
        "config": {k: (str(v) if isinstance(v, pathlib.Path) else v) for k, v in vars(args).items()},
        "peak_bandwidth_Bps": peak,
        "rows": rows,
        "tree_cost_ratio": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
