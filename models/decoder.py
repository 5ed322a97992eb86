"""The decoder forward pass as pure functions over a parameter pytree.

Parameters keep Hugging Face's [out, in] weight layout, stacked over layers so
the forward is one ``lax.scan`` (compile time independent of depth) and loading
is a plain copy. One forward serves prefill, one-token decode and a draft tree:
the caller passes explicit positions and a T x T mask saying which of the new
tokens each new token sees; every new token also sees the cached prefix
``[0, cache_lengths[b])``. The new tokens' K/V are written at
``[cache_lengths[b], cache_lengths[b] + T)``.

The KV cache is written in place: attention reads each layer straight out of
the stacked cache (``tree_attention(..., layer=i)``), the layer scan only
collects the T new K/V rows per layer, and one scatter writes those rows into
the (donated) cache after the scan. No step copies or rewrites a whole layer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from specjax.models.config import ModelConfig
from specjax.models.quant import dequantize
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

    def take_rows(self, index: jax.Array) -> "KVCache":
        """The cache of batch rows ``index`` (a batch shrunk to the rows still decoding)."""
        return KVCache(self.k[:, index], self.v[:, index])


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


def linear(x: jax.Array, w, b: Optional[jax.Array] = None) -> jax.Array:
    """x @ w.T (+ b) for HF's [out, in] weight layout; a ``QuantizedWeight`` is dequantized right
    before the dot (inside the layer scan, so only one layer's weights are ever float)."""
    y = jnp.einsum("...i,oi->...o", x, dequantize(w))
    return y if b is None else y + b


def write_rows(cache: jax.Array, rows: jax.Array, slots: jax.Array) -> jax.Array:
    """Scatter rows [L, B, Hkv, N, D] into cache [L, B, Hkv, S, D] at slots int32[B, N].

    Only those L*B*Hkv*N rows are touched; with the cache donated XLA updates it
    in place. Slots past the cache's end are dropped.
    """
    n_layers, b, hkv, n, _ = rows.shape
    layer = jnp.arange(n_layers)[:, None, None, None]
    batch = jnp.arange(b)[None, :, None, None]
    head = jnp.arange(hkv)[None, None, :, None]
    return cache.at[layer, batch, head, slots[None, :, None, :]].set(rows.astype(cache.dtype), mode="drop")


def read_rows(cache: jax.Array, slots: jax.Array) -> jax.Array:
    """Gather rows at slots int32[B, N] from cache [L, B, Hkv, S, D] -> [L, B, Hkv, N, D]."""
    n_layers, b, hkv = cache.shape[:3]
    layer = jnp.arange(n_layers)[:, None, None, None]
    batch = jnp.arange(b)[None, :, None, None]
    head = jnp.arange(hkv)[None, None, :, None]
    return cache.at[layer, batch, head, slots[None, :, None, :]].get(mode="clip")


def qkv_projection(cfg: ModelConfig, lp: Params, x: jax.Array, positions: jax.Array, inv_freq: jax.Array):
    """One layer's attention inputs: (q [B, T, Hq, D], k, v [B, T, Hkv, D]), normed and rotated."""
    b, t, _ = x.shape
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    q = linear(h, lp["wq"], lp.get("bq")).reshape(b, t, cfg.num_heads, cfg.head_dim)
    k = linear(h, lp["wk"], lp.get("bk")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    v = linear(h, lp["wv"], lp.get("bv")).reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def _attention_block(cfg, lp, x, positions, inv_freq, cache, layer, lengths, tree_mask, attention):
    b, t, _ = x.shape
    q, k, v = qkv_projection(cfg, lp, x, positions, inv_freq)
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    out = tree_attention(q, cache.k, cache.v, lengths, k, v, tree_mask, impl=attention, layer=layer)
    out = linear(out.reshape(b, t, -1).astype(x.dtype), lp["wo"], lp.get("bo"))
    return x + out, k, v


def mlp_block(cfg: ModelConfig, lp: Params, x: jax.Array) -> jax.Array:
    """The gated MLP with its pre-norm and residual."""
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    gate = linear(h, lp["w_gate"], lp.get("b_gate"))
    up = linear(h, lp["w_up"], lp.get("b_up"))
    return x + linear(jax.nn.silu(gate) * up, lp["w_down"], lp.get("b_down"))


def forward_hidden(
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
    input_embeds: Optional[jax.Array] = None,
) -> tuple[jax.Array, KVCache, Optional[jax.Array]]:
    """The decoder up to the final norm: (normed hidden [B, T, H], cache, hidden states).

    Callers that need logits for a few positions only (prefill) apply ``lm_head``
    to those, instead of materializing [B, T, V]. ``input_embeds`` [B, T, H], when
    given, replaces the token embeddings (a vision-language prefill puts image
    features at its image tokens, ``specjax.models.multimodal``); ``tokens`` still set T.
    """
    inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)
    x = params["embed"][tokens] if input_embeds is None else input_embeds
    lengths = cache_lengths.astype(jnp.int32)
    wanted = np.asarray(hidden_layers, np.int32)
    # Only the requested layers are kept (a running [n, B, T, H] buffer), never all L of them.
    collect = lambda buf, x, i: jnp.where((wanted == i)[:, None, None, None], x[None].astype(buf.dtype), buf)
    kept = collect(jnp.zeros((len(wanted),) + x.shape, x.dtype), x, 0)

    def layer(carry, lp):
        x, i, kept = carry
        x, k, v = _attention_block(cfg, lp, x, positions, inv_freq, cache, i, lengths, tree_mask, attention)
        x = mlp_block(cfg, lp, x)
        return (x, i + 1, collect(kept, x, i + 1)), (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3))

    (x, _, kept), (k_new, v_new) = lax.scan(layer, (x, jnp.int32(0), kept), params["layers"])
    slots = lengths[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
    cache = KVCache(write_rows(cache.k, k_new, slots), write_rows(cache.v, v_new, slots))
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return x, cache, kept if hidden_layers else None


def lm_head(params: Params, cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """fp32 logits [..., V] of final-normed hidden states [..., H]."""
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("...h,vh->...v", x, dequantize(head), preferred_element_type=jnp.float32)


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
    input_embeds: Optional[jax.Array] = None,
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
      input_embeds: [B, T, H] embeddings used instead of the tokens' (see ``forward_hidden``).
    Returns logits (fp32) for every new token, the cache with their K/V written,
    and the requested hidden states.
    """
    x, cache, hidden = forward_hidden(params, cfg, tokens, positions, cache, cache_lengths, tree_mask,
                                      attention=attention, hidden_layers=hidden_layers, input_embeds=input_embeds)
    return ForwardOutput(logits=lm_head(params, cfg, x), cache=cache, hidden=hidden)


def causal_mask(batch_size: int, length: int, valid_lengths: Optional[jax.Array] = None) -> jax.Array:
    """bool[B, T, T] lower-triangular mask; padding rows/cols beyond valid_lengths masked."""
    tri = jnp.tril(jnp.ones((length, length), bool))
    mask = jnp.broadcast_to(tri, (batch_size, length, length))
    if valid_lengths is not None:
        ok = jnp.arange(length)[None, :] < valid_lengths[:, None]
        mask = mask & ok[:, None, :] & ok[:, :, None]
    return mask
