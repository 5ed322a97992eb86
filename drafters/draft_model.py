"""A small causal LM as the drafter (any specjax-loadable model with the target's vocabulary).

Chain (``topk=1``: the draft's greedy continuation, ``depth`` tokens) or an
EAGLE-2-style dynamic tree (``topk`` children of the ``topk`` best frontier
nodes per level, then the best T by cumulative draft probability). Sampled
rows draw children i.i.d. from the draft's q at the row's temperature and pass
q in the tree, so acceptance stays lossless.

State: the draft's own KV cache holding the true context *including* the
root token (``dlen = target length + 1``) and the root's draft logits. Drafting
writes frontier rows above ``dlen``; ``update`` feeds the emitted tokens over
them (one draft forward of width T + 1), so no compaction is needed.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from specjax.drafters.device import (TreeShape, build_dynamic_tree, masked_attention, row_temperature,
                                     scratch_visibility, write_block)
from specjax.engine.tree import DraftTree
from specjax.models.config import ModelConfig
from specjax.models.decoder import (KVCache, Params, causal_mask, forward, linear, mlp_block, qkv_projection,
                                    rms_norm)
from specjax.models.loading import Model
from specjax.models.rope import inverse_frequencies


class VocabMismatchError(ValueError):
    """Drafter and target disagree on the vocabulary."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftModelState:
    cache: KVCache  # the draft's cache, [L, B, Hkv, S, D]
    lengths: jax.Array  # int32[B] true tokens cached (target length + 1: the root is fed)
    root_logits: jax.Array  # float32[B, V] the draft's logits after the root


def _masked_layer(cfg: ModelConfig, lp, x, positions, inv_freq, k_layer, v_layer, visible):
    """One decoder layer whose attention reads the cache through an explicit mask."""
    b, t, _ = x.shape
    q, k, v = qkv_projection(cfg, lp, x, positions, inv_freq)
    k, v = k.astype(k_layer.dtype), v.astype(v_layer.dtype)
    out = masked_attention(q, k_layer, v_layer, visible, k, v)
    x = x + linear(out.reshape(b, t, -1).astype(x.dtype), lp["wo"], lp.get("bo"))
    return mlp_block(cfg, lp, x), k, v


def masked_forward(params: Params, cfg: ModelConfig, tokens, positions, cache: KVCache, visible,
                   write_starts) -> tuple[jax.Array, KVCache]:
    """Logits [B, t, V] of t new tokens that see the cache slots ``visible`` [B, t, S] and
    themselves; their K/V are written at ``[write_starts[b], write_starts[b] + t)``."""
    inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)

    def layer(carry, lp):
        x, i = carry
        x, k, v = _masked_layer(cfg, lp, x, positions, inv_freq, cache.k[i], cache.v[i], visible)
        return (x, i + 1), (k, v)

    (x, _), (k_new, v_new) = lax.scan(layer, (params["embed"][tokens], jnp.int32(0)), params["layers"])
    cache = KVCache(write_block(cache.k, k_new, write_starts), write_block(cache.v, v_new, write_starts))
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.einsum("bth,vh->btv", x, head, preferred_element_type=jnp.float32), cache


@dataclasses.dataclass(eq=False)
class DraftModelDrafter:
    """A draft LM proposing chains (``topk=1``) or dynamic trees on the device.

    Args:
      draft: the loaded draft ``Model``; its vocab must equal ``target_vocab_size``.
      target_vocab_size: the target's vocabulary size (checked).
      capacity: T, tree slots per step.
      topk: children per expanded node and frontier width (1 = chain).
      depth: draft levels (defaults to T for a chain, 7 for a tree).
    """

    draft: Model
    target_vocab_size: int
    capacity: int = 16
    topk: int = 1
    depth: Optional[int] = None
    attention: str = "xla"
    hidden_layers: tuple[int, ...] = ()

    def __post_init__(self):
        vocab = self.draft.config.vocab_size
        if vocab != self.target_vocab_size:
            raise VocabMismatchError(
                f"draft model vocab_size {vocab} != target vocab_size {self.target_vocab_size}: "
                "a draft model must share the target's tokenizer and vocabulary")
        if self.depth is None:
            self.depth = self.capacity if self.topk == 1 else 7
        if self.topk > vocab:
            raise ValueError(f"topk {self.topk} exceeds the vocabulary ({vocab})")
        self.shape = TreeShape(self.capacity, self.topk, self.depth)

    @property
    def params(self) -> Params:
        return self.draft.params

    @property
    def cfg(self) -> ModelConfig:
        return self.draft.config

    def init_state(self, batch_size: int, max_len: int) -> DraftModelState:
        slots = max_len + 1 + max(self.shape.scratch_rows, self.shape.depth + 1)
        dtype = self.params["embed"].dtype
        return DraftModelState(cache=KVCache.zeros(self.cfg, batch_size, slots, dtype),
                               lengths=jnp.zeros(batch_size, jnp.int32),
                               root_logits=jnp.zeros((batch_size, self.cfg.vocab_size), jnp.float32))

    def prefill(self, params, dstate: DraftModelState, prompt_tokens, prompt_lengths, first_tokens,
                hidden=None) -> DraftModelState:
        """Feed prompt + first token (the root) causally; keep the root's logits."""
        b, p = prompt_tokens.shape
        tokens = jnp.concatenate([prompt_tokens, jnp.zeros((b, 1), prompt_tokens.dtype)], axis=1)
        tokens = tokens.at[jnp.arange(b), prompt_lengths].set(first_tokens.astype(tokens.dtype))
        positions = jnp.broadcast_to(jnp.arange(p + 1, dtype=jnp.int32), (b, p + 1))
        out = forward(params, self.cfg, tokens, positions, dstate.cache, jnp.zeros(b, jnp.int32),
                      causal_mask(b, p + 1, prompt_lengths + 1), attention=self.attention)
        root = jnp.take_along_axis(out.logits, prompt_lengths[:, None, None], axis=1)[:, 0]
        return DraftModelState(out.cache, (prompt_lengths + 1).astype(jnp.int32), root)

    def propose(self, params, dstate: DraftModelState, root_tokens, lengths, sampling, key, *,
                with_q: bool = False) -> tuple[DraftTree, DraftModelState]:
        b = dstate.lengths.shape[0]
        m = max(self.shape.scratch_rows, 1)

        def expand(cache, tokens, feats, positions, offset, scratch_mask):
            own = jax.nn.one_hot(offset + jnp.arange(tokens.shape[1]), m, dtype=bool)[None]
            visible = scratch_visibility(dstate.lengths, dstate.lengths, scratch_mask & ~own, cache.k.shape[3])
            logits, cache = masked_forward(params, self.cfg, tokens, positions, cache, visible,
                                           dstate.lengths + offset)
            return logits, feats, cache

        tree, cache = build_dynamic_tree(expand, dstate.cache, dstate.root_logits, jnp.zeros((b, 1)),
                                         dstate.lengths, self.shape, row_temperature(sampling, b), key,
                                         with_q=with_q)
        return tree, dataclasses.replace(dstate, cache=cache)

    def update(self, params, dstate: DraftModelState, accepted, aux=None) -> DraftModelState:
        """Feed the emitted tokens (over the scratch rows) and keep the new root's logits.

        At most depth + 1 tokens are emitted per step. A chain already wrote the K/V of
        its depth-d node at slot ``lengths + d - 1`` while drafting (the scratch row it is
        fed at), which is where the d-th emitted token goes: only the tokens past the fed
        part of the chain (the bonus, and the last draft when the whole chain was
        accepted) run through the draft model."""
        b = accepted.tokens.shape[0]
        start = jnp.zeros(b, jnp.int32)
        n = self.shape.depth + 1
        if self.shape.topk == 1:
            start = jnp.minimum(jnp.maximum(accepted.num - 1, 0), self.shape.depth - 1)
            n = 2
        offsets = start[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
        tokens = jnp.take_along_axis(accepted.tokens, jnp.minimum(offsets, accepted.tokens.shape[1] - 1), axis=1)
        valid = accepted.num - start
        out = forward(params, self.cfg, tokens, dstate.lengths[:, None] + offsets, dstate.cache,
                      dstate.lengths + start, causal_mask(b, n, valid), attention=self.attention)
        last = jnp.take_along_axis(out.logits, jnp.maximum(valid - 1, 0)[:, None, None], axis=1)[:, 0]
        fed = accepted.num > 0
        return DraftModelState(out.cache, dstate.lengths + accepted.num,
                               jnp.where(fed[:, None], last, dstate.root_logits))

    def end_batch(self, dstate) -> None:
        return None
