"""Pieces shared by the tree-attention kernels: operand layout and the softmax step.

Both kernels see one KV head per program and all query heads of its group as
rows of a single [R, D] matrix, R = T * G with rows ordered (tree token, group
head).  The wrapper code here builds that layout from the public one (a few
small transposes of q and the tree K/V; the cache is never copied) and packs the
T x T tree mask into int32 bit words, one row per query row.  Both kernels take
the cache stacked over layers, [L, B, Hkv, S, D], and read one layer in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Finite "minus infinity": keeps the online-softmax arithmetic free of inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
BITS_PER_WORD = 32


def stacked_cache(k_cache: jax.Array, v_cache: jax.Array, layer) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(k, v, layer) in the kernels' stacked form: [L, B, Hkv, S, D] and int32[1].

    A single-layer [B, Hkv, S, D] cache becomes a stack of one (a free reshape)
    read at layer 0.  The layer is clamped into [0, L) like lax.dynamic_slice
    (the reference) does, so no index map can address memory outside the stack.
    """
    if layer is None:
        return k_cache[None], v_cache[None], jnp.zeros((1,), jnp.int32)
    layer = jnp.clip(jnp.asarray(layer, jnp.int32), 0, k_cache.shape[0] - 1)
    return k_cache, v_cache, layer.reshape(1)


def group_queries(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """[B, T, Hq, D] -> [B, Hkv, T*G, D], rows ordered (t, g)."""
    b, t, hq, d = q.shape
    g = hq // num_kv_heads
    return q.reshape(b, t, num_kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, num_kv_heads, t * g, d)


def ungroup_output(out: jax.Array, num_tree: int) -> jax.Array:
    """Inverse of group_queries: [B, Hkv, T*G, D] -> [B, T, Hq, D]."""
    b, hkv, rows, d = out.shape
    g = rows // num_tree
    return out.reshape(b, hkv, num_tree, g, d).transpose(0, 2, 1, 3, 4).reshape(b, num_tree, hkv * g, d)


def heads_major(x: jax.Array) -> jax.Array:
    """Tree K/V [B, T, Hkv, D] -> [B, Hkv, T, D], the cache's head-major layout."""
    return x.transpose(0, 2, 1, 3)


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Zero-pad one axis up to `size` (tile constraints; padded keys are masked)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def num_mask_words(num_tree: int) -> int:
    """Int32 words per packed mask row, a power of two (Triton loads need one)."""
    return pl.next_power_of_2(pl.cdiv(num_tree, BITS_PER_WORD))


def pack_tree_mask(tree_mask: jax.Array, group: int) -> jax.Array:
    """bool [B, T, T] -> int32 [B, T*G, W]: bit j of row t*G+g is tree_mask[t, j].

    The mask stays T x T bits per query row; it is never widened over the cache.
    """
    b, t, _ = tree_mask.shape
    words = num_mask_words(t)
    bits = jnp.pad(tree_mask.astype(jnp.uint32), ((0, 0), (0, 0), (0, words * BITS_PER_WORD - t)))
    bits = bits.reshape(b, t, words, BITS_PER_WORD) << jnp.arange(BITS_PER_WORD, dtype=jnp.uint32)
    packed = lax.bitcast_convert_type(bits.sum(axis=-1, dtype=jnp.uint32), jnp.int32)
    return jnp.repeat(packed, group, axis=1)


def unpack_mask_words(words_ref, num_cols: int) -> jax.Array:
    """Kernel side of pack_tree_mask: a [R, W] int32 ref -> bool [R, num_cols]."""
    rows, num_words = words_ref.shape
    cols = lax.broadcasted_iota(jnp.int32, (rows, num_cols), 1)
    word_of_col = cols // BITS_PER_WORD
    word = jnp.zeros((rows, num_cols), jnp.int32)
    for w in range(num_words):
        word = jnp.where(word_of_col == w, words_ref[:, pl.ds(w, 1)], word)
    return (lax.shift_right_logical(word, cols % BITS_PER_WORD) & 1) == 1


def dot_precision(dtype) -> lax.Precision | None:
    """fp32 operands get true fp32 matmuls (the 1e-5 contract); bf16 the native one."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def scores_of(q: jax.Array, k: jax.Array, sm_scale: float) -> jax.Array:
    """q [R, D] . k[N, D]^T in fp32, scaled."""
    nt = (((1,), (1,)), ((), ()))
    s = lax.dot_general(q, k, nt, precision=dot_precision(q.dtype), preferred_element_type=jnp.float32)
    return s * sm_scale


def online_softmax_update(m_prev, l_prev, acc_prev, scores, valid, v):
    """Fold one block of keys into the running (max, denominator, numerator).

    m/l are [R, 1], acc [R, D], scores/valid [R, N], v [N, D].  Masked keys get
    probability exactly 0, so a row that sees no key keeps l == 0.
    """
    scores = jnp.where(valid, scores, MASK_VALUE)
    m_next = jnp.maximum(m_prev, scores.max(axis=-1, keepdims=True))
    alpha = jnp.exp(m_prev - m_next)
    p = jnp.where(valid, jnp.exp(scores - m_next), 0.0)
    l_next = alpha * l_prev + p.sum(axis=-1, keepdims=True)
    pv = jnp.dot(p.astype(v.dtype), v, precision=dot_precision(v.dtype), preferred_element_type=jnp.float32)
    return m_next, l_next, alpha * acc_prev + pv


def normalize(acc: jax.Array, l: jax.Array) -> jax.Array:
    """acc / l, with zeros for rows that attended to nothing."""
    return jnp.where(l > 0.0, acc / jnp.where(l > 0.0, l, 1.0), 0.0)
