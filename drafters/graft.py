"""Graft ("Draft Less, Retrieve More"): prune a model drafter's tree, graft retrieved tokens into it.

A dense EAGLE-style tree spends verify slots on low-probability branches.
Graft keeps only the model tree's most confident nodes and fills the slots
that pruning opened with continuations retrieved from the suffix index (or
prompt lookup): retrieval recovers the coverage pruning lost, at near-zero
cost, training-free and lossless.

One step, as built here (capacity T, static shapes):

1. **prune** (device): the device drafter (EAGLE-3 head or draft model) drafts
   its dynamic tree; its ``model_budget`` most probable nodes by cumulative
   draft probability, among those with probability >= ``min_prob``, are kept
   (ancestor-closed, since cumulative probabilities fall along a path).
2. **retrieve** (host): the retrieval drafter proposes up to T nodes
   continuing the request's context.
3. **graft** (device, fused into the verify step): the retrieved tree is
   merged into the kept model tree from the root: a retrieved path that runs
   along kept model nodes continues below them (grafted at the kept node whose
   path the retrieval matched), a retrieved node equal to a pruned model node
   restores it, duplicate prefixes become one node. Slot priority: kept model
   nodes, then retrieved nodes (by their retrieval probability), then, with
   ``refill`` (default), the pruned model nodes by draft probability, so the T
   slots are never left empty when retrieval finds nothing (on an accelerator
   a verify of T slots costs the same whether they are used or not).
4. **verify + accept** with the target (sampled rows: each node compared with
   the target's own draw at its position, lossless for any tree); then the
   device drafter is fed every emitted
   token (``hybrid.feed_accepted``) and the retrieval drafter observes them.

Overlap: the loop dispatches the next step's model draft (asynchronously)
right after the verify step and before reading the accepted tokens back; the
host's retrieval for the next step then runs while the device drafts, and the
host never reads the model tree back (the graft happens on the device).

Defaults: the paper (Graft, 2026) prunes an EAGLE-3 tree by calibrated
confidence and fills the freed positions from retrieval at the root of the
tree, at a fixed total node count; its exact thresholds are not reproduced
here. Ours: ``model_budget = T // 2``, ``min_prob = 0.0`` (pure top-budget
pruning), grafting from the root, ``refill = True``. Not implemented: asking
the retrieval source again from the end of each kept model path (grafting
below model leaves by a fresh match); it would need the model tree on the
host before retrieval, which serializes the two parts.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.base import HostDrafter, check_proposals
from specjax.drafters.device import DeviceDrafter, KeyedByConfig
from specjax.drafters.hybrid import (NO_KEY, check_hybrid_member, concat_parts, feed_accepted, merge_trees,
                                     prefill_drafter, top_nodes)
from specjax.engine.device_loop import prepare_device_batch
from specjax.engine.engine import GenerationResult, report_progress
from specjax.engine.sampling import SamplingParams, request_seeds
from specjax.engine.steps import step_impl
from specjax.engine.trace import TraceStep
from specjax.engine.tree import DraftTree

# Slot priority classes: a node's merge key is its class + probability / 2 (so the class is the key's floor).
REFILLED, GRAFTED, KEPT = 0.0, 1.0, 2.0


def _key(priority: float, probs: jax.Array) -> jax.Array:
    return priority + 0.5 * probs


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GraftCarry:
    """What the device keeps between Graft steps."""

    state: Any  # the target's DecodeState
    dstate: Any  # the device drafter's state


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GraftStats:
    """Per-row counts of one step (summed over a batch by the loop)."""

    verified: jax.Array  # int32[B] valid nodes in the verified tree
    grafted: jax.Array  # int32[B] of them retrieved (not a kept model node)
    accepted_grafted: jax.Array  # int32[B] grafted nodes on the accepted path


@dataclasses.dataclass(eq=False)
class GraftDrafter(KeyedByConfig):
    """A device drafter's pruned tree plus host retrieval, merged into one tree of ``capacity`` nodes.

    Args:
      model: the device drafter (``Eagle3Drafter`` or ``DraftModelDrafter``); its
        own tree may be larger than ``capacity`` (it is pruned).
      retrieval: a host drafter (``SuffixDecodingDrafter``, ``PromptLookupDrafter``).
      capacity: T, nodes verified per step and row.
      model_budget: model nodes kept before grafting (default T // 2).
      min_prob: model nodes below this cumulative draft probability are pruned too.
      refill: pruned model nodes fill the slots retrieval leaves empty.
    """

    state_fields = ("retrieval",)  # host-side: its trees reach the device as arguments

    model: DeviceDrafter
    retrieval: HostDrafter
    capacity: int = 16
    model_budget: Optional[int] = None
    min_prob: float = 0.0
    refill: bool = True

    def __post_init__(self):
        check_hybrid_member(self.model)
        if self.capacity < 1:
            raise ValueError(f"graft capacity must be >= 1, got {self.capacity}")
        if self.model_budget is None:
            self.model_budget = self.capacity // 2
        if not 0 <= self.model_budget <= self.capacity:
            raise ValueError(f"model_budget must be in [0, capacity={self.capacity}], got {self.model_budget}")
        if not 0.0 <= self.min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {self.min_prob}")
        self.hidden_layers = tuple(self.model.hidden_layers)
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------ the tree

    def graft_tree(self, model_tree: DraftTree, retrieved: tuple) -> tuple[DraftTree, jax.Array]:
        """The verified tree from the model's tree and the retrieved (tokens, parents, valid, probs)
        [B, R]; also each slot's priority class (KEPT, GRAFTED, REFILLED; -1 for empty slots)."""
        probs = model_tree.draft_probs
        if probs is None:
            raise ValueError(f"{type(self.model).__name__} gives no draft_probs: Graft prunes by them")
        kept = top_nodes(probs, model_tree.valid, self.model_budget, self.min_prob)
        pruned_key = _key(REFILLED, probs) if self.refill else jnp.full_like(probs, NO_KEY)
        model_key = jnp.where(kept, _key(KEPT, probs), pruned_key)
        r_tokens, r_parents, r_valid, r_probs = retrieved
        r_probs = jnp.clip(r_probs, 0.0, 1.0)
        parts = [(model_tree.tokens, model_tree.parents, model_tree.valid, model_key, probs),
                 (r_tokens, r_parents, r_valid, _key(GRAFTED, r_probs), r_probs)]
        tree, key = merge_trees(*concat_parts(parts), self.capacity)
        origin = jnp.where(tree.valid, jnp.floor(key), -1.0)
        return tree, origin

    # ------------------------------------------------------------ generation

    def generate_hybrid(self, engine, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature=0.0,
                        top_p=1.0, top_k=0, seed=0, stop: Sequence[str] = (), progress=None,
                        logprobs: bool = False) -> list:
        """``Engine.generate`` for Graft (token-id prompts); ``self.stats`` sums the batch counts. Each
        result carries its per-pass ``trace`` (T, nodes verified, accepted, emitted, the row's share of
        host retrieval time, the step's time) and, with ``logprobs``, the emitted tokens' log-probabilities."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        sampling = SamplingParams.make(len(prompts), temperature, top_k, top_p)
        per_prompt = {k: np.asarray(getattr(sampling, k)) for k in ("temperature", "top_k", "top_p")}
        seeds = request_seeds(seed, len(prompts))
        self.stats = {"steps": 0, "verified": 0, "grafted": 0, "accepted_grafted": 0}
        results = []
        for start in range(0, len(prompts), engine.max_batch_size):
            end = start + engine.max_batch_size
            results.extend(self._generate_batch(engine, list(prompts[start:end]), max_new_tokens,
                                                {k: v[start:end] for k, v in per_prompt.items()}, seeds[start:end],
                                                tuple(stop), progress, logprobs))
        return results

    def _generate_batch(self, engine, prompts, max_new_tokens, sampling: dict, seeds, stop, progress,
                        logprobs: bool = False):
        cfg, params = engine.target.config, engine.target.params
        t0 = time.perf_counter()
        n_req = len(prompts)
        batch = prepare_device_batch(engine, prompts, max_new_tokens, sampling, self.capacity, self.hidden_layers,
                                     seeds, return_logits=logprobs)
        rows, state, first = batch.rows, batch.state, batch.first
        dstate = prefill_drafter(self.model.params, self.model.init_state(rows, batch.max_len),
                                 jnp.asarray(batch.tokens), jnp.asarray(batch.lengths), first, batch.hidden,
                                 drafter=self.model)
        carry = GraftCarry(state, dstate)
        rids = [("graft", next(_REQUEST_IDS)) for _ in range(n_req)]
        for rid, prompt in zip(rids, prompts):
            self.retrieval.start_request(rid, prompt)
        outputs = [[int(t)] for t in np.asarray(first)]
        unobserved = [list(o) for o in outputs]
        finished = np.asarray(state.finished) | engine.stop_string_hits(outputs, stop)  # padding rows too
        passes = np.ones(rows, np.int64)
        accepted = np.zeros(rows, np.int64)
        draft_s = np.zeros(rows)
        traces = [[] for _ in range(n_req)]
        token_logprobs = None if not logprobs else [[float(x)] for x in np.asarray(batch.first_logprobs)]
        report_progress(progress, n_req)
        carry, model_tree = _propose(self.model.params, carry, graft=self)
        while not finished.all():
            active = ~finished
            d0 = time.perf_counter()
            # The retrieval's trees overlap the model's draft on the device.
            retrieved = self._retrieve(rids, active, unobserved, cfg.vocab_size)
            d1 = time.perf_counter()
            draft_s += (d1 - d0) * active / active.sum()
            carry = dataclasses.replace(carry, state=carry.state.replace(finished=jnp.asarray(finished)))
            carry, acc_tokens, num, n_draft, dev_finished, stats, acc_logprobs = _graft_step(
                params, self.model.params, carry, model_tree, retrieved, graft=self, cfg=cfg,
                attention=engine.attention, logprobs=logprobs)
            carry, model_tree = _propose(self.model.params, carry, graft=self)  # next draft, dispatched early
            emitted, num, n_draft, dev_finished, stats, acc_logprobs = jax.device_get(
                (acc_tokens, num, n_draft, dev_finished, stats, acc_logprobs))
            step_s = time.perf_counter() - d1
            passes[active] += 1
            accepted += n_draft
            self._count(stats, active)
            for i in np.flatnonzero(active[:n_req]):
                new = emitted[i, : num[i]].tolist()
                outputs[i].extend(new)
                unobserved[i].extend(new)
                traces[i].append(TraceStep(self.capacity, int(stats.verified[i]), int(n_draft[i]), int(num[i]),
                                           float((d1 - d0) / active.sum()), step_s))
                if token_logprobs is not None:
                    token_logprobs[i].extend(acc_logprobs[i, : num[i]].tolist())
            report_progress(progress, int(num[:n_req].sum()))
            finished = finished | dev_finished | engine.stop_string_hits(outputs, stop)
        for i, rid in enumerate(rids):
            if unobserved[i]:
                self.retrieval.observe(rid, unobserved[i])
            self.retrieval.stop_request(rid)
        self.model.end_batch(carry.dstate)
        wall = time.perf_counter() - t0
        device_s = (wall - draft_s.sum()) / n_req
        outputs = outputs[:n_req]
        texts = [engine.decode(o) for o in outputs]
        outputs, texts = engine.cut_stops(outputs, texts, stop)
        return [GenerationResult(token_ids=o, text=t, target_passes=int(passes[i]),
                                 accepted_draft_tokens=int(accepted[i]), draft_s=float(draft_s[i]),
                                 verify_s=device_s, wall_s=wall, trace=traces[i],
                                 logprobs=None if token_logprobs is None else token_logprobs[i][: len(o)])
                for i, (o, t) in enumerate(zip(outputs, texts))]

    def _retrieve(self, rids, active, unobserved, vocab_size: int) -> tuple[np.ndarray, ...]:
        """The retrieval drafter's (checked) trees for the active rows, padded to [B, capacity]."""
        rows, t = len(active), self.capacity
        tokens = np.zeros((rows, t), np.int32)
        parents = np.full((rows, t), -1, np.int32)
        valid = np.zeros((rows, t), bool)
        probs = np.zeros((rows, t), np.float32)
        proposals = {}
        for i, rid in enumerate(rids):
            if not active[i]:
                continue
            if unobserved[i]:
                self.retrieval.observe(rid, unobserved[i])
                unobserved[i].clear()
            proposals[i] = self.retrieval.propose(rid, t)
        check_proposals(list(proposals.values()), self.retrieval, t, vocab_size)
        for i, prop in proposals.items():
            n = len(prop)
            tokens[i, :n], parents[i, :n], valid[i, :n], probs[i, :n] = prop.tokens, prop.parents, True, prop.probs
        return tokens, parents, valid, probs

    def _count(self, stats: GraftStats, active: np.ndarray) -> None:
        self.stats["steps"] += int(active.sum())
        for name in ("verified", "grafted", "accepted_grafted"):
            self.stats[name] += int(np.asarray(getattr(stats, name))[active].sum())


_REQUEST_IDS = itertools.count()


@functools.partial(jax.jit, static_argnames=("graft",), donate_argnums=(1,))
def _propose(dparams, carry: GraftCarry, *, graft: GraftDrafter) -> tuple[GraftCarry, DraftTree]:
    """The device drafter's tree for the next step (top-k children: point-mass verification)."""
    state = carry.state
    tree, dstate = graft.model.propose(dparams, carry.dstate, state.last_tokens, state.lengths, state.sampling,
                                       state.rng, with_q=False)
    return GraftCarry(state, dstate), tree


@functools.partial(jax.jit, static_argnames=("graft", "cfg", "attention", "logprobs"), donate_argnums=(2,))
def _graft_step(params, dparams, carry: GraftCarry, model_tree: DraftTree, retrieved, *, graft: GraftDrafter,
                cfg, attention: str, logprobs: bool = False):
    """Graft, verify + accept, feed the device drafter; returns what the host reads back (the emitted
    tokens' log-probabilities with ``logprobs``, else None)."""
    tree, origin = graft.graft_tree(model_tree, retrieved)
    active = ~carry.state.finished
    state, acc, aux = step_impl(params, carry.state, tree, cfg=cfg, attention=attention, eos_ids=cfg.eos_token_ids,
                                hidden_layers=graft.hidden_layers, logprobs=logprobs)
    dstate = feed_accepted(graft.model, dparams, carry.dstate, acc, aux)
    origin_r = jnp.concatenate([jnp.full((origin.shape[0], 1), KEPT), origin], axis=1)  # root-indexed
    depth = jnp.arange(acc.path.shape[1])[None, :]
    on_path = (depth >= 1) & (depth <= acc.num_draft_accepted[:, None])
    path_origin = jnp.take_along_axis(origin_r, acc.path, axis=1)
    count = lambda mask: jnp.where(active, mask.sum(axis=1), 0).astype(jnp.int32)
    stats = GraftStats(verified=count(tree.valid), grafted=count(origin == GRAFTED),
                       accepted_grafted=count(on_path & (path_origin == GRAFTED)))
    return (GraftCarry(state, dstate), acc.tokens, acc.num, acc.num_draft_accepted, state.finished,
            stats, acc.logprobs)
