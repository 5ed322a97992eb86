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

The steps donate their state (the cache is updated in place): a state is stepped
once, and ``fork(state)`` (``specjax.engine.state``) copies it to try several trees.
``prefill`` / ``extend`` check concrete inputs on the host (ids, lengths,
positions); the jitted steps never sync with the host.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from specjax.engine.sampling import (SamplingParams, first_argmax, gumbel_argmax, position_keys, row_keys,
                                     sample_or_argmax, target_probs)
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
    logprobs: Optional[jax.Array] = None  # float32[B, T + 1] of ``tokens`` (see ``token_logprobs``), on request


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepAux:
    """The verify pass's outputs that model drafters feed on (dead code for everyone else)."""

    logits: jax.Array  # float32[B, T + 1, V]
    hidden: Optional[jax.Array]  # [len(hidden_layers), B, T + 1, H] or None


class Prefilled(NamedTuple):
    """What ``prefill`` and ``extend`` return: always these four fields, None where not asked for."""

    state: DecodeState
    first_tokens: jax.Array  # int32[B], the first new token per row (already counted against its budget)
    hidden: Optional[jax.Array] = None  # [len(hidden_layers), B, P, H] of every position, with hidden_layers
    logits: Optional[jax.Array] = None  # float32[B, V], each row's last prompt position, with return_logits


class _DonatesState:
    """A jitted step that donates its ``DecodeState``, refusing a state an earlier step already donated.

    XLA's own error says only "Buffer has been deleted or donated"; this one names ``fork``.
    ``is_deleted`` reads a host-side flag (no device sync); traced states (inside the caller's own
    ``jit``) pass unchecked. Every other attribute (``lower``, ``clear_cache``, ...) is the jitted
    function's.
    """

    def __init__(self, jitted, position: int):
        self._jitted, self._position = jitted, position
        functools.update_wrapper(self, jitted)

    def __call__(self, *args, **kwargs):
        state = args[self._position] if len(args) > self._position else kwargs.get("state")
        refuse_donated(state, f"{self.__name__}()")
        return self._jitted(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._jitted, name)


def _donates_state(position: int):
    return lambda jitted: _DonatesState(jitted, position)


def refuse_donated(tree, where: str) -> None:
    """Raise if any concrete array of ``tree`` (a state or cache) was donated to an earlier step."""
    for leaf in jax.tree_util.tree_leaves(tree):
        if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer) and leaf.is_deleted():
            raise ValueError(f"{where}: this state's buffers were donated to an earlier step and are gone; "
                             "pass the state that step returned, or step a copy, fork(state) "
                             "(specjax.engine.state.fork), to try several trees from one state")


def _concrete(*trees) -> bool:
    """True when no leaf is a tracer (the values can be read on the host)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def check_prompt_inputs(cfg: ModelConfig, cache_slots: int, starts, tokens, lengths, max_new_tokens) -> None:
    """Host-side checks of a prefill's inputs, with errors naming the problem.

    The jitted chunks would run bad input silently: an id >= vocab reads a clamped embedding row and a
    position past ``max_position_embeddings`` extrapolates RoPE. Only real positions are checked (the
    padding is never read). Reads the values, so callers skip it for traced or already-checked inputs.
    """
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"prompt tokens must be integer ids [batch, width], got {tokens.dtype}{list(tokens.shape)}")
    b, p = tokens.shape
    if lengths.shape != (b,):
        raise ValueError(f"prompt lengths must have shape [{b}] (one per row), got {list(lengths.shape)}")
    starts = np.broadcast_to(np.asarray(starts), (b,))
    budget = np.broadcast_to(np.asarray(max_new_tokens), (b,))
    for row in range(b):
        if not 1 <= lengths[row] <= p:
            raise ValueError(f"row {row}: prompt length {lengths[row]} is outside [1, {p}] (the padded width)")
        ids = tokens[row, : lengths[row]]
        bad = (ids < 0) | (ids >= cfg.vocab_size)
        if bad.any():
            raise ValueError(f"row {row}: token id {ids[bad][0]} at position {np.argmax(bad)} is outside the "
                             f"vocab [0, {cfg.vocab_size})")
        end = int(starts[row] + lengths[row])
        if end > cfg.max_position_embeddings:
            raise ValueError(f"row {row}: {end} tokens ({starts[row]} cached + {lengths[row]} new) exceed the "
                             f"model's max_position_embeddings ({cfg.max_position_embeddings})")
        if end + 1 > cache_slots:
            raise ValueError(f"row {row}: {end} prompt tokens + the first new token do not fit a cache of "
                             f"{cache_slots} slots")
        if budget[row] < 1:
            raise ValueError(f"row {row}: max_new_tokens must be >= 1, got {budget[row]}")


# ------------------------------------------------------------------ prefill


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "max_len", "dtype", "cache_sharding"))
def new_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype, cache_sharding=None) -> KVCache:
    """An empty cache. A buffer, not a constant: stops XLA from constant-folding over the zeros."""
    cache = lax.optimization_barrier(KVCache.zeros(cfg, batch_size, max_len, dtype))
    return cache if cache_sharding is None else shard_cache(cache, cache_sharding)


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "hidden_layers"), donate_argnums=(1,))
def prefill_chunk(params, cache: KVCache, tokens: jax.Array, starts: jax.Array, ends: jax.Array,
                  last_hidden: jax.Array, input_embeds: Optional[jax.Array] = None, *, cfg: ModelConfig,
                  attention: str = "xla", hidden_layers: tuple[int, ...] = ()):
    """Feed tokens[B, C] at cache slots [starts[b], starts[b] + C), causally (or their
    ``input_embeds`` [B, C, H] in place of the token embeddings, see ``extend``).

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
                                      hidden_layers=hidden_layers, input_embeds=input_embeds)
    offset = ends - 1 - starts
    here = (offset >= 0) & (offset < c)
    picked = jnp.take_along_axis(x, jnp.clip(offset, 0, c - 1)[:, None, None], axis=1)[:, 0]
    return cache, jnp.where(here[:, None], picked.astype(last_hidden.dtype), last_hidden), hidden


@functools.partial(jax.jit, static_argnames=("cfg", "return_logits"), donate_argnums=(2,))
def _first_tokens(params, cfg: ModelConfig, cache: KVCache, last_hidden, lengths, max_new_tokens, rng,
                  sampling: SamplingParams, return_logits: bool = False):
    """The LM head on each sequence's last position only ([B, V], never [B, P, V]); the first token
    is drawn with the noise of its position (``lengths``), and the state keeps the per-row keys."""
    rng = row_keys(rng, lengths.shape[0])
    logits = lm_head(params, cfg, last_hidden)
    first = sample_or_argmax(position_keys(rng, lengths), logits, sampling)
    finished = _is_eos(first, cfg.eos_token_ids) | (max_new_tokens <= 1)
    state = DecodeState(cache=cache, lengths=lengths.astype(jnp.int32), last_tokens=first,
                        remaining=max_new_tokens.astype(jnp.int32) - 1, finished=finished, rng=rng,
                        sampling=sampling, eos_ids=tuple(cfg.eos_token_ids))
    return Prefilled(state, first, logits=logits if return_logits else None)


def extend(params, cfg: ModelConfig, cache: KVCache, starts: jax.Array, new_tokens: jax.Array,
           new_lengths: jax.Array, max_new_tokens: jax.Array, rng: jax.Array, sampling: SamplingParams, *,
           attention: str = "xla", hidden_layers: tuple[int, ...] = (), chunk: int = PREFILL_CHUNK,
           return_logits: bool = False, validate: bool = True,
           input_embeds: Optional[jax.Array] = None) -> Prefilled:
    """Prefill new_tokens[B, P] (right-padded, new_lengths[b] real) after starts[b] cached tokens.

    The general prefill: ``prefill`` is ``extend`` from an empty cache, and a
    session's next turn extends the cache it kept (donated: pass a cache once).
    Prompts wider than ``chunk`` must be padded to a multiple of it
    (``specjax.engine.buckets.prompt_bucket`` gives such widths); they run as a
    host loop over one compiled chunk function. Returns a ``Prefilled``: the
    state and first tokens, the hidden states [n, B, P, H] of every position
    when ``hidden_layers`` is given, and with ``return_logits`` the float32
    logits [B, V] of each row's last prompt position (before temperature,
    top-k and top-p).

    ``validate`` checks concrete inputs on the host (``check_prompt_inputs``:
    ids in the vocab, lengths, positions within ``max_position_embeddings`` and
    the cache); traced inputs are never read. Callers that checked already
    pass False to skip reading the arrays back.

    ``input_embeds`` [B, P, H], when given, is fed instead of the tokens' embeddings (a
    vision-language prompt's, with image features at its image tokens:
    ``specjax.models.multimodal.prompt_embeddings``); ``new_tokens`` still give the width and are
    checked, and the cache and every later step are as for a text prompt.
    """
    b, p = new_tokens.shape
    if input_embeds is not None and input_embeds.shape != (b, p, cfg.hidden_size):
        raise ValueError(f"input_embeds have shape {list(input_embeds.shape)}; the prompt needs [{b}, {p}, "
                         f"{cfg.hidden_size}] (batch, width, hidden size)")
    if p > chunk and p % chunk:
        raise ValueError(f"prompt width {p} exceeds the prefill chunk {chunk} and is not a multiple of it")
    refuse_donated(cache, "extend()")
    if validate and _concrete(starts, new_tokens, new_lengths, max_new_tokens):
        check_prompt_inputs(cfg, cache.k.shape[3], starts, new_tokens, new_lengths, max_new_tokens)
    width = min(p, chunk)
    starts = jnp.asarray(starts, jnp.int32)
    ends = starts + jnp.asarray(new_lengths, jnp.int32)
    last_hidden = jnp.zeros((b, cfg.hidden_size), params["embed"].dtype)
    hidden_parts = []
    for offset in range(0, p, width):
        embeds = None if input_embeds is None else input_embeds[:, offset: offset + width]
        cache, last_hidden, hidden = prefill_chunk(params, cache, new_tokens[:, offset: offset + width],
                                                   starts + offset, ends, last_hidden, embeds, cfg=cfg,
                                                   attention=attention, hidden_layers=tuple(hidden_layers))
        hidden_parts.append(hidden)
    out = _first_tokens(params, cfg, cache, last_hidden, ends, jnp.asarray(max_new_tokens), rng, sampling,
                        return_logits=return_logits)
    return out._replace(hidden=jnp.concatenate(hidden_parts, axis=2) if hidden_layers else None)


def prefill(params, cfg: ModelConfig, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
            max_new_tokens: jax.Array, rng: jax.Array, sampling: SamplingParams, *, max_len: int,
            attention: str = "xla", cache_sharding=None, hidden_layers: tuple[int, ...] = (),
            chunk: int = PREFILL_CHUNK, return_logits: bool = False, validate: bool = True,
            input_embeds: Optional[jax.Array] = None) -> Prefilled:
    """Run right-padded prompts [B, P] through the target and pick each first new token.

    Returns a ``Prefilled`` (state, first tokens, and the hidden states / last
    position's logits when asked for; see ``extend``, which also describes
    ``validate`` and ``input_embeds``, a vision-language prompt's embeddings).
    The state's ``eos_ids`` are the config's. ``cache_sharding`` (a
    NamedSharding) lays the new cache out over a mesh. The padded width must
    fit the ``max_len`` cache slots, and each real prompt one slot more.
    """
    b = prompt_tokens.shape[0]
    if prompt_tokens.shape[1] > max_len:
        raise ValueError(f"prompt width {prompt_tokens.shape[1]} (padded) does not fit a cache of {max_len} slots")
    cache = new_cache(cfg, b, max_len, params["embed"].dtype, cache_sharding)
    return extend(params, cfg, cache, jnp.zeros(b, jnp.int32), prompt_tokens, prompt_lengths, max_new_tokens,
                  rng, sampling, attention=attention, hidden_layers=hidden_layers, chunk=chunk,
                  return_logits=return_logits, validate=validate, input_embeds=input_embeds)


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


@_donates_state(position=1)
@functools.partial(jax.jit, static_argnames=("cfg", "attention", "hidden_layers"), donate_argnums=(1,))
def verify(params, state: DecodeState, tree: DraftTree, *, cfg: ModelConfig, attention: str = "xla",
           hidden_layers: tuple[int, ...] = ()) -> tuple[DecodeState, jax.Array, Optional[jax.Array]]:
    """One target pass over root + tree. Returns the state (cache written), logits [B, T+1, V]
    and the requested hidden states (for model drafters). Donates ``state``: ``fork`` it to try
    several trees."""
    return _verify_impl(params, state, tree, cfg, attention, hidden_layers)


# ------------------------------------------------------------------ accept


def _greedy_path(tokens, parents, valid, anc, depth, logits):
    """Deepest node whose whole path agrees with the target's argmax, and the bonus token."""
    choice = first_argmax(logits)  # [B, N]
    agrees = valid & (tokens == jnp.take_along_axis(choice, parents, axis=1))
    agrees = agrees.at[:, 0].set(True)
    whole_path_agrees = ~jnp.any(anc & ~agrees[:, None, :], axis=-1)
    best = jnp.argmax(jnp.where(whole_path_agrees, depth, -1), axis=-1)
    bonus = jnp.take_along_axis(choice, best[:, None], axis=1)[:, 0]
    return best, bonus


def _sampled_walk(tokens, parents, valid, logits, lengths, keys, sampling: SamplingParams, done):
    """Sampled rows: the deepest node whose whole path agrees with the target's draws, and the bonus.

    The target's token after a node at depth d is ``gumbel_argmax`` of its ``target_probs`` with
    the noise of that position (``lengths + d + 1``, the row's key): greedy acceptance with this
    draw in place of the argmax. The emitted tokens are then exactly what plain sampling with the
    same per-position noise emits, whatever the tree (lossless, and independent of the tree size,
    the drafter and the batch). Nodes on agreeing paths share their prefix, so one of them (the
    first) stands for the depth; duplicate siblings keep every copy's subtree alive. The walk runs
    one depth per iteration until every row has drawn its bonus; ``done`` rows (greedy, finished)
    are skipped.
    """
    b, n = tokens.shape
    rows = jnp.arange(b)
    child_slot = jnp.arange(n)[None, :] >= 1

    def body(carry):
        d, alive, best, bonus, done = carry
        node = jnp.argmax(alive, axis=1)  # the first node of this depth on an agreeing path
        logp = jnp.log(target_probs(logits[rows, node], sampling))
        draw = gumbel_argmax(position_keys(keys, lengths + d + 1), logp)
        children = child_slot & valid & jnp.take_along_axis(alive, parents, axis=1) & (tokens == draw[:, None])
        found = jnp.any(children, axis=1) & ~done
        best = jnp.where(found, jnp.argmax(children, axis=1), best)
        bonus = jnp.where(done | found, bonus, draw)
        return d + 1, jnp.where(found[:, None], children, alive), best, bonus, done | ~found

    alive = jnp.zeros((b, n), bool).at[:, 0].set(True)
    init = (jnp.int32(0), alive, jnp.zeros(b, jnp.int32), jnp.zeros(b, jnp.int32), done)
    _, _, best, bonus, _ = lax.while_loop(lambda c: ~jnp.all(c[-1]), body, init)
    return best.astype(jnp.int32), bonus


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


def token_logprobs(logits: jax.Array, tokens: jax.Array, sampling: SamplingParams) -> jax.Array:
    """float32[B, ...]: each token's log-probability under the distribution it was drawn from.

    logits[B, ..., V] are the target's at the positions that emitted tokens[B, ...]. Greedy rows:
    the log-softmax of the raw logits. Sampled rows: the log of ``target_probs`` (temperature,
    top-k and top-p applied), so a token outside top-k/top-p would read -inf (none is emitted).
    """
    picked = lambda dist: jnp.take_along_axis(dist, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    raw = picked(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))

    def with_sampled_rows():
        greedy_row = (sampling.temperature <= 0).reshape((-1,) + (1,) * (tokens.ndim - 1))
        return jnp.where(greedy_row, raw, jnp.log(picked(target_probs(logits, sampling))))

    return lax.cond(sampling.any_sampled(), with_sampled_rows, lambda: raw)


class Selection(NamedTuple):
    """What acceptance picks per sequence, before any cache or state changes (see ``select_accepted``)."""

    emitted: jax.Array  # int32[B, N]: accepted draft tokens, then the bonus; zero past ``num``
    num: jax.Array  # int32[B] tokens emitted (EOS and the budget applied; 0 for finished rows)
    n_draft: jax.Array  # int32[B] depth of the deepest agreeing node (draft tokens before the bonus)
    path: jax.Array  # int32[B, N] root-indexed node at each depth of the accepted path
    hit_eos: jax.Array  # bool[B]


def select_accepted(tokens, parents, valid, anc, depth, logits, lengths, keys, sampling: SamplingParams,
                    finished, remaining, eos_ids: tuple[int, ...]) -> Selection:
    """The accepted path and emitted tokens of root-indexed trees ([B, N], see ``tree_inputs``).

    Pure and cache-free, so a contiguous cache (``accept``) and the paged one
    (``engine.paged_steps``) share one acceptance rule: greedy rows the argmax
    path, sampled rows ``_sampled_walk`` with ``keys`` (one per row) at the
    positions after ``lengths`` (the root's position), one bonus token, then
    EOS and the ``remaining`` budget cut the emission; ``finished`` rows emit nothing.
    """
    b, n = tokens.shape
    greedy_best, greedy_bonus = _greedy_path(tokens, parents, valid, anc, depth, logits)

    def with_sampled_rows():
        greedy_row = sampling.temperature <= 0
        best, bonus = _sampled_walk(tokens, parents, valid, logits, lengths, keys, sampling, greedy_row | finished)
        return jnp.where(greedy_row, greedy_best, best), jnp.where(greedy_row, greedy_bonus, bonus)

    best, bonus = lax.cond(sampling.any_sampled(), with_sampled_rows, lambda: (greedy_best, greedy_bonus))
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
    num = jnp.minimum(num, remaining)
    num = jnp.where(finished, 0, num)
    emitted = jnp.where(jnp.arange(n)[None, :] < num[:, None], emitted, 0)
    return Selection(emitted, num, n_draft, path, hit_eos)


def _accept_impl(state: DecodeState, tree: DraftTree, logits: jax.Array, eos_ids: tuple[int, ...],
                 logprobs: bool = False):
    tokens, parents, valid, anc, depth = tree_inputs(state, tree)
    n = tokens.shape[1]
    emitted, num, n_draft, path, hit_eos = select_accepted(
        tokens, parents, valid, anc, depth, logits, state.lengths, row_keys(state.rng, tokens.shape[0]),
        state.sampling, state.finished, state.remaining, eos_ids)
    remaining = state.remaining - num
    # A root with one node needs no move: an accepted node already sits after the root, and a
    # rejected one past the new length, where the next pass writes.
    cache = state.cache if n <= 2 else _compact_cache(state.cache, state.lengths, path)
    new_last = jnp.take_along_axis(emitted, jnp.maximum(num - 1, 0)[:, None], axis=1)[:, 0]
    new_state = state.replace(
        cache=cache,
        lengths=state.lengths + num,  # root + (num - 1) drafts now cached; last emitted is the new root
        last_tokens=jnp.where(state.finished, state.last_tokens, new_last),
        remaining=remaining,
        finished=state.finished | hit_eos | (remaining <= 0),
    )
    emitted_logprobs = None
    if logprobs:  # emitted token k was drawn at path node k: gather those logits first ([B, N, V])
        at_path = jnp.take_along_axis(logits, path[:, :, None], axis=1)
        emitted_logprobs = jnp.where(jnp.arange(n)[None, :] < num[:, None],
                                     token_logprobs(at_path, emitted, state.sampling), 0.0)
    return new_state, Accepted(tokens=emitted, num=num,
                               num_draft_accepted=jnp.where(state.finished, 0, jnp.minimum(n_draft, num)),
                               path=path, logprobs=emitted_logprobs)


@_donates_state(position=0)
@functools.partial(jax.jit, static_argnames=("eos_ids", "logprobs"), donate_argnums=(0,))
def accept(state: DecodeState, tree: DraftTree, logits: jax.Array, *,
           eos_ids: Optional[tuple[int, ...]] = None, logprobs: bool = False) -> tuple[DecodeState, Accepted]:
    """Pick the accepted path and bonus token, compact the cache, update the state.

    Greedy rows: the deepest path on which every node is the target's argmax.
    Sampled rows (``state.sampling``): the deepest path on which every node is the target's draw
    with its position's noise (``_sampled_walk``: plain sampling's output, whatever the tree).
    Emission stops after an EOS token (``eos_ids``; None: the state's, which ``prefill`` took from
    the model config) or when the budget runs out; finished sequences emit nothing. Donates
    ``state``: ``fork`` it to try several trees. ``logprobs``: also ``Accepted.logprobs``
    (``token_logprobs`` of the emitted tokens; a separate program, the default one is unchanged).
    """
    return _accept_impl(state, tree, logits, state.eos_ids if eos_ids is None else eos_ids, logprobs)


# ------------------------------------------------------------------ fused step


def step_impl(params, state: DecodeState, tree: DraftTree, *, cfg: ModelConfig, attention: str = "xla",
              eos_ids: Optional[tuple[int, ...]] = None, hidden_layers: tuple[int, ...] = (),
              logprobs: bool = False) -> tuple[DecodeState, Accepted, StepAux]:
    """verify + accept as one pure function (not jitted): for loops that jit their own step.
    ``eos_ids`` None: the config's ``eos_token_ids``; ``logprobs`` as in ``accept``."""
    state, logits, hidden = _verify_impl(params, state, tree, cfg, attention, tuple(hidden_layers))
    state, accepted = _accept_impl(state, tree, logits, cfg.eos_token_ids if eos_ids is None else eos_ids,
                                   logprobs)
    return state, accepted, StepAux(logits=logits, hidden=hidden)


@_donates_state(position=1)
@functools.partial(jax.jit, static_argnames=("cfg", "attention", "eos_ids", "logprobs"), donate_argnums=(1,))
def step(params, state: DecodeState, tree: DraftTree, *, cfg: ModelConfig, attention: str = "xla",
         eos_ids: Optional[tuple[int, ...]] = None, logprobs: bool = False) -> tuple[DecodeState, Accepted]:
    """One fused speculative step (verify + accept, one dispatch); logits never leave the device.

    Stops at ``eos_ids`` (None: the config's ``eos_token_ids``). Donates ``state``: the returned
    state replaces it; ``fork(state)`` first to try several trees from one state. ``logprobs``: see
    ``accept``.
    """
    state, accepted, _ = step_impl(params, state, tree, cfg=cfg, attention=attention, eos_ids=eos_ids,
                                   logprobs=logprobs)
    return state, accepted
