"""The on-device speculative loop for device drafters (draft model, EAGLE-3, Token Recycling).

One jitted step fuses draft -> verify -> accept -> drafter update; a
``lax.while_loop`` runs up to ``steps_per_sync`` of them before the host looks
at the batch again (to stream progress, check stop strings and see whether
every row has finished). Emitted tokens accumulate in a device buffer, so the
host reads back only them. ``steps_per_sync=1`` is the host loop: the same
step, one host round trip per step.

``generate_on_device`` returns the same ``GenerationResult``s as
``Engine.generate``; greedy output equals plain greedy decoding token for token.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.device import DeviceDrafter
from specjax.engine.engine import MIN_CACHE_BUCKET, GenerationResult, next_power_of_two
from specjax.engine.plain import pad_prompts
from specjax.engine.sampling import SamplingParams
from specjax.engine.state import DecodeState
from specjax.engine.steps import prefill, step_impl
from specjax.models.config import ModelConfig
from specjax.models.sharding import cache_sharding

DEFAULT_STEPS_PER_SYNC = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoopState:
    """Everything the device loop carries: target state, drafter state, the output buffer."""

    state: DecodeState
    dstate: Any
    out_tokens: jax.Array  # int32[B, max_new_tokens] emitted tokens (the first one included)
    out_len: jax.Array  # int32[B]
    passes: jax.Array  # int32[B] target passes per row (prefill included)
    accepted: jax.Array  # int32[B] accepted draft tokens per row
    key: jax.Array  # drafting randomness (sampled rows draw children from q)


def device_step(params, dparams, loop: LoopState, *, drafter: DeviceDrafter, cfg: ModelConfig, attention: str,
                with_q: bool) -> LoopState:
    """One speculative step on the device: propose, verify + accept, drafter update, record."""
    key, sub = jax.random.split(loop.key)
    state = loop.state
    active = ~state.finished
    tree, dstate = drafter.propose(dparams, loop.dstate, state.last_tokens, state.lengths, state.sampling, sub,
                                   with_q=with_q)
    state, acc, aux = step_impl(params, state, tree, cfg=cfg, attention=attention, eos_ids=cfg.eos_token_ids,
                                hidden_layers=tuple(drafter.hidden_layers))
    dstate = drafter.update(dparams, dstate, acc, aux)
    b, n = acc.tokens.shape
    width = loop.out_tokens.shape[1]
    slots = loop.out_len[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    slots = jnp.where(jnp.arange(n)[None, :] < acc.num[:, None], slots, width)  # width -> dropped
    out = loop.out_tokens.at[jnp.arange(b)[:, None], slots].set(acc.tokens, mode="drop")
    return LoopState(state, dstate, out, loop.out_len + acc.num, loop.passes + active.astype(jnp.int32),
                     loop.accepted + acc.num_draft_accepted, key)


@functools.partial(jax.jit, static_argnames=("drafter", "cfg", "attention", "with_q"), donate_argnums=(2,))
def run_steps(params, dparams, loop: LoopState, steps: jax.Array, *, drafter: DeviceDrafter, cfg: ModelConfig,
              attention: str, with_q: bool) -> LoopState:
    """Up to ``steps`` (a runtime int: no recompile per value) device steps, stopping early once
    every row has finished."""

    def cond(carry):
        i, loop = carry
        return (i < steps) & ~jnp.all(loop.state.finished)

    def body(carry):
        i, loop = carry
        return i + 1, device_step(params, dparams, loop, drafter=drafter, cfg=cfg, attention=attention,
                                  with_q=with_q)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), loop))[1]


@functools.partial(jax.jit, static_argnames=("drafter",))
def _drafter_prefill(dparams, dstate, tokens, lengths, first, hidden, *, drafter: DeviceDrafter):
    return drafter.prefill(dparams, dstate, tokens, lengths, first, hidden)


def generate_on_device(engine, prompts: Sequence, max_new_tokens: int = 128, *, temperature=0.0, top_p=1.0,
                       top_k=0, seed: int = 0, stop: Sequence[str] = (), progress=None,
                       steps_per_sync: int = DEFAULT_STEPS_PER_SYNC,
                       drafter: Optional[DeviceDrafter] = None) -> list[GenerationResult]:
    """``Engine.generate`` for a device drafter (``engine.drafter`` unless ``drafter`` is given).

    Prompts run in batches of ``engine.max_batch_size``; ``temperature``,
    ``top_p`` and ``top_k`` are scalars or one value per prompt.
    """
    drafter = drafter if drafter is not None else engine.drafter
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if steps_per_sync < 1:
        raise ValueError(f"steps_per_sync must be >= 1, got {steps_per_sync}")
    encoded = [engine.encode(p) for p in prompts]
    sampling = SamplingParams.make(len(encoded), temperature, top_k, top_p)
    per_prompt = {k: np.asarray(getattr(sampling, k)) for k in ("temperature", "top_k", "top_p")}
    results: list[GenerationResult] = []
    for start in range(0, len(encoded), engine.max_batch_size):
        end = start + engine.max_batch_size
        results.extend(_generate_batch(engine, drafter, encoded[start:end], max_new_tokens,
                                       {k: v[start:end] for k, v in per_prompt.items()}, seed + start,
                                       tuple(stop), progress, steps_per_sync))
    return results


@dataclasses.dataclass(frozen=True)
class DeviceBatch:
    """One batch of prompts padded to the engine's buckets and prefilled by the target."""

    rows: int  # the batch bucket: len(prompts) real rows, then copies of the last prompt
    tokens: np.ndarray  # int32[rows, width] right-padded prompts, width a prompt bucket
    lengths: np.ndarray  # int32[rows]
    max_len: int  # the cache bucket: prompt + max_new_tokens + a draft tree + root
    sampling: SamplingParams  # per row, the padding rows repeating the last prompt's
    state: DecodeState  # after prefill; the padding rows already finished
    first: jax.Array  # int32[rows] the first generated token
    hidden: Optional[jax.Array]  # the prompt's hidden states at ``hidden_layers`` (None if none)


def prepare_device_batch(engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: dict,
                         capacity: int, hidden_layers: tuple[int, ...], seed: int) -> DeviceBatch:
    """Pad ``prompts`` to a batch and prompt bucket, pick the cache bucket for a drafter of tree
    ``capacity``, and prefill; the setup every device-side generation loop starts from."""
    cfg = engine.target.config
    n_req = len(prompts)
    rows = engine.batch_bucket(n_req)
    padded = list(prompts) + [prompts[-1]] * (rows - n_req)  # padding rows finish at once
    tokens, lengths = pad_prompts(padded, cfg.vocab_size, multiple=1)
    width = engine.prompt_bucket(tokens.shape[1])
    tokens = np.pad(tokens, ((0, 0), (0, width - tokens.shape[1])))
    if width + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({width} tokens, padded) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_position_embeddings ({cfg.max_position_embeddings})")
    max_len = next_power_of_two(width + max_new_tokens + capacity + 1, MIN_CACHE_BUCKET)
    sp = SamplingParams.make(rows, *(np.pad(sampling[k], (0, rows - n_req), mode="edge")
                                     for k in ("temperature", "top_k", "top_p")))
    out = prefill(engine.target.params, cfg, jnp.asarray(tokens), jnp.asarray(lengths),
                  jnp.full(rows, max_new_tokens, jnp.int32), jax.random.key(seed), sp, max_len=max_len,
                  attention=engine.attention, hidden_layers=hidden_layers, chunk=engine.prefill_chunk,
                  cache_sharding=None if engine.mesh is None else cache_sharding(cfg, engine.mesh, rows))
    state, first = out[0], out[1]
    hidden = out[2] if hidden_layers else None
    pad_rows = np.arange(rows) >= n_req
    state = state.replace(finished=state.finished | jnp.asarray(pad_rows))
    return DeviceBatch(rows, tokens, lengths, max_len, sp, state, first, hidden)


def _generate_batch(engine, drafter: DeviceDrafter, prompts, max_new_tokens, sampling: dict, seed, stop,
                    progress, steps_per_sync):
    cfg, params = engine.target.config, engine.target.params
    t0 = time.perf_counter()
    n_req = len(prompts)
    batch = prepare_device_batch(engine, prompts, max_new_tokens, sampling, drafter.capacity,
                                 tuple(drafter.hidden_layers), seed)
    rows, state, first = batch.rows, batch.state, batch.first
    with_q = bool(np.any(np.asarray(batch.sampling.temperature) > 0))
    dstate = drafter.init_state(rows, batch.max_len)
    dstate = _drafter_prefill(drafter.params, dstate, jnp.asarray(batch.tokens), jnp.asarray(batch.lengths), first,
                              batch.hidden, drafter=drafter)
    buffer = jnp.zeros((rows, max_new_tokens), jnp.int32).at[:, 0].set(first)
    loop = LoopState(state, dstate, buffer, jnp.ones(rows, jnp.int32), jnp.ones(rows, jnp.int32),
                     jnp.zeros(rows, jnp.int32), jax.random.fold_in(jax.random.key(seed), 1))
    reported = n_req
    _report(progress, n_req)
    finished = np.asarray(loop.state.finished)
    while not finished.all():
        loop = run_steps(params, drafter.params, loop, jnp.int32(steps_per_sync), drafter=drafter, cfg=cfg,
                         attention=engine.attention, with_q=with_q)
        buf, out_len, finished = jax.device_get((loop.out_tokens, loop.out_len, loop.state.finished))
        outputs = [buf[i, : out_len[i]].tolist() for i in range(n_req)]
        total = int(out_len[:n_req].sum())
        _report(progress, total - reported)
        reported = total
        stopped = np.zeros(rows, bool)
        stopped[:n_req] = engine._apply_stop_strings(outputs, stop)
        if stopped.any() and not (finished | stopped).all():
            loop = dataclasses.replace(loop, state=loop.state.replace(finished=loop.state.finished | stopped))
        finished = finished | stopped
    drafter.end_batch(loop.dstate)
    buf, out_len, passes, accepted = jax.device_get((loop.out_tokens, loop.out_len, loop.passes, loop.accepted))
    wall = time.perf_counter() - t0
    outputs = [buf[i, : out_len[i]].tolist() for i in range(n_req)]
    texts = [engine.decode(o) for o in outputs]
    outputs, texts = engine._cut_stops(outputs, texts, stop)
    # Drafting is fused into the device step: all of the loop's time is device (and sync) time.
    return [GenerationResult(token_ids=o, text=t, target_passes=int(passes[i]),
                             accepted_draft_tokens=int(accepted[i]), draft_s=0.0, verify_s=wall / n_req, wall_s=wall)
            for i, (o, t) in enumerate(zip(outputs, texts))]


def _report(progress, n: int) -> None:
    if progress is not None and n:
        progress.update(n)
