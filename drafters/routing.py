"""TAPS: several device drafters for one target, routed per step and row, or merged into one tree.

Drafters trained on different data specialize (stories vs SQL, math vs
chat). Combining them at inference beats averaging their weights
(``weight_average``, the baseline): the router runs every drafter each step
and either

- **routes** (``confidence`` / ``entropy``): per row, verifies the tree of the
  drafter most sure of the next token: the highest top-1 probability of its
  root distribution, or the lowest entropy of it. The signal is a function of
  each drafter's state only, never of the tokens it sampled (acceptance is
  lossless for any tree, so this keeps the signal honest, not the output);
- **merges** (``merged``): one tree of capacity T holding every drafter's
  proposals, duplicate prefixes merged (``hybrid.merge_trees``); with
  ``split="even"`` each of the K drafters is guaranteed its T // K most probable
  nodes and the rest go to the most probable nodes of any drafter,
  ``split="prob"`` ranks all nodes by draft probability alone. Merged trees are
  drafted with top-k children and verified as point masses (lossless for any
  tree).

Every drafter is fed every emitted token after each step (whichever drafter's
tree was verified), so each keeps its own state in step with the context. The
router is itself a ``DeviceDrafter``: the whole loop runs on the device
(``engine/device_loop.py``), with the union of the drafters' hidden layers
requested from the target.

Signals without ``q_dists`` (greedy batches): the root's drafted children's
draft probabilities (the top-k of the root distribution); the entropy then
spreads the undrafted mass uniformly over the rest of the vocabulary (the
largest entropy consistent with the top-k: a flat draft must not look sure
because its tail was not drafted).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.device import DeviceDrafter, KeyedByConfig
from specjax.drafters.hybrid import (check_hybrid_member, concat_parts, feed_accepted, merge_trees, select_hidden,
                                     top_nodes)
from specjax.engine.tree import DraftTree

ROUTINGS = ("confidence", "entropy", "merged")
SPLITS = ("even", "prob")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TapsState:
    states: tuple  # each drafter's own state
    picks: jax.Array  # int32[B, K] steps each drafter's tree was verified (routing modes)


def root_distribution_signals(tree: DraftTree, vocab_size: int) -> tuple[jax.Array, jax.Array]:
    """(top-1 probability, entropy) [B] of the distribution the root's children were drafted from."""
    if tree.q_dists is not None:
        q = tree.q_dists[:, 0].astype(jnp.float32)
        entropy = -jnp.sum(jnp.where(q > 0, q * jnp.log(jnp.maximum(q, 1e-30)), 0.0), axis=-1)
        return q.max(axis=-1), entropy
    if tree.draft_probs is None:
        raise ValueError("routing needs draft_probs or q_dists in each drafter's tree")
    p = jnp.where(tree.valid & (tree.parents == -1), tree.draft_probs.astype(jnp.float32), 0.0)
    drafted = (p > 0).sum(axis=-1)
    rest = jnp.clip(1.0 - p.sum(axis=-1), 0.0, 1.0)
    spread = jnp.maximum(vocab_size - drafted, 1).astype(jnp.float32)  # the rest, uniform over the others
    plogp = lambda x: jnp.where(x > 0, x * jnp.log(jnp.maximum(x, 1e-30)), 0.0)
    return p.max(axis=-1), -(plogp(p).sum(axis=-1) + spread * plogp(rest / spread))


def pad_tree(tree: DraftTree, capacity: int, vocab_size: int) -> DraftTree:
    """The tree with empty slots appended up to ``capacity`` (uniform q rows for them)."""
    pad = capacity - tree.capacity
    if pad == 0:
        return tree
    if pad < 0:
        raise ValueError(f"a drafter's tree has {tree.capacity} slots, more than the router's {capacity}")
    widen = lambda x, value: jnp.pad(x, ((0, 0), (0, pad)), constant_values=value)
    q = tree.q_dists
    if q is not None:
        q = jnp.concatenate([q, jnp.full((q.shape[0], pad, vocab_size), 1.0 / vocab_size, q.dtype)], axis=1)
    probs = None if tree.draft_probs is None else widen(tree.draft_probs, 0.0)
    return DraftTree(widen(tree.tokens, 0), widen(tree.parents, -1), widen(tree.valid, False), probs, q)


def select_rows(trees: Sequence[DraftTree], pick: jax.Array) -> DraftTree:
    """Row b of tree ``pick[b]`` (trees of one capacity, all with or all without each optional field)."""

    def choose(*fields):
        if fields[0] is None:
            return None
        stacked = jnp.stack(fields)  # [K, B, ...]
        return jnp.take_along_axis(stacked, pick.reshape((1, -1) + (1,) * (stacked.ndim - 2)), axis=0)[0]

    return DraftTree(*(choose(*[getattr(t, f.name) for t in trees]) for f in dataclasses.fields(DraftTree)))


def weight_average(params_list: Sequence[Any]) -> Any:
    """The element-wise mean of same-architecture drafters' params (the TAPS comparison baseline).

    Integer leaves (e.g. EAGLE-3's draft-vocabulary map ``d2t``) must be equal in
    every drafter: averaging an index table is meaningless.
    """
    if len(params_list) < 1:
        raise ValueError("weight_average needs at least one params pytree")
    structures = {jax.tree_util.tree_structure(p) for p in params_list}
    if len(structures) != 1:
        raise ValueError("weight_average needs drafters of one architecture (their param trees differ)")

    def mean(path, *leaves):
        name = jax.tree_util.keystr(path)
        shapes = {np.shape(x) for x in leaves}
        if len(shapes) != 1:
            raise ValueError(f"weight_average: param {name} has shapes {sorted(shapes)}")
        if jnp.issubdtype(jnp.asarray(leaves[0]).dtype, jnp.floating):
            stacked = jnp.stack([jnp.asarray(x, jnp.float32) for x in leaves])
            return stacked.mean(axis=0).astype(jnp.asarray(leaves[0]).dtype)
        if not all(np.array_equal(np.asarray(leaves[0]), np.asarray(x)) for x in leaves[1:]):
            raise ValueError(f"weight_average: integer param {name} differs between drafters")
        return leaves[0]

    return jax.tree_util.tree_map_with_path(mean, *params_list)


@dataclasses.dataclass(eq=False)
class TapsDrafter(KeyedByConfig):
    """Route between (or merge the trees of) several device drafters for one target.

    Args:
      drafters: device drafters (EAGLE-3 heads, draft models) for the same target.
      routing: "confidence" (highest root top-1 probability), "entropy" (lowest
        root entropy) or "merged" (one tree holding every drafter's proposals).
      capacity: T of the verified tree; default the largest drafter's.
      vocab_size: the target's vocabulary (for padding q rows).
      split: merged mode: "even" (each drafter keeps its T // K best nodes first)
        or "prob" (draft probability alone).
    """

    drafters: Sequence[DeviceDrafter]
    vocab_size: int
    routing: str = "confidence"
    capacity: int = 0
    split: str = "even"

    def __post_init__(self):
        self.drafters = tuple(self.drafters)
        if len(self.drafters) < 2:
            raise ValueError(f"TAPS needs at least two drafters, got {len(self.drafters)}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        for d in self.drafters:
            check_hybrid_member(d)
        largest = max(d.capacity for d in self.drafters)
        self.capacity = self.capacity or largest
        if self.routing != "merged" and self.capacity < largest:
            raise ValueError(f"routing verifies one drafter's whole tree: capacity {self.capacity} < a drafter's "
                             f"{largest}")
        self.hidden_layers = tuple(sorted({i for d in self.drafters for i in d.hidden_layers}))
        self._hidden_index = [tuple(self.hidden_layers.index(i) for i in d.hidden_layers) for d in self.drafters]
        self.last_picks = None

    @property
    def params(self) -> tuple:
        return tuple(d.params for d in self.drafters)

    def init_state(self, batch_size: int, max_len: int) -> TapsState:
        return TapsState(tuple(d.init_state(batch_size, max_len) for d in self.drafters),
                         jnp.zeros((batch_size, len(self.drafters)), jnp.int32))

    def prefill(self, params, dstate: TapsState, prompt_tokens, prompt_lengths, first_tokens, hidden) -> TapsState:
        states = tuple(d.prefill(p, s, prompt_tokens, prompt_lengths, first_tokens,
                                 None if not idx else hidden[jnp.asarray(idx)])
                       for d, p, s, idx in zip(self.drafters, params, dstate.states, self._hidden_index))
        return dataclasses.replace(dstate, states=states)

    def propose(self, params, dstate: TapsState, root_tokens, lengths, sampling, key, *,
                with_q: bool = False) -> tuple[DraftTree, TapsState]:
        merged = self.routing == "merged"
        trees, states = [], []
        for d, p, s in zip(self.drafters, params, dstate.states):  # one key: each couples with the target's draws
            tree, s = d.propose(p, s, root_tokens, lengths, sampling, key, with_q=with_q and not merged)
            trees.append(tree)
            states.append(s)
        dstate = dataclasses.replace(dstate, states=tuple(states))
        if merged:
            return self.merged_tree(trees), dstate
        top1, entropy = zip(*(root_distribution_signals(t, self.vocab_size) for t in trees))
        signal = jnp.stack(top1 if self.routing == "confidence" else [-h for h in entropy], axis=1)  # [B, K]
        pick = jnp.argmax(signal, axis=1)
        tree = select_rows([pad_tree(t, self.capacity, self.vocab_size) for t in trees], pick)
        picks = dstate.picks + jax.nn.one_hot(pick, len(self.drafters), dtype=jnp.int32)
        return tree, dataclasses.replace(dstate, picks=picks)

    def merged_tree(self, trees: Sequence[DraftTree]) -> DraftTree:
        """One tree of ``capacity`` nodes from every drafter's tree (duplicate prefixes merged)."""
        share = self.capacity // len(trees) if self.split == "even" else 0
        parts = []
        for t in trees:
            if t.draft_probs is None:
                raise ValueError("merged routing ranks nodes by draft_probs; a drafter gave none")
            guaranteed = top_nodes(t.draft_probs, t.valid, share)
            parts.append((t.tokens, t.parents, t.valid, guaranteed + 0.5 * t.draft_probs, t.draft_probs))
        return merge_trees(*concat_parts(parts), self.capacity)[0]

    def update(self, params, dstate: TapsState, accepted, aux) -> TapsState:
        states = tuple(feed_accepted(d, p, s, accepted, select_hidden(aux, idx))
                       for d, p, s, idx in zip(self.drafters, params, dstate.states, self._hidden_index))
        return dataclasses.replace(dstate, states=states)

    def end_batch(self, dstate: TapsState) -> None:
        """Keep how often each drafter's tree was verified (``last_picks``, [B, K]) and pass the end on."""
        self.last_picks = np.asarray(dstate.picks)
        for d, s in zip(self.drafters, dstate.states):
            d.end_batch(s)
