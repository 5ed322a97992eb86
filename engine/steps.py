"""The pure, jitted steps of speculative decoding: prefill, verify, accept.

Indexing: inside a step the root (the state's last token, not yet cached) is
node 0 and draft node i is node i + 1, so a tree of capacity T gives N = T + 1
query tokens. verify writes all N tokens' K/V at cache slots [len, len + N);
accept moves the accepted path's K/V to [len, len + 1 + n_accepted) so the next
step sees a contiguous prefix.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from specjax.engine.sampling import Sampling, sample_or_argmax, target_probs
from specjax.engine.state import DecodeState
from specjax.engine.tree import DraftTree, ancestor_mask, depths, parents_with_root
from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, causal_mask, forward
from specjax.models.sharding import shard_cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Accepted:
    """What one step emits per sequence: ``tokens[b, :num[b]]`` (accepted drafts, then bonus)."""

    tokens: jax.Array  # int32[B, T + 1]
    num: jax.Array  # int32[B]
    num_draft_accepted: jax.Array  # int32[B], draft tokens among them


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_len", "attention", "cache_sharding"))
def prefill(params, cfg: ModelConfig, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
            max_new_tokens: jax.Array, rng: jax.Array, *, sampling: Sampling, max_len: int,
            attention: str = "xla", cache_sharding=None) -> tuple[DecodeState, jax.Array]:
    """Run right-padded prompts [B, P] through the target and pick each first new token.

    Returns the state and the first tokens (already counted against the budget).
    ``cache_sharding`` (a NamedSharding) lays the new cache out over a mesh.
    """
    b, p = prompt_tokens.shape
    # A buffer, not a constant: stops XLA from constant-folding attention over the zeros.
    cache = lax.optimization_barrier(KVCache.zeros(cfg, b, max_len, params["embed"].dtype))
    if cache_sharding is not None:
        cache = shard_cache(cache, cache_sharding)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out = forward(params, cfg, prompt_tokens, positions, cache, jnp.zeros(b, jnp.int32),
                  causal_mask(b, p, prompt_lengths), attention=attention)
    last_logits = jnp.take_along_axis(out.logits, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    rng, key = jax.random.split(rng)
    first = sample_or_argmax(key, last_logits, sampling)
    finished = _is_eos(first, cfg.eos_token_ids) | (max_new_tokens <= 1)
    state = DecodeState(cache=out.cache, lengths=prompt_lengths.astype(jnp.int32), last_tokens=first,
                        remaining=max_new_tokens.astype(jnp.int32) - 1, finished=finished, rng=rng)
    return state, first


def tree_inputs(state: DecodeState, tree: DraftTree):
    """Root-prepended tokens, parents, ancestor mask and depths of a batch of trees."""
    tokens = jnp.concatenate([state.last_tokens[:, None], tree.tokens.astype(jnp.int32)], axis=1)
    parents = parents_with_root(tree.parents, tree.valid)
    valid = jnp.concatenate([jnp.ones((tree.valid.shape[0], 1), bool), tree.valid.astype(bool)], axis=1)
    anc = ancestor_mask(parents)
    return tokens, parents, valid, anc, depths(anc)


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "hidden_layers"), donate_argnums=(1,))
def verify(params, state: DecodeState, tree: DraftTree, *, cfg: ModelConfig, attention: str = "xla",
           hidden_layers: tuple[int, ...] = ()) -> tuple[DecodeState, jax.Array, Optional[jax.Array]]:
    """One target pass over root + tree. Returns the state (cache written), logits [B, T+1, V]
    and the requested hidden states (for model drafters)."""
    tokens, _, _, anc, depth = tree_inputs(state, tree)
    out = forward(params, cfg, tokens, state.lengths[:, None] + depth, state.cache, state.lengths, anc,
                  attention=attention, hidden_layers=hidden_layers)
    return state.replace(cache=out.cache), out.logits, out.hidden


def _greedy_path(tokens, parents, valid, anc, depth, logits):
    """Deepest node whose whole path agrees with the target's argmax, and the bonus token."""
    choice = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, N]
    agrees = valid & (tokens == jnp.take_along_axis(choice, parents, axis=1))
    agrees = agrees.at[:, 0].set(True)
    whole_path_agrees = ~jnp.any(anc & ~agrees[:, None, :], axis=-1)
    best = jnp.argmax(jnp.where(whole_path_agrees, depth, -1), axis=-1)
    bonus = jnp.take_along_axis(choice, best[:, None], axis=1)[:, 0]
    return best, bonus


def _sampled_path_one(tokens, parents, valid, probs, q_dists, key):
    """Lossless tree rejection sampling for one sequence (SpecInfer-style, recursive over siblings).

    At the current node with residual target distribution p, the next unvisited
    child x is accepted with min(1, p(x)/q(x)) (q = point mass on x when the
    drafter gives no q); on rejection p <- normalize((p - q)+) and the next
    sibling is tried. When no child is left, the bonus token is drawn from p.
    Every child is examined at most once, so N - 1 iterations suffice.
    """
    n = tokens.shape[0]
    index = jnp.arange(n)

    def step(_, carry):
        cur, p, ptr, done, best, key = carry
        candidates = (index >= ptr) & (index >= 1) & (parents == cur) & valid
        has_child = jnp.any(candidates) & ~done
        child = jnp.argmax(candidates)
        x = tokens[child]
        key, sub = jax.random.split(key)
        if q_dists is None:
            q = jax.nn.one_hot(x, p.shape[0], dtype=p.dtype)
        else:
            q = q_dists[cur]
        accept_prob = jnp.minimum(1.0, p[x] / jnp.maximum(q[x], 1e-30))
        accepted = has_child & (jax.random.uniform(sub) < accept_prob)
        residual = jnp.maximum(p - q, 0.0)
        mass = residual.sum()
        residual = jnp.where(mass > 1e-12, residual / jnp.maximum(mass, 1e-30), p)
        p = jnp.where(accepted, probs[child], jnp.where(has_child, residual, p))
        cur = jnp.where(accepted, child, cur)
        best = jnp.where(accepted, child, best)
        ptr = jnp.where(has_child, child + 1, ptr)
        return cur, p, ptr, done | ~has_child, best, key

    init = (jnp.int32(0), probs[0], jnp.int32(1), jnp.bool_(False), jnp.int32(0), key)
    _, p, _, _, best, key = lax.fori_loop(0, max(n - 1, 0), step, init)
    bonus = jax.random.categorical(key, jnp.log(p)).astype(jnp.int32)
    return best, bonus


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, tokens.dtype))


def _compact_cache(cache: KVCache, lengths: jax.Array, path: jax.Array) -> KVCache:
    """Move the K/V of path nodes (root-indexed) to consecutive slots from ``lengths``."""

    def one(layer_cache):  # [L, B, Hkv, S, D]
        def per_seq(c, start, order):  # c: [L, Hkv, S, D]
            n = order.shape[0]
            window = lax.dynamic_slice_in_dim(c, start, n, axis=2)
            return lax.dynamic_update_slice_in_dim(c, jnp.take(window, order, axis=2), start, axis=2)

        return jax.vmap(per_seq, in_axes=(1, 0, 0), out_axes=1)(layer_cache, lengths, path)

    return KVCache(one(cache.k), one(cache.v))


@functools.partial(jax.jit, static_argnames=("sampling", "eos_ids"), donate_argnums=(0,))
def accept(state: DecodeState, tree: DraftTree, logits: jax.Array, *, sampling: Sampling,
           eos_ids: tuple[int, ...] = ()) -> tuple[DecodeState, Accepted]:
    """Pick the accepted path and bonus token, compact the cache, update the state.

    Greedy: the deepest path on which every node is the target's argmax.
    Sampling: lossless rejection sampling over the tree. Emission stops after an
    EOS token or when the budget runs out; finished sequences emit nothing.
    """
    tokens, parents, valid, anc, depth = tree_inputs(state, tree)
    b, n = tokens.shape
    rng, key = jax.random.split(state.rng)
    if sampling.greedy:
        best, bonus = _greedy_path(tokens, parents, valid, anc, depth, logits)
    else:
        probs = target_probs(logits, sampling)
        keys = jax.random.split(key, b)
        if tree.q_dists is None:
            point_mass = lambda t, pa, v, pr, k: _sampled_path_one(t, pa, v, pr, None, k)
            best, bonus = jax.vmap(point_mass)(tokens, parents, valid, probs, keys)
        else:
            best, bonus = jax.vmap(_sampled_path_one)(tokens, parents, valid, probs,
                                                      tree.q_dists.astype(jnp.float32), keys)
    n_draft = jnp.take_along_axis(depth, best[:, None], axis=1)[:, 0]
    # path[b, d] = the node at depth d on the accepted path (d <= n_draft).
    on_path = jnp.take_along_axis(anc, best[:, None, None], axis=1)[:, 0]  # [B, N]
    at_depth = on_path[:, None, :] & (depth[:, None, :] == jnp.arange(n)[None, :, None])
    path = jnp.argmax(at_depth, axis=-1).astype(jnp.int32)  # [B, N]
    draft_tokens = jnp.take_along_axis(tokens, path, axis=1)
    # Emitted: draft tokens at depth 1..n_draft, then the bonus.
    emitted = jnp.concatenate([draft_tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
    emitted = jnp.where(jnp.arange(n)[None, :] == n_draft[:, None], bonus[:, None], emitted)
    num = n_draft + 1
    eos_at = _is_eos(emitted, eos_ids) & (jnp.arange(n)[None, :] < num[:, None])
    first_eos = jnp.argmax(eos_at, axis=-1)
    hit_eos = jnp.any(eos_at, axis=-1)
    num = jnp.where(hit_eos, first_eos + 1, num)
    num = jnp.minimum(num, state.remaining)
    num = jnp.where(state.finished, 0, num)
    emitted = jnp.where(jnp.arange(n)[None, :] < num[:, None], emitted, 0)
    remaining = state.remaining - num
    cache = _compact_cache(state.cache, state.lengths, path)
    new_last = jnp.take_along_axis(emitted, jnp.maximum(num - 1, 0)[:, None], axis=1)[:, 0]
    new_state = state.replace(
        cache=cache,
        lengths=state.lengths + num,  # root + (num - 1) drafts now cached; last emitted is the new root
        last_tokens=jnp.where(state.finished, state.last_tokens, new_last),
        remaining=remaining,
        finished=state.finished | hit_eos | (remaining <= 0),
        rng=rng,
    )
    return new_state, Accepted(tokens=emitted, num=num,
                               num_draft_accepted=jnp.where(state.finished, 0, jnp.minimum(n_draft, num)))
