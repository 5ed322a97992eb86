"""A small causal LM as the drafter (any specjax-loadable model with the target's vocabulary).

Chain (``topk=1``: the draft's greedy continuation, ``depth`` tokens) or an
EAGLE-2-style dynamic tree (``topk`` children of the ``topk`` best frontier
nodes per level, then the best T by cumulative draft probability). Sampled
rows draw children from the draft's q at the row's temperature, each node's
first child with the target's own noise at its position (the Gumbel coupling,
``device._children``), and pass q in the tree.

State: the draft's own KV cache holding the true context *including* the
root token (``dlen = target length + 1``) and the root's draft logits. Drafting
writes frontier rows above ``dlen``; ``update`` feeds the emitted tokens over
them (one draft forward of width T + 1), so no compaction is needed.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from specjax.drafters.device import (KeyedByConfig, TreeShape, build_dynamic_tree, pick_position, row_temperature,
                                     scan_chunks, scratch_attention, write_block)
from specjax.engine.tree import DraftTree
from specjax.models.config import ModelConfig
from specjax.engine.steps import PREFILL_CHUNK
from specjax.models.decoder import (KVCache, Params, causal_mask, forward, forward_hidden, linear, lm_head,
                                    mlp_block, qkv_projection, rms_norm)
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
    scratch_tokens: jax.Array  # int32[B, M] the token fed at scratch slot lengths + j by the last
    #                            propose (-1 once update has overwritten the scratch rows)


def _scratch_layer(cfg: ModelConfig, lp, x, positions, inv_freq, cache: KVCache, i, lengths, scratch_mask):
    """One decoder layer whose attention reads the prefix and the chosen scratch rows of layer i."""
    b, t, _ = x.shape
    q, k, v = qkv_projection(cfg, lp, x, positions, inv_freq)
    k, v = k.astype(cache.k.dtype), v.astype(cache.v.dtype)
    out = scratch_attention(q, cache.k, cache.v, i, lengths, scratch_mask, k, v)
    x = x + linear(out.reshape(b, t, -1).astype(x.dtype), lp["wo"], lp.get("bo"))
    return mlp_block(cfg, lp, x), k, v


def scratch_forward(params: Params, cfg: ModelConfig, tokens, positions, cache: KVCache, lengths, scratch_mask,
                    write_starts) -> tuple[jax.Array, KVCache]:
    """Logits [B, t, V] of t new tokens that see the prefix ``[0, lengths[b])``, the scratch slots
    ``lengths[b] + j`` where ``scratch_mask`` [B, t, M], and themselves; their K/V are written at
    ``[write_starts[b], write_starts[b] + t)``."""
    inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)

    def layer(carry, lp):
        x, i = carry
        x, k, v = _scratch_layer(cfg, lp, x, positions, inv_freq, cache, i, lengths, scratch_mask)
        return (x, i + 1), (k, v)

    (x, _), (k_new, v_new) = lax.scan(layer, (params["embed"][tokens], jnp.int32(0)), params["layers"])
    cache = KVCache(write_block(cache.k, k_new, write_starts), write_block(cache.v, v_new, write_starts))
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return lm_head(params, cfg, x), cache


def _no_scratch(batch_size: int, shape: TreeShape) -> jax.Array:
    """Scratch tokens of a state whose scratch rows hold nothing reusable."""
    return jnp.full((batch_size, max(shape.scratch_rows, 1)), -1, jnp.int32)


def _cached_prefix(scratch_tokens: jax.Array, emitted: jax.Array) -> jax.Array:
    """int32[B]: how many leading emitted tokens equal the tokens fed at the scratch rows (their K/V,
    which depend on every token before them, are then already the true context's)."""
    m = min(scratch_tokens.shape[1], emitted.shape[1])
    same = scratch_tokens[:, :m] == emitted[:, :m]
    return jnp.sum(jnp.cumprod(same.astype(jnp.int32), axis=1), axis=1)


@dataclasses.dataclass(eq=False)
class DraftModelDrafter(KeyedByConfig):
    """A draft LM proposing chains (``topk=1``) or dynamic trees on the device.

    Args:
      draft: the loaded draft ``Model``; its vocab must equal ``target_vocab_size``.
      target_vocab_size: the target's vocabulary size (checked).
      capacity: T, tree slots per step.
      topk: children per expanded node and frontier width (1 = chain).
      depth: draft levels (defaults to T for a chain, 7 for a tree).
      prefill_chunk: prompt tokens fed per chunk at prefill (memory O(chunk x block)).
    """

    draft: Model
    target_vocab_size: int
    capacity: int = 16
    topk: int = 1
    depth: Optional[int] = None
    attention: str = "xla"
    hidden_layers: tuple[int, ...] = ()
    prefill_chunk: int = PREFILL_CHUNK

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
                               root_logits=jnp.zeros((batch_size, self.cfg.vocab_size), jnp.float32),
                               scratch_tokens=_no_scratch(batch_size, self.shape))

    def prefill(self, params, dstate: DraftModelState, prompt_tokens, prompt_lengths, first_tokens,
                hidden=None) -> DraftModelState:
        """Feed prompt + first token (the root) causally, in chunks of ``prefill_chunk`` tokens
        through the blockwise attention; the LM head runs on the root only."""
        b = prompt_tokens.shape[0]
        tokens = jnp.concatenate([prompt_tokens, jnp.zeros((b, 1), prompt_tokens.dtype)], axis=1)
        tokens = tokens.at[jnp.arange(b), prompt_lengths].set(first_tokens.astype(tokens.dtype))
        ends = (prompt_lengths + 1).astype(jnp.int32)

        def feed(carry, start, chunk):
            cache, root_hidden = carry
            positions = start + jnp.broadcast_to(jnp.arange(chunk.shape[1], dtype=jnp.int32), chunk.shape)
            real = positions < ends[:, None]
            mask = jnp.tril(jnp.ones((chunk.shape[1],) * 2, bool))[None] & real[:, None, :] & real[:, :, None]
            x, cache, _ = forward_hidden(params, self.cfg, chunk, positions, cache, jnp.full(b, start), mask,
                                         attention=self.attention)
            return cache, pick_position(x, ends - 1 - start, root_hidden)

        root_hidden = jnp.zeros((b, self.cfg.hidden_size), params["embed"].dtype)
        cache, root_hidden = scan_chunks(feed, (dstate.cache, root_hidden), (tokens,), self.prefill_chunk)
        return DraftModelState(cache, ends, lm_head(params, self.cfg, root_hidden), _no_scratch(b, self.shape))

    def propose(self, params, dstate: DraftModelState, root_tokens, lengths, sampling, key, *,
                with_q: bool = False) -> tuple[DraftTree, DraftModelState]:
        b = dstate.lengths.shape[0]
        m = max(self.shape.scratch_rows, 1)

        def expand(carry, tokens, feats, positions, offset, scratch_mask):
            cache, fed = carry
            own = jax.nn.one_hot(offset + jnp.arange(tokens.shape[1]), m, dtype=bool)[None]
            logits, cache = scratch_forward(params, self.cfg, tokens, positions, cache, dstate.lengths,
                                            scratch_mask & ~own, dstate.lengths + offset)
            fed = lax.dynamic_update_slice_in_dim(fed, tokens.astype(jnp.int32), offset, axis=1)
            return logits, feats, (cache, fed)

        no_scratch = jnp.full_like(dstate.scratch_tokens, -1)  # the state's width (a bucket's proposer: smaller)
        tree, (cache, fed) = build_dynamic_tree(expand, (dstate.cache, no_scratch),
                                                dstate.root_logits, jnp.zeros((b, 1)), dstate.lengths, self.shape,
                                                row_temperature(sampling, b), key, lengths, with_q=with_q)
        return tree, dataclasses.replace(dstate, cache=cache, scratch_tokens=fed)

    def update(self, params, dstate: DraftModelState, accepted, aux=None) -> DraftModelState:
        """Feed the emitted tokens (over the scratch rows) and keep the new root's logits.

        At most depth + 1 tokens are emitted per step. A chain already wrote the K/V of
        its depth-d node at slot ``lengths + d - 1`` while drafting (the scratch row it is
        fed at), which is where the d-th emitted token goes: when the emitted tokens
        are that chain's, only the tokens past its fed part (the bonus, and the last
        draft when the whole chain was accepted) run through the draft model. In a
        hybrid the accepted path may come from another drafter or a retrieved branch:
        then every emitted token is fed."""
        b = accepted.tokens.shape[0]
        if self.shape.topk == 1:
            start = jnp.minimum(jnp.maximum(accepted.num - 1, 0), self.shape.depth - 1)
            own_chain = jnp.all(_cached_prefix(dstate.scratch_tokens, accepted.tokens) >= start)
            return lax.cond(own_chain, lambda: self._feed(params, dstate, accepted, start, 2),
                            lambda: self._feed(params, dstate, accepted, jnp.zeros(b, jnp.int32),
                                               self.shape.depth + 1))
        return self._feed(params, dstate, accepted, jnp.zeros(b, jnp.int32), self.shape.depth + 1)

    def _feed(self, params, dstate: DraftModelState, accepted, start, n: int) -> DraftModelState:
        """Feed ``n`` emitted tokens from index ``start[b]`` (the ones before it are cached)."""
        b = accepted.tokens.shape[0]
        n = min(n, accepted.tokens.shape[1])  # a smaller verified tree emits fewer (a plain step: one)
        offsets = start[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
        tokens = jnp.take_along_axis(accepted.tokens, jnp.minimum(offsets, accepted.tokens.shape[1] - 1), axis=1)
        valid = accepted.num - start
        out = forward(params, self.cfg, tokens, dstate.lengths[:, None] + offsets, dstate.cache,
                      dstate.lengths + start, causal_mask(b, n, valid), attention=self.attention)
        last = jnp.take_along_axis(out.logits, jnp.maximum(valid - 1, 0)[:, None, None], axis=1)[:, 0]
        fed = accepted.num > 0
        return DraftModelState(out.cache, dstate.lengths + accepted.num,
                               jnp.where(fed[:, None], last, dstate.root_logits), _no_scratch(b, self.shape))

    def catch_up(self, params, dstate: DraftModelState, tokens: jax.Array, num: jax.Array) -> DraftModelState:
        """Feed ``tokens[b, :num[b]]``, emitted by plain steps that skipped this drafter: the device
        loop's auto size feeds them in one pass before drafting again, cheaper than a draft forward
        per plain step."""
        emitted = types.SimpleNamespace(tokens=tokens, num=num)
        return self._feed(params, dstate, emitted, jnp.zeros(tokens.shape[0], jnp.int32), tokens.shape[1])

    def end_batch(self, dstate) -> None:
        return None

    def take_rows(self, dstate: DraftModelState, index: jax.Array) -> DraftModelState:
        """The draft's cache and roots of batch rows ``index``."""
        return DraftModelState(dstate.cache.take_rows(index), dstate.lengths[index], dstate.root_logits[index],
                               dstate.scratch_tokens[index])
