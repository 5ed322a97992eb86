"""The contract for drafters that run on the device, and the pieces they share.

A device drafter is pure functions over its own params and its own state (a KV
cache, fed target features, an adjacency table), so that draft -> verify ->
accept -> drafter update compiles into one step and ``lax.while_loop`` can run
many steps per host sync (``specjax.engine.device_loop``).

Shapes are static: a batch of B rows with different lengths, a tree of fixed
capacity T. The drafter's cache follows the target's: true context at slots
``[0, dlen)``, drafting writes a scratch region above it, and ``update`` feeds
the accepted tokens so the next step starts from a compact prefix again.

Shared here: the EAGLE-2 dynamic tree builder (top-k expansion of the top-k
frontier by cumulative draft log-probability, then the best T candidates),
used by the draft-model and EAGLE-3 drafters, and attention over the cache's
prefix plus chosen scratch rows (a frontier node sees the prefix and its
ancestors among the scratch rows).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from specjax.engine.sampling import position_keys, row_keys, vocab_top_k
from specjax.engine.tree import DraftTree
from specjax.tpu_kernels.tree_attention import blockwise_attention


class DeviceDrafter(Protocol):
    """What the on-device loop needs from a drafter (all methods jittable, shapes static).

    Attributes:
      capacity: T, tree slots per row and step.
      hidden_layers: target layers whose hidden states the drafter feeds on
        (0 = embeddings, i = after layer i); () when it needs none.
      params: the drafter's own parameter pytree (passed back into every method,
        so it is a jit argument, never a baked-in constant).
    """

    capacity: int
    hidden_layers: tuple[int, ...]
    params: Any

    def init_state(self, batch_size: int, max_len: int) -> Any:
        """Empty drafter state for B rows whose target cache has ``max_len`` slots."""
        ...

    def prefill(self, params, dstate, prompt_tokens: jax.Array, prompt_lengths: jax.Array,
                first_tokens: jax.Array, hidden: Optional[jax.Array]) -> Any:
        """Feed the right-padded prompts [B, P], the first generated tokens [B] and (if
        ``hidden_layers``) the target's prompt hidden states [n, B, P, H]."""
        ...

    def propose(self, params, dstate, root_tokens: jax.Array, lengths: jax.Array, sampling, key: jax.Array,
                *, with_q: bool = False) -> tuple[DraftTree, Any]:
        """A tree continuing each row's root token (target cache length ``lengths``: the root's position).

        ``with_q`` (static): some row samples, so children of those rows are drawn
        from q at the row's temperature and the tree carries ``q_dists``. ``key``: the
        rows' request keys [B] (``DecodeState.rng``); draws derive from them and the
        position drawn (``specjax.engine.sampling.position_keys``), never from the step.
        """
        ...

    def update(self, params, dstate, accepted, aux) -> Any:
        """Absorb one step's ``Accepted`` (tokens, num, path) and ``StepAux`` (logits, hidden)."""
        ...

    def end_batch(self, dstate) -> None:
        """Keep what should outlive the batch (Token Recycling's table); a no-op for models."""
        ...

    # Optional: ``take_rows(dstate, index) -> dstate``, the state of batch rows ``index`` (int32[B'])
    # alone. The device loop shrinks a batch to the rows still decoding once half have finished
    # (``device_loop.live_rows``) only for a drafter that has it.


def is_device_drafter(drafter) -> bool:
    """True for drafters that follow ``DeviceDrafter`` (the engine runs them in the device loop)."""
    methods = ("init_state", "prefill", "propose", "update", "end_batch")
    return all(callable(getattr(drafter, m, None)) for m in methods)


class KeyedByConfig:
    """Hash and compare a (dataclass) drafter by its configuration, not by identity.

    Device drafters are static jit arguments: hashed by identity, every new instance would
    recompile every program. Every dataclass field counts except ``state_fields`` (weights and
    learned tables: they reach the traced programs only as jit arguments, so drafters differing
    only in them share one program); a field holding a model counts by its config, a field
    holding another drafter by that drafter's key.
    """

    state_fields: tuple[str, ...] = ()

    def config_key(self) -> tuple:
        """Computed once (every jitted call hashes its static drafter: a large tree template is
        tens of thousands of values) and again after a config field is assigned."""
        cached = self.__dict__.get("_config_key")
        if cached is None:
            key = (type(self),) + tuple((f.name, _static_value(f.name, getattr(self, f.name)))
                                        for f in dataclasses.fields(self) if f.name not in self.state_fields)
            cached = (key, hash(key))
            object.__setattr__(self, "_config_key", cached)
        return cached[0]

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.state_fields:
            self.__dict__.pop("_config_key", None)
        super().__setattr__(name, value)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and (other is self or self.config_key() == other.config_key())

    def __hash__(self) -> int:
        self.config_key()
        return self.__dict__["_config_key"][1]


def _static_value(name: str, value: Any) -> Any:
    """A field's hashable stand-in for a drafter's config key; arrays are refused (they would be
    baked into a program another drafter then reuses)."""
    from specjax.models.loading import Model

    if isinstance(value, KeyedByConfig):
        return value.config_key()
    if isinstance(value, Model):
        return ("model", value.config)
    if isinstance(value, (list, tuple)):
        return tuple(_static_value(name, v) for v in value)
    if isinstance(value, (jax.Array, np.ndarray)):
        raise TypeError(f"drafter field {name!r} holds an array: pass it to the traced methods as params or "
                        "state and name it in state_fields, or make it a static (hashable) setting")
    return value


def row_temperature(sampling, batch_size: int) -> jax.Array:
    """float32[B] temperatures from per-row sampling params (or a scalar setting)."""
    return jnp.broadcast_to(jnp.asarray(sampling.temperature, jnp.float32), (batch_size,))


# ------------------------------------------------------------------ attention over a masked cache


def scratch_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer, lengths: jax.Array,
                      scratch_mask: jax.Array, k_self: jax.Array, v_self: jax.Array) -> jax.Array:
    """Attention of tree nodes being drafted, q [B, t, Hq, D], over the stacked cache [L, B, Hkv, S, D]
    at ``layer``: the prefix slots ``< lengths[b]``, the scratch slot ``lengths[b] + j`` where
    ``scratch_mask[b, i, j]`` (ancestors earlier levels wrote), and each query's own new key/value
    [B, t, Hkv, D] (not yet in the cache). Streams the prefix in blocks (``blockwise_attention``):
    no slot past the longest prefix and its scratch rows is read. fp32 softmax."""
    b, t = q.shape[:2]
    hkv, m = k_cache.shape[2], scratch_mask.shape[-1]
    slots = (lengths[:, None] + jnp.arange(m, dtype=jnp.int32)[None, :])[:, None, :]  # [B, 1, m]
    batch, head = jnp.arange(b)[:, None, None], jnp.arange(hkv)[None, :, None]
    rows = lambda cache: cache.at[layer, batch, head, slots].get(mode="clip").transpose(0, 2, 1, 3)
    new_k = jnp.concatenate([rows(k_cache), k_self.astype(k_cache.dtype)], axis=1)  # [B, m + t, Hkv, D]
    new_v = jnp.concatenate([rows(v_cache), v_self.astype(v_cache.dtype)], axis=1)
    own = jnp.broadcast_to(jnp.eye(t, dtype=bool), (b, t, t))
    return blockwise_attention(q, k_cache, v_cache, lengths, new_k, new_v,
                               jnp.concatenate([scratch_mask, own], axis=-1), layer=layer)


def scan_chunks(feed: Callable[..., Any], carry: Any, arrays: tuple, chunk: int) -> Any:
    """``carry = feed(carry, start, *pieces)`` over arrays [B, P, ...] cut into chunks of ``chunk``
    positions (the last one zero-padded), as one ``lax.scan``: a drafter's prefill compiles one chunk
    and keeps chunk-sized activations, whatever the prompt's length (as the target's ``extend``)."""
    p = arrays[0].shape[1]
    width = min(p, chunk)
    n = -(-p // width)

    def split(a):
        a = jnp.pad(a, [(0, 0), (0, n * width - p)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((a.shape[0], n, width) + a.shape[2:]), 1, 0)

    starts = jnp.arange(n, dtype=jnp.int32) * width
    step = lambda c, xs: (feed(c, xs[0], *xs[1:]), None)
    return lax.scan(step, carry, (starts,) + tuple(split(a) for a in arrays))[0]


def pick_position(x: jax.Array, offset: jax.Array, previous: jax.Array) -> jax.Array:
    """x[b, offset[b]] where the offset lies inside this chunk of x [B, C, H], else ``previous[b]``."""
    c = x.shape[1]
    picked = jnp.take_along_axis(x, jnp.clip(offset, 0, c - 1)[:, None, None], axis=1)[:, 0]
    return jnp.where(((offset >= 0) & (offset < c))[:, None], picked.astype(previous.dtype), previous)


def write_block(cache: jax.Array, rows: jax.Array, starts: jax.Array) -> jax.Array:
    """Write rows [L, B, t, Hkv, D] into a stacked cache [L, B, Hkv, S, D] at slots
    ``[starts[b], starts[b] + t)``; rows past the end are dropped."""
    n_layers, b, t = rows.shape[:3]
    hkv = cache.shape[2]
    slots = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]  # [B, t]
    layer = jnp.arange(n_layers)[:, None, None, None]
    batch = jnp.arange(b)[None, :, None, None]
    head = jnp.arange(hkv)[None, None, :, None]
    rows = rows.transpose(0, 1, 3, 2, 4).astype(cache.dtype)  # [L, B, Hkv, t, D]
    return cache.at[layer, batch, head, slots[None, :, None, :]].set(rows, mode="drop")


# ------------------------------------------------------------------ the EAGLE-2 dynamic tree


@dataclasses.dataclass(frozen=True)
class TreeShape:
    """Dynamic-tree settings: ``topk`` children per expanded node and nodes per frontier,
    ``depth`` levels of draft tokens, the best ``capacity`` (T) candidates kept.
    ``topk == 1`` is a chain of ``depth`` tokens."""

    capacity: int
    topk: int = 10
    depth: int = 7

    def __post_init__(self):
        for name in ("capacity", "topk", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"tree {name} must be >= 1, got {getattr(self, name)}")

    @property
    def num_candidates(self) -> int:
        return self.topk + (self.depth - 1) * self.topk * self.topk

    @property
    def scratch_rows(self) -> int:
        """Drafter cache rows written while drafting: every frontier node but the last level."""
        return (self.depth - 1) * self.topk


def bucket_proposer(drafter, bucket: int):
    """The drafter as it proposes for a verified tree of ``bucket`` nodes (the auto size's cut):
    a tree of at most 2 x ``bucket`` nodes, its depth and top-k at most that. The best ``bucket``
    nodes of the full tree lie inside it (each is among the best ``bucket`` of its level, at depth
    at most ``bucket``), so the cut is the same while a small bucket no longer pays for the full
    tree's levels; the extra half keeps the auto policy's claims for the next bucket up. Drafters
    with a ``TreeShape`` (``shape``), or that cut their own tree (``best_nodes_proposer``: Token
    Recycling's template nodes that can rank among the best 2T); the state it returns has the
    drafter's own layout."""
    if not 0 < bucket < drafter.capacity:
        return drafter
    if hasattr(drafter, "best_nodes_proposer"):
        proposer = drafter.best_nodes_proposer(2 * bucket)
        return proposer if proposer.capacity >= bucket else drafter
    if not hasattr(drafter, "shape"):
        return drafter
    size = min(drafter.capacity, 2 * bucket)
    if size == drafter.capacity and drafter.shape.depth <= size and drafter.shape.topk <= size:
        return drafter
    return dataclasses.replace(drafter, capacity=size, topk=min(drafter.shape.topk, size),
                               depth=min(drafter.shape.depth, size))


# expand(carry, tokens[B, K], feats[B, K, F], positions[B, K], scratch_offset, scratch_mask[B, K, M])
#   -> (draft logits [B, K, Vd], new feats [B, K, F], carry)
ExpandFn = Callable[..., tuple[jax.Array, jax.Array, Any]]


def _children(keys, positions, logits: jax.Array, temperature: jax.Array, k: int, with_q: bool,
              target_ids: jax.Array, target_vocab: int):
    """Children of each node: greedy rows the top-k, sampled rows k draws from q without replacement.

    logits [B, K, Vd] -> (ids [B, K, k], log q of them [B, K, k], q [B, K, Vd] or None).
    Scores use the draft's log-probabilities at temperature 1 for greedy rows and
    at the row's temperature for sampled rows (the q the children came from).

    A sampled node's children are the top k of log q + G (Gumbel-top-k: k draws without
    replacement), G the very Gumbel noise the target draws its token at that position with
    (``keys``, ``positions``: the children's position; ``target_ids`` [Vd] maps draft ids into
    the target's vocab of ``target_vocab``). The target's draw is argmax(log p + G): when q is
    close to p it is the first child, or among the k (the Gumbel coupling), and acceptance keeps it.
    """
    greedy_logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_logp, top_ids = vocab_top_k(greedy_logp, k)
    if not with_q:
        return top_ids.astype(jnp.int32), top_logp, None
    temp = jnp.where(temperature > 0, temperature, 1.0)[:, None, None]
    logq = jax.nn.log_softmax(logits.astype(jnp.float32) / temp, axis=-1)
    shared = jax.vmap(lambda key: jax.random.gumbel(key, (target_vocab,)))(position_keys(keys, positions))
    drawn = vocab_top_k(logq + shared[:, None, target_ids], k)[1].astype(jnp.int32)  # [B, K, k]
    drawn_logq = jnp.take_along_axis(logq, drawn, axis=-1)
    sampled = (temperature > 0)[:, None, None]
    return (jnp.where(sampled, drawn, top_ids.astype(jnp.int32)), jnp.where(sampled, drawn_logq, top_logp),
            jnp.exp(logq))


def build_dynamic_tree(expand: ExpandFn, carry: Any, root_logits: jax.Array, root_feats: jax.Array,
                       base: jax.Array, shape: TreeShape, temperature: jax.Array, keys: jax.Array,
                       root_positions: jax.Array, *, to_target: Callable[[jax.Array], jax.Array] = lambda ids: ids,
                       q_to_target: Callable[[jax.Array], jax.Array] = lambda q: q, target_vocab: Optional[int] = None,
                       with_q: bool = False) -> tuple[DraftTree, Any]:
    """EAGLE-2's dynamic tree, batched with static shapes.

    Depth 1: the root's top-k children. Then depth - 1 times: feed the frontier
    (the k best nodes of the newest level by cumulative log-probability) through
    ``expand``, score each frontier node's top-k children, keep the best k as
    the next frontier. Finally rerank every candidate and keep the best T (sorted
    by creation, so parents precede children).

    Sampled rows (``with_q``, temperature > 0) draw children from q without
    replacement, coupled with the target's draw at their position (see
    ``_children``), and the
    final cut keeps whole sibling groups in draw order (ranked by the parent's
    score). Acceptance is lossless for any tree; this only makes it accept more.

    Args:
      root_logits: [B, Vd] the drafter's logits for the root's children.
      root_feats: [B, F] what depth-1 nodes are fed with (EAGLE: the root's hidden state).
      base: int32[B] first scratch slot (the drafter's true length); node at depth
        d is fed at position ``base + d - 1``, frontier j of depth d at scratch
        row ``(d - 1) * k + j``.
      keys, root_positions: the rows' request keys [B] (or one key) and the root's
        position in the target's sequence: a depth-d node's draw uses position
        ``root_positions + d`` (``specjax.engine.sampling.position_keys``).
      target_vocab: the target's vocabulary size (default: the drafter's).
    """
    b = root_logits.shape[0]
    k, depth = shape.topk, shape.depth
    m = max(shape.scratch_rows, 1)
    keys = row_keys(keys, b)
    target_ids = to_target(jnp.arange(root_logits.shape[-1], dtype=jnp.int32))
    draw = functools.partial(_children, keys, temperature=temperature, k=k, with_q=with_q, target_ids=target_ids,
                             target_vocab=target_vocab or root_logits.shape[-1])
    ids, logp, q_root = draw(root_positions + 1, root_logits[:, None, :])
    ids, scores = ids[:, 0], logp[:, 0]  # [B, k]
    level_tokens, level_scores = [ids], [scores]
    level_parents = [jnp.full((b, k), -1, jnp.int32)]
    level_keys = [jnp.zeros((b, k), jnp.float32)]  # sampled rows rank a group by its parent's score
    frontier_ids = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))  # global candidate indices
    frontier_feats = jnp.broadcast_to(root_feats[:, None, :], (b, k, root_feats.shape[-1]))
    frontier_mask = jnp.broadcast_to(jax.nn.one_hot(jnp.arange(k), m, dtype=bool), (b, k, m))
    q_rows, q_owner = [], []

    def level(frontier, d):
        """Feed the depth-d frontier; emit the depth-(d + 1) candidates, carry the next frontier."""
        f_tokens, f_scores, f_ids, f_feats, f_mask, carry = frontier
        positions = jnp.broadcast_to((base + d - 1)[:, None], (b, k))
        logits, feats, carry = expand(carry, to_target(f_tokens), f_feats, positions, (d - 1) * k, f_mask)
        c_ids, c_logp, q = draw(root_positions + d + 1, logits)
        c_scores = (f_scores[:, :, None] + c_logp).reshape(b, k * k)
        first = k + (d - 1) * k * k
        best = lax.top_k(c_scores, k)[1]  # next frontier, as indices into this level
        from_node = best // k
        nxt_mask = jnp.take_along_axis(f_mask, from_node[:, :, None], axis=1)
        nxt_mask = nxt_mask | jax.nn.one_hot(d * k + jnp.arange(k), m, dtype=bool)[None]
        nxt = (jnp.take_along_axis(c_ids.reshape(b, k * k), best, axis=1),
               jnp.take_along_axis(c_scores, best, axis=1), first + best,
               jnp.take_along_axis(feats, from_node[:, :, None], axis=1), nxt_mask, carry)
        out = (c_ids.reshape(b, k * k), c_scores, jnp.repeat(f_ids, k, axis=1), jnp.repeat(f_scores, k, axis=1),
               q if with_q else jnp.zeros((b, 0)), f_ids)
        return nxt, out

    frontier = (ids, scores, frontier_ids, frontier_feats, frontier_mask, carry)
    if depth > 1:  # one scanned level per depth: compile time does not grow with depth
        frontier, (c_ids, c_scores, parents, group_key, q, owners) = lax.scan(
            level, frontier, jnp.arange(1, depth, dtype=jnp.int32))
        flat = lambda x: jnp.moveaxis(x, 0, 1).reshape((b, -1) + x.shape[3:])
        level_tokens.append(flat(c_ids))
        level_scores.append(flat(c_scores))
        level_parents.append(flat(parents))
        level_keys.append(flat(group_key))
        if with_q:
            q_rows.append(flat(q))
            q_owner.append(flat(owners))
    carry = frontier[-1]

    tokens = jnp.concatenate(level_tokens, axis=1)
    scores = jnp.concatenate(level_scores, axis=1)
    parents = jnp.concatenate(level_parents, axis=1)
    rank_key = scores
    if with_q:
        rank_key = jnp.where((temperature > 0)[:, None], jnp.concatenate(level_keys, axis=1), scores)
    chosen = _chosen_indices(rank_key, shape.capacity)
    tree = _select_best(tokens, scores, parents, chosen, shape, to_target)
    if with_q:
        tree = dataclasses.replace(tree, q_dists=_tree_q(tree, q_root[:, 0], q_rows, q_owner, shape, chosen,
                                                         q_to_target))
    return tree, carry


def _chosen_indices(rank_key: jax.Array, capacity: int) -> jax.Array:
    """Global candidate indices of the kept nodes, ascending (top_k breaks ties by index)."""
    kept = min(capacity, rank_key.shape[1])
    return jnp.sort(lax.top_k(rank_key, kept)[1], axis=1).astype(jnp.int32)


def _select_best(tokens, scores, parents, chosen, shape: TreeShape, to_target) -> DraftTree:
    """Keep the ``chosen`` candidates; renumber parents into tree slots."""
    b, c = tokens.shape
    kept = chosen.shape[1]
    slot_of = jnp.full((b, c), -1, jnp.int32).at[jnp.arange(b)[:, None], chosen].set(
        jnp.arange(kept, dtype=jnp.int32)[None, :])
    cand_parent = jnp.take_along_axis(parents, chosen, axis=1)
    parent_slot = jnp.where(cand_parent < 0, -1,
                            jnp.take_along_axis(slot_of, jnp.maximum(cand_parent, 0), axis=1))
    # A child ranked above its parent cannot happen (scores only fall with depth and
    # ties go to the lower index), but a dropped parent would orphan it: mask it out.
    valid = jnp.ones((b, kept), bool)
    for _ in range(shape.depth):
        parent_ok = jnp.take_along_axis(valid, jnp.maximum(parent_slot, 0), axis=1)
        valid = (parent_slot == -1) | ((parent_slot >= 0) & parent_ok)
    tree_tokens = to_target(jnp.take_along_axis(tokens, chosen, axis=1))
    probs = jnp.exp(jnp.take_along_axis(scores, chosen, axis=1))
    pad = shape.capacity - kept
    if pad:
        tree_tokens = jnp.pad(tree_tokens, ((0, 0), (0, pad)))
        parent_slot = jnp.pad(parent_slot, ((0, 0), (0, pad)), constant_values=-1)
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
        probs = jnp.pad(probs, ((0, 0), (0, pad)))
    return DraftTree(tokens=tree_tokens.astype(jnp.int32), parents=jnp.where(valid, parent_slot, -1),
                     valid=valid, draft_probs=jnp.where(valid, probs, 0.0))


def _tree_q(tree: DraftTree, q_root, q_rows, q_owner, shape: TreeShape, chosen, q_to_target) -> jax.Array:
    """q_dists [B, T + 1, V]: row 0 the root's q, row i + 1 the q node i's children came from
    (uniform for nodes that were never expanded: they have no children)."""
    b = q_root.shape[0]
    c = shape.num_candidates
    root = q_to_target(q_root)
    v = root.shape[-1]
    if not q_rows:
        node_q = jnp.full((b, tree.capacity, v), 1.0 / v, jnp.float32)
        return jnp.concatenate([root[:, None], node_q], axis=1)
    frontier_q = jnp.concatenate(q_rows, axis=1)  # [B, (D-1)k, Vd]
    owners = jnp.concatenate(q_owner, axis=1)  # global candidate index of each expanded node
    row_of = jnp.full((b, c), -1, jnp.int32).at[jnp.arange(b)[:, None], owners].set(
        jnp.arange(owners.shape[1], dtype=jnp.int32)[None, :])
    node_row = jnp.take_along_axis(row_of, chosen, axis=1)  # [B, kept]
    picked = jnp.take_along_axis(frontier_q, jnp.maximum(node_row, 0)[:, :, None], axis=1)
    node_q = jnp.where((node_row >= 0)[:, :, None], q_to_target(picked), 1.0 / v)
    pad = tree.capacity - node_q.shape[1]
    if pad:
        node_q = jnp.concatenate([node_q, jnp.full((b, pad, v), 1.0 / v, node_q.dtype)], axis=1)
    return jnp.concatenate([root[:, None], node_q], axis=1).astype(jnp.float32)
