"""Tree attention speed: Pallas kernel vs the XLA reference vs jax.nn.dot_product_attention,
and what a whole verify pass costs against a decode step.

Kernel table (mode "kernel"): for each prefix length L and tree size T at
Llama-3-8B head shapes (32 query heads, 8 KV heads, head_dim 128) it times one
attention layer and reports the kernel's achieved memory bandwidth against the
device's peak.  The kernel reads the K/V prefix once, so at small T it should be
memory-bound.  Layout "single" passes one layer's cache [B, Hkv, S, D];
"stacked" passes the model's whole stacked cache [layers, B, Hkv, S, D] and a
traced layer index, as the decoder does: the two should time the same (the
kernel reads the layer in place, no copy).

The dot_product_attention column is the naive way: the tree's K/V appended to
the prefix and a dense [T, L+T] mask (prepared outside the timed loop), with
implementation="cudnn"; it is left empty where cuDNN does not run.

Verify cost (mode "verify"): one target forward of T new tokens (T=1 is a plain
decode step; T=64 a 64-node tree) against a cache holding L tokens, on a
random-weight 1B-class Llama (Llama-3.2-1B shapes: 16 layers, hidden 2048, 32
heads / 8 KV heads of 64, vocab 128256), LM head and greedy argmax included,
with the attention impl the engine would use ("auto").  The ratio T=64 / T=1
per L is the cost of speculation per pass; the target is <= 1.3 at L=8k.

Each timing runs the op `--iters` times inside one jitted fori_loop (output fed
back, so nothing is hoisted) and takes the median of `--repeats` such runs: no
Python dispatch in the numbers.

  python benchmarks/bench_tree_attention.py                # accelerator: kernel table + verify cost
  python benchmarks/bench_tree_attention.py --mode verify  # only the verify-cost table
  python benchmarks/bench_tree_attention.py --smoke        # tiny, CPU (kernels in interpret mode)
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

from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, forward, init_params
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
    p.add_argument("--layouts", nargs="+", choices=["single", "stacked"], default=["single", "stacked"],
                   help="cache passed to the kernel: one layer, or the model's stack of --num-layers")
    p.add_argument("--num-layers", type=int, default=32, help="layers in the stacked layout (Llama-3-8B: 32)")
    p.add_argument("--mode", choices=["all", "kernel", "verify"], default="all")
    p.add_argument("--verify-lengths", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--verify-trees", type=int, nargs="+", default=[1, 64], help="new tokens per verify pass")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one iteration: checks the script runs (CPU ok)")
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.model = LLAMA_1B
    if args.smoke:
        args.lengths, args.trees, args.batch, args.layouts, args.num_layers = [40], [1, 4], 2, ["stacked"], 3
        args.q_heads, args.kv_heads, args.head_dim = 4, 2, 32
        args.verify_lengths, args.verify_trees, args.model = [40], [1, 4], TINY_LLAMA
        args.iters, args.repeats = 1, 1
    return args


# Llama-3.2-1B's shapes (random weights): the 1B-class target of the verify-cost table.
LLAMA_1B = ModelConfig(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
                       num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       max_position_embeddings=131072)
TINY_LLAMA = ModelConfig(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=1024)


def chain_mask(batch: int, num_tree: int) -> jax.Array:
    """A causal chain: every tree token sees all earlier ones (the densest tree)."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((num_tree, num_tree), bool)), (batch, num_tree, num_tree))


def make_inputs(args: argparse.Namespace, length: int, num_tree: int, layers: Optional[int] = None, seed: int = 0):
    """Operands of one attention call; with `layers`, the cache is a stack of that many layers."""
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(seed), 5)
    b, hq, hkv, d = args.batch, args.q_heads, args.kv_heads, args.head_dim
    normal = lambda key, shape: jax.random.normal(key, shape, dtype)
    cache = (b, hkv, length, d) if layers is None else (layers, b, hkv, length, d)
    return (
        normal(keys[0], (b, num_tree, hq, d)),
        normal(keys[1], cache),
        normal(keys[2], cache),
        jnp.full((b,), length, jnp.int32),
        normal(keys[3], (b, num_tree, hkv, d)),
        normal(keys[4], (b, num_tree, hkv, d)),
        chain_mask(b, num_tree),
    )


def dense_inputs(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask):
    """The naive layout: tree K/V appended to the prefix, the mask widened to [T, L+T] (one layer)."""
    if k_cache.ndim == 5:
        k_cache, v_cache = k_cache[0], v_cache[0]
    b, t = q.shape[:2]
    length = k_cache.shape[2]
    keys = jnp.concatenate([k_cache.transpose(0, 2, 1, 3), tree_k], axis=1)
    values = jnp.concatenate([v_cache.transpose(0, 2, 1, 3), tree_v], axis=1)
    mask = jnp.concatenate([jnp.ones((b, t, length), bool), tree_mask], axis=2)[:, None]
    return q, keys, values, mask


def time_op(fn: Callable, args: tuple, iters: int, repeats: int, traced_kwargs: Optional[dict] = None) -> float:
    """Median seconds per call of fn(q, *rest, **traced_kwargs) -> like q, looped on device."""
    kwargs = traced_kwargs or {}
    looped = jax.jit(lambda q, rest, kw: lax.fori_loop(0, iters, lambda _, x: fn(x, *rest, **kw), q))
    run = lambda: looped(args[0], args[1:], kwargs)
    run().block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run().block_until_ready()
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
    prefix = 2 * int(np.sum(np.asarray(lengths))) * k_cache.shape[-3] * k_cache.shape[-1] * k_cache.dtype.itemsize
    return prefix + 2 * q.nbytes + tree_k.nbytes + tree_v.nbytes


def measure(args: argparse.Namespace, length: int, num_tree: int, layout: str, peak: Optional[float]) -> dict:
    stacked = layout == "stacked"
    inputs = make_inputs(args, length, num_tree, args.num_layers if stacked else None)
    # A traced layer index in the middle of the stack, as the decoder's layer scan passes it.
    layer = {"layer": jnp.int32(args.num_layers // 2)} if stacked else {}
    kernel = lambda q, *rest, **lay: tree_attention(q, *rest, impl="pallas", backend=args.backend, **lay)
    xla = lambda q, *rest, **lay: tree_attention(q, *rest, impl="xla", **lay)
    kernel_s = time_op(kernel, inputs, args.iters, args.repeats, layer)
    xla_s = time_op(xla, inputs, args.iters, args.repeats, layer)
    cudnn_s = time_cudnn(inputs, args.iters, args.repeats)
    bandwidth = bytes_moved(inputs) / kernel_s
    return {
        "layout": layout,
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

    lines = [f"{'layout':>8} {'L':>6} {'T':>4} {'kernel ms':>10} {'xla ms':>10} {'cudnn ms':>10} "
             f"{'kernel GB/s':>12} {'of peak':>8}"]
    for r in rows:
        lines.append(
            f"{r['layout']:>8} {r['L']:>6} {r['T']:>4} {cell(r['kernel_ms'], '10.4f')} {cell(r['xla_ms'], '10.4f')} "
            f"{cell(r['cudnn_ms'], '10.4f')} {cell(r['kernel_GBps'], '12.1f')} {cell(r['fraction_of_peak'], '8.1%')}"
        )
    return "\n".join(lines)


def tree_cost_ratios(rows: list[dict], key: str) -> dict:
    """Time at the largest T over T=1, per L (and layout where rows have one)."""
    ratios = {}
    for group in sorted({(r.get("layout", ""), r["L"]) for r in rows}):
        by_tree = {r["T"]: r[key] for r in rows if (r.get("layout", ""), r["L"]) == group}
        if 1 in by_tree and len(by_tree) > 1:
            ratios[":".join(str(g) for g in group if g != "")] = by_tree[max(by_tree)] / by_tree[1]
    return ratios


def verify_step(cfg: ModelConfig, attention: str, iters: int):
    """`iters` verify passes in one jitted loop: forward of T tokens, LM head, greedy argmax.

    The cache is carried through the loop (written in place at the same T slots
    each pass, so L stays fixed); the argmax sum keeps the LM head live.
    """
    def one(params, tokens, positions, cache, lengths, mask):
        out = forward(params, cfg, tokens, positions, cache, lengths, mask, attention=attention)
        return out.cache, jnp.argmax(out.logits, axis=-1).sum()

    def loop(params, tokens, positions, cache, lengths, mask):
        def body(_, carry):
            cache, total = carry
            cache, picked = one(params, tokens, positions, cache, lengths, mask)
            return cache, total + picked
        return lax.fori_loop(0, iters, body, (cache, jnp.int32(0)))

    return jax.jit(loop, donate_argnums=(3,))


def measure_verify(args: argparse.Namespace, params, length: int, num_tree: int) -> dict:
    cfg, b = args.model, args.batch
    dtype = jnp.dtype(args.dtype)
    cache = KVCache.zeros(cfg, b, length + num_tree, dtype)
    lengths = jnp.full((b,), length, jnp.int32)
    tokens = jax.random.randint(jax.random.key(1), (b, num_tree), 0, cfg.vocab_size, jnp.int32)
    positions = lengths[:, None] + jnp.arange(num_tree, dtype=jnp.int32)[None]
    mask = chain_mask(b, num_tree)
    run = verify_step(cfg, "auto", args.iters)
    cache, _ = run(params, tokens, positions, cache, lengths, mask)
    jax.block_until_ready(cache)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        cache, total = run(params, tokens, positions, cache, lengths, mask)
        jax.block_until_ready(total)
        times.append((time.perf_counter() - start) / args.iters)
    return {"L": length, "T": num_tree, "step_ms": statistics.median(times) * 1e3}


def verify_cost(args: argparse.Namespace) -> tuple[list[dict], dict]:
    params = init_params(args.model, jax.random.key(0), jnp.dtype(args.dtype))
    rows = [measure_verify(args, params, length, t) for length in args.verify_lengths for t in args.verify_trees]
    print(f"\nverify cost: {args.model.num_layers}-layer Llama, hidden {args.model.hidden_size}, "
          f"{args.model.num_heads}/{args.model.num_kv_heads} heads, vocab {args.model.vocab_size}, batch {args.batch}")
    print(f"{'L':>6} {'T':>4} {'step ms':>10}")
    for r in rows:
        print(f"{r['L']:>6} {r['T']:>4} {r['step_ms']:>10.3f}")
    ratios = tree_cost_ratios(rows, "step_ms")
    for length, ratio in ratios.items():
        print(f"L={length}: verify T={max(args.verify_trees)} / T=1 = {ratio:.2f}x")
    return rows, ratios


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    device = jax.devices()[0]
    peak = peak_bandwidth(device.device_kind)
    print(f"device: {device.device_kind} ({jax.default_backend()}), peak bandwidth: "
          f"{'unknown' if peak is None else f'{peak / 1e9:.0f} GB/s'}, dtype {args.dtype}, batch {args.batch}")
    result = {
        "device": device.device_kind,
        "platform": jax.default_backend(),
        "config": {k: (str(v) if isinstance(v, (pathlib.Path, ModelConfig)) else v) for k, v in vars(args).items()},
        "peak_bandwidth_Bps": peak,
    }
    if args.mode in ("all", "kernel"):
        rows = [measure(args, length, t, layout, peak)
                for layout in args.layouts for length in args.lengths for t in args.trees]
        print(format_table(rows))
        ratios = tree_cost_ratios(rows, "kernel_ms")
        for group, ratio in ratios.items():
            print(f"{group}: kernel T={max(args.trees)} / T=1 = {ratio:.2f}x")
        result.update(rows=rows, tree_cost_ratio=ratios)
    if args.mode in ("all", "verify"):
        rows, ratios = verify_cost(args)
        result.update(verify_rows=rows, verify_cost_ratio=ratios)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
