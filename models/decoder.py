"""The decoder forward pass as pure functions over a parameter pytree.

Parameters keep Hugging Face's [out, in] weight layout, stacked over layers so
the forward is one ``lax.scan`` (compile time independent of depth) and loading
is a plain copy. One forward serves prefill, one-token decode and a draft tree:
the caller passes explicit positions and a T x T mask saying which of the new
tokens each new token sees; every new token also sees the cached prefix
``[0, cache_lengths[b])``. The new tokens' K/V are written at
``[cache_lengths[b], cache_lengths[b] + T)``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from specjax.models.config import ModelConfig
from specjax.models.rope import apply_rope, inverse_frequencies
from specjax.tpu_kernels.tree_attention import tree_attention

Params = dict


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Static-shape KV cache: k, v of shape [layers, B, kv_heads, max_len, head_dim]."""

    k: jax.Array
    v: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch_size: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    logits: jax.Array  # float32[B, T, V]
    cache: KVCache
    hidden: Optional[jax.Array]  # [len(hidden_layers), B, T, H] or None


def param_shapes(cfg: ModelConfig) -> dict:
    """Shapes of every parameter, keyed like the param pytree (HF [out, in] layout)."""
    L, H, D = cfg.num_layers, cfg.hidden_size, cfg.head_dim
    q_out, kv_out, inter = cfg.num_heads * D, cfg.num_kv_heads * D, cfg.intermediate_size
    layers = {
        "attn_norm": (L, H), "wq": (L, q_out, H), "wk": (L, kv_out, H), "wv": (L, kv_out, H),
        "wo": (L, H, q_out), "mlp_norm": (L, H),
        "w_gate": (L, inter, H), "w_up": (L, inter, H), "w_down": (L, H, inter),
    }
    if cfg.qkv_bias:
        layers.update(bq=(L, q_out), bk=(L, kv_out), bv=(L, kv_out))
    if cfg.o_bias:
        layers["bo"] = (L, H)
    if cfg.mlp_bias:
        layers.update(b_gate=(L, inter), b_up=(L, inter), b_down=(L, H))
    if cfg.qk_norm:
        layers.update(q_norm=(L, D), k_norm=(L, D))
    shapes = {"embed": (cfg.vocab_size, H), "layers": layers, "final_norm": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, H)
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.02) -> Params:
    """Random parameters (normal * scale; norms at 1) for tests and toy models."""
    shapes = param_shapes(cfg)
    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
    keys = jax.random.split(key, len(flat))
    leaves = []
    for (path, shape), k in zip(flat, keys):
        name = path[-1].key
        if name.endswith("norm"):
            leaves.append(jnp.ones(shape, dtype))
        else:
            leaves.append((scale * jax.random.normal(k, shape)).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """HF RMSNorm: normalize in fp32, cast back, then scale."""
    xf = x.astype(jnp.float32)
    xf = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


def _linear(x: jax.Array, w: jax.Array, b: Optional[jax.Array] = None) -> jax.Array:
    y = jnp.einsum("...i,oi->...o", x, w)
    return y if b is None else y + b


def _write_kv(cache_layer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new [B, T, Hkv, D] into cache_layer [B, Hkv, S, D] at per-sequence offsets."""
    new = new.transpose(0, 2, 1, 3).astype(cache_layer.dtype)
    return jax.vmap(lambda c, n, s: lax.dynamic_update_slice(c, n, (0, s, 0)))(cache_layer, new, starts)


def _attention_block(cfg, lp, x, positions, inv_freq, k_cache, v_cache, lengths, tree_mask, attention):
    b, t, _ = x.shape
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = _linear(h, lp["wq"], lp.get("bq")).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = _linear(h, lp["wk"], lp.get("bk")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = _linear(h, lp["wv"], lp.get("bv")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    out = tree_attention(q, k_cache, v_cache, lengths, k.astype(k_cache.dtype), v.astype(v_cache.dtype),
                         tree_mask, impl=attention)
    out = _linear(out.reshape(b, t, -1).astype(x.dtype), lp["wo"], lp.get("bo"))
    return x + out, k, v


def _mlp_block(cfg, lp, x):
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    gate = _linear(h, lp["w_gate"], lp.get("b_gate"))
    up = _linear(h, lp["w_up"], lp.get("b_up"))
    return x + _linear(jax.nn.silu(gate) * up, lp["w_down"], lp.get("b_down"))


def forward(
    params: Params,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    cache_lengths: jax.Array,
    tree_mask: jax.Array,
    *,
    attention: str = "xla",
    hidden_layers: Sequence[int] = (),
) -> ForwardOutput:
    """Run T new tokens per sequence against the cache.

    Args:
      tokens: int32[B, T]; positions: int32[B, T] (RoPE positions).
      cache: the KV cache; slots ``[0, cache_lengths[b])`` are the prefix.
      tree_mask: bool[B, T, T]; ``tree_mask[b, i, j]`` lets new token i see new token j
        (causal for prefill, ancestor-or-self for a draft tree).
      attention: "xla" (jnp reference), "pallas" or "auto" (see specjax.tpu_kernels).
      hidden_layers: indices of layers whose *output* hidden states to return
        (0 = embeddings, i = after layer i), for model drafters.
    Returns logits (fp32) for every new token, the cache with their K/V written,
    and the requested hidden states.
    """
    inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)
    x = params["embed"][tokens]
    lengths = cache_lengths.astype(jnp.int32)

    def layer(carry, lp):
        x, k_all, v_all, i = carry
        k_layer = lax.dynamic_index_in_dim(k_all, i, keepdims=False)
        v_layer = lax.dynamic_index_in_dim(v_all, i, keepdims=False)
        x, k, v = _attention_block(cfg, lp, x, positions, inv_freq, k_layer, v_layer, lengths,
                                   tree_mask, attention)
        x = _mlp_block(cfg, lp, x)
        k_all = lax.dynamic_update_index_in_dim(k_all, _write_kv(k_layer, k, lengths), i, 0)
        v_all = lax.dynamic_update_index_in_dim(v_all, _write_kv(v_layer, v, lengths), i, 0)
        return (x, k_all, v_all, i + 1), (x if hidden_layers else None)

    embeddings = x
    (x, k_all, v_all, _), per_layer = lax.scan(layer, (x, cache.k, cache.v, 0), params["layers"])
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    logits = jnp.einsum("bth,vh->btv", x, head, preferred_element_type=jnp.float32)
    hidden = None
    if hidden_layers:
        stacked = jnp.concatenate([embeddings[None], per_layer], axis=0)
        hidden = stacked[np.asarray(hidden_layers)]
    return ForwardOutput(logits=logits, cache=KVCache(k_all, v_all), hidden=hidden)


def causal_mask(batch_size: int, length: int, valid_lengths: Optional[jax.Array] = None) -> jax.Array:
    """bool[B, T, T] lower-triangular mask; padding rows/cols beyond valid_lengths masked."""
    tri = jnp.tril(jnp.ones((length, length), bool))
    mask = jnp.broadcast_to(tri, (batch_size, length, length))
    if valid_lengths is not None:
        ok = jnp.arange(length)[None, :] < valid_lengths[:, None]
        mask = mask & ok[:, None, :] & ok[:, :, None]
    return mask
