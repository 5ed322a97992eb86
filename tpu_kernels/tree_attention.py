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
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


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
    b, t, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
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
