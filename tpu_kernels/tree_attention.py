"""Tree attention: T draft-tree queries attend to a cached prefix plus their ancestors.

Layout (shared by the reference and every kernel):
  q:        [B, T, Hq, D]   queries of the T tree tokens (Hq a multiple of Hkv)
  k_cache:  [B, Hkv, S, D]  cached keys; only slots [0, lengths[b]) are read
  v_cache:  [B, Hkv, S, D]
  lengths:  int32[B]        valid prefix length per sequence
  tree_k:   [B, T, Hkv, D]  keys of the tree tokens themselves
  tree_v:   [B, T, Hkv, D]
  tree_mask: bool[B, T, T]  tree_mask[b, i, j]: query i may attend to tree key j
returns     [B, T, Hq, D]

The prefix and the tree are separate inputs on purpose: a kernel streams the
prefix flash-decoding style and applies the compact T x T mask only to the tree
part, never widening it over the cache length.

`tree_attention` is the one entry point: impl="xla" runs the jnp reference,
impl="pallas" the Pallas kernel of a backend (tree_attention_tpu: Mosaic,
tree_attention_gpu: Triton), impl="auto" picks by platform.  The cache is
contiguous per sequence for now; each kernel module notes where a page table
would go for a paged layout.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from .tree_attention_gpu import tree_attention_gpu
from .tree_attention_tpu import tree_attention_tpu

IMPLS = ("auto", "xla", "pallas")
KERNELS = {"tpu": tree_attention_tpu, "gpu": tree_attention_gpu}
KERNEL_OPTIONS = {
    "tpu": frozenset({"block_k"}),
    "gpu": frozenset({"block_k", "block_r", "num_splits", "num_warps", "num_stages"}),
}
# The kernels hold a whole tree in one block: built for draft trees, not for
# prefill-sized T (compute-bound and quadratic in T), which goes to XLA.
MAX_KERNEL_TREE = 128


def check_shapes(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask) -> None:
    """Raise ValueError naming the first operand whose shape or dtype breaks the layout."""
    if q.ndim != 4:
        raise ValueError(f"q must be [B, T, Hq, D], got shape {q.shape}")
    b, t, hq, d = q.shape
    if k_cache.ndim != 4 or k_cache.shape[0] != b or k_cache.shape[3] != d:
        raise ValueError(f"k_cache must be [B={b}, Hkv, S, D={d}], got shape {k_cache.shape}")
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {v_cache.shape} differs from k_cache shape {k_cache.shape}")
    if s < 1:
        raise ValueError("the cache has no slots (S == 0)")
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(f"lengths must be int[B={b}], got {lengths.dtype}{list(lengths.shape)}")
    for name, x in (("tree_k", tree_k), ("tree_v", tree_v)):
        if x.shape != (b, t, hkv, d):
            raise ValueError(f"{name} must be [B, T, Hkv, D] = {(b, t, hkv, d)}, got shape {x.shape}")
    if tree_mask.shape != (b, t, t) or tree_mask.dtype != jnp.bool_:
        raise ValueError(f"tree_mask must be bool[B, T, T] = bool{[b, t, t]}, got {tree_mask.dtype}{list(tree_mask.shape)}")


def tree_attention_ref(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    tree_k: jax.Array,
    tree_v: jax.Array,
    tree_mask: jax.Array,
    *,
    sm_scale: Optional[float] = None,
) -> jax.Array:
    """Plain-jnp reference: one softmax over [prefix ++ tree] keys, in fp32."""
    check_shapes(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask)
    b, t, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, hkv, group, d).astype(jnp.float32) * scale
    s_prefix = jnp.einsum("btkgd,bksd->bkgts", qg, k_cache.astype(jnp.float32))
    prefix_ok = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    s_prefix = jnp.where(prefix_ok[:, None, None, None, :], s_prefix, -jnp.inf)
    s_tree = jnp.einsum("btkgd,bukd->bkgtu", qg, tree_k.astype(jnp.float32))
    s_tree = jnp.where(tree_mask[:, None, None, :, :], s_tree, -jnp.inf)
    scores = jnp.concatenate([s_prefix, s_tree], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    # A query with nothing to attend to (fully masked padding) yields zeros, not NaN.
    probs = jnp.where(jnp.isnan(probs), 0.0, probs)
    p_prefix, p_tree = probs[..., :s], probs[..., s:]
    out = jnp.einsum("bkgts,bksd->btkgd", p_prefix, v_cache.astype(jnp.float32))
    out = out + jnp.einsum("bkgtu,bukd->btkgd", p_tree, tree_v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)


def _kernel_backend(impl: str, backend: Optional[str], platform: str, num_tree: int) -> Optional[str]:
    """Which kernel runs ("tpu" / "gpu"), or None for the jnp reference."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    if backend is not None and backend not in KERNELS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {tuple(KERNELS)}")
    if impl == "xla" or num_tree > MAX_KERNEL_TREE:
        return None
    if impl == "auto":
        return platform if platform in KERNELS else None
    return backend or (platform if platform in KERNELS else "tpu")


def tree_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    tree_k: jax.Array,
    tree_v: jax.Array,
    tree_mask: jax.Array,
    *,
    impl: str = "auto",
    backend: Optional[str] = None,
    sm_scale: Optional[float] = None,
    interpret: bool = False,
    **block_sizes: int,
) -> jax.Array:
    """Tree attention behind one switch; jittable with `impl` (and the rest) static.

    impl:
      "xla":    the jnp reference (tree_attention_ref), on any platform.
      "pallas": the Pallas kernel of `backend` ("tpu": Mosaic, "gpu": Triton);
                by default the current platform's, and on CPU the Mosaic kernel
                (specjax is TPU-first).  A kernel off its own platform runs in
                interpret mode.
      "auto":   TPU -> Mosaic kernel, GPU -> Triton kernel, anything else -> reference.
    Trees larger than MAX_KERNEL_TREE tokens (prefill) always take the reference.
    interpret: run the kernel in Pallas interpret mode even on its own platform.
    block_sizes: static kernel tuning, by backend: tpu {block_k}; gpu {block_k,
      block_r, num_splits, num_warps, num_stages}.  Ignored when the reference runs.
    """
    check_shapes(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    platform = jax.default_backend()
    kernel_backend = _kernel_backend(impl, backend, platform, q.shape[1])
    if kernel_backend is None:
        return tree_attention_ref(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, sm_scale=scale)
    unknown = set(block_sizes) - KERNEL_OPTIONS[kernel_backend]
    if unknown:
        raise ValueError(
            f"unknown block-size options {sorted(unknown)} for the {kernel_backend} kernel; "
            f"expected some of {sorted(KERNEL_OPTIONS[kernel_backend])}"
        )
    if interpret or kernel_backend != platform:
        block_sizes["interpret"] = pltpu.InterpretParams() if kernel_backend == "tpu" else True
    kernel = KERNELS[kernel_backend]
    return kernel(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, sm_scale=scale, **block_sizes)
