"""Draft trees as data: fixed-capacity arrays plus the helpers every step needs.

A tree holds T candidate tokens per sequence. ``parents[b, i]`` is the index of
node i's parent, or -1 when node i is a child of the last accepted token (the
*root*, which is not stored in the tree). Parents always precede children
(``parents[b, i] < i``), so a chain is ``parents = [-1, 0, 1, ...]``. Unused
slots have ``valid = False`` and are masked everywhere: the shape never changes
from step to step, so jitted steps compile once per (B, T).

Inside verify the root is prepended as node 0, giving T + 1 query tokens; the
``*_with_root`` helpers work in that indexing.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftTree:
    """A batch of draft trees of capacity T.

    Attributes:
      tokens: int32[B, T] candidate token ids.
      parents: int32[B, T] parent index, -1 for children of the root.
      valid: bool[B, T] which slots hold real nodes.
      draft_probs: optional float32[B, T], the drafter's estimate of each node's
        probability given its path (scores for pruning and routing; not used by
        acceptance).
      q_dists: optional float32[B, T + 1, V], for drafters that *sample* their
        children: row 0 is the distribution the root's children were drawn
        from, row i + 1 the one node i's children were drawn from. Routing
        reads it; acceptance does not (it compares nodes with the target's own
        draw at each position, lossless for any drafts: see ``steps.accept``).
    """

    tokens: jax.Array
    parents: jax.Array
    valid: jax.Array
    draft_probs: Optional[jax.Array] = None
    q_dists: Optional[jax.Array] = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        return self.tokens.shape[1]


class InvalidTreeError(ValueError):
    """A draft tree violates the structural rules (parents, shapes, vocab)."""


def empty_tree(batch_size: int, capacity: int) -> DraftTree:
    """A tree with no valid nodes: verify then does one plain decoding step."""
    return DraftTree(
        tokens=np.zeros((batch_size, capacity), np.int32),
        parents=np.full((batch_size, capacity), -1, np.int32),
        valid=np.zeros((batch_size, capacity), bool),
    )


def validate_tree(tree: DraftTree, vocab_size: Optional[int] = None) -> None:
    """Check a tree on the host; raise ``InvalidTreeError`` naming the first problem.

    Rules: 2-D arrays of one shape; ``-1 <= parents[i] < i`` for valid nodes (so
    no cycles); a valid node's parent is valid; token ids inside the vocab.
    """
    tokens = np.asarray(tree.tokens)
    parents = np.asarray(tree.parents)
    valid = np.asarray(tree.valid)
    if tokens.ndim != 2:
        raise InvalidTreeError(f"tree tokens must be [B, T], got shape {tokens.shape}")
    for name, arr in (("parents", parents), ("valid", valid)):
        if arr.shape != tokens.shape:
            raise InvalidTreeError(f"tree {name} has shape {arr.shape}, tokens have {tokens.shape}")
    if tree.draft_probs is not None and np.shape(tree.draft_probs) != tokens.shape:
        raise InvalidTreeError(
            f"tree draft_probs has shape {np.shape(tree.draft_probs)}, tokens have {tokens.shape}")
    if tree.q_dists is not None:
        qs = np.shape(tree.q_dists)
        if len(qs) != 3 or qs[:2] != (tokens.shape[0], tokens.shape[1] + 1):
            raise InvalidTreeError(f"tree q_dists must be [B, T + 1, V], got {qs}")
        if vocab_size is not None and qs[2] != vocab_size:
            raise InvalidTreeError(f"tree q_dists vocab {qs[2]} != target vocab {vocab_size}")
    index = np.arange(tokens.shape[1])
    bad_order = valid & ((parents < -1) | (parents >= index[None, :]))
    if bad_order.any():
        b, i = np.argwhere(bad_order)[0]
        raise InvalidTreeError(
            f"sequence {b} node {i}: parent {parents[b, i]} must be -1 or an earlier node "
            f"(parents precede children; this also rules out cycles)")
    parent_valid = np.take_along_axis(valid, np.maximum(parents, 0), axis=1) | (parents == -1)
    orphan = valid & ~parent_valid
    if orphan.any():
        b, i = np.argwhere(orphan)[0]
        raise InvalidTreeError(f"sequence {b} node {i}: its parent {parents[b, i]} is not a valid node")
    if vocab_size is not None:
        out = valid & ((tokens < 0) | (tokens >= vocab_size))
        if out.any():
            b, i = np.argwhere(out)[0]
            raise InvalidTreeError(
                f"sequence {b} node {i}: token id {tokens[b, i]} outside the vocab [0, {vocab_size})")


def parents_with_root(parents: jax.Array, valid: jax.Array) -> jax.Array:
    """int32[B, T + 1] parents in root-prepended indexing; the root is its own parent.

    Invalid nodes also point at themselves so they never join a real path.
    """
    b, t = parents.shape
    own = jnp.arange(1, t + 1, dtype=jnp.int32)[None, :]
    shifted = jnp.where(valid, parents.astype(jnp.int32) + 1, own)
    return jnp.concatenate([jnp.zeros((b, 1), jnp.int32), shifted], axis=1)


def ancestor_mask(parents_r: jax.Array) -> jax.Array:
    """bool[B, N, N]: ``mask[b, i, j]`` is True when j is i or an ancestor of i.

    ``parents_r`` is in root-prepended indexing (a self-loop marks a root).
    Pointer doubling: log2(N) gathers instead of a loop over depth.
    """
    n = parents_r.shape[-1]
    eye = jnp.eye(n, dtype=bool)
    reach = jnp.broadcast_to(eye, parents_r.shape + (n,))
    reach = reach | jax.nn.one_hot(parents_r, n, dtype=bool)
    jump = parents_r
    steps = max(1, int(np.ceil(np.log2(max(n, 2)))))
    for _ in range(steps):
        # reach(i) |= reach(jump(i)); jump(i) = jump(jump(i))
        reach = reach | jnp.take_along_axis(reach, jump[..., None], axis=1)
        jump = jnp.take_along_axis(jump, jump, axis=1)
    return reach


def depths(ancestors: jax.Array) -> jax.Array:
    """int32[B, N] depth of each node (root = 0) from its ancestor mask."""
    return ancestors.sum(-1).astype(jnp.int32) - 1
