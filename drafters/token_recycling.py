"""Token Recycling (Luo et al., 2024): a training-free device drafter.

An adjacency table ``[V, k]`` holds, for every token, the top-k successors the
target predicted the last time that token was scored. Every verify pass
refreshes the rows of *all* tree nodes from their logits (the candidate tokens
plain decoding throws away), and drafting walks a static tree template from
the root token: a node that is the r-th child of its parent gets
``table[parent_token, r]``. The table outlives requests (the paper's hot
start): ``end_batch`` keeps it on the drafter for the next batch.

Each successor also keeps the target's probability of it, so a drafted node
carries a path probability (the product along its path): the auto tree size
keeps the most probable nodes and calibrates these claims by what is accepted.
``update`` also records the next step's root, so a plain step (the auto size's
T = 0, no proposal) still teaches the table the root's successors.

Drafts are point masses (no q), so acceptance is lossless for any table.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.device import KeyedByConfig
from specjax.engine.sampling import vocab_top_k
from specjax.engine.tree import DraftTree

# The paper's default tree (its code's template "2.2.2"): 80 nodes in 6 levels
# (8, 21, 25, 15, 8, 3); a node is the path of child ranks from the root.
PAPER_TREE: tuple[tuple[int, ...], ...] = (
    *[(i,) for i in range(8)],
    *[(0, i) for i in range(8)], *[(1, i) for i in range(4)], *[(2, i) for i in range(3)],
    (3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0),
    *[(0, 0, i) for i in range(8)], (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1),
    (0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0),
    (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    *[(0, 0, 0, i) for i in range(5)], (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0),
    (0, 0, 4, 0), (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0),
    (0, 0, 1, 0, 0), (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)


def sorted_paths(paths: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Template paths in their slot order: breadth first, then by rank (a ``TreeTemplate``'s)."""
    return sorted((tuple(p) for p in paths), key=lambda p: (len(p), p))


@dataclasses.dataclass(frozen=True)
class TreeTemplate:
    """A static tree: ``parents[i]`` (-1 = child of the root, else an earlier node),
    ``ranks[i]`` which successor of its parent node i takes, ``depth[i]`` from 1."""

    parents: np.ndarray
    ranks: np.ndarray
    depth: np.ndarray

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "TreeTemplate":
        paths = sorted_paths(paths)
        index = {p: i for i, p in enumerate(paths)}
        missing = [p for p in paths if len(p) > 1 and p[:-1] not in index]
        if missing or any(len(p) == 0 for p in paths):
            raise ValueError(f"tree template paths must be non-empty and closed under prefixes; "
                             f"parents missing for {missing[:3]}")
        parents = np.array([index[p[:-1]] if len(p) > 1 else -1 for p in paths], np.int32)
        return cls(parents, np.array([p[-1] for p in paths], np.int32), np.array([len(p) for p in paths], np.int32))

    def truncated(self, capacity: int) -> "TreeTemplate":
        """The first ``capacity`` nodes (breadth-first order keeps every parent)."""
        return TreeTemplate(self.parents[:capacity], self.ranks[:capacity], self.depth[:capacity])

    def __len__(self) -> int:
        return len(self.parents)


def dominators(path: tuple[int, ...], present: set) -> int:
    """How many template nodes (``present``) are at least as probable as ``path``'s node and sit in an
    earlier slot, whatever the table: its ancestors, and each ancestor's (or its own) lower-rank
    siblings (a table row's successors are sorted by probability, so a lower rank is never less
    probable, and path probabilities never rise along a path)."""
    siblings = sum((path[:i] + (j,)) in present for i in range(len(path)) for j in range(path[i]))
    return len(path) - 1 + siblings


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecyclingState:
    table: jax.Array  # int32[V, k] latest top-k successors per token, -1 = never seen
    table_probs: jax.Array  # float32[V, k] the target's probability of each successor when it was scored
    tree_tokens: jax.Array  # int32[B, T + 1] the tree to be verified, root first (the root alone between steps)
    tree_valid: jax.Array  # bool[B, T + 1]


@dataclasses.dataclass(eq=False)
class TokenRecyclingDrafter(KeyedByConfig):
    """Token Recycling over a static template (default: the paper's 80-node tree, k = 8).

    ``capacity`` below the template size keeps its first nodes (breadth first);
    above it, the extra slots stay empty.
    """

    state_fields = ("table", "table_probs", "params")  # the learned table travels in the drafter state

    vocab_size: int
    capacity: int = 80
    k: int = 8
    paths: Sequence[Sequence[int]] = PAPER_TREE
    table: Optional[jax.Array] = None
    table_probs: Optional[jax.Array] = None
    hidden_layers: tuple[int, ...] = ()
    params: None = None

    def __post_init__(self):
        template = TreeTemplate.from_paths(self.paths)
        if template.ranks.max() >= self.k:
            raise ValueError(f"the template uses successor rank {template.ranks.max()}, but k = {self.k}")
        if self.k > self.vocab_size:
            raise ValueError(f"k = {self.k} exceeds the vocabulary ({self.vocab_size})")
        self.template = template.truncated(self.capacity)

    def best_nodes_proposer(self, size: int) -> "TokenRecyclingDrafter":
        """This drafter over the template nodes that can be among its ``size`` most probable for any
        table (fewer than ``size`` dominators, see ``dominators``): the auto size's small buckets walk
        a few nodes, not the whole template, and keep the same best nodes (ties go to the lower slot)."""
        kept = sorted_paths(self.paths)[: self.capacity]
        present = set(kept)
        paths = tuple(p for p in kept if dominators(p, present) < size)
        if len(paths) >= self.capacity:
            return self
        return dataclasses.replace(self, paths=paths, capacity=len(paths))

    def reset(self) -> None:
        """Forget every recycled successor (a cold start)."""
        self.table = self.table_probs = None

    def init_state(self, batch_size: int, max_len: int = 0) -> RecyclingState:
        if self.table is None:
            table, probs = jnp.full((self.vocab_size, self.k), -1, jnp.int32), jnp.zeros((self.vocab_size, self.k))
        else:
            table, probs = self.table, self.table_probs
        n = self.capacity + 1
        return RecyclingState(table, probs, jnp.zeros((batch_size, n), jnp.int32), jnp.zeros((batch_size, n), bool))

    def prefill(self, params, dstate, prompt_tokens, prompt_lengths, first_tokens, hidden=None):
        """The first generated token is the first root."""
        return _with_root(dstate, first_tokens.astype(jnp.int32), jnp.ones(first_tokens.shape, bool))

    def propose(self, params, dstate: RecyclingState, root_tokens, lengths, sampling, key, *,
                with_q: bool = False) -> tuple[DraftTree, RecyclingState]:
        b, t = root_tokens.shape[0], len(self.template)
        tokens = jnp.zeros((b, self.capacity + 1), jnp.int32).at[:, 0].set(root_tokens.astype(jnp.int32))
        valid = jnp.zeros((b, self.capacity + 1), bool).at[:, 0].set(True)
        probs = jnp.zeros((b, self.capacity + 1), jnp.float32).at[:, 0].set(1.0)
        for level in range(1, int(self.template.depth.max(initial=0)) + 1):
            nodes = np.flatnonzero(self.template.depth == level)
            parent_r = self.template.parents[nodes] + 1  # root-indexed
            succ = dstate.table[tokens[:, parent_r], self.template.ranks[nodes]]  # [B, n]
            succ_p = dstate.table_probs[tokens[:, parent_r], self.template.ranks[nodes]]
            tokens = tokens.at[:, nodes + 1].set(jnp.maximum(succ, 0))
            valid = valid.at[:, nodes + 1].set(valid[:, parent_r] & (succ >= 0))
            probs = probs.at[:, nodes + 1].set(probs[:, parent_r] * succ_p)
        parents = np.full(self.capacity, -1, np.int32)
        parents[:t] = self.template.parents
        tree = DraftTree(tokens=tokens[:, 1:], parents=jnp.broadcast_to(jnp.asarray(parents), (b, self.capacity)),
                         valid=valid[:, 1:], draft_probs=jnp.where(valid, probs, 0.0)[:, 1:])
        n = self.capacity + 1  # a ``best_nodes_proposer`` fills the front of the state's own (wider) tree
        return tree, dataclasses.replace(dstate, tree_tokens=dstate.tree_tokens.at[:, :n].set(tokens),
                                         tree_valid=jnp.zeros_like(dstate.tree_valid).at[:, :n].set(valid))

    def first_guess(self, params, dstate: RecyclingState, root_tokens) -> tuple[jax.Array, jax.Array]:
        """Each row's one-node draft (the root's top recycled successor) and whether it has one: the
        auto size checks it against plain steps' tokens, T = 1's acceptance at no verifying cost."""
        successor = dstate.table[root_tokens.astype(jnp.int32), 0]
        return jnp.maximum(successor, 0), successor >= 0

    def restrict(self, dstate: RecyclingState, kept: jax.Array, valid: jax.Array) -> RecyclingState:
        """Only the proposal's nodes ``kept`` [B, t] (``valid`` [B, t]) were verified (a smaller
        auto tree size): move them to the front, where ``update`` pairs them with their logits."""
        t = kept.shape[1]
        nodes = jnp.take_along_axis(dstate.tree_tokens[:, 1:], kept, axis=1)
        tree_valid = jnp.zeros_like(dstate.tree_valid).at[:, 0].set(dstate.tree_valid[:, 0])
        return dataclasses.replace(dstate, tree_tokens=dstate.tree_tokens.at[:, 1:t + 1].set(nodes),
                                   tree_valid=tree_valid.at[:, 1:t + 1].set(valid))

    def update(self, params, dstate: RecyclingState, accepted, aux) -> RecyclingState:
        """Every scored node's row becomes the target's top-k successors at that node (and their
        probabilities); the last emitted token becomes the next root.

        ``aux.logits`` [B, w, V] score the first w tree slots (the root, then the verified
        nodes): w = 1 for a plain step."""
        logits = aux.logits.astype(jnp.float32)
        w = logits.shape[1]
        top, succ = vocab_top_k(logits, self.k)  # [B, w, k]
        probs = jnp.exp(top - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        live = dstate.tree_valid[:, :w] & (accepted.num > 0)[:, None]
        rows = jnp.where(live, dstate.tree_tokens[:, :w], self.vocab_size).reshape(-1)  # out of range -> dropped
        table = dstate.table.at[rows].set(succ.astype(jnp.int32).reshape(-1, self.k), mode="drop")
        table_probs = dstate.table_probs.at[rows].set(probs.reshape(-1, self.k), mode="drop")
        last = jnp.take_along_axis(accepted.tokens, jnp.maximum(accepted.num - 1, 0)[:, None], axis=1)[:, 0]
        root = jnp.where(accepted.num > 0, last, dstate.tree_tokens[:, 0])
        dstate = dataclasses.replace(dstate, table=table, table_probs=table_probs)
        return _with_root(dstate, root.astype(jnp.int32), dstate.tree_valid[:, 0] | (accepted.num > 0))

    def end_batch(self, dstate: RecyclingState) -> None:
        self.table, self.table_probs = dstate.table, dstate.table_probs

    def take_rows(self, dstate: RecyclingState, index: jax.Array) -> RecyclingState:
        """Rows ``index``' trees; the table is shared by every row and kept whole."""
        return dataclasses.replace(dstate, tree_tokens=dstate.tree_tokens[index], tree_valid=dstate.tree_valid[index])


def _with_root(dstate: RecyclingState, root: jax.Array, valid: jax.Array) -> RecyclingState:
    """The state between steps: each row's tree is its root alone."""
    return dataclasses.replace(dstate, tree_tokens=dstate.tree_tokens.at[:, 0].set(root),
                               tree_valid=jnp.zeros_like(dstate.tree_valid).at[:, 0].set(valid))
