"""The on-device speculative loop for device drafters (draft model, EAGLE-3, Token Recycling).

One jitted step fuses draft -> verify -> accept -> drafter update; a
``lax.while_loop`` runs up to ``steps_per_sync`` of them before the host looks
at the batch again (to stream progress, check stop strings and see whether
every row has finished). Emitted tokens accumulate in a device buffer, so the
host reads back only them. ``steps_per_sync=1`` is the host loop: the same
step, one host round trip per step.

``generate_on_device`` returns the same ``GenerationResult``s as
``Engine.generate``; greedy output equals plain greedy decoding token for token.

The auto tree size (``auto=True``, what ``Engine(draft_capacity="auto")``
does): each chunk runs one compiled program per tree-size bucket T (0 = plain
steps), chosen by ``ChunkPolicy`` from the measured step cost of each program
and the drafter's calibrated claims. A smaller bucket verifies the drafter's
most probable T nodes (``keep_best``); a plain chunk still runs the drafter's
``update`` on every emitted token, so its state (Token Recycling's table, a
draft model's cache) stays valid across switches; a drafter with ``catch_up``
(the draft model) skips it in plain steps and is fed their tokens in one pass
when the next speculative chunk starts. The programs share one loop state, so
switching compiles nothing once each bucket has run.
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
from specjax.engine.autotune import ChunkPolicy, capacity_buckets
from specjax.engine.engine import MIN_CACHE_BUCKET, GenerationResult, next_power_of_two, report_progress
from specjax.engine.plain import pad_prompts
from specjax.engine.sampling import SamplingParams
from specjax.engine.state import DecodeState
from specjax.engine.steps import prefill, step_impl
from specjax.engine.tree import DraftTree
from specjax.models.config import ModelConfig
from specjax.models.sharding import cache_sharding

DEFAULT_STEPS_PER_SYNC = 8
MEASURE_STEPS = 4  # steps of a chunk that times a bucket for the first time, or probes one


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
    claimed: jax.Array  # float32[len(buckets)] drafter's claimed accepted tokens per bucket size, summed
    row_steps: jax.Array  # int32 active row-steps that drafted (the claims' denominator)
    steps: jax.Array  # int32 fused steps run
    fed: jax.Array  # int32[B] output tokens the drafter has seen (less after plain steps of a catch-up drafter)


def keep_best(tree: DraftTree, capacity: int) -> tuple[DraftTree, jax.Array]:
    """The ``capacity`` most probable nodes of each row's tree, and their slots in it [B, capacity].

    A node's path probability never exceeds its parent's and ties go to the lower
    slot (the parent), so the kept nodes include every kept node's parent; kept in
    slot order, parents still precede children. Only for point-mass drafts (no
    ``q_dists``): sampled trees must keep whole groups of i.i.d. children.
    """
    b = tree.tokens.shape[0]
    probs = tree.valid.astype(jnp.float32) if tree.draft_probs is None else tree.draft_probs
    kept = jnp.sort(jax.lax.top_k(jnp.where(tree.valid, probs, -1.0), capacity)[1], axis=1).astype(jnp.int32)
    slot_of = jnp.full(tree.tokens.shape, -1, jnp.int32).at[jnp.arange(b)[:, None], kept].set(
        jnp.arange(capacity, dtype=jnp.int32)[None, :])
    parents = jnp.take_along_axis(tree.parents, kept, axis=1)
    new_parents = jnp.where(parents < 0, -1, jnp.take_along_axis(slot_of, jnp.maximum(parents, 0), axis=1))
    valid = jnp.take_along_axis(tree.valid, kept, axis=1) & ((parents < 0) | (new_parents >= 0))
    pick = lambda x: None if x is None else jnp.take_along_axis(x, kept, axis=1)
    return DraftTree(pick(tree.tokens), jnp.where(valid, new_parents, -1), valid, pick(tree.draft_probs)), kept


def claims_by_size(tree: DraftTree, active: jax.Array, buckets: tuple[int, ...]) -> jax.Array:
    """float32[len(buckets)]: per bucket T, the sum over active rows of the drafter's path
    probabilities of its T most probable nodes (its expected accepted tokens at that size)."""
    probs = tree.valid.astype(jnp.float32) if tree.draft_probs is None else tree.draft_probs
    ranked = -jnp.sort(-jnp.where(tree.valid, probs, 0.0), axis=1)
    cum = jnp.concatenate([jnp.zeros((ranked.shape[0], 1)), jnp.cumsum(ranked, axis=1)], axis=1)
    sizes = jnp.asarray([min(t, ranked.shape[1]) for t in buckets], jnp.int32)
    return jnp.sum(jnp.where(active[:, None], cum[:, sizes], 0.0), axis=0)


def _plain_tree(rows: int) -> DraftTree:
    return DraftTree(jnp.zeros((rows, 0), jnp.int32), jnp.full((rows, 0), -1, jnp.int32), jnp.zeros((rows, 0), bool))


def device_step(params, dparams, loop: LoopState, *, drafter: DeviceDrafter, cfg: ModelConfig, attention: str,
                with_q: bool, capacity: Optional[int] = None, buckets: tuple[int, ...] = ()) -> LoopState:
    """One step on the device: propose (unless ``capacity`` is 0: a plain step), keep the best
    ``capacity`` nodes (default: the drafter's whole tree), verify + accept, drafter update, record."""
    key, sub = jax.random.split(loop.key)
    state = loop.state
    active = ~state.finished
    capacity = drafter.capacity if capacity is None else capacity
    claimed, row_steps, dstate = loop.claimed, loop.row_steps, loop.dstate
    lazy = capacity == 0 and hasattr(drafter, "catch_up")  # fed later, in one pass (see ``catch_up``)
    if capacity == 0:
        tree = _plain_tree(active.shape[0])
    else:
        tree, dstate = drafter.propose(dparams, dstate, state.last_tokens, state.lengths, state.sampling, sub,
                                       with_q=with_q)
        if buckets:
            claimed = claimed + claims_by_size(tree, active, buckets)
            row_steps = row_steps + jnp.sum(active, dtype=jnp.int32)
        if capacity < drafter.capacity:
            if tree.q_dists is not None:
                raise ValueError("a sampled tree (with q) keeps its whole size: its children are i.i.d. groups")
            tree, kept = keep_best(tree, capacity)
            if hasattr(drafter, "restrict"):  # a drafter pairing its own nodes with the verifier's outputs
                dstate = drafter.restrict(dstate, kept, tree.valid)
    state, acc, aux = step_impl(params, state, tree, cfg=cfg, attention=attention, eos_ids=cfg.eos_token_ids,
                                hidden_layers=tuple(drafter.hidden_layers))
    if not lazy:
        dstate = drafter.update(dparams, dstate, acc, aux)
    b, n = acc.tokens.shape
    width = loop.out_tokens.shape[1]
    slots = loop.out_len[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    slots = jnp.where(jnp.arange(n)[None, :] < acc.num[:, None], slots, width)  # width -> dropped
    out = loop.out_tokens.at[jnp.arange(b)[:, None], slots].set(acc.tokens, mode="drop")
    return LoopState(state, dstate, out, loop.out_len + acc.num, loop.passes + active.astype(jnp.int32),
                     loop.accepted + acc.num_draft_accepted, key, claimed, row_steps, loop.steps + 1,
                     loop.fed if lazy else loop.out_len + acc.num)


CATCH_UP_WIDTH = 8  # tokens per catch-up pass


def catch_up(dparams, loop: LoopState, drafter: DeviceDrafter) -> LoopState:
    """Feed a catch-up drafter (a draft model) the tokens plain steps emitted without it, in
    passes of ``CATCH_UP_WIDTH`` tokens per row, so its state is current before it drafts again."""
    width = loop.out_tokens.shape[1]

    def body(carry):
        fed, dstate = carry
        index = jnp.minimum(fed[:, None] + jnp.arange(CATCH_UP_WIDTH, dtype=jnp.int32)[None, :], width - 1)
        num = jnp.clip(loop.out_len - fed, 0, CATCH_UP_WIDTH)
        tokens = jnp.take_along_axis(loop.out_tokens, index, axis=1)
        return fed + num, drafter.catch_up(dparams, dstate, tokens, num)

    fed, dstate = jax.lax.while_loop(lambda c: jnp.any(c[0] < loop.out_len), body, (loop.fed, loop.dstate))
    return dataclasses.replace(loop, dstate=dstate, fed=fed)


@functools.partial(jax.jit, static_argnames=("drafter", "cfg", "attention", "with_q", "capacity", "buckets"),
                   donate_argnums=(2,))
def run_steps(params, dparams, loop: LoopState, steps: jax.Array, *, drafter: DeviceDrafter, cfg: ModelConfig,
              attention: str, with_q: bool, capacity: Optional[int] = None,
              buckets: tuple[int, ...] = ()) -> LoopState:
    """Up to ``steps`` (a runtime int: no recompile per value) device steps of tree size
    ``capacity`` (see ``device_step``), stopping early once every row has finished."""

    if capacity != 0 and hasattr(drafter, "catch_up"):
        loop = catch_up(dparams, loop, drafter)

    def cond(carry):
        i, loop = carry
        return (i < steps) & ~jnp.all(loop.state.finished)

    def body(carry):
        i, loop = carry
        return i + 1, device_step(params, dparams, loop, drafter=drafter, cfg=cfg, attention=attention,
                                  with_q=with_q, capacity=capacity, buckets=buckets)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), loop))[1]


@functools.partial(jax.jit, static_argnames=("drafter",))
def _drafter_prefill(dparams, dstate, tokens, lengths, first, hidden, *, drafter: DeviceDrafter):
    return drafter.prefill(dparams, dstate, tokens, lengths, first, hidden)


def generate_on_device(engine, prompts: Sequence, max_new_tokens: int = 128, *, temperature=0.0, top_p=1.0,
                       top_k=0, seed: int = 0, stop: Sequence[str] = (), progress=None,
                       steps_per_sync: int = DEFAULT_STEPS_PER_SYNC,
                       drafter: Optional[DeviceDrafter] = None, auto: bool = False,
                       max_capacity: Optional[int] = None) -> list[GenerationResult]:
    """``Engine.generate`` for a device drafter (``engine.drafter`` unless ``drafter`` is given).

    Prompts run in batches of ``engine.max_batch_size``; ``temperature``,
    ``top_p`` and ``top_k`` are scalars or one value per prompt. ``auto``: the
    tree size per chunk from measured costs and calibrated claims (see the
    module docstring), among ``capacity_buckets`` up to ``max_capacity``
    (default: the drafter's capacity); otherwise the drafter's own capacity.
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
                                       tuple(stop), progress, steps_per_sync, auto, max_capacity))
    return results


def chunk_policy(engine, drafter: DeviceDrafter, rows: int, max_len: int, with_q: bool,
                 max_capacity: Optional[int]) -> ChunkPolicy:
    """The engine's policy for this drafter and bucket, kept across batches (its measured costs
    and calibration carry over, so steady-state batches measure nothing)."""
    policies = engine.__dict__.setdefault("_chunk_policies", {})
    key = (drafter, rows, max_len, with_q, max_capacity)
    if key not in policies:
        top = drafter.capacity if max_capacity is None else max(1, min(max_capacity, drafter.capacity))
        buckets = (0, drafter.capacity) if with_q else capacity_buckets(top)  # sampled trees keep their size
        policies[key] = ChunkPolicy(costs={}, buckets=buckets)
    return policies[key]


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
                    progress, steps_per_sync, auto=False, max_capacity=None):
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
    policy = chunk_policy(engine, drafter, rows, batch.max_len, with_q, max_capacity) if auto else None
    buckets = policy.buckets if policy is not None else ()
    loop = LoopState(state, dstate, buffer, jnp.ones(rows, jnp.int32), jnp.ones(rows, jnp.int32),
                     jnp.zeros(rows, jnp.int32), jax.random.fold_in(jax.random.key(seed), 1),
                     jnp.zeros(len(buckets), jnp.float32), jnp.int32(0), jnp.int32(0), jnp.ones(rows, jnp.int32))
    reported = n_req
    report_progress(progress, n_req)
    finished = np.asarray(loop.state.finished)
    run = functools.partial(run_steps, params, drafter.params, drafter=drafter, cfg=cfg, attention=engine.attention,
                            with_q=with_q, buckets=buckets)
    if policy is not None:  # compile every bucket's program now (zero-step calls), not inside a timed chunk
        for capacity in policy.unmeasured():
            loop = run(loop, jnp.int32(0), capacity=capacity)
    while not finished.all():
        if policy is None:
            loop = run(loop, jnp.int32(steps_per_sync))
            buf, out_len, finished = jax.device_get((loop.out_tokens, loop.out_len, loop.state.finished))
        else:
            loop, (buf, out_len, finished) = _timed_chunk(run, loop, policy, steps_per_sync)
        outputs = [buf[i, : out_len[i]].tolist() for i in range(n_req)]
        total = int(out_len[:n_req].sum())
        report_progress(progress, total - reported)
        reported = total
        stopped = np.zeros(rows, bool)
        stopped[:n_req] = engine.stop_string_hits(outputs, stop)
        if stopped.any() and not (finished | stopped).all():
            loop = dataclasses.replace(loop, state=loop.state.replace(finished=loop.state.finished | stopped))
        finished = finished | stopped
    drafter.end_batch(loop.dstate)
    buf, out_len, passes, accepted = jax.device_get((loop.out_tokens, loop.out_len, loop.passes, loop.accepted))
    wall = time.perf_counter() - t0
    outputs = [buf[i, : out_len[i]].tolist() for i in range(n_req)]
    texts = [engine.decode(o) for o in outputs]
    outputs, texts = engine.cut_stops(outputs, texts, stop)
    # Drafting is fused into the device step: all of the loop's time is device (and sync) time.
    return [GenerationResult(token_ids=o, text=t, target_passes=int(passes[i]),
                             accepted_draft_tokens=int(accepted[i]), draft_s=0.0, verify_s=wall / n_req, wall_s=wall)
            for i, (o, t) in enumerate(zip(outputs, texts))]


def _timed_chunk(run, loop: LoopState, policy: ChunkPolicy, steps: int):
    """One chunk at the policy's T, timed and folded into the policy. A bucket still unmeasured
    runs a short chunk (``MEASURE_STEPS``), so that every bucket is timed early in the first batch;
    so does a probe, which is expected not to pay."""
    capacity = policy.choose()
    if capacity in policy.unmeasured() or policy.probing:
        steps = min(steps, MEASURE_STEPS)
    before = jax.device_get((loop.claimed, loop.row_steps, loop.steps, loop.accepted))
    t0 = time.perf_counter()
    loop = run(loop, jnp.int32(steps), capacity=capacity)
    out = jax.device_get((loop.out_tokens, loop.out_len, loop.state.finished))
    seconds = time.perf_counter() - t0
    claimed, row_steps, n_steps, accepted = jax.device_get((loop.claimed, loop.row_steps, loop.steps, loop.accepted))
    policy.record(capacity, seconds, int(n_steps - before[2]), int(row_steps - before[1]), claimed - before[0],
                  int((accepted - before[3]).sum()))
    return loop, out
