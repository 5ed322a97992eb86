"""Ragged paged tree attention as a Pallas Mosaic (TPU) kernel.

Grid (query block, kv head, step).  A query block is `block_q` rows of one
sequence (see _ragged_common); its `block_q * G` query rows of one KV group stay
in VMEM while the steps stream keys through an online softmax in VMEM scratch:

- steps [0, max_pages): one page of the cached prefix per step.  The page
  table and the per-block sequence, cached length and block index are
  scalar-prefetch operands, so the index map DMAs page_table[seq, step] straight
  out of the page pool.  Steps past the cached length repeat the last live
  page's index (the pipeline skips the DMA) and compute nothing.
- steps [max_pages, max_pages + KB): the sequence's new keys, one key block of
  `block_q` rows per step, under the bit-packed ancestor mask.  Key blocks
  after the query block's own hold no ancestors (parents precede children)
  and are skipped the same way.

Pages are [num_pages, Hkv, page_size, D]: one (page, head) block is a dense
page_size x D tile (D on the lanes), a single contiguous DMA; the token-major
[num_pages, page_size, Hkv, D] would make it Hkv strided rows of D.  Keep
page_size a multiple of 8 (sublanes); 128 or more keeps the DMAs long.  The
pools may be the model's stacked [L, num_pages, Hkv, page_size, D]: the layer
is one more scalar-prefetch operand, so no layer is ever sliced out (copied).
"""

from __future__ import annotations

import functools
from typing import Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _ragged_common as ragged
from . import _tree_common as common

DEFAULT_BLOCK_Q = 32


def _ragged_kernel(
    seq_ref,
    index_ref,
    context_ref,
    page_table_ref,
    layer_ref,
    q_ref,
    k_ref,
    v_ref,
    new_k_ref,
    new_v_ref,
    mask_ref,
    o_ref,
    m_scratch,
    l_scratch,
    acc_scratch,
    *,
    page_size: int,
    max_pages: int,
    sm_scale: float,
):
    blk, step = pl.program_id(0), pl.program_id(2)
    context = context_ref[blk]

    @pl.when(step == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, common.MASK_VALUE, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    def fold(scores, valid, v):
        m, l, acc = common.online_softmax_update(m_scratch[...], l_scratch[...], acc_scratch[...], scores, valid, v)
        m_scratch[...], l_scratch[...], acc_scratch[...] = m, l, acc

    @pl.when((step < max_pages) & (step * page_size < context))
    def _prefix_page():
        scores = common.scores_of(q_ref[...], k_ref[...], sm_scale)
        valid = step * page_size + lax.broadcasted_iota(jnp.int32, scores.shape, 1) < context
        # Slots past the cached length hold another step's rows or stale data (maybe NaN).
        rows_live = step * page_size + lax.broadcasted_iota(jnp.int32, (page_size, 1), 0) < context
        fold(scores, valid, jnp.where(rows_live, v_ref[...], jnp.zeros((), v_ref.dtype)))

    @pl.when((step >= max_pages) & (step - max_pages <= index_ref[blk]))
    def _new_keys():
        scores = common.scores_of(q_ref[...], new_k_ref[...], sm_scale)
        fold(scores, common.unpack_mask_words(mask_ref, scores.shape[1]), new_v_ref[...])

    @pl.when(step == pl.num_programs(2) - 1)
    def _output():
        o_ref[...] = common.normalize(acc_scratch[...], l_scratch[...]).astype(o_ref.dtype)


def _page_index_map(blk, h, step, seq_ref, index_ref, context_ref, page_table_ref, layer_ref, *, page_size,
                    max_pages):
    last_live = jnp.maximum(pl.cdiv(context_ref[blk], page_size) - 1, 0)
    page = jnp.minimum(jnp.minimum(step, max_pages - 1), last_live)
    return layer_ref[0], page_table_ref[seq_ref[blk] * max_pages + page], h, 0, 0


def _new_key_block(blk, step, index_ref, *, max_pages, num_blocks):
    """The sequence's key block for this step: its first block + (step - max_pages), clamped to live ones."""
    own = jnp.maximum(index_ref[blk], 0)
    return jnp.clip(blk - own + jnp.clip(step - max_pages, 0, own), 0, num_blocks - 1)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "max_q_len", "interpret"))
def ragged_tree_attention_tpu(
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
    interpret: Union[bool, pltpu.InterpretParams] = False,
) -> jax.Array:
    """Mosaic ragged paged tree attention; layout and semantics as ragged_tree_attention_ref.

    block_q: packed rows per query block and new keys per key block, a multiple
    of 32 (one mask word per 32 keys).  max_q_len: a static bound on rows per
    sequence (default: all rows), which sets the key-block steps.  mask_words:
    the step's ragged_tree_attention.tree_mask_words, built once for every
    layer (default: built here from `parents`).
    """
    k_pages, v_pages, layer = common.stacked_cache(k_pages, v_pages, layer)
    total_rows, hq, d = q.shape
    num_pages, hkv, page_size, _ = k_pages.shape[1:]
    num_seqs, max_pages = page_tables.shape
    group = hq // hkv
    num_key_blocks = ragged.num_key_blocks(max_q_len or total_rows, block_q)
    dtype = k_pages.dtype

    plan = ragged.block_plan(cu_q_lens, cached_lens, total_rows, block_q)
    num_blocks = plan.seq.shape[0]
    num_words = num_key_blocks * block_q // common.BITS_PER_WORD
    words = ragged.ancestor_words(parents, cu_q_lens, num_words) if mask_words is None else mask_words
    words = ragged.fit_words(words, num_words)
    masks = ragged.mask_blocks(words, plan, block_q, group)
    qb = ragged.group_query_blocks(q.astype(dtype), plan, hkv)
    kb = ragged.gather_rows(new_k.astype(dtype), plan)
    vb = ragged.gather_rows(new_v.astype(dtype), plan)
    table = jnp.clip(page_tables, 0, num_pages - 1).astype(jnp.int32).reshape(-1)

    rows = block_q * group
    per_block = lambda blk, h, step, *prefetch: (blk, h, 0, 0)
    page_map = functools.partial(_page_index_map, page_size=page_size, max_pages=max_pages)
    page_spec = pl.BlockSpec((None, None, None, page_size, d), page_map)
    key_block = functools.partial(_new_key_block, max_pages=max_pages, num_blocks=num_blocks)
    new_spec = pl.BlockSpec((None, None, block_q, d),
                            lambda blk, h, step, seq, index, *rest: (key_block(blk, step, index), h, 0, 0))
    mask_spec = pl.BlockSpec(
        (None, None, rows, masks.shape[-1]),
        lambda blk, h, step, *prefetch: (blk, jnp.clip(step - max_pages, 0, num_key_blocks - 1), 0, 0),
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(num_blocks, hkv, max_pages + num_key_blocks),
        in_specs=[pl.BlockSpec((None, None, rows, d), per_block), page_spec, page_spec, new_spec, new_spec,
                  mask_spec],
        out_specs=pl.BlockSpec((None, None, rows, d), per_block),
        scratch_shapes=[
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, d), jnp.float32),
        ],
    )
    kernel = functools.partial(_ragged_kernel, page_size=page_size, max_pages=max_pages, sm_scale=sm_scale)
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((num_blocks, hkv, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="ragged_tree_attention_tpu",
    )(plan.seq, plan.index, plan.context, table, layer, qb, k_pages, v_pages, kb, vb, masks)
    return ragged.packed_outputs(out, plan, cu_q_lens)
