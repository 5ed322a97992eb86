"""Tree attention as a Pallas Triton (GPU) kernel, flash-decoding with split K.

Grid (batch, kv head, row block, split).  A GPU needs many programs in flight
to reach memory bandwidth, so each sequence's live prefix [0, length) is cut
into `num_splits` equal chunks, sized from the dynamic length.  Each program
streams its chunk in blocks of `block_k` keys for `block_r` query rows of one
KV group (online softmax in registers); split 0 also folds in the T tree keys
under the bit-packed T x T mask.  The per-split results (normalized output,
row max, row denominator) are merged afterwards with their log-sum-exp weights.

Triton needs power-of-two tiles, at least 16 wide for a matmul: the wrapper
pads the query rows and tree keys (small tensors); the cache is read in place,
with masked loads past the live prefix.  The cache is the model's stacked
[L, B, Hkv, S, D]: each program's cache block spans all layers of its (batch,
head), and the kernel offsets its loads by the `layer` operand, so no layer is
sliced out (copied); offsets switch to 64 bits when the stack passes 4 GiB.  Only plain loads, masked `plgpu.load`,
dots and elementwise ops are used, so `interpret=True` runs it on CPU.

Paged KV: the kernel would take a page table [B, pages] as one more input and
compute each block's base from page_table[b, block] instead of `start + j*block_k`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from . import _tree_common as common

DEFAULT_BLOCK_K = 64
DEFAULT_BLOCK_R = 64
MIN_DOT_DIM = 16  # Triton's smallest matmul tile
TARGET_PROGRAMS = 256  # about two waves on a 132-SM H100
MIN_CHUNK_PER_ROW = 8  # keys per query row a split must cover to pay for its partial output


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
    m_ref,
    l_ref,
    *,
    block_k: int,
    sm_scale: float,
    num_splits: int,
):
    split = pl.program_id(3)
    length = lengths_ref[0]
    layer = layer_ref[0]
    chunk = pl.cdiv(pl.cdiv(length, num_splits), block_k) * block_k
    start = split * chunk
    stop = jnp.minimum(start + chunk, length)
    q = q_ref[...]
    rows, d = q.shape

    def prefix_block(j, carry):
        key_pos = start + j * block_k + jnp.arange(block_k)
        live = key_pos < stop
        block = pl.ds(start + j * block_k, block_k)
        k = plgpu.load(k_ref.at[layer, block, :], mask=live[:, None], other=0.0)
        v = plgpu.load(v_ref.at[layer, block, :], mask=live[:, None], other=0.0)
        scores = common.scores_of(q, k, sm_scale)
        return common.online_softmax_update(*carry, scores, jnp.broadcast_to(live[None, :], scores.shape), v)

    def tree_block(carry):
        scores = common.scores_of(q, tree_k_ref[...], sm_scale)
        valid = common.unpack_mask_words(mask_ref, scores.shape[1])
        return common.online_softmax_update(*carry, scores, valid, tree_v_ref[...])

    carry = (
        jnp.full((rows, 1), common.MASK_VALUE, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, d), jnp.float32),
    )
    carry = lax.fori_loop(0, pl.cdiv(jnp.maximum(stop - start, 0), block_k), prefix_block, carry)
    m, l, acc = lax.cond(split == 0, tree_block, lambda c: c, carry)
    o_ref[...] = common.normalize(acc, l).astype(o_ref.dtype)
    m_ref[...] = m
    l_ref[...] = l


def default_num_splits(batch: int, kv_heads: int, row_blocks: int, rows: int, cache_len: int, block_k: int) -> int:
    """Enough programs to fill the GPU, but chunks long enough that the per-split
    partial outputs stay a small fraction of the K/V bytes they summarize."""
    wanted = pl.cdiv(TARGET_PROGRAMS, batch * kv_heads * row_blocks)
    affordable = cache_len // max(block_k, MIN_CHUNK_PER_ROW * rows)
    return max(1, min(wanted, affordable))


def merge_splits(o: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Combine per-split softmax results [B, Hkv, splits, R, *] with their LSE weights."""
    weight = l * jnp.exp(m - m.max(axis=2, keepdims=True))
    total = weight.sum(axis=2)
    out = (weight * o.astype(jnp.float32)).sum(axis=2)
    return jnp.where(total > 0.0, out / jnp.where(total > 0.0, total, 1.0), 0.0)


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "block_k", "block_r", "num_splits", "num_warps", "num_stages", "interpret"),
)
def tree_attention_gpu(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    tree_k: jax.Array,
    tree_v: jax.Array,
    tree_mask: jax.Array,
    layer: jax.Array | None = None,
    *,
    sm_scale: float,
    block_k: int = DEFAULT_BLOCK_K,
    block_r: int = DEFAULT_BLOCK_R,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
) -> jax.Array:
    """Triton tree attention; layout and semantics as tree_attention_ref.

    k_cache/v_cache: [B, Hkv, S, D], or the stacked [L, B, Hkv, S, D] with
    `layer` (traced int32 scalar) naming the layer read in place.
    block_k: prefix keys per loop step; block_r: query rows (T*G, padded) per
    program; num_splits: prefix chunks per sequence (default: default_num_splits).
    All tiles are powers of two; head_dim must be one too.
    """
    k_cache, v_cache, layer = common.stacked_cache(k_cache, v_cache, layer)
    b, t, hq, d = q.shape
    num_layers, hkv, s = k_cache.shape[0], k_cache.shape[2], k_cache.shape[3]
    if d & (d - 1) or d < MIN_DOT_DIM:
        raise ValueError(f"the GPU kernel needs a power-of-two head_dim >= {MIN_DOT_DIM}, got {d}")
    if block_k & (block_k - 1) or block_r & (block_r - 1):
        raise ValueError(f"block_k ({block_k}) and block_r ({block_r}) must be powers of two")
    rows = t * (hq // hkv)
    rows_padded = pl.next_power_of_2(max(rows, MIN_DOT_DIM))
    block_r = min(max(block_r, MIN_DOT_DIM), rows_padded)
    row_blocks = rows_padded // block_r
    tree_padded = pl.next_power_of_2(max(t, MIN_DOT_DIM))
    if num_splits is None:
        num_splits = default_num_splits(b, hkv, row_blocks, rows_padded, s, block_k)
    dtype = k_cache.dtype

    qg = common.pad_axis(common.group_queries(q.astype(dtype), hkv), 2, rows_padded)
    tk = common.pad_axis(common.heads_major(tree_k.astype(dtype)), 2, tree_padded)
    tv = common.pad_axis(common.heads_major(tree_v.astype(dtype)), 2, tree_padded)
    mask_words = common.pad_axis(common.pack_tree_mask(tree_mask, hq // hkv), 1, rows_padded)

    per_group = lambda b, h, r, c: (b, h, 0, 0)
    kv_spec = pl.BlockSpec((num_layers, None, None, s, d), lambda b, h, r, c: (0, b, h, 0, 0))
    row_block = lambda b, h, r, c: (b, h, c, r, 0)
    out_shape = lambda dt, last: jax.ShapeDtypeStruct((b, hkv, num_splits, rows_padded, last), dt)
    o, m, l = pl.pallas_call(
        functools.partial(_tree_attention_kernel, block_k=block_k, sm_scale=sm_scale, num_splits=num_splits),
        grid=(b, hkv, row_blocks, num_splits),
        in_specs=[
            pl.BlockSpec((1,), lambda b, h, r, c: (b,)),
            pl.BlockSpec((1,), lambda b, h, r, c: (0,)),
            pl.BlockSpec((None, None, block_r, d), lambda b, h, r, c: (b, h, r, 0)),
            kv_spec,
            kv_spec,
            pl.BlockSpec((None, None, tree_padded, d), per_group),
            pl.BlockSpec((None, None, tree_padded, d), per_group),
            pl.BlockSpec((None, block_r, mask_words.shape[-1]), lambda b, h, r, c: (b, r, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_r, d), row_block),
            pl.BlockSpec((None, None, None, block_r, 1), row_block),
            pl.BlockSpec((None, None, None, block_r, 1), row_block),
        ],
        out_shape=[out_shape(q.dtype, d), out_shape(jnp.float32, 1), out_shape(jnp.float32, 1)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="tree_attention_gpu",
    )(lengths.astype(jnp.int32), layer, qg, k_cache, v_cache, tk, tv, mask_words)
    out = merge_splits(o, m, l)[:, :, :rows].astype(q.dtype)
    return common.ungroup_output(out, t)
