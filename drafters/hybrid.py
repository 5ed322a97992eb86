"""Pieces shared by the hybrid drafters (Graft, TAPS): merging trees, feeding sub-drafters.

``merge_trees`` unions candidate nodes from several trees into one tree of
capacity T on the device: nodes with the same path (same token under the same
merged parent) become one node, each merged node is ranked by the best key any
of its copies had, keys are capped down each path (so the best T nodes are
always ancestor-closed) and the best T are kept in creation order (parents
precede children). Keys encode priorities (e.g. "kept model node" > "retrieved
node" > "pruned model node") as integer classes plus a probability in [0, 1].

Hybrid trees carry no ``q_dists``: acceptance compares each node with the
target's own draw at its position (``steps.accept``), lossless for any tree.

``feed_accepted`` hands a device drafter every emitted token of a step, in
chunks of the drafter's own depth + 1: a hybrid tree can be deeper than the
drafter's own trees (retrieved chains, another drafter's branches), and model
drafters feed at most depth + 1 tokens per ``update`` call.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from specjax.engine.steps import Accepted, StepAux
from specjax.engine.tree import DraftTree

NO_KEY = -jnp.inf


def check_hybrid_member(drafter) -> None:
    """Refuse device drafters whose ``update`` reads the verified tree as their own proposal."""
    from specjax.drafters.token_recycling import TokenRecyclingDrafter

    if isinstance(drafter, TokenRecyclingDrafter):
        raise ValueError("Token Recycling cannot be part of a hybrid drafter: its update reads the verified "
                         "tree's logits as those of its own tree; use a draft model or an EAGLE-3 head")
    for name in ("propose", "update", "prefill", "init_state"):
        if not callable(getattr(drafter, name, None)):
            raise TypeError(f"{type(drafter).__name__} is not a device drafter (no {name}())")


def _fixpoint(f, x):
    """Apply ``f`` until nothing changes (at most the tree depth + 1 times for the uses here)."""

    def body(carry):
        _, x = carry
        y = f(x)
        return jnp.any(y != x), y

    return lax.while_loop(lambda c: c[0], body, (jnp.bool_(True), x))[1]


def _parent_values(values: jax.Array, parents: jax.Array, root_value) -> jax.Array:
    return jnp.where(parents >= 0, jnp.take_along_axis(values, jnp.maximum(parents, 0), axis=1), root_value)


def concat_parts(parts: Sequence[tuple]) -> tuple[jax.Array, ...]:
    """Concatenate (tokens, parents, valid, keys, probs) parts [B, n_i]; parents shift into the union."""
    out, offset = [], 0
    for tokens, parents, valid, keys, probs in parts:
        parents = jnp.where(parents >= 0, parents + offset, -1).astype(jnp.int32)
        out.append((tokens.astype(jnp.int32), parents, valid.astype(bool), keys.astype(jnp.float32),
                    probs.astype(jnp.float32)))
        offset += tokens.shape[1]
    return tuple(jnp.concatenate(col, axis=1) for col in zip(*out))


def merge_trees(tokens, parents, valid, keys, probs, capacity: int) -> tuple[DraftTree, jax.Array]:
    """One tree of ``capacity`` nodes from candidates [B, C] (parents index the candidates, precede
    children, -1 = the root). Returns the tree (``draft_probs`` = the best copy's prob) and each
    slot's merged key (``NO_KEY`` for empty slots). Candidates with key ``NO_KEY`` are never kept."""
    b, c = tokens.shape
    index = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    same_token = (tokens[:, :, None] == tokens[:, None, :]) & valid[:, :, None] & valid[:, None, :]

    def canonical(canon):  # the first candidate with the same token under the same canonical parent
        parent = _parent_values(canon, parents, -1)
        same = same_token & (parent[:, :, None] == parent[:, None, :])
        return jnp.where(valid, jnp.argmax(same, axis=2).astype(jnp.int32), index)

    canon = _fixpoint(canonical, index)
    rows = jnp.arange(b)[:, None]
    merged_key = jnp.full((b, c), NO_KEY).at[rows, canon].max(jnp.where(valid, keys, NO_KEY))
    merged_prob = jnp.zeros((b, c)).at[rows, canon].max(jnp.where(valid, probs, 0.0))
    canon_parent = _parent_values(canon, parents, -1)  # for a canonical node: its canonical parent
    # A child never outranks its parent, so the best nodes are ancestor-closed (ties go to the parent,
    # which has the lower index: lax.top_k keeps the lower index first).
    merged_key = _fixpoint(lambda k: jnp.minimum(k, _parent_values(k, canon_parent, jnp.inf)), merged_key)
    rank = jnp.where(valid & (canon == index), merged_key, NO_KEY)
    kept = min(capacity, c)
    chosen = jnp.sort(lax.top_k(rank, kept)[1], axis=1).astype(jnp.int32)
    chosen_key = jnp.take_along_axis(rank, chosen, axis=1)
    chosen_valid = chosen_key > NO_KEY
    slot_of = jnp.full((b, c), -1, jnp.int32).at[rows, chosen].set(jnp.arange(kept, dtype=jnp.int32)[None, :])
    parent = jnp.take_along_axis(canon_parent, chosen, axis=1)
    parent_slot = jnp.where(chosen_valid & (parent >= 0),
                            jnp.take_along_axis(slot_of, jnp.maximum(parent, 0), axis=1), -1)
    out_tokens = jnp.take_along_axis(tokens, chosen, axis=1)
    out_probs = jnp.where(chosen_valid, jnp.take_along_axis(merged_prob, chosen, axis=1), 0.0)
    out_key = jnp.where(chosen_valid, chosen_key, NO_KEY)
    pad = capacity - kept
    if pad:
        out_tokens = jnp.pad(out_tokens, ((0, 0), (0, pad)))
        parent_slot = jnp.pad(parent_slot, ((0, 0), (0, pad)), constant_values=-1)
        chosen_valid = jnp.pad(chosen_valid, ((0, 0), (0, pad)))
        out_probs = jnp.pad(out_probs, ((0, 0), (0, pad)))
        out_key = jnp.pad(out_key, ((0, 0), (0, pad)), constant_values=NO_KEY)
    tree = DraftTree(tokens=jnp.where(chosen_valid, out_tokens, 0), parents=parent_slot.astype(jnp.int32),
                     valid=chosen_valid, draft_probs=out_probs)
    return tree, out_key


def top_nodes(probs: jax.Array, valid: jax.Array, budget: int, min_prob: float = 0.0) -> jax.Array:
    """bool[B, n]: the ``budget`` most probable valid nodes with prob >= ``min_prob`` (cumulative
    draft probabilities fall along a path, so the set is ancestor-closed; ties go to the lower index)."""
    n = probs.shape[1]
    budget = min(budget, n)
    if budget <= 0:
        return jnp.zeros(probs.shape, bool)
    score = jnp.where(valid & (probs >= min_prob), probs, NO_KEY)
    best = lax.top_k(score, budget)[1]
    chosen = jnp.zeros(probs.shape, bool).at[jnp.arange(probs.shape[0])[:, None], best].set(True)
    return chosen & (score > NO_KEY)


def tree_depth(drafter) -> int:
    """The deepest node a device drafter's own trees have (its ``shape.depth``)."""
    shape = getattr(drafter, "shape", None)
    if shape is None:
        raise ValueError(f"{type(drafter).__name__} has no tree shape: cannot feed it a hybrid step's tokens")
    return shape.depth


def feed_accepted(drafter, dparams, dstate, accepted: Accepted, aux: StepAux):
    """``drafter.update`` with every emitted token: chunks of depth + 1 tokens, skipped once no row
    has tokens left (``aux.hidden`` must hold exactly the drafter's ``hidden_layers``)."""
    n = tree_depth(drafter) + 1
    width = accepted.tokens.shape[1]
    pad = -width % n
    tokens = jnp.pad(accepted.tokens, ((0, 0), (0, pad)))
    path = jnp.pad(accepted.path, ((0, 0), (0, pad)))

    def feed(carry):
        start, dstate = carry
        chunk = Accepted(tokens=lax.dynamic_slice_in_dim(tokens, start, n, axis=1),
                         num=jnp.clip(accepted.num - start, 0, n).astype(jnp.int32),
                         num_draft_accepted=jnp.clip(accepted.num_draft_accepted - start, 0, n).astype(jnp.int32),
                         path=lax.dynamic_slice_in_dim(path, start, n, axis=1))
        return start + n, drafter.update(dparams, dstate, chunk, aux)

    # The first chunk always runs (as a plain update would); more while any row has tokens left.
    more = lambda c: (c[0] == 0) | jnp.any(accepted.num > c[0])
    return lax.while_loop(more, feed, (jnp.int32(0), dstate))[1]


def select_hidden(aux: StepAux, index: Optional[tuple[int, ...]]) -> StepAux:
    """The verify pass's outputs with only the hidden layers at ``index`` (None: no hidden states)."""
    hidden = None if not index else aux.hidden[jnp.asarray(index)]
    return StepAux(logits=aux.logits, hidden=hidden)


@functools.partial(jax.jit, static_argnames=("drafter",))
def prefill_drafter(dparams, dstate, tokens, lengths, first, hidden, *, drafter):
    """A device drafter's prefill, compiled (the hybrid loops call it once per batch)."""
    return drafter.prefill(dparams, dstate, tokens, lengths, first, hidden)


def load_device_drafter(model_dir: str, target, capacity: int, topk: int = 4, depth: int = 6, dtype=None):
    """A trained drafter directory as a device drafter for ``target``: an EAGLE-3 head when its
    config.json says so (``draft_vocab_size`` or an Eagle architecture), else a draft model."""
    import json
    import os

    from specjax.drafters.draft_model import DraftModelDrafter
    from specjax.drafters.eagle3 import load_eagle3
    from specjax.models.loading import load_model
    from specjax.models.safetensors_io import CheckpointError

    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"drafter directory {model_dir!r} has no config.json")
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
    dtype = dtype if dtype is not None else target.params["embed"].dtype
    shape = dict(capacity=capacity, topk=min(topk, capacity), depth=min(depth, capacity))
    eagle = "draft_vocab_size" in config or any("eagle" in a.lower() for a in config.get("architectures") or [])
    if eagle:
        return load_eagle3(model_dir, target, dtype=dtype, **shape)
    return DraftModelDrafter(load_model(model_dir, dtype=dtype), target.config.vocab_size, **shape)
