"""The verify/accept step over the paged KV cache, for a ragged batch (continuous batching).

One step packs every scheduled sequence's new rows along one axis (see
``tpu_kernels.ragged_tree_attention``): a sequence that decodes contributes its
root (the newest token, not cached yet) plus a tree of T nodes (T may differ
per sequence; 0 = a plain step), a sequence that prefills contributes a chunk
of its prompt as a chain. The decoder layers run over the packed rows with
ragged paged tree attention, the rows' K/V go to their pages
(``paged_cache.write_rows``), and acceptance runs per sequence on an
[S, N] view (N = the largest tree + 1, the layout of ``engine.steps``), with
the very rule of ``steps.select_accepted``: greedy the deepest argmax path,
sampled the per-position Gumbel draws, so the output is plain decoding's with
the same request seeds. The accepted rows then move to their final slots
(``paged_cache.compact_accepted``).

A prefill chunk that ends its prompt picks the first new token from its last
row, as a tree with no nodes whose root is that row: the draw is at the
prompt's length, as in ``steps.prefill``. A chunk that does not end its prompt
emits nothing (``emits`` False).

All host-side bookkeeping (lengths, budgets, pages) is the scheduler's
(``engine.scheduler``); this module is pure functions and one jitted step.
Shapes: S (slots) and N are fixed by the scheduler; Q (packed rows) is
padded to a power of two, so a step compiles once per row bucket.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from specjax.engine.paged_cache import compact_accepted, write_rows
from specjax.engine.sampling import SamplingParams
from specjax.engine.steps import select_accepted
from specjax.engine.tree import ancestor_mask, depths, parents_with_root
from specjax.models.config import ModelConfig
from specjax.models.decoder import linear, lm_head, mlp_block, qkv_projection, rms_norm
from specjax.models.rope import inverse_frequencies
from specjax.tpu_kernels.ragged_tree_attention import ragged_tree_attention, tree_mask_words


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """One step's inputs, host-built (numpy) with static shapes: Q packed rows, S slots, T = N - 1.

    Packed rows (sequence s owns [cu_q_lens[s], cu_q_lens[s + 1]); rows past
    cu_q_lens[S] are padding):
      tokens, positions, parents: int32[Q] (parents relative to the sequence's
        first row, -1 = child of the cached prefix; a tree's root is row 0).
    Per slot:
      cu_q_lens int32[S + 1], cached_lens int32[S], page_tables int32[S, max_pages];
      logit_rows int32[S, N]: the packed row of each acceptance node (the
        root first; for a prefill chunk, its last row);
      tree_tokens, tree_parents int32[S, T], tree_valid bool[S, T]: the tree in
        ``DraftTree`` indexing (parents -1 = child of the root);
      root_tokens int32[S], root_positions int32[S] (the root row's position:
        keys are drawn at root_positions + depth + 1);
      emits bool[S]: the slot picks tokens this step (decoding, or a prefill
        chunk that ends its prompt); remaining int32[S] its token budget;
      moves int32[S]: 1 where the accepted rows must move (a tree), else 0;
      keys: [S] the request keys (``sampling.request_keys``); sampling: per slot.
    """

    tokens: jax.Array
    positions: jax.Array
    parents: jax.Array
    cu_q_lens: jax.Array
    cached_lens: jax.Array
    page_tables: jax.Array
    logit_rows: jax.Array
    tree_tokens: jax.Array
    tree_parents: jax.Array
    tree_valid: jax.Array
    root_tokens: jax.Array
    root_positions: jax.Array
    emits: jax.Array
    remaining: jax.Array
    moves: jax.Array
    keys: jax.Array
    sampling: SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedAccepted:
    """What the host reads back: ``tokens[s, :num[s]]`` (accepted drafts, then the bonus)."""

    tokens: jax.Array  # int32[S, N]
    num: jax.Array  # int32[S], 0 for slots that emit nothing this step
    num_draft_accepted: jax.Array  # int32[S]
    hit_eos: jax.Array  # bool[S]


def row_bucket(rows: int, minimum: int = 8) -> int:
    """Packed row count padded to a power of two (at least ``minimum``): a handful of compiles."""
    return max(minimum, 1 << max(0, rows - 1).bit_length())


def paged_forward(params, cfg: ModelConfig, k_pages: jax.Array, v_pages: jax.Array, batch: PagedBatch, *,
                  attention: str = "xla", max_q_len: Optional[int] = None):
    """The decoder over packed ragged rows: (final-normed hidden [Q, H], pools with the rows written).

    Each layer reads its pages in place (``layer=i`` of the stacked pools) and
    attends to the cached prefix plus the row's ancestors in its own sequence;
    the ancestor bit words are built once for all layers. The layer scan
    collects the new K/V rows [L, Q, Hkv, D]; one ``write_rows`` puts them at
    [cached_len, cached_len + rows) of each sequence, after the scan.
    """
    inv_freq = inverse_frequencies(cfg.rope, cfg.head_dim)
    words = tree_mask_words(batch.parents, batch.cu_q_lens, max_q_len)
    x = params["embed"][batch.tokens][None]  # [1, Q, H]: the packed axis is the decoder's time axis
    positions = batch.positions[None]

    def layer(carry, lp):
        x, i = carry
        q, k, v = qkv_projection(cfg, lp, x, positions, inv_freq)
        k, v = k[0].astype(k_pages.dtype), v[0].astype(v_pages.dtype)
        out = ragged_tree_attention(q[0], k_pages, v_pages, batch.page_tables, batch.cached_lens, batch.cu_q_lens,
                                    k, v, batch.parents, impl=attention, layer=i, mask_words=words,
                                    max_q_len=max_q_len)
        x = x + linear(out.reshape(1, out.shape[0], -1).astype(x.dtype), lp["wo"], lp.get("bo"))
        return (mlp_block(cfg, lp, x), i + 1), (k, v)

    (x, _), (k_new, v_new) = lax.scan(layer, (x, jnp.int32(0)), params["layers"])
    k_pages, v_pages = write_rows(k_pages, v_pages, batch.page_tables, batch.cached_lens, batch.cu_q_lens,
                                  k_new, v_new)
    return rms_norm(x[0], params["final_norm"], cfg.rms_norm_eps), k_pages, v_pages


def paged_accept(params, cfg: ModelConfig, hidden: jax.Array, batch: PagedBatch, eos_ids: tuple[int, ...]):
    """Acceptance on the [S, N] view: ``steps.select_accepted`` over each slot's root + tree.

    The LM head runs on the gathered acceptance rows only ([S, N, V]), never on
    a prefill chunk's every row.
    """
    logits = lm_head(params, cfg, hidden[batch.logit_rows])  # [S, N, V]
    tokens = jnp.concatenate([batch.root_tokens[:, None], batch.tree_tokens], axis=1)
    parents = parents_with_root(batch.tree_parents, batch.tree_valid)
    valid = jnp.concatenate([jnp.ones_like(batch.tree_valid[:, :1]), batch.tree_valid], axis=1)
    anc = ancestor_mask(parents)
    return select_accepted(tokens, parents, valid, anc, depths(anc), logits, batch.root_positions, batch.keys,
                           batch.sampling, ~batch.emits, batch.remaining, eos_ids)


def paged_step_impl(params, k_pages: jax.Array, v_pages: jax.Array, batch: PagedBatch, *, cfg: ModelConfig,
                    attention: str = "xla", eos_ids: tuple[int, ...] = (), max_q_len: Optional[int] = None):
    """verify + accept + compaction as one pure function: (k_pages, v_pages, PagedAccepted)."""
    hidden, k_pages, v_pages = paged_forward(params, cfg, k_pages, v_pages, batch, attention=attention,
                                             max_q_len=max_q_len)
    chosen = paged_accept(params, cfg, hidden, batch, eos_ids)
    k_pages, v_pages = compact_accepted(k_pages, v_pages, batch.page_tables, batch.cached_lens, chosen.path,
                                        (chosen.n_draft + 1) * batch.moves)
    accepted = PagedAccepted(tokens=chosen.emitted, num=chosen.num,
                             num_draft_accepted=jnp.minimum(chosen.n_draft, chosen.num), hit_eos=chosen.hit_eos)
    return k_pages, v_pages, accepted


@functools.partial(jax.jit, static_argnames=("cfg", "attention", "eos_ids", "max_q_len"), donate_argnums=(1, 2))
def paged_step(params, k_pages: jax.Array, v_pages: jax.Array, batch: PagedBatch, *, cfg: ModelConfig,
               attention: str = "xla", eos_ids: tuple[int, ...] = (), max_q_len: Optional[int] = None):
    """``paged_step_impl`` as one dispatch, donating the page pools (written in place)."""
    return paged_step_impl(params, k_pages, v_pages, batch, cfg=cfg, attention=attention, eos_ids=eos_ids,
                           max_q_len=max_q_len)


# ------------------------------------------------------------------ host-side packing


@dataclasses.dataclass(frozen=True)
class Work:
    """One slot's part of a step, on the host.

    A tree: ``tokens`` = root + T nodes, ``parents`` in DraftTree indexing (T
    entries, -1 = child of the root); ``start`` the cached length (the root's
    position). A prefill chunk: ``tokens`` the chunk, ``parents`` None (a
    chain), ``start`` where the chunk begins, ``emits`` whether it ends the
    prompt (its last row then picks the first new token).
    """

    slot: int
    tokens: np.ndarray
    parents: Optional[np.ndarray]
    start: int
    emits: bool

    @property
    def rows(self) -> int:
        return len(self.tokens)


def pack_batch(works: list[Work], page_tables: np.ndarray, remaining: np.ndarray, keys: jax.Array,
               sampling: SamplingParams, num_nodes: int, min_rows: int = 8) -> PagedBatch:
    """The ``PagedBatch`` of a step's works (any slot order, each slot at most once).

    Slots without work get no rows and emit nothing. ``num_nodes`` is the fixed
    N (largest tree + 1); Q is padded to ``row_bucket``.
    """
    num_slots = page_tables.shape[0]
    t = num_nodes - 1
    q_lens = np.zeros(num_slots, np.int32)
    for work in works:
        q_lens[work.slot] = work.rows
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    total = row_bucket(int(cu[-1]), min_rows)
    tokens, positions = np.zeros(total, np.int32), np.zeros(total, np.int32)
    parents = np.full(total, -1, np.int32)
    cached = np.zeros(num_slots, np.int32)
    logit_rows = np.zeros((num_slots, num_nodes), np.int32)
    tree_tokens, tree_parents = np.zeros((num_slots, t), np.int32), np.full((num_slots, t), -1, np.int32)
    tree_valid = np.zeros((num_slots, t), bool)
    roots, root_positions = np.zeros(num_slots, np.int32), np.zeros(num_slots, np.int32)
    emits, moves = np.zeros(num_slots, bool), np.zeros(num_slots, np.int32)
    for work in works:
        s, first, n = work.slot, cu[work.slot], work.rows
        cached[s], emits[s] = work.start, work.emits
        tokens[first: first + n] = work.tokens
        if work.parents is None:  # a prefill chunk: a chain; its last row is the acceptance root
            parents[first: first + n] = np.arange(n) - 1
            positions[first: first + n] = work.start + np.arange(n)
            logit_rows[s] = first + n - 1
            roots[s], root_positions[s] = work.tokens[-1], work.start + n - 1
        else:
            nodes = n - 1
            parents[first: first + n] = np.concatenate([[-1], work.parents + 1])
            positions[first: first + n] = work.start + np.concatenate([[0], tree_depths(work.parents)])
            logit_rows[s] = first + np.minimum(np.arange(num_nodes), nodes)
            tree_tokens[s, :nodes], tree_parents[s, :nodes], tree_valid[s, :nodes] = (
                work.tokens[1:], work.parents, True)
            roots[s], root_positions[s], moves[s] = work.tokens[0], work.start, int(nodes > 0)
    return PagedBatch(tokens=tokens, positions=positions, parents=parents, cu_q_lens=cu, cached_lens=cached,
                      page_tables=page_tables, logit_rows=logit_rows, tree_tokens=tree_tokens,
                      tree_parents=tree_parents, tree_valid=tree_valid, root_tokens=roots,
                      root_positions=root_positions, emits=emits, remaining=remaining.astype(np.int32),
                      moves=moves, keys=keys, sampling=sampling)


def tree_depths(parents: np.ndarray) -> np.ndarray:
    """int32 depth of each node of one parent array (-1 = child of the root, depth 1); parents precede children."""
    depth = np.zeros(len(parents), np.int32)
    for i, p in enumerate(parents):
        depth[i] = 1 if p < 0 else depth[p] + 1
    return depth
