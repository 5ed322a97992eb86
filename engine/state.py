"""The decoding state carried between steps: one pytree, donated through every step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

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
    ``eos_ids`` (static, not an array) are the tokens that end a sequence: ``prefill`` sets the
    model config's, and ``accept`` stops at them unless told otherwise.
    """

    cache: KVCache
    lengths: jax.Array  # int32[B]
    last_tokens: jax.Array  # int32[B]
    remaining: jax.Array  # int32[B]
    finished: jax.Array  # bool[B]
    rng: jax.Array  # [B] per-row request keys (or one key, split per row); never advanced: draws fold in positions
    sampling: SamplingParams
    eos_ids: tuple[int, ...] = dataclasses.field(default=(), metadata=dict(static=True))

    def replace(self, **changes) -> "DecodeState":
        return dataclasses.replace(self, **changes)

    def take_rows(self, index: jax.Array) -> "DecodeState":
        """The state of batch rows ``index`` (a batch shrunk to the rows still decoding)."""
        rows = lambda x: x[index]
        return self.replace(cache=self.cache.take_rows(index), lengths=rows(self.lengths),
                            last_tokens=rows(self.last_tokens), remaining=rows(self.remaining),
                            finished=rows(self.finished), rng=self.rng if self.rng.ndim == 0 else rows(self.rng),
                            sampling=jax.tree_util.tree_map(rows, self.sampling))


def fork(state: DecodeState) -> DecodeState:
    """A copy of the state in new buffers (every array leaf copied, on the device, no sync).

    ``step`` / ``verify`` / ``accept`` donate their state: its buffers are reused for the result, so a
    state can be stepped once. To try several trees from one state, step a fork per try:
    ``step(params, fork(state), tree_a, cfg=cfg)``, then ``step(params, state, tree_b, cfg=cfg)``.
    """
    return jax.tree_util.tree_map(jnp.copy, state)
