"""Tree attention as a Pallas Mosaic (TPU) kernel.

Grid (batch, kv head, prefix block).  Each program holds the T*G query rows of
one KV group in VMEM and streams the cached prefix in blocks of `block_k` keys,
flash-decoding style (online softmax in VMEM scratch).  Blocks past a sequence's
length are neither fetched (the index map clamps to the last live block, so the
pipeline sees a repeated index and skips the DMA) nor computed.  The last grid
step folds in the T tree keys under the bit-packed T x T mask and writes the
normalized output.

The cache is the model's stacked [L, B, Hkv, S, D]; the layer to read is a
scalar-prefetch operand next to `lengths`, so the index map DMAs that layer's
blocks straight out of the stack and no layer is ever sliced out (copied).

Paged KV: a page table would be a second scalar-prefetch operand next to
`lengths`, the cache a page pool [P, Hkv, page, D], and `_kv_index_map` would
return (page_table[b, block], h, 0, 0) with block_k == page size.
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _tree_common as common

DEFAULT_BLOCK_K = 512
SUBLANES = 8


def _tree_attention_kernel(
    lengths_ref,
    layer_ref,
    q_ref,
    k_ref,
    v_ref,
    tree_k_ref,
    tree_v_ref,
    mask_ref,
    o_ref,
    m_scratch,
    l_scratch,
    acc_scratch,
    *,
    block_k: int,
    sm_scale: float,
    pad_tail: bool,
):
    b, i = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[b]

    @pl.when(i == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, common.MASK_VALUE, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    def fold(scores, valid, v):
        m, l, acc = common.online_softmax_update(m_scratch[...], l_scratch[...], acc_scratch[...], scores, valid, v)
        m_scratch[...], l_scratch[...], acc_scratch[...] = m, l, acc

    @pl.when(i * block_k < length)
    def _prefix_block():
        scores = common.scores_of(q_ref[...], k_ref[...], sm_scale)
        valid = i * block_k + lax.broadcasted_iota(jnp.int32, scores.shape, 1) < length
        v = v_ref[...]
        if pad_tail:  # the cache's last block overhangs S: its padding may hold NaNs
            rows_live = i * block_k + lax.broadcasted_iota(jnp.int32, (block_k, 1), 0) < length
            v = jnp.where(rows_live, v, jnp.zeros_like(v))
        fold(scores, valid, v)

    @pl.when(i == pl.num_programs(2) - 1)
    def _tree_and_output():
        scores = common.scores_of(q_ref[...], tree_k_ref[...], sm_scale)
        fold(scores, common.unpack_mask_words(mask_ref, scores.shape[1]), tree_v_ref[...])
        o_ref[...] = common.normalize(acc_scratch[...], l_scratch[...]).astype(o_ref.dtype)


def _kv_index_map(b, h, i, lengths_ref, layer_ref, *, block_k: int):
    last_live_block = jnp.maximum(pl.cdiv(lengths_ref[b], block_k) - 1, 0)
    return layer_ref[0], b, h, jnp.minimum(i, last_live_block), 0


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_k", "interpret"))
def tree_attention_tpu(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    tree_k: jax.Array,
    tree_v: jax.Array,
    tree_mask: jax.Array,
    layer: Optional[jax.Array] = None,
    *,
    sm_scale: float,
    block_k: int = DEFAULT_BLOCK_K,
    interpret: Union[bool, pltpu.InterpretParams] = False,
) -> jax.Array:
    """Mosaic tree attention; layout and semantics as tree_attention_ref.

    k_cache/v_cache: [B, Hkv, S, D], or the stacked [L, B, Hkv, S, D] with
    `layer` (traced int32 scalar) naming the layer read in place.
    block_k: prefix keys per grid step; clipped to S.  Keep it a multiple of 128
    (or >= S) so the K/V blocks tile VMEM.
    """
    k_cache, v_cache, layer = common.stacked_cache(k_cache, v_cache, layer)
    b, t, hq, d = q.shape
    hkv, s = k_cache.shape[2], k_cache.shape[3]
    rows = t * (hq // hkv)
    block_k = min(block_k, s)
    num_blocks = pl.cdiv(s, block_k)
    dtype = k_cache.dtype

    qg = common.group_queries(q.astype(dtype), hkv)
    tree_padded = pl.cdiv(t, SUBLANES) * SUBLANES  # a 1-row tree key block hits a Mosaic matvec bug
    tk = common.pad_axis(common.heads_major(tree_k.astype(dtype)), 2, tree_padded)
    tv = common.pad_axis(common.heads_major(tree_v.astype(dtype)), 2, tree_padded)
    mask_words = common.pack_tree_mask(tree_mask, hq // hkv)

    per_group = lambda b, h, i, *prefetch: (b, h, 0, 0)
    kv_map = functools.partial(_kv_index_map, block_k=block_k)
    kv_spec = pl.BlockSpec((None, None, None, block_k, d), kv_map)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, hkv, num_blocks),
        in_specs=[
            pl.BlockSpec((None, None, rows, d), per_group),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, None, tree_padded, d), per_group),
            pl.BlockSpec((None, None, tree_padded, d), per_group),
            pl.BlockSpec((None, rows, mask_words.shape[-1]), lambda b, h, i, *prefetch: (b, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, rows, d), per_group),
        scratch_shapes=[
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, d), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _tree_attention_kernel, block_k=block_k, sm_scale=sm_scale, pad_tail=s % block_k != 0
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((b, hkv, rows, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="tree_attention_tpu",
    )(lengths.astype(jnp.int32), layer, qg, k_cache, v_cache, tk, tv, mask_words)
    return common.ungroup_output(out, t)
