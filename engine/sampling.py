"""The target's sampling distribution: temperature, top-k and top-p applied to logits.

Plain sampling and speculative acceptance both call ``target_probs``, so the
speculative output follows exactly the distribution plain sampling draws from.

The settings are per-row runtime arrays (``SamplingParams``), not static
arguments: rows of one batch may differ, and changing a value never recompiles.
The filters are sort-free: each threshold is found by bisection over the
order-preserving integer key of the float32 values (32 steps of O(V)
reductions, exact), and runs only when some row asks for it, so greedy batches
pay nothing for them. One exp pass per node: the top-p masses reuse the weights
the final normalization divides.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PerRow = Union[float, int, Sequence[float], Sequence[int], np.ndarray]

# Bisection over uint32 keys: each step halves the candidate range, which starts below 2**32.
_BISECTION_STEPS = 32


def first_argmax(x: jax.Array) -> jax.Array:
    """int32 ``jnp.argmax(x, axis=-1)``, bit for bit (the first index on ties; the first NaN where a
    row has one), as a max and a min over the indices that reach it: XLA:CPU runs ``argmax`` as a
    reduction over (value, index) pairs that does not vectorize, about 6x slower over a vocabulary
    (0.88 ms against 0.15 ms for 8 rows of 49,152), and every greedy step takes one."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    reaches = (x == top) | jnp.isnan(x)  # a NaN row's max is NaN, equal to nothing: its first NaN
    return jnp.min(jnp.where(reaches, index, x.shape[-1]), axis=-1)


def vocab_top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k(x, k)`` over a vocabulary (the last axis), the same values and indices in the same
    order (ties to the lower index), faster on XLA:CPU, whose top-k sorts: a drafter's successors or
    children take one per step (0.45 ms for 8 rows of 49,152 against 0.06 ms here). k = 1 is
    ``first_argmax``. Otherwise the vocabulary splits into groups of about sqrt(V / k) entries: each
    of the k best entries lies in one of the k groups with the best maxima (every group ranked above
    its group holds an entry ranked above it), so the exact top-k reads those k groups alone, in
    index order."""
    vocab = x.shape[-1]
    if k == 1:
        ids = first_argmax(x)[..., None]
        return jnp.take_along_axis(x, ids, axis=-1), ids
    # a power of two near sqrt(V / k), dividing V (at most V's largest power-of-two factor)
    group = min(1 << max(math.isqrt(max(vocab // k, 1)) - 1, 0).bit_length(), vocab & -vocab)
    if group < 8 or vocab // group <= k:  # nothing to gain
        return lax.top_k(x, k)
    grouped = x.reshape(x.shape[:-1] + (vocab // group, group))
    best_groups = jnp.sort(lax.top_k(jnp.max(grouped, axis=-1), k)[1], axis=-1)  # [..., k], index order
    candidates = jnp.take_along_axis(grouped, best_groups[..., None], axis=-2).reshape(x.shape[:-1] + (k * group,))
    values, at = lax.top_k(candidates, k)
    return values, jnp.take_along_axis(best_groups, at // group, axis=-1) * group + at % group


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling settings (HF order: temperature, then top-k, then top-p).

    temperature: float32[B], 0 = greedy row (argmax, other fields ignored).
    top_k: int32[B], 0 = off; keeps every token whose logit is >= the k-th largest.
    top_p: float32[B] in (0, 1], 1 = off; see ``target_probs`` for the exact rule.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array

    @classmethod
    def make(cls, batch_size: int, temperature: PerRow = 0.0, top_k: PerRow = 0,
             top_p: PerRow = 1.0) -> "SamplingParams":
        """Validated params from scalars (same for every row) or per-row sequences."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        temperature = _per_row("temperature", temperature, batch_size, np.float32)
        top_k = _per_row("top_k", top_k, batch_size, np.int32)
        top_p = _per_row("top_p", top_p, batch_size, np.float32)
        if not np.all(np.isfinite(temperature) & (temperature >= 0)):
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature.tolist()}")
        if np.any(top_k < 0):
            raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k.tolist()}")
        if not np.all((top_p > 0) & (top_p <= 1)):
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p.tolist()}")
        return cls(jnp.asarray(temperature), jnp.asarray(top_k), jnp.asarray(top_p))

    def any_sampled(self) -> jax.Array:
        """bool scalar: some row samples (temperature > 0)."""
        return jnp.any(self.temperature > 0)


def _per_row(name: str, value: PerRow, batch_size: int, dtype) -> np.ndarray:
    """Broadcast a scalar or check a per-row sequence; integers only for an int field."""
    array = np.asarray(value)
    if array.ndim > 1 or (array.ndim == 1 and array.shape[0] != batch_size):
        raise ValueError(f"{name} must be a scalar or have one value per row ({batch_size}), "
                         f"got shape {array.shape}")
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.number)):
        raise ValueError(f"{name} must be numeric, got {value!r}")
    if np.issubdtype(dtype, np.integer):
        if not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if np.any(np.abs(array) > np.iinfo(dtype).max):
            raise ValueError(f"{name} must fit in {np.dtype(dtype).name}, got {value!r}")
    return np.broadcast_to(array.astype(dtype), (batch_size,)).copy()


def target_probs(logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """float32[B, ..., V] probabilities of the next token after each position of logits[B, ..., V].

    Row b's settings apply to all of logits[b] (the middle axes, e.g. tree nodes).
    Greedy rows give the one-hot of the argmax (the first index on ties, as
    ``jnp.argmax``). Sampled rows: logits / temperature; top-k keeps the tokens
    whose scaled logit is >= the k-th largest (ties at the k-th value all kept,
    as transformers' ``TopKLogitsWarper``; k >= V is off); top-p then keeps token
    x iff the top-k distribution's mass of tokens strictly more likely than x is
    < top_p. That is the smallest set of most likely tokens whose mass reaches
    top_p (never empty: the argmax always stays), extended by every token tied
    with its least likely member; on tie-free logits it is exactly transformers'
    ``TopPLogitsWarper`` (which breaks such ties by its sort order instead).
    The filters run under ``lax.cond`` only when some row uses them (under
    ``vmap`` both branches run; call it on the whole batch instead).
    """
    logits = logits.astype(jnp.float32)
    shape, vocab = logits.shape, logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    temperature, top_k, top_p = (_per_node(x, shape[:-1]) for x in (sp.temperature, sp.top_k, sp.top_p))
    greedy = temperature <= 0
    scaled = flat / jnp.where(greedy, 1.0, temperature)[:, None]  # guard: greedy rows never divide by 0
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))  # the only exp: softmax numerators
    keys = _ordered_keys(scaled)
    top_k_on = ~greedy & (top_k > 0) & (top_k < vocab)
    top_p_on = ~greedy & (top_p < 1)
    keep_k = lax.cond(jnp.any(top_k_on), lambda: _top_k_keep(keys, top_k, top_k_on),
                      lambda: jnp.ones(keys.shape, bool))
    weights = jnp.where(keep_k, weights, 0.0)
    keep_p = lax.cond(jnp.any(top_p_on), lambda: _top_p_keep(keys, weights, top_p, top_p_on),
                      lambda: jnp.ones(keys.shape, bool))
    weights = jnp.where(keep_p, weights, 0.0)
    probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
    one_hot = jax.nn.one_hot(first_argmax(flat), vocab, dtype=jnp.float32)
    return jnp.where(greedy[:, None], one_hot, probs).reshape(shape)


def sample_or_argmax(key: jax.Array, logits: jax.Array, sp: SamplingParams) -> jax.Array:
    """int32[B, ...] next tokens from logits[B, ..., V]: argmax for greedy rows, else a draw
    from ``target_probs`` (``gumbel_argmax``; ``key`` is one key or one per row, e.g. the
    ``position_keys`` of each row's next token). An all-greedy batch skips the filters and the draw."""
    greedy = _per_node(sp.temperature, logits.shape[:-1]).reshape(logits.shape[:-1]) <= 0
    argmax = first_argmax(logits)

    def draw():
        return jnp.where(greedy, argmax, gumbel_argmax(key, jnp.log(target_probs(logits, sp))))

    return lax.cond(sp.any_sampled(), draw, lambda: argmax)


# ------------------------------------------------------------------ seeds
#
# Every random draw is a function of (the request's key, the absolute position of the token
# drawn), never of the batch, the step or the tree: a request's sampled output is then the same
# alone or in any batch, whatever tree sizes the auto policy picks. Prefill, plain steps and
# speculative acceptance draw the token at a position with its noise; sampling model drafters
# draw their children there with the same noise (the Gumbel coupling, ``drafters.device``).


def request_keys(seeds) -> jax.Array:
    """[B] keys, one per request seed (what ``prefill`` takes as ``rng``)."""
    seeds = np.asarray(seeds)
    if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seeds must be a 1-D sequence of ints, got {seeds!r}")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def request_seeds(seed, n: int) -> np.ndarray:
    """int64[n] per-request seeds: ``seed + i`` for request i from an int, or one seed per request."""
    array = np.asarray(seed)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer) or array.ndim > 1:
        raise ValueError(f"seed must be an int or one int per prompt, got {seed!r}")
    if array.ndim == 1 and array.shape[0] != n:
        raise ValueError(f"seed has {array.shape[0]} values for {n} prompts")
    seeds = array.astype(np.int64) + (np.arange(n) if array.ndim == 0 else 0)
    if np.any((seeds < 0) | (seeds >= 2 ** 32)):
        raise ValueError(f"seeds must be in [0, 2**32), got {seeds.tolist()}")
    return seeds


def row_keys(rng: jax.Array, batch_size: int) -> jax.Array:
    """[B] per-row keys: ``rng`` itself when it holds one key per row, else B keys split from it."""
    if rng.ndim == 0:
        return jax.random.split(rng, batch_size)
    if rng.shape != (batch_size,):
        raise ValueError(f"rng holds {rng.shape} keys for {batch_size} rows: pass one key or one per row")
    return rng


def position_keys(keys: jax.Array, positions: jax.Array) -> jax.Array:
    """[B] keys of each row's draw at absolute sequence ``positions[b]``."""
    return jax.vmap(jax.random.fold_in)(keys, positions.astype(jnp.uint32))


def gumbel_argmax(key: jax.Array, logp: jax.Array) -> jax.Array:
    """int32 argmax(logp + Gumbel noise) over the last axis: an exact draw from softmax(logp).

    ``key``: one key for the whole array, or one per row ([B]: each row's noise depends on its
    key alone, so the draw does not depend on the batch around it).
    """
    if key.ndim == 0:
        noise = jax.random.gumbel(key, logp.shape)
    else:
        noise = jax.vmap(lambda k: jax.random.gumbel(k, logp.shape[1:]))(key)
    return first_argmax(logp + noise)


def _per_node(row_values: jax.Array, lead_shape: tuple[int, ...]) -> jax.Array:
    """[B] -> flat [prod(lead_shape)]: each row's value repeated over the middle axes."""
    if len(lead_shape) < 1 or row_values.shape != lead_shape[:1]:
        raise ValueError(f"sampling params have {row_values.shape[0]} rows but logits have shape "
                         f"{lead_shape + ('V',)}: expected [B, ..., V] with B = {row_values.shape[0]}")
    expanded = row_values.reshape(row_values.shape + (1,) * (len(lead_shape) - 1))
    return jnp.broadcast_to(expanded, lead_shape).reshape(-1)


def _ordered_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with key(a) < key(b) iff a < b for non-NaN float32 (and -0.0 == +0.0)."""
    bits = lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _top_k_keep(keys: jax.Array, top_k: jax.Array, on: jax.Array) -> jax.Array:
    """bool[R, V]: key >= the k-th largest key, found as the largest t with #(key >= t) >= k."""
    lo, hi = keys.min(axis=-1), keys.max(axis=-1)  # count(key >= lo) = V >= k holds at lo

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2  # upper middle, so lo = mid always moves
        enough = jnp.sum(keys >= mid[:, None], axis=-1) >= top_k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    threshold, _ = lax.fori_loop(0, _BISECTION_STEPS, halve, (lo, hi))
    return ~on[:, None] | (keys >= threshold[:, None])


def _top_p_keep(keys: jax.Array, weights: jax.Array, top_p: jax.Array, on: jax.Array) -> jax.Array:
    """bool[R, V]: mass strictly above the token < top_p; the threshold is the smallest t with
    mass(key > t) < top_p * total (true at the max key, where the mass above is 0)."""
    budget = top_p * jnp.sum(weights, axis=-1)
    lo, hi = keys.min(axis=-1), keys.max(axis=-1)

    def halve(_, bounds):
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        below_budget = jnp.sum(jnp.where(keys > mid[:, None], weights, 0.0), axis=-1) < budget
        return jnp.where(below_budget, lo, mid + 1), jnp.where(below_budget, mid, hi)

    threshold, _ = lax.fori_loop(0, _BISECTION_STEPS, halve, (lo, hi))
    return ~on[:, None] | (keys >= threshold[:, None])
