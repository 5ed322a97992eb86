"""Tree attention: T draft-tree queries attend to a cached prefix plus their ancestors.

Layout (shared by the reference and every kernel):
  q:        [B, T, Hq, D]   queries of the T tree tokens (Hq a multiple of Hkv)
  k_cache:  [B, Hkv, S, D]  cached keys; only slots [0, lengths[b]) are read;
            or the whole stacked cache [L, B, Hkv, S, D] with `layer` (a traced
            int32 scalar) naming the layer to read: the model's layer scan passes
            the stack so that no layer is ever sliced out (copied) per step
  v_cache:  like k_cache
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

from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
from jax import lax
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
# The reference reads the prefix in blocks of this many keys (online softmax):
# memory O(T x block) instead of O(T x S), and blocks past the longest sequence
# are never read.
REF_BLOCK_K = 512


def check_shapes(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, layer=None) -> None:
    """Raise ValueError naming the first operand whose shape or dtype breaks the layout."""
    if layer is not None:
        if k_cache.ndim != 5:
            raise ValueError(f"with `layer`, k_cache must be the stacked [L, B, Hkv, S, D], got shape {k_cache.shape}")
        if jnp.shape(layer) != () or not jnp.issubdtype(jnp.asarray(layer).dtype, jnp.integer):
            raise ValueError(f"layer must be an integer scalar, got {layer!r}")
        if v_cache.shape != k_cache.shape:
            raise ValueError(f"v_cache shape {v_cache.shape} differs from k_cache shape {k_cache.shape}")
        k_cache = v_cache = jax.ShapeDtypeStruct(k_cache.shape[1:], k_cache.dtype)
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
    layer: Optional[jax.Array] = None,
    sm_scale: Optional[float] = None,
    block_k: int = REF_BLOCK_K,
) -> jax.Array:
    """Plain-jnp reference in fp32: the prefix streamed in blocks, then the tree keys.

    One online softmax over [prefix ++ tree] keys (flash-attention style), so
    prefill chunks and long caches need memory O(T x block_k), and only the
    blocks below the longest sequence are read (with `layer`, straight out of
    the stacked cache).
    """
    check_shapes(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, layer)
    return blockwise_attention(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, layer=layer,
                               sm_scale=sm_scale, block_k=block_k)


def blockwise_attention(q, k_cache, v_cache, lengths, new_k, new_v, new_mask, *, layer=None, sm_scale=None,
                        block_k: int = REF_BLOCK_K) -> jax.Array:
    """The reference's math for T queries and U new keys (new_k, new_v [B, U, Hkv, D], new_mask
    bool[B, T, U]): device drafters expanding a tree, whose frontier queries see the prefix, their
    ancestors among scratch rows and themselves, read no cache slot past the longest prefix."""
    if layer is None:
        k_cache, v_cache, layer = k_cache[None], v_cache[None], 0
    b, t, hq, d = q.shape
    hkv, s = k_cache.shape[2], k_cache.shape[3]
    group = hq // hkv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, hkv, group, d).astype(jnp.float32) * scale
    block = min(block_k, s)
    carry = (jnp.full((b, hkv, group, t), _MASK_VALUE, jnp.float32), jnp.zeros((b, hkv, group, t), jnp.float32),
             jnp.zeros((b, hkv, group, t, d), jnp.float32))

    def prefix_block(j, carry):
        # The last block is shifted back to fit in S; keys it shares with the
        # previous block are masked so each key is counted once.
        start = jnp.minimum(j * block, s - block)
        k_blk = lax.dynamic_slice(k_cache, (layer, 0, 0, start, 0), (1, b, hkv, block, d))[0]
        v_blk = lax.dynamic_slice(v_cache, (layer, 0, 0, start, 0), (1, b, hkv, block, d))[0]
        pos = start + jnp.arange(block)
        ok = (pos[None, :] < lengths[:, None]) & (pos[None, :] >= j * block)  # [B, block]
        scores = jnp.einsum("btkgd,bksd->bkgts", qg, k_blk.astype(jnp.float32))
        return _online_softmax(carry, scores, ok[:, None, None, None, :], v_blk, "bkgts,bksd->bkgtd")

    num_blocks = (jnp.max(lengths) + block - 1) // block
    carry = lax.fori_loop(0, num_blocks, prefix_block, carry)
    s_tree = jnp.einsum("btkgd,bukd->bkgtu", qg, new_k.astype(jnp.float32))
    m, l, acc = _online_softmax(carry, s_tree, new_mask[:, None, None, :, :], new_v.transpose(0, 2, 1, 3),
                                "bkgtu,bkud->bkgtd")
    # A query with nothing to attend to (fully masked padding) yields zeros, not NaN.
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)


_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _online_softmax(carry, scores, valid, values, pv_subscripts: str):
    """Fold one block of keys into the running (max, denominator, numerator) per query."""
    m_prev, l_prev, acc_prev = carry
    scores = jnp.where(valid, scores, _MASK_VALUE)
    m_next = jnp.maximum(m_prev, scores.max(axis=-1))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.where(valid, jnp.exp(scores - m_next[..., None]), 0.0)
    pv = jnp.einsum(pv_subscripts, p, values.astype(jnp.float32))
    return m_next, alpha * l_prev + p.sum(axis=-1), alpha[..., None] * acc_prev + pv


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


def new_tokens_attention(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, *, layer=None, sm_scale=None):
    """Attention over the new tokens only (the cache is ignored): for training windows from an empty cache.

    The same math as ``tree_attention_ref`` with ``lengths == 0`` (fp32 softmax over the
    masked new keys), but differentiable: the reference streams the cached prefix in a
    ``fori_loop`` with a data-dependent trip count, which reverse mode cannot handle.
    """
    b, t, hq, d = q.shape
    hkv = tree_k.shape[2]
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, hkv, hq // hkv, d).astype(jnp.float32) * scale
    scores = jnp.einsum("btkgd,bukd->bkgtu", qg, tree_k.astype(jnp.float32))
    valid = tree_mask[:, None, None]
    # A finite mask value, and zeros for a query with nothing to attend to (padding), as the
    # reference gives: -inf would make padded rows NaN, and NaN values poison every row.
    probs = jnp.where(valid, jax.nn.softmax(jnp.where(valid, scores, _MASK_VALUE), axis=-1), 0.0)
    out = jnp.einsum("bkgtu,bukd->btkgd", probs, tree_v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)


def tree_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    tree_k: jax.Array,
    tree_v: jax.Array,
    tree_mask: jax.Array,
    *,
    impl: Union[str, Callable[..., jax.Array]] = "auto",
    backend: Optional[str] = None,
    layer: Optional[jax.Array] = None,
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
      a callable with this function's signature, such as the mesh-aware
                `sharded_attention.sharded_tree_attention(mesh, impl)`: called
                with the operands, `layer` and `sm_scale` (it holds its own
                impl and kernel options), so a model runs on a mesh unchanged.
    Trees larger than MAX_KERNEL_TREE tokens (prefill) always take the reference.
    layer: with a stacked cache [L, B, Hkv, S, D], the layer to read (traced int32).
    interpret: run the kernel in Pallas interpret mode even on its own platform.
    block_sizes: static kernel tuning, by backend: tpu {block_k}; gpu {block_k,
      block_r, num_splits, num_warps, num_stages}.  Ignored when the reference runs.
    """
    if callable(impl):
        if backend is not None or interpret or block_sizes:
            raise ValueError("a callable impl holds its own backend and kernel options; pass them when building it")
        return impl(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, layer=layer, sm_scale=sm_scale)
    check_shapes(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, layer)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    platform = jax.default_backend()
    kernel_backend = _kernel_backend(impl, backend, platform, q.shape[1])
    if kernel_backend is None:
        return tree_attention_ref(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, layer=layer,
                                  sm_scale=scale)
    unknown = set(block_sizes) - KERNEL_OPTIONS[kernel_backend]
    if unknown:
        raise ValueError(
            f"unknown block-size options {sorted(unknown)} for the {kernel_backend} kernel; "
            f"expected some of {sorted(KERNEL_OPTIONS[kernel_backend])}"
        )
    if interpret or kernel_backend != platform:
        block_sizes["interpret"] = pltpu.InterpretParams() if kernel_backend == "tpu" else True
    kernel = KERNELS[kernel_backend]
    return kernel(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, layer, sm_scale=scale, **block_sizes)
