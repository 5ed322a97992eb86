"""The decoding state carried between steps: one pytree, donated through every step."""

from __future__ import annotations

import dataclasses

import jax

from specjax.engine.sampling import SamplingParams
from specjax.models.decoder import KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Per-sequence decoding state.

    ``lengths[b]`` tokens are in the cache; ``last_tokens[b]`` is the newest
    generated token, not yet in the cache: it is the root of the next draft tree.
    ``remaining[b]`` counts tokens still allowed (max_new_tokens budget).
    ``sampling`` holds each row's temperature / top-k / top-p as runtime arrays.
    """

    cache: KVCache
    lengths: jax.Array  # int32[B]
    last_tokens: jax.Array  # int32[B]
    remaining: jax.Array  # int32[B]
    finished: jax.Array  # bool[B]
    rng: jax.Array  # PRNG key
    sampling: SamplingParams

    def replace(self, **changes) -> "DecodeState":
        return dataclasses.replace(self, **changes)
