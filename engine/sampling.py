"""The target's sampling distribution: temperature, top-k and top-p applied to logits.

Plain sampling and speculative acceptance both call ``target_probs``, so the
speculative output follows exactly the distribution plain sampling draws from.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Static sampling settings; ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def target_probs(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """float32[..., V] probabilities after temperature, top-k, then top-p (HF order)."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        logits = _top_p_filter(logits, sampling.top_p)
    return jax.nn.softmax(logits, axis=-1)


def _top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (at least one)."""
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # The number of tokens kept: those whose preceding mass is still below top_p.
    keep = jnp.sum(cum - jax.nn.softmax(sorted_logits, axis=-1) < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, jnp.maximum(keep - 1, 0), axis=-1)
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sample_or_argmax(key: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
    """int32[...] next tokens from logits [..., V]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = target_probs(logits, sampling)
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
