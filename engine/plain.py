"""Plain autoregressive decoding: the baseline every speculative result is compared with.

Deliberately separate from verify/accept (one token per pass, its own step), so
lossless tests compare the speculative path against independent code.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.engine.sampling import (SamplingParams, position_keys, request_keys, request_seeds, row_keys,
                                     sample_or_argmax)
from specjax.engine.state import DecodeState
from specjax.engine.buckets import prompt_bucket
from specjax.engine.steps import PREFILL_CHUNK, _is_eos, prefill
from specjax.models.config import ModelConfig
from specjax.models.decoder import forward
from specjax.models.loading import Model


@functools.partial(jax.jit, static_argnames=("cfg", "attention"), donate_argnums=(1,))
def decode_step(params, state: DecodeState, *, cfg: ModelConfig, attention: str = "xla") -> DecodeState:
    """Feed each sequence's last token, pick the next one."""
    b = state.lengths.shape[0]
    out = forward(params, cfg, state.last_tokens[:, None], state.lengths[:, None], state.cache,
                  state.lengths, jnp.ones((b, 1, 1), bool), attention=attention)
    keys = position_keys(row_keys(state.rng, b), state.lengths + 1)  # the next token's position
    nxt = sample_or_argmax(keys, out.logits[:, 0], state.sampling)
    active = ~state.finished
    remaining = state.remaining - active.astype(jnp.int32)
    return state.replace(
        cache=out.cache,
        lengths=state.lengths + active,
        last_tokens=jnp.where(active, nxt, state.last_tokens),
        remaining=remaining,
        finished=state.finished | (active & _is_eos(nxt, cfg.eos_token_ids)) | (remaining <= 0),
    )


def pad_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, multiple: int = 8):
    """Right-padded int32[B, P] (P rounded up to ``multiple``) and int32[B] lengths.

    Raises ValueError for empty prompts or ids outside the vocab.
    """
    if not prompts:
        raise ValueError("no prompts given")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
        raise ValueError(f"prompt {int(np.argmin(lengths))} is empty")
    width = int(-(-lengths.max() // multiple) * multiple)
    tokens = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids = np.asarray(p, np.int64)
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            raise ValueError(f"prompt {i} has token id {int(ids[bad][0])} outside the vocab [0, {vocab_size})")
        tokens[i, : len(ids)] = ids
    return tokens, lengths


def generate_plain(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed=0,
                   stop_at_eos: bool = True, attention: str = "xla") -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt, one target pass per token.

    Prompt i's seed is ``seed + i`` (or ``seed[i]`` for a sequence), as in ``Engine.generate``: each
    token is drawn with the noise of its request and position, so with a host drafter (or none) the
    Engine samples exactly these tokens (see "Seeds" in the README)."""
    cfg = model.config
    if not stop_at_eos:
        import dataclasses

        cfg = dataclasses.replace(cfg, eos_token_ids=())
    tokens, lengths = pad_prompts(prompts, cfg.vocab_size, multiple=1)
    longest, width = tokens.shape[1], prompt_bucket(tokens.shape[1], PREFILL_CHUNK)  # the Engine's widths
    tokens = np.pad(tokens, ((0, 0), (0, width - longest)))
    max_len = int(-(-max(width, longest + max_new_tokens + 1) // 64) * 64)
    budget = np.full(len(prompts), max_new_tokens, np.int32)
    sampling = SamplingParams.make(len(prompts), temperature, top_k, top_p)
    prefilled = prefill(model.params, cfg, tokens, lengths, budget,  # numpy: checked on the host for free
                        request_keys(request_seeds(seed, len(prompts))), sampling, max_len=max_len,
                        attention=attention)
    state, first = prefilled.state, prefilled.first_tokens
    outputs = [[int(t)] for t in np.asarray(first)]
    finished = np.asarray(state.finished)
    while not finished.all():
        state = decode_step(model.params, state, cfg=cfg, attention=attention)
        new, finished_now = jax.device_get((state.last_tokens, state.finished))
        for i in np.flatnonzero(~finished):
            outputs[i].append(int(new[i]))
        finished = finished_now
    return outputs


def greedy_generate(model: Model, prompts, max_new_tokens: int, stop_at_eos: bool = True) -> list[list[int]]:
    return generate_plain(model, prompts, max_new_tokens, stop_at_eos=stop_at_eos)
