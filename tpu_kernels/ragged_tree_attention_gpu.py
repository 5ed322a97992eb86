"""Ragged paged tree attention as a Pallas Triton (GPU) kernel.

Grid (query block, kv head).  Each program holds the `block_q * G` query rows
of one KV group of one query block (`block_q` rows of one sequence, see
_ragged_common) in registers and loops over the sequence's live cached pages,
one page of keys per loop step, then over its new key blocks up to its own
(later blocks hold no ancestors) under the bit-packed ancestor mask; one online
softmax throughout.

The page pool [num_pages, Hkv, page_size, D], or the model's stacked
[L, num_pages, Hkv, page_size, D] read at the `layer` operand, is read in
place: each program's block spans every page (of every layer) of its head and
the loop loads page_table[seq, p]'s page by a dynamic index.  Per-block scalars (cached length, block index, first
key block) and the block's page-table row come in as small gathered operands,
since Triton index maps cannot read scalars.  Triton needs power-of-two tiles,
at least 16 wide for a matmul: page_size, block_q and D must be powers of two
>= 16 and the query rows are padded to one.  No split-K yet: a long cached
prefix is one program's loop (tree_attention_gpu splits it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _ragged_common as ragged
from . import _tree_common as common

DEFAULT_BLOCK_Q = 32
MIN_DOT_DIM = 16


def _ragged_kernel(
    context_ref,
    index_ref,
    first_ref,
    page_row_ref,
    layer_ref,
    q_ref,
    k_ref,
    v_ref,
    new_k_ref,
    new_v_ref,
    mask_ref,
    o_ref,
    *,
    page_size: int,
    sm_scale: float,
):
    context, index, first, layer = context_ref[0], index_ref[0], first_ref[0], layer_ref[0]
    q = q_ref[...]
    rows, d = q.shape

    def prefix_page(p, carry):
        page = page_row_ref[p]
        live = p * page_size + jnp.arange(page_size) < context
        k = plgpu.load(k_ref.at[layer, page, :, :])
        v = jnp.where(live[:, None], plgpu.load(v_ref.at[layer, page, :, :]), 0.0)  # stale slots may be NaN
        scores = common.scores_of(q, k, sm_scale)
        return common.online_softmax_update(*carry, scores, jnp.broadcast_to(live[None, :], scores.shape), v)

    def new_key_block(j, carry):
        scores = common.scores_of(q, new_k_ref[first + j, :, :], sm_scale)
        return common.online_softmax_update(*carry, scores, _key_block_mask(mask_ref, j, scores.shape[1]),
                                            new_v_ref[first + j, :, :])

    carry = (
        jnp.full((rows, 1), common.MASK_VALUE, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, d), jnp.float32),
    )
    carry = lax.fori_loop(0, pl.cdiv(context, page_size), prefix_page, carry)
    m, l, acc = lax.fori_loop(0, index + 1, new_key_block, carry)
    o_ref[...] = common.normalize(acc, l).astype(o_ref.dtype)


def _key_block_mask(mask_ref, key_block, num_cols: int) -> jax.Array:
    """common.unpack_mask_words for key block `key_block` of a [KB, R, W] ref, one indexer per load
    (Triton lowers a single indexer, not a ref view indexed again)."""
    rows = mask_ref.shape[1]
    cols = lax.broadcasted_iota(jnp.int32, (rows, num_cols), 1)
    word = jnp.zeros((rows, num_cols), jnp.int32)
    for w in range(mask_ref.shape[2]):
        word = jnp.where(cols // common.BITS_PER_WORD == w, mask_ref[key_block, :, pl.ds(w, 1)], word)
    return (lax.shift_right_logical(word, cols % common.BITS_PER_WORD) & 1) == 1


@functools.partial(
    jax.jit, static_argnames=("sm_scale", "block_q", "max_q_len", "num_warps", "num_stages", "interpret")
)
def ragged_tree_attention_gpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    cached_lens: jax.Array,
    cu_q_lens: jax.Array,
    new_k: jax.Array,
    new_v: jax.Array,
    parents: jax.Array,
    layer: jax.Array | None = None,
    mask_words: jax.Array | None = None,
    *,
    sm_scale: float,
    block_q: int = DEFAULT_BLOCK_Q,
    max_q_len: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Triton ragged paged tree attention; layout and semantics as ragged_tree_attention_ref.

    block_q: packed rows per query block and new keys per key block (a
    multiple of 32: one mask word per 32 keys); max_q_len: a static bound on
    rows per sequence (default: all rows).  mask_words: the step's
    ragged_tree_attention.tree_mask_words, built once for every layer
    (default: built here from `parents`).
    """
    k_pages, v_pages, layer = common.stacked_cache(k_pages, v_pages, layer)
    total_rows, hq, d = q.shape
    num_layers, num_pages, hkv, page_size, _ = k_pages.shape
    max_pages = page_tables.shape[1]
    for name, size in (("head_dim", d), ("page_size", page_size), ("block_q", block_q)):
        if size & (size - 1) or size < MIN_DOT_DIM:
            raise ValueError(f"the GPU kernel needs a power-of-two {name} >= {MIN_DOT_DIM}, got {size}")
    group = hq // hkv
    num_key_blocks = ragged.num_key_blocks(max_q_len or total_rows, block_q)
    dtype = k_pages.dtype

    plan = ragged.block_plan(cu_q_lens, cached_lens, total_rows, block_q)
    num_blocks = plan.seq.shape[0]
    num_words = num_key_blocks * block_q // common.BITS_PER_WORD
    words = ragged.ancestor_words(parents, cu_q_lens, num_words) if mask_words is None else mask_words
    words = ragged.fit_words(words, num_words)
    rows = block_q * group
    rows_padded = pl.next_power_of_2(rows)
    masks = common.pad_axis(ragged.mask_blocks(words, plan, block_q, group), 2, rows_padded)
    qb = common.pad_axis(ragged.group_query_blocks(q.astype(dtype), plan, hkv), 2, rows_padded)
    kb = ragged.gather_rows(new_k.astype(dtype), plan)
    vb = ragged.gather_rows(new_v.astype(dtype), plan)
    page_rows = common.pad_axis(jnp.clip(page_tables, 0, num_pages - 1).astype(jnp.int32)[plan.seq], 1,
                                pl.next_power_of_2(max_pages))
    first = (jnp.arange(num_blocks) - jnp.maximum(plan.index, 0)).astype(jnp.int32)

    scalar = pl.BlockSpec((1,), lambda blk, h: (blk,))
    per_block = lambda blk, h: (blk, h, 0, 0)
    pool_spec = pl.BlockSpec((num_layers, num_pages, None, page_size, d), lambda blk, h: (0, 0, h, 0, 0))
    new_spec = pl.BlockSpec((num_blocks, None, block_q, d), lambda blk, h: (0, h, 0, 0))
    out = pl.pallas_call(
        functools.partial(_ragged_kernel, page_size=page_size, sm_scale=sm_scale),
        grid=(num_blocks, hkv),
        in_specs=[
            scalar,
            scalar,
            scalar,
            pl.BlockSpec((None, page_rows.shape[1]), lambda blk, h: (blk, 0)),
            pl.BlockSpec((1,), lambda blk, h: (0,)),
            pl.BlockSpec((None, None, rows_padded, d), per_block),
            pool_spec,
            pool_spec,
            new_spec,
            new_spec,
            pl.BlockSpec((None, num_key_blocks, rows_padded, masks.shape[-1]), lambda blk, h: (blk, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows_padded, d), per_block),
        out_shape=jax.ShapeDtypeStruct((num_blocks, hkv, rows_padded, d), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_tree_attention_gpu",
    )(plan.context, plan.index, first, page_rows, layer, qb, k_pages, v_pages, kb, vb, masks)
    return ragged.packed_outputs(out[:, :, :rows], plan, cu_q_lens)
