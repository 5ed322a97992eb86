"""The pure, jitted steps of speculative decoding: prefill, verify, accept, and the fused step.

Indexing: inside a step the root (the state's last token, not yet cached) is
node 0 and draft node i is node i + 1, so a tree of capacity T gives N = T + 1
query tokens. verify writes all N tokens' K/V at cache slots [len, len + N);
accept moves the accepted path's K/V to [len, len + 1 + n_accepted) so the next
step sees a contiguous prefix. Both touch only those rows of the (donated)
cache. ``step`` fuses verify and accept into one dispatch; the host reads back
only the ``Accepted`` tokens.

Sampling settings are per-row arrays in the state (``DecodeState.sampling``),
so a new temperature never recompiles and rows of one batch may differ.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from specjax.engine.sampling import SamplingParams, sample_or_argmax, target_probs
from specjax.engine.state import DecodeState
from specjax.engine.tree import DraftTree, ancestor_mask, depths, parents_with_root
from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, forward, forward_hidden, lm_head, read_rows, write_rows
from specjax.models.sharding import shard_cache

# Prompts longer than this are prefilled in chunks of this many tokens: attention
# memory stays O(chunk x block) and one compiled chunk serves every long prompt.
PREFILL_CHUNK = 512


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Accepted:
    """What one step emits per sequence: ``tokens[b, :num[b]]`` (accepted drafts, then bonus).

    ``path[b, d]`` is the root-indexed node at depth d of the accepted path
    (``path[b, 0] == 0``), meaningful for ``d <= num_draft_accepted[b]``; device
    drafters use it to compact their own caches and gather the target's features.
    """

    tokens: jax.Array  # int32[B, T + 1]
    num: jax.Array  # int32[B]
    num_draft_accepted: jax.Array  # int32[B], draft tokens among them
    path: jax.Array  # int32[B, T + 1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepAux:
    """The verify pass's outputs that model drafters feed on (dead code for everyone else)."""

    logits: jax.Array  # float32[B, T + 1, V]
    hidden: Optional[jax.Array]  # [len(hidden_layers), B, T + 1, H] or None


# ------------------------------------------------------------------ prefill


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "max_len", "dtype", "cache_sharding"))
def new_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype, cache_sharding=None) -> KVCache:
    """An empty cache. A buffer, not a constant: stops XLA from constant-folding over the zeros."""
    cache = lax.optimization_barrier(KVCache.zeros(cfg, batch_size, max_len, dtype))
    return cache if cache_sharding is None else shard_cache(cache, cache_sharding)


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "hidden_layers"), donate_argnums=(1,))
def prefill_chunk(params, cache: KVCache, tokens: jax.Array, starts: jax.Array, ends: jax.Array,
                  last_hidden: jax.Array, *, cfg: ModelConfig, attention: str = "xla",
                  hidden_layers: tuple[int, ...] = ()):
    """Feed tokens[B, C] at cache slots [starts[b], starts[b] + C), causally.

    Only positions below ``ends[b]`` are real (the rest is padding: computed,
    written past the sequence's length, never read). ``last_hidden[b]`` takes
    the final hidden state of position ``ends[b] - 1`` when it lies in this chunk.
    Returns (cache, last_hidden, hidden states of the chunk or None).
    """
    b, c = tokens.shape
    positions = starts[:, None] + jnp.arange(c, dtype=jnp.int32)[None, :]
    real = positions < ends[:, None]
    mask = jnp.tril(jnp.ones((c, c), bool))[None] & real[:, None, :] & real[:, :, None]
    x, cache, hidden = forward_hidden(params, cfg, tokens, positions, cache, starts, mask, attention=attention,
                                      hidden_layers=hidden_layers)
    offset = ends - 1 - starts
    here = (offset >= 0) & (offset < c)
    picked = jnp.take_along_axis(x, jnp.clip(offset, 0, c - 1)[:, None, None], axis=1)[:, 0]
    return cache, jnp.where(here[:, None], picked.astype(last_hidden.dtype), last_hidden), hidden


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(2,))
def _first_tokens(params, cfg: ModelConfig, cache: KVCache, last_hidden, lengths, max_new_tokens, rng,
                  sampling: SamplingParams):
    """The LM head on each sequence's last position only ([B, V], never [B, P, V])."""
    rng, key = jax.random.split(rng)
    first = sample_or_argmax(key, lm_head(params, cfg, last_hidden), sampling)
    finished = _is_eos(first, cfg.eos_token_ids) | (max_new_tokens <= 1)
    state = DecodeState(cache=cache, lengths=lengths.astype(jnp.int32), last_tokens=first,
                        remaining=max_new_tokens.astype(jnp.int32) - 1, finished=finished, rng=rng,
                        sampling=sampling)
    return state, first


def extend(params, cfg: ModelConfig, cache: KVCache, starts: jax.Array, new_tokens: jax.Array,
           new_lengths: jax.Array, max_new_tokens: jax.Array, rng: jax.Array, sampling: SamplingParams, *,
           attention: str = "xla", hidden_layers: tuple[int, ...] = (), chunk: int = PREFILL_CHUNK):
    """Prefill new_tokens[B, P] (right-padded, new_lengths[b] real) after starts[b] cached tokens.

    The general prefill: ``prefill`` is ``extend`` from an empty cache, and a
    session's next turn extends the cache it kept. Prompts wider than ``chunk``
    must be padded to a multiple of it; they run as a host loop over one
    compiled chunk function. Returns (state, first tokens) and, when
    ``hidden_layers`` is given, the hidden states [n, B, P, H] of every position.
    """
    b, p = new_tokens.shape
    if p > chunk and p % chunk:
        raise ValueError(f"prompt width {p} exceeds the prefill chunk {chunk} and is not a multiple of it")
    width = min(p, chunk)
    starts = jnp.asarray(starts, jnp.int32)
    ends = starts + jnp.asarray(new_lengths, jnp.int32)
    last_hidden = jnp.zeros((b, cfg.hidden_size), params["embed"].dtype)
    hidden_parts = []
    for offset in range(0, p, width):
        cache, last_hidden, hidden = prefill_chunk(params, cache, new_tokens[:, offset: offset + width],
                                                   starts + offset, ends, last_hidden, cfg=cfg,
                                                   attention=attention, hidden_layers=tuple(hidden_layers))
        hidden_parts.append(hidden)
    state, first = _first_tokens(params, cfg, cache, last_hidden, ends, jnp.asarray(max_new_tokens), rng,
                                 sampling)
    if not hidden_layers:
        return state, first
    return state, first, jnp.concatenate(hidden_parts, axis=2)


def prefill(params, cfg: ModelConfig, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
            max_new_tokens: jax.Array, rng: jax.Array, sampling: SamplingParams, *, max_len: int,
            attention: str = "xla", cache_sharding=None, hidden_layers: tuple[int, ...] = (),
            chunk: int = PREFILL_CHUNK):
    """Run right-padded prompts [B, P] through the target and pick each first new token.

    Returns the state and the first tokens (already counted against the budget),
    plus the prompt's hidden states when ``hidden_layers`` is given (see ``extend``).
    ``cache_sharding`` (a NamedSharding) lays the new cache out over a mesh.
    """
    b = prompt_tokens.shape[0]
    if prompt_tokens.shape[1] + 1 > max_len:
        raise ValueError(f"prompt width {prompt_tokens.shape[1]} does not fit a cache of {max_len} slots")
    cache = new_cache(cfg, b, max_len, params["embed"].dtype, cache_sharding)
    return extend(params, cfg, cache, jnp.zeros(b, jnp.int32), prompt_tokens, prompt_lengths, max_new_tokens,
                  rng, sampling, attention=attention, hidden_layers=hidden_layers, chunk=chunk)


# ------------------------------------------------------------------ verify


def tree_inputs(state: DecodeState, tree: DraftTree):
    """Root-prepended tokens, parents, valid, ancestor mask and depths of a batch of trees."""
    tokens = jnp.concatenate([state.last_tokens[:, None], tree.tokens.astype(jnp.int32)], axis=1)
    parents = parents_with_root(tree.parents, tree.valid)
    valid = jnp.concatenate([jnp.ones((tree.valid.shape[0], 1), bool), tree.valid.astype(bool)], axis=1)
    anc = ancestor_mask(parents)
    return tokens, parents, valid, anc, depths(anc)


def _verify_impl(params, state: DecodeState, tree: DraftTree, cfg: ModelConfig, attention: str,
                 hidden_layers: tuple[int, ...]):
    tokens, _, _, anc, depth = tree_inputs(state, tree)
    out = forward(params, cfg, tokens, state.lengths[:, None] + depth, state.cache, state.lengths, anc,
                  attention=attention, hidden_layers=hidden_layers)
    return state.replace(cache=out.cache), out.logits, out.hidden


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "hidden_layers"), donate_argnums=(1,))
def verify(params, state: DecodeState, tree: DraftTree, *, cfg: ModelConfig, attention: str = "xla",
           hidden_layers: tuple[int, ...] = ()) -> tuple[DecodeState, jax.Array, Optional[jax.Array]]:
    """One target pass over root + tree. Returns the state (cache written), logits [B, T+1, V]
    and the requested hidden states (for model drafters)."""
    return _verify_impl(params, state, tree, cfg, attention, hidden_layers)


# ------------------------------------------------------------------ accept


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


def _sampled_paths(tokens, parents, valid, logits, tree: DraftTree, sampling: SamplingParams, key):
    """Per-row rejection sampling over the batch (point masses unless the tree carries q)."""
    probs = target_probs(logits, sampling)
    keys = jax.random.split(key, tokens.shape[0])
    if tree.q_dists is None:
        point_mass = lambda t, pa, v, pr, k: _sampled_path_one(t, pa, v, pr, None, k)
        return jax.vmap(point_mass)(tokens, parents, valid, probs, keys)
    return jax.vmap(_sampled_path_one)(tokens, parents, valid, probs, tree.q_dists.astype(jnp.float32), keys)


def _is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, tokens.dtype))


def _compact_cache(cache: KVCache, lengths: jax.Array, path: jax.Array) -> KVCache:
    """Move the K/V rows of path nodes (root-indexed) to consecutive slots from ``lengths``.

    Reads and writes only N rows per layer, head and sequence.
    """
    sources = lengths[:, None] + path
    targets = lengths[:, None] + jnp.arange(path.shape[1], dtype=jnp.int32)[None, :]
    return KVCache(write_rows(cache.k, read_rows(cache.k, sources), targets),
                   write_rows(cache.v, read_rows(cache.v, sources), targets))


def _accept_impl(state: DecodeState, tree: DraftTree, logits: jax.Array, eos_ids: tuple[int, ...]):
    tokens, parents, valid, anc, depth = tree_inputs(state, tree)
    b, n = tokens.shape
    rng, key = jax.random.split(state.rng)
    greedy_best, greedy_bonus = _greedy_path(tokens, parents, valid, anc, depth, logits)

    def with_sampled_rows():
        best, bonus = _sampled_paths(tokens, parents, valid, logits, tree, state.sampling, key)
        greedy_row = state.sampling.temperature <= 0
        return jnp.where(greedy_row, greedy_best, best), jnp.where(greedy_row, greedy_bonus, bonus)

    best, bonus = lax.cond(state.sampling.any_sampled(), with_sampled_rows, lambda: (greedy_best, greedy_bonus))
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
    cache = state.cache if n == 1 else _compact_cache(state.cache, state.lengths, path)
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
                               num_draft_accepted=jnp.where(state.finished, 0, jnp.minimum(n_draft, num)),
                               path=path)


@functools.partial(jax.jit, static_argnames=("eos_ids",), donate_argnums=(0,))
def accept(state: DecodeState, tree: DraftTree, logits: jax.Array, *,
           eos_ids: tuple[int, ...] = ()) -> tuple[DecodeState, Accepted]:
    """Pick the accepted path and bonus token, compact the cache, update the state.

    Greedy rows: the deepest path on which every node is the target's argmax.
    Sampled rows (``state.sampling``): lossless rejection sampling over the tree.
    Emission stops after an EOS token or when the budget runs out; finished
    sequences emit nothing.
    """
    return _accept_impl(state, tree, logits, eos_ids)


# ------------------------------------------------------------------ fused step


def step_impl(params, state: DecodeState, tree: DraftTree, *, cfg: ModelConfig, attention: str = "xla",
              eos_ids: tuple[int, ...] = (), hidden_layers: tuple[int, ...] = ()
              ) -> tuple[DecodeState, Accepted, StepAux]:
    """verify + accept as one pure function (not jitted): for loops that jit their own step."""
    state, logits, hidden = _verify_impl(params, state, tree, cfg, attention, tuple(hidden_layers))
    state, accepted = _accept_impl(state, tree, logits, eos_ids)
    return state, accepted, StepAux(logits=logits, hidden=hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "eos_ids"), donate_argnums=(1,))
def step(params, state: DecodeState, tree: DraftTree, *, cfg: ModelConfig, attention: str = "xla",
         eos_ids: tuple[int, ...] = ()) -> tuple[DecodeState, Accepted]:
    """One fused speculative step (verify + accept, one dispatch); logits never leave the device."""
    state, accepted, _ = step_impl(params, state, tree, cfg=cfg, attention=attention, eos_ids=eos_ids)
    return state, accepted
