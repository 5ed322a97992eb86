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
most probable T nodes (``keep_best``) of a tree proposed for it
(``bucket_proposer``: at most 2T nodes, not the full tree); a plain chunk still
runs the drafter's ``update`` on every emitted token, so its state (Token
Recycling's table) stays valid across switches; a drafter with ``catch_up``
(the draft model, an EAGLE-3 head) skips it in plain steps and is fed their
tokens (a head also the target's features the plain steps kept,
``LoopState.pending_hidden``) in one pass when the next speculative chunk
starts. Its state is *parked* meanwhile: plain chunks run with
``LoopState.dstate`` None, the program plain decoding runs, and a batch that
never drafts never creates it (nor reads its prompts). A drafter with
``first_guess`` (Token Recycling) has each plain step
check its one-node draft against the emitted token (``LoopState.shadow``),
which tells the policy T = 1's acceptance without probing. The programs share
one loop state, so switching compiles nothing once each bucket has run; a
bucket compiles when the
policy first picks it (plain steps and the smallest tree first, larger trees
once the largest one run has paid and the claims say a bigger one would), so
sizes never tried are never compiled.

Once half of a batch's rows have finished, the rest run as a batch of the next
power of two above their count (``live_rows``, ``LoopState.take_rows``): every
step computes every row, so a long tail row would otherwise pay for the whole
batch. The host keeps the dropped rows' results (``_RowBook``); under the auto
size the smaller batch gets its own ``ChunkPolicy`` (its own step costs), told
what the bigger one learned of the drafts (``ChunkPolicy.continue_batch``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.device import DeviceDrafter, bucket_proposer
from specjax.engine.autotune import ChunkPolicy, capacity_buckets
from specjax.engine.compile_cache import CompileClock
from specjax.engine.engine import MIN_CACHE_BUCKET, GenerationResult, next_power_of_two, report_progress
from specjax.engine.image_prompts import batch_input_embeds
from specjax.engine.plain import pad_prompts
from specjax.engine.sampling import SamplingParams, request_keys, request_seeds
from specjax.engine.state import DecodeState
from specjax.engine.steps import prefill, step_impl, token_logprobs
from specjax.engine.trace import TraceStep
from specjax.engine.tree import DraftTree
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
    claimed: jax.Array  # float32[len(buckets)] drafter's claimed accepted tokens per bucket size, summed
    row_steps: jax.Array  # int32 active row-steps that drafted (the claims' denominator)
    steps: jax.Array  # int32 fused steps run
    fed: jax.Array  # int32[B] output tokens the drafter has seen (less after plain steps of a catch-up drafter)
    step_log: jax.Array  # int32[B, max_new_tokens, 2] per pass after prefill: (tokens emitted, drafts accepted)
    out_logprobs: Optional[jax.Array] = None  # float32[B, max_new_tokens] of out_tokens, when asked (see accept)
    # [L, B, max_new_tokens, H]: for a catch-up drafter that reads the target's features (EAGLE-3), those
    # of the position before each output token, written by plain steps until ``catch_up`` feeds them
    pending_hidden: Optional[jax.Array] = None
    # int32[2] for a drafter with ``first_guess`` under the auto size: (plain row-steps whose emitted
    # token was the drafter's first guess, plain row-steps): T = 1's acceptance, seen without verifying
    shadow: Optional[jax.Array] = None

    @classmethod
    def start(cls, state: DecodeState, dstate: Any, width: int, *, n_buckets: int = 0,
              first: Optional[jax.Array] = None, first_logprobs: Optional[jax.Array] = None,
              logprobs: bool = False) -> "LoopState":
        """A loop before its first fused step: one pass (the prefill) per row, and the prefill's
        token already in the buffer when ``first`` is given (the drafter has seen it)."""
        rows = state.lengths.shape[0]
        out = jnp.zeros((rows, width), jnp.int32)
        n_first = 0 if first is None else 1
        if first is not None:
            out = out.at[:, 0].set(first)
        out_logprobs = None
        if logprobs:
            out_logprobs = jnp.zeros((rows, width), jnp.float32)
            if first_logprobs is not None:
                out_logprobs = out_logprobs.at[:, 0].set(first_logprobs)
        out_len, fed = (jnp.full(rows, n_first, jnp.int32) for _ in range(2))  # two buffers: both are donated
        return cls(state, dstate, out, out_len, jnp.ones(rows, jnp.int32), jnp.zeros(rows, jnp.int32),
                   jnp.zeros(n_buckets, jnp.float32), jnp.int32(0), jnp.int32(0), fed,
                   jnp.zeros((rows, width, 2), jnp.int32), out_logprobs)

    def take_rows(self, index: jax.Array, drafter: DeviceDrafter) -> "LoopState":
        """The loop of batch rows ``index`` alone (``live_rows``); the counters summed over the
        batch (claims, row-steps, fused steps, first-guess hits) carry over."""
        rows = lambda x: None if x is None else x[index]
        pending = None if self.pending_hidden is None else self.pending_hidden[:, index]
        dstate = None if self.dstate is None else drafter.take_rows(self.dstate, index)  # None: parked
        return dataclasses.replace(self, state=self.state.take_rows(index), dstate=dstate,
                                   out_tokens=rows(self.out_tokens), out_len=rows(self.out_len),
                                   passes=rows(self.passes), accepted=rows(self.accepted), fed=rows(self.fed),
                                   step_log=rows(self.step_log), out_logprobs=rows(self.out_logprobs),
                                   pending_hidden=pending)


def live_rows(finished: np.ndarray) -> Optional[np.ndarray]:
    """int32 rows to keep once at least half of a batch has finished: the live ones, then copies of
    a finished one up to a power of two (a batch size that compiles once). None while more than
    half still decode, or none do. Every step computes every row, finished or not, so a long tail
    row otherwise pays for a whole batch."""
    live = np.flatnonzero(~finished)
    rows = next_power_of_two(len(live))
    if not len(live) or rows > len(finished) // 2:
        return None
    return np.concatenate([live, np.full(rows - len(live), np.flatnonzero(finished)[0])]).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("drafter",))
def _take_loop_rows(loop: LoopState, index: jax.Array, *, drafter: DeviceDrafter) -> LoopState:
    return loop.take_rows(index, drafter)


@functools.partial(jax.jit, static_argnames=("drafter",))
def _take_drafter_rows(dstate, index: jax.Array, *, drafter: DeviceDrafter):
    return drafter.take_rows(dstate, index)


def keep_best(tree: DraftTree, capacity: int) -> tuple[DraftTree, jax.Array]:
    """The ``capacity`` most probable nodes of each row's tree, and their slots in it [B, capacity].

    A node's path probability never exceeds its parent's and ties go to the lower
    slot (the parent), so the kept nodes include every kept node's parent; kept in
    slot order, parents still precede children. Sampled trees are cut alike: acceptance
    walks any tree with the target's own draws (``steps._sampled_walk``), and a sampled
    node's probability is its path's under q, so the most probable nodes are kept.
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


@dataclasses.dataclass(frozen=True)
class NoDrafter:
    """The device loop's stand-in for no drafter: every step plain, nothing to feed. Plain
    decoding fused into on-device chunks skips the host loop's per-step dispatch and sync (the
    ``Engine`` without a drafter runs this way unless it streams per step or keeps a session)."""

    capacity: int = 0
    hidden_layers: tuple = ()
    params: None = None

    def init_state(self, batch_size: int, max_len: int) -> None:
        return None

    def prefill(self, params, dstate, prompt_tokens, prompt_lengths, first_tokens, hidden) -> None:
        return None

    def propose(self, params, dstate, root_tokens, lengths, sampling, key, *, with_q: bool = False):
        raise AssertionError("NoDrafter has capacity 0: the loop never asks it for a tree")

    def update(self, params, dstate, accepted, aux) -> None:
        return None

    def end_batch(self, dstate) -> None:
        return None

    def take_rows(self, dstate, index) -> None:
        return None


def _plain_tree(rows: int) -> DraftTree:
    return DraftTree(jnp.zeros((rows, 0), jnp.int32), jnp.full((rows, 0), -1, jnp.int32), jnp.zeros((rows, 0), bool))


def device_step(params, dparams, loop: LoopState, *, drafter: DeviceDrafter, cfg: ModelConfig, attention: str,
                with_q: bool, capacity: Optional[int] = None, buckets: tuple[int, ...] = ()) -> LoopState:
    """One step on the device: propose (unless ``capacity`` is 0: a plain step), keep the best
    ``capacity`` nodes (default: the drafter's whole tree), verify + accept, drafter update, record."""
    state = loop.state
    active = ~state.finished
    capacity = drafter.capacity if capacity is None else capacity
    claimed, row_steps, dstate = loop.claimed, loop.row_steps, loop.dstate
    lazy = capacity == 0 and hasattr(drafter, "catch_up")  # fed later, in one pass (see ``catch_up``)
    guess = None
    if capacity == 0:
        tree = _plain_tree(active.shape[0])
        if loop.shadow is not None:  # the drafter's one-node draft, checked against the plain step's token
            guess, known = drafter.first_guess(dparams, dstate, state.last_tokens)
    else:
        proposer = bucket_proposer(drafter, capacity)  # a small bucket: a short tree, not the full one cut
        tree, dstate = proposer.propose(dparams, dstate, state.last_tokens, state.lengths, state.sampling,
                                        state.rng, with_q=with_q)  # draws: (request key, position), see "Seeds"
        if buckets:
            claimed = claimed + claims_by_size(tree, active, buckets)
            row_steps = row_steps + jnp.sum(active, dtype=jnp.int32)
        if capacity < drafter.capacity:  # q is not read by acceptance: any cut of a sampled tree stays lossless
            tree, kept = keep_best(dataclasses.replace(tree, q_dists=None), capacity)
            if hasattr(drafter, "restrict"):  # a drafter pairing its own nodes with the verifier's outputs
                dstate = drafter.restrict(dstate, kept, tree.valid)
    with_logprobs = loop.out_logprobs is not None  # the loop state's structure: a separate program
    state, acc, aux = step_impl(params, state, tree, cfg=cfg, attention=attention, eos_ids=cfg.eos_token_ids,
                                hidden_layers=tuple(drafter.hidden_layers), logprobs=with_logprobs)
    pending_hidden = loop.pending_hidden
    if not lazy:
        dstate = drafter.update(dparams, dstate, acc, aux)
    elif pending_hidden is not None:  # kept for ``catch_up``: the root's features pair with the new token
        slot = jnp.where(active, loop.out_len, pending_hidden.shape[2])
        pending_hidden = pending_hidden.at[:, jnp.arange(active.shape[0]), slot].set(
            aux.hidden[:, :, 0].astype(pending_hidden.dtype), mode="drop")
    shadow = loop.shadow
    if guess is not None:
        hits = active & known & (acc.num > 0) & (acc.tokens[:, 0] == guess)
        shadow = shadow + jnp.stack([jnp.sum(hits, dtype=jnp.int32), jnp.sum(active, dtype=jnp.int32)])
    b, n = acc.tokens.shape
    width = loop.out_tokens.shape[1]
    slots = loop.out_len[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
    slots = jnp.where(jnp.arange(n)[None, :] < acc.num[:, None], slots, width)  # width -> dropped
    out = loop.out_tokens.at[jnp.arange(b)[:, None], slots].set(acc.tokens, mode="drop")
    out_logprobs = None if not with_logprobs else loop.out_logprobs.at[jnp.arange(b)[:, None], slots].set(
        acc.logprobs, mode="drop")
    log_slot = jnp.where(active, loop.passes - 1, loop.step_log.shape[1])  # finished rows: dropped
    step_log = loop.step_log.at[jnp.arange(b), log_slot].set(
        jnp.stack([acc.num, acc.num_draft_accepted], axis=-1), mode="drop")
    return LoopState(state, dstate, out, loop.out_len + acc.num, loop.passes + active.astype(jnp.int32),
                     loop.accepted + acc.num_draft_accepted, claimed, row_steps, loop.steps + 1,
                     loop.fed if lazy else loop.out_len + acc.num, step_log, out_logprobs, pending_hidden, shadow)


CATCH_UP_WIDTH = 8  # tokens per catch-up pass


def catch_up(dparams, loop: LoopState, drafter: DeviceDrafter) -> LoopState:
    """Feed a catch-up drafter (a draft model, an EAGLE-3 head) the tokens plain steps emitted
    without it (and, for a head, the target's features they kept), in passes of ``CATCH_UP_WIDTH``
    tokens per row, so its state is current before it drafts again."""
    width = loop.out_tokens.shape[1]

    def body(carry):
        fed, dstate = carry
        index = jnp.minimum(fed[:, None] + jnp.arange(CATCH_UP_WIDTH, dtype=jnp.int32)[None, :], width - 1)
        num = jnp.clip(loop.out_len - fed, 0, CATCH_UP_WIDTH)
        tokens = jnp.take_along_axis(loop.out_tokens, index, axis=1)
        if loop.pending_hidden is None:
            return fed + num, drafter.catch_up(dparams, dstate, tokens, num)
        hidden = jnp.take_along_axis(loop.pending_hidden, index[None, :, :, None], axis=2)
        return fed + num, drafter.catch_up(dparams, dstate, tokens, num, hidden)

    fed, dstate = jax.lax.while_loop(lambda c: jnp.any(c[0] < loop.out_len), body, (loop.fed, loop.dstate))
    return dataclasses.replace(loop, dstate=dstate, fed=fed)


@functools.partial(jax.jit, static_argnames=("drafter", "cfg", "attention", "with_q", "capacity", "buckets"),
                   donate_argnums=(2,))
def run_steps(params, dparams, loop: LoopState, steps: jax.Array, *, drafter: DeviceDrafter, cfg: ModelConfig,
              attention: str, with_q: bool, capacity: Optional[int] = None,
              buckets: tuple[int, ...] = ()) -> LoopState:
    """Up to ``steps`` (a runtime int: no recompile per value) device steps of tree size
    ``capacity`` (see ``device_step``), stopping early once every row has finished."""

    if capacity != 0 and buckets and hasattr(drafter, "catch_up"):  # only the auto size's plain chunks leave
        loop = catch_up(dparams, loop, drafter)  # a catch-up drafter behind (``buckets``: the auto size)

    def cond(carry):
        i, loop = carry
        return (i < steps) & ~jnp.all(loop.state.finished)

    def body(carry):
        i, loop = carry
        return i + 1, device_step(params, dparams, loop, drafter=drafter, cfg=cfg, attention=attention,
                                  with_q=with_q, capacity=capacity, buckets=buckets)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), loop))[1]


PLAIN_CHUNK_STEPS = DEFAULT_STEPS_PER_SYNC  # the most plain steps a host-loop batch fuses per sync


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "logprobs"), donate_argnums=(1,))
def run_plain_chunk(params, state: DecodeState, steps: jax.Array, *, cfg: ModelConfig, attention: str,
                    logprobs: bool = False) -> tuple[DecodeState, tuple]:
    """Up to ``steps`` (a runtime int, clipped to ``PLAIN_CHUNK_STEPS``) plain steps of a host-loop
    batch fused into one dispatch: what the ``Engine`` runs while "auto" has its host drafter paused,
    instead of one dispatch and sync per token. Donates ``state``. Returns the new state and, for the
    host to read, (tokens[B, PLAIN_CHUNK_STEPS], emitted per row, logprobs or None, fused steps run)."""
    width = PLAIN_CHUNK_STEPS
    loop = LoopState.start(state, None, width, logprobs=logprobs)
    loop = run_steps(params, None, loop, jnp.clip(steps, 0, width), drafter=NoDrafter(), cfg=cfg,
                     attention=attention, with_q=False)
    return loop.state, (loop.out_tokens, loop.out_len, loop.out_logprobs, loop.steps)


@functools.partial(jax.jit, static_argnames=("drafter",))
def _drafter_prefill(dparams, dstate, tokens, lengths, first, hidden, *, drafter: DeviceDrafter):
    return drafter.prefill(dparams, dstate, tokens, lengths, first, hidden)


def generate_on_device(engine, prompts: Sequence, max_new_tokens: int = 128, *, temperature=0.0, top_p=1.0,
                       top_k=0, seed=0, stop: Sequence[str] = (), progress=None,
                       steps_per_sync: int = DEFAULT_STEPS_PER_SYNC,
                       drafter: Optional[DeviceDrafter] = None, auto: bool = False,
                       max_capacity: Optional[int] = None, logprobs: bool = False) -> list[GenerationResult]:
    """``Engine.generate`` for a device drafter (``engine.drafter`` unless ``drafter`` is given).

    Prompts run in batches of ``engine.max_batch_size``; ``temperature``,
    ``top_p`` and ``top_k`` are scalars or one value per prompt. ``auto``: the
    tree size per chunk from measured costs and calibrated claims (see the
    module docstring), among ``capacity_buckets`` up to ``max_capacity``
    (default: the drafter's capacity); otherwise the drafter's own capacity.
    ``logprobs``: as ``Engine.generate``'s, kept in a device buffer beside the tokens.
    """
    drafter = drafter if drafter is not None else engine.drafter
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if steps_per_sync < 1:
        raise ValueError(f"steps_per_sync must be >= 1, got {steps_per_sync}")
    encoded = [engine.encode(p) for p in prompts]
    sampling = SamplingParams.make(len(encoded), temperature, top_k, top_p)
    per_prompt = {k: np.asarray(getattr(sampling, k)) for k in ("temperature", "top_k", "top_p")}
    seeds = request_seeds(seed, len(encoded))
    results: list[GenerationResult] = []
    for start in range(0, len(encoded), engine.max_batch_size):
        end = start + engine.max_batch_size
        results.extend(_generate_batch(engine, drafter, encoded[start:end], max_new_tokens,
                                       {k: v[start:end] for k, v in per_prompt.items()}, seeds[start:end],
                                       tuple(stop), progress, steps_per_sync, auto, max_capacity, logprobs))
    return results


def chunk_policy(engine, drafter: DeviceDrafter, rows: int, max_len: int, with_q: bool,
                 max_capacity: Optional[int]) -> ChunkPolicy:
    """The engine's policy for this drafter and bucket, kept across batches (its measured costs
    and calibration carry over, so steady-state batches measure nothing)."""
    policies = engine.__dict__.setdefault("_chunk_policies", {})
    key = (drafter, rows, max_len, with_q, max_capacity)
    if key not in policies:
        policies[key] = ChunkPolicy(costs={}, buckets=chunk_buckets(drafter, max_capacity))
    return policies[key]


def chunk_buckets(drafter: DeviceDrafter, max_capacity: Optional[int]) -> tuple[int, ...]:
    """The auto size's tree sizes: buckets up to ``max_capacity`` (default: the drafter's capacity)."""
    top = drafter.capacity if max_capacity is None else max(1, min(max_capacity, drafter.capacity))
    return capacity_buckets(top)


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
    first_logprobs: Optional[jax.Array] = None  # float32[rows] of ``first``, with ``return_logits``


def prepare_device_batch(engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: dict,
                         capacity: int, hidden_layers: tuple[int, ...], seeds,
                         return_logits: bool = False) -> DeviceBatch:
    """Pad ``prompts`` to a batch and prompt bucket, pick the cache bucket for a drafter of tree
    ``capacity``, and prefill; the setup every device-side generation loop starts from. ``seeds``:
    the requests' seeds (an int: request i gets ``seeds + i``; see ``request_seeds``). ``return_logits``:
    also the first tokens' log-probabilities (``token_logprobs``)."""
    cfg = engine.target.config
    n_req = len(prompts)
    rows = engine.batch_bucket(n_req)
    padded = list(prompts) + [prompts[-1]] * (rows - n_req)  # padding rows finish at once
    tokens, lengths = pad_prompts(padded, cfg.vocab_size, multiple=1)
    longest, width = tokens.shape[1], engine.prompt_bucket(tokens.shape[1])
    tokens = np.pad(tokens, ((0, 0), (0, width - longest)))
    if longest + max_new_tokens > cfg.max_position_embeddings:  # the real length: padding is never a position
        raise ValueError(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's max_position_embeddings ({cfg.max_position_embeddings})")
    # The drafters prefill the padded width into their own caches too: cover it and a root slot.
    max_len = next_power_of_two(max(width + 1, longest + max_new_tokens + capacity + 1), MIN_CACHE_BUCKET)
    sp = SamplingParams.make(rows, *(np.pad(sampling[k], (0, rows - n_req), mode="edge")
                                     for k in ("temperature", "top_k", "top_p")))
    keys = request_keys(np.pad(request_seeds(seeds, n_req), (0, rows - n_req), mode="edge"))
    out = prefill(engine.target.params, cfg, tokens, lengths, np.full(rows, max_new_tokens, np.int32), keys, sp,
                  max_len=max_len, attention=engine.attention, hidden_layers=hidden_layers,
                  chunk=engine.prefill_chunk,  # numpy inputs: checked on the host without a sync
                  cache_sharding=None if engine.mesh is None else cache_sharding(cfg, engine.mesh, rows),
                  return_logits=return_logits, input_embeds=batch_input_embeds(padded, width))
    state, first, hidden = out.state, out.first_tokens, out.hidden
    pad_rows = np.arange(rows) >= n_req
    state = state.replace(finished=state.finished | jnp.asarray(pad_rows))
    first_logprobs = None if out.logits is None else token_logprobs(out.logits, first, sp)
    return DeviceBatch(rows, tokens, lengths, max_len, sp, state, first, hidden, first_logprobs)


class _RowBook:
    """The host's view of a batch that shrinks (``live_rows``): the batch row each loop row holds
    (-1 for a padding copy) and the results of the rows dropped once finished."""

    def __init__(self, rows: int, n_req: int):
        self.ids = np.arange(rows)
        self.n_req = n_req
        self.kept: dict[int, tuple] = {}  # batch row -> (tokens, passes, accepted, step log, logprobs)
        self.all_passes = np.ones(rows, np.int32)  # per batch row, for the traces

    def passes(self, passes: np.ndarray) -> np.ndarray:
        """Passes per batch row after a chunk, from the loop rows' ``passes``."""
        held = self.ids >= 0
        self.all_passes[self.ids[held]] = passes[held]
        return self.all_passes.copy()

    def outputs(self, buf: np.ndarray, out_len: np.ndarray) -> list[list[int]]:
        """Every request's tokens so far, in request order."""
        out = {row: kept[0] for row, kept in self.kept.items()}
        out.update({int(row): buf[j, : out_len[j]].tolist() for j, row in enumerate(self.ids)
                    if 0 <= row < self.n_req})
        return [out[i] for i in range(self.n_req)]

    def by_loop_row(self, per_request: np.ndarray) -> np.ndarray:
        """bool per loop row of a per-request flag (False for padding rows)."""
        real = (self.ids >= 0) & (self.ids < self.n_req)
        return np.where(real, np.asarray(per_request, bool)[np.where(real, self.ids, 0)], False)

    def keep(self, rows: tuple, which: np.ndarray) -> None:
        """Store the results of the loop rows ``which`` (bool) from the per-row arrays ``rows``:
        (tokens, lengths, passes, accepted, step log, logprobs or None)."""
        buf, out_len, passes, accepted, step_log, logprobs = rows
        for j in np.flatnonzero(which & (self.ids >= 0) & (self.ids < self.n_req)):
            self.kept[int(self.ids[j])] = (buf[j, : out_len[j]].tolist(), int(passes[j]), int(accepted[j]),
                                           step_log[j], None if logprobs is None else logprobs[j])

    def shrink(self, index: np.ndarray, finished: np.ndarray) -> None:
        """The loop now holds rows ``index`` of the old one; the finished among them are padding."""
        self.ids = np.where(finished[index], -1, self.ids[index])


def _row_results(loop: LoopState) -> tuple:
    """The per-row arrays results are read from, on the host (one sync)."""
    return jax.device_get((loop.out_tokens, loop.out_len, loop.passes, loop.accepted, loop.step_log,
                           loop.out_logprobs))


def _generate_batch(engine, drafter: DeviceDrafter, prompts, max_new_tokens, sampling: dict, seeds, stop,
                    progress, steps_per_sync, auto=False, max_capacity=None, logprobs=False):
    cfg, params = engine.target.config, engine.target.params
    t0 = time.perf_counter()
    n_req = len(prompts)
    with_q = bool(np.any(np.asarray(sampling["temperature"]) > 0))
    # The target's cache holds the verified tree only: the largest bucket, not the drafter's whole
    # proposal (a smaller cache bucket is cheaper attention on every step).
    verified = chunk_buckets(drafter, max_capacity)[-1] if auto else drafter.capacity
    batch = prepare_device_batch(engine, prompts, max_new_tokens, sampling, verified,
                                 tuple(drafter.hidden_layers), seeds, return_logits=logprobs)
    rows, state, first = batch.rows, batch.state, batch.first
    policy = chunk_policy(engine, drafter, rows, batch.max_len, with_q, max_capacity) if auto else None
    if policy is not None:
        policy.start_batch()
    buckets = policy.buckets if policy is not None else ()
    prompt_unread, lazy_prompt = True, policy is not None and hasattr(drafter, "catch_up")
    prompt = (batch.tokens, batch.lengths, first, batch.hidden)  # per loop row: taken along when it shrinks
    parked = None  # a lazy drafter's state while plain chunks run without it (None until it first drafts)

    def ready_drafter(loop: LoopState, capacity: int) -> tuple[LoopState, float]:
        """The loop for a chunk at T, with its drafter's state where the chunk needs it. Under the
        auto size a catch-up drafter (the draft model: plain steps leave it alone) is parked during
        plain chunks, and created and fed the prompt only before the batch's first speculative
        chunk, so a batch that runs plain throughout never pays for either. Returns the loop and the
        seconds that setup took (0.0 when there was none)."""
        nonlocal prompt_unread, parked
        if lazy_prompt and capacity == 0:
            parked = parked if loop.dstate is None else loop.dstate
            return dataclasses.replace(loop, dstate=None), 0.0
        if not prompt_unread:
            if loop.dstate is None:  # the chunk donates it: nothing is parked any more
                loop, parked = dataclasses.replace(loop, dstate=parked), None
            return loop, 0.0
        prompt_unread = False
        if not lazy_prompt:  # read with the batch's setup, before any chunk: nothing to time, no sync
            return dataclasses.replace(loop, dstate=_drafter_prefill(drafter.params, loop.dstate, *prompt,
                                                                     drafter=drafter)), 0.0
        with CompileClock() as compiling:  # a new prompt shape compiles the prefill: not a per-batch cost
            start = time.perf_counter()
            dstate = drafter.init_state(len(prompt[1]), batch.max_len)
            dstate = _drafter_prefill(drafter.params, dstate, *prompt, drafter=drafter)
            dstate = jax.block_until_ready(dstate)  # the policy's setup cost, not in the next chunk's timing
        return dataclasses.replace(loop, dstate=dstate), time.perf_counter() - start - compiling.seconds

    dstate = None if lazy_prompt else drafter.init_state(rows, batch.max_len)
    loop = LoopState.start(state, dstate, max_new_tokens, n_buckets=len(buckets), first=first,
                           first_logprobs=batch.first_logprobs, logprobs=logprobs)
    if lazy_prompt and getattr(drafter, "catch_up_reads_hidden", False):
        layers, hidden_size = len(drafter.hidden_layers), cfg.hidden_size
        loop = dataclasses.replace(loop, pending_hidden=jnp.zeros((layers, rows, max_new_tokens, hidden_size),
                                                                  batch.hidden.dtype))
    if policy is not None and hasattr(drafter, "first_guess"):
        loop = dataclasses.replace(loop, shadow=jnp.zeros(2, jnp.int32))
    loop, _ = ready_drafter(loop, 0)
    counters = _start_counters(rows, len(buckets)) if policy is not None else None
    chunks, fused_steps = [], 0  # chunks: (T, seconds, fused steps, passes per batch row after it), for the traces
    book = _RowBook(rows, n_req)
    shrinks = engine.shrink_batches and engine.mesh is None and hasattr(drafter, "take_rows")
    reported = n_req
    report_progress(progress, n_req)
    finished = np.asarray(loop.state.finished)
    run = functools.partial(run_steps, params, drafter.params, drafter=drafter, cfg=cfg, attention=engine.attention,
                            with_q=with_q, buckets=buckets)

    def compile_buckets(loop: LoopState) -> LoopState:
        """With eager compiling, a policy's first batch runs every bucket's program once (zero steps);
        a parked drafter's trees compile on a fresh state, dropped after."""
        if policy is not None and not engine.lazy_compile and not policy.history:
            for capacity in policy.unmeasured():
                if capacity > 0 and loop.dstate is None:
                    fresh = drafter.init_state(len(loop.out_len), batch.max_len)
                    loop = dataclasses.replace(run(dataclasses.replace(loop, dstate=fresh), np.int32(0),
                                                   capacity=capacity), dstate=None)
                else:
                    loop = run(loop, np.int32(0), capacity=capacity)
        return loop

    loop = compile_buckets(loop)
    while not finished.all():
        if policy is None:
            c0 = time.perf_counter()
            loop = run(loop, np.int32(steps_per_sync))
            buf, out_len, finished, passes, n_steps = jax.device_get(
                (loop.out_tokens, loop.out_len, loop.state.finished, loop.passes, loop.steps))
            chunks.append((drafter.capacity, time.perf_counter() - c0, int(n_steps) - fused_steps,
                           book.passes(passes)))
            fused_steps = int(n_steps)
        else:
            loop, (buf, out_len, finished), chunk, counters = _timed_chunk(run, loop, policy, steps_per_sync,
                                                                           ready_drafter, counters)
            chunks.append(chunk[:3] + (book.passes(chunk[3]),))
        outputs = book.outputs(buf, out_len)
        total = sum(map(len, outputs))
        report_progress(progress, total - reported)
        reported = total
        stopped = book.by_loop_row(engine.stop_string_hits(outputs, stop))
        if stopped.any() and not (finished | stopped).all():
            loop = dataclasses.replace(loop, state=loop.state.replace(finished=loop.state.finished | stopped))
        finished = finished | stopped
        index = live_rows(finished) if shrinks else None
        if index is not None:  # half the rows have finished: the rest run as a smaller batch
            book.keep(_row_results(loop), finished)
            book.shrink(index, finished)
            loop = _take_loop_rows(loop, jnp.asarray(index), drafter=drafter)
            if parked is not None:
                parked = _take_drafter_rows(parked, jnp.asarray(index), drafter=drafter)
            if prompt_unread:  # a lazy drafter reads the prompts of the rows left, when it first drafts
                tokens, lengths, first, hidden = prompt
                prompt = (tokens[index], lengths[index], first[index], None if hidden is None else hidden[:, index])
            finished = finished[index]
            if policy is not None:
                smaller = chunk_policy(engine, drafter, len(index), batch.max_len, with_q, max_capacity)
                smaller.continue_batch(policy)
                policy = smaller
                counters = (*counters[:3], counters[3][index], counters[4][index], counters[5])
                loop = compile_buckets(loop)
    drafter.end_batch(parked if loop.dstate is None else loop.dstate)
    book.keep(_row_results(loop), np.ones(len(book.ids), bool))
    wall = time.perf_counter() - t0
    kept = [book.kept[i] for i in range(n_req)]
    texts = [engine.decode(k[0]) for k in kept]
    outputs, texts = engine.cut_stops([k[0] for k in kept], texts, stop)
    # Drafting is fused into the device step: all of the loop's time is device (and sync) time.
    return [GenerationResult(token_ids=o, text=t, target_passes=passes, accepted_draft_tokens=accepted,
                             draft_s=0.0, verify_s=wall / n_req, wall_s=wall,
                             trace=chunk_traces(chunks, step_log, i),
                             logprobs=None if row_logprobs is None else row_logprobs[: len(o)].tolist())
            for i, (o, t, (_, passes, accepted, step_log, row_logprobs)) in enumerate(zip(outputs, texts, kept))]


def chunk_traces(chunks: list, step_log: np.ndarray, row: int) -> list[TraceStep]:
    """Row ``row``'s passes as ``TraceStep``s: each chunk's T and time per fused step (an average over
    the chunk: its steps are not timed apart), with the pass's counts from ``step_log`` ([passes, 2])."""
    trace, done = [], 0
    for capacity, seconds, steps, passes in chunks:
        for k in range(done, int(passes[row]) - 1):
            emitted, accepted = (int(x) for x in step_log[k])
            trace.append(TraceStep(capacity, capacity, accepted, emitted, 0.0, seconds / max(steps, 1)))
        done = max(done, int(passes[row]) - 1)
    return trace


def _counters(loop: LoopState) -> tuple:
    """What the policy reads after a chunk: claims, row-steps, fused steps, accepted, passes, and the
    plain steps' first-guess hits and row-steps."""
    shadow = np.zeros(2, np.int32) if loop.shadow is None else loop.shadow  # host zeros: no device op per chunk
    return loop.claimed, loop.row_steps, loop.steps, loop.accepted, loop.passes, shadow


def _start_counters(rows: int, n_buckets: int) -> tuple:
    """``_counters`` of ``LoopState.start``, known on the host without a device round trip."""
    return (np.zeros(n_buckets, np.float32), np.int32(0), np.int32(0), np.zeros(rows, np.int32),
            np.ones(rows, np.int32), np.zeros(2, np.int32))


def _timed_chunk(run, loop: LoopState, policy: ChunkPolicy, steps: int, ready_drafter, before: tuple):
    """One chunk at the policy's T, timed and folded into the policy. A bucket still unmeasured
    is compiled first, outside the timing. Every chunk runs ``steps`` fused steps, probes and
    first measurements too: a chunk's fixed cost (dispatch, sync) then weighs alike on every
    bucket's cost per step, and the policy spaces probes by what they cost. Returns the loop,
    (tokens, lengths, finished) and the chunk's record (T, seconds, fused steps, passes per row)
    for the traces, and the counters after it (``before``: those of the chunk's start; one host sync
    per chunk). ``ready_drafter(loop, T)``: the loop with the drafter's state as a chunk at T needs
    it, and the seconds its setup took (a lazy drafter's first state and prefill)."""
    capacity = policy.choose()
    loop, setup = ready_drafter(loop, capacity)
    if capacity in policy.unmeasured():  # compiled on first use (a zero-step call), outside the timing
        loop = run(loop, np.int32(0), capacity=capacity)
    t0 = time.perf_counter()
    loop = run(loop, np.int32(steps), capacity=capacity)
    out, after = jax.device_get(((loop.out_tokens, loop.out_len, loop.state.finished), _counters(loop)))
    seconds = time.perf_counter() - t0
    claimed, row_steps, n_steps, accepted, passes, shadow = after
    hits, guessed = (int(x) for x in shadow - before[5])
    policy.record(capacity, seconds, int(n_steps - before[2]), int(row_steps - before[1]), claimed - before[0],
                  int((accepted - before[3]).sum()), shadow=(hits, guessed) if guessed else None, setup_s=setup)
    return loop, out, (capacity, seconds, int(n_steps - before[2]), passes), after
