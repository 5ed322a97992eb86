"""Pieces shared by the ragged paged tree-attention kernels: the block plan and the mask.

Both kernels work on *query blocks*: `block_q` consecutive packed rows of one
sequence (a sequence with q rows owns cdiv(q, block_q) blocks, its last one
padded).  The wrapper gathers the packed queries and new keys into that
block-major layout once per call (small tensors: the pages are never copied)
and gathers the outputs back, so every kernel program sees rows of exactly one
sequence, one page table and one cached length.

The tree mask is built once per step from the parent arrays, as int32 bit
words (`ancestor_words`, pointer doubling: log2(rows) gathers of the words),
and every layer and head reuses it.  Expanding parents inside the kernel would
mean pointer chasing (a gather per tree level) in every program of every
layer, which Mosaic does not lower well; the packed words cost cdiv(q, 32)
int32 per query row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from ._tree_common import BITS_PER_WORD, pad_axis


class BlockPlan(NamedTuple):
    """Where each query block comes from; all int32, traced.

    seq [NB]: the block's sequence (clamped into [0, S) for padding blocks);
    index [NB]: the block's index within its sequence, -1 for padding blocks;
    context [NB]: the sequence's cached length, 0 for padding blocks;
    rows [NB, block_q]: packed row of each block row (clamped), live [NB, block_q];
    block_of_row [Q], slot_of_row [Q]: the inverse map, packed row -> (block, row).
    """

    seq: jax.Array
    index: jax.Array
    context: jax.Array
    rows: jax.Array
    live: jax.Array
    block_of_row: jax.Array
    slot_of_row: jax.Array


def num_query_blocks(total_rows: int, num_seqs: int, block_q: int) -> int:
    """Static upper bound on query blocks: each sequence wastes at most one partial block."""
    return max(1, min(pl.cdiv(total_rows, block_q) + num_seqs, total_rows))


def sequence_of_rows(cu_q_lens: jax.Array, total_rows: int) -> jax.Array:
    """int32[Q]: the sequence of each packed row; S for rows past cu_q_lens[-1] (padding)."""
    return jnp.searchsorted(cu_q_lens[1:], jnp.arange(total_rows), side="right").astype(jnp.int32)


def block_plan(cu_q_lens: jax.Array, cached_lens: jax.Array, total_rows: int, block_q: int) -> BlockPlan:
    """Cut each sequence's packed rows into blocks of `block_q` (see the module docstring)."""
    num_seqs = cached_lens.shape[0]
    num_blocks = num_query_blocks(total_rows, num_seqs, block_q)
    q_lens = cu_q_lens[1:] - cu_q_lens[:-1]
    blocks_end = jnp.cumsum(pl.cdiv(q_lens, block_q))
    blocks_start = blocks_end - pl.cdiv(q_lens, block_q)
    block_ids = jnp.arange(num_blocks)
    seq = jnp.searchsorted(blocks_end, block_ids, side="right")
    real = seq < num_seqs
    seq = jnp.minimum(seq, num_seqs - 1).astype(jnp.int32)
    index = jnp.where(real, block_ids - blocks_start[seq], -1).astype(jnp.int32)
    offsets = index[:, None] * block_q + jnp.arange(block_q)
    live = real[:, None] & (offsets < q_lens[seq][:, None])
    rows = jnp.clip(cu_q_lens[seq][:, None] + offsets, 0, total_rows - 1).astype(jnp.int32)

    row_seq = sequence_of_rows(cu_q_lens, total_rows)
    row_seq_c = jnp.minimum(row_seq, num_seqs - 1)
    rel = jnp.arange(total_rows) - cu_q_lens[row_seq_c]
    return BlockPlan(
        seq=seq,
        index=index,
        context=jnp.where(real, cached_lens[seq], 0).astype(jnp.int32),
        rows=rows,
        live=live,
        block_of_row=jnp.clip(blocks_start[row_seq_c] + rel // block_q, 0, num_blocks - 1).astype(jnp.int32),
        slot_of_row=(rel % block_q).astype(jnp.int32),
    )


def ancestor_words(parents: jax.Array, cu_q_lens: jax.Array, num_words: int) -> jax.Array:
    """int32[Q, W]: bit j of row i is set iff row j of i's sequence is i itself or an ancestor.

    parents are relative to the sequence's first row (-1: child of the cached
    prefix).  Pointer doubling: after round k each row holds its ancestors at
    distance < 2^k and a pointer to the one at distance 2^k, so ceil(log2(Q))
    rounds cover any depth.  Rows past cu_q_lens[-1] get no bits.
    """
    total_rows = parents.shape[0]
    num_seqs = cu_q_lens.shape[0] - 1
    row_seq = sequence_of_rows(cu_q_lens, total_rows)
    real = row_seq < num_seqs
    first = cu_q_lens[jnp.minimum(row_seq, num_seqs - 1)]
    rel = jnp.arange(total_rows) - first
    bit = jnp.left_shift(jnp.uint32(1), (rel % BITS_PER_WORD).astype(jnp.uint32))
    words = jnp.where((jnp.arange(num_words)[None, :] == (rel // BITS_PER_WORD)[:, None]) & real[:, None],
                      bit[:, None], jnp.uint32(0))
    up = jnp.where(real & (parents >= 0), first + parents, -1)
    for _ in range(max(1, (total_rows - 1).bit_length())):
        has = up >= 0
        target = jnp.clip(up, 0, total_rows - 1)
        words = words | jnp.where(has[:, None], words[target], jnp.uint32(0))
        up = jnp.where(has, up[target], -1)
    return lax.bitcast_convert_type(words, jnp.int32)


def fit_words(words: jax.Array, num_words: int) -> jax.Array:
    """Ancestor words [Q, W'] cut or zero-padded to the kernel's W words (bits past a sequence are zero)."""
    return words[:, :num_words] if words.shape[1] >= num_words else pad_axis(words, 1, num_words)


def mask_blocks(words: jax.Array, plan: BlockPlan, block_q: int, group: int) -> jax.Array:
    """[Q, KB*wpb] words -> int32[NB, KB, block_q*G, wpb]: one query block's bits for one key block.

    Key block kb of a sequence is its rows [kb*block_q, (kb+1)*block_q), so its
    bits are words [kb*wpb, (kb+1)*wpb) of each row (block_q a multiple of 32).
    Rows are repeated G times, in the kernels' (row, group head) order.
    """
    words_per_block = block_q // BITS_PER_WORD
    num_blocks = plan.rows.shape[0]
    blocks = jnp.where(plan.live[..., None], words[plan.rows], 0)  # [NB, bq, W]
    blocks = blocks.reshape(num_blocks, block_q, -1, words_per_block).transpose(0, 2, 1, 3)
    return jnp.repeat(blocks, group, axis=2)


def gather_rows(x: jax.Array, plan: BlockPlan) -> jax.Array:
    """Packed [Q, H, D] -> [NB, H, block_q, D], padding rows zero."""
    blocks = jnp.where(plan.live[..., None, None], x[plan.rows], jnp.zeros((), x.dtype))
    return blocks.transpose(0, 2, 1, 3)


def group_query_blocks(q: jax.Array, plan: BlockPlan, num_kv_heads: int) -> jax.Array:
    """Packed q [Q, Hq, D] -> [NB, Hkv, block_q*G, D], rows ordered (row, group head)."""
    blocks = jnp.where(plan.live[..., None, None], q[plan.rows], jnp.zeros((), q.dtype))
    nb, bq, hq, d = blocks.shape
    g = hq // num_kv_heads
    return blocks.reshape(nb, bq, num_kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(nb, num_kv_heads, bq * g, d)


def packed_outputs(out: jax.Array, plan: BlockPlan, cu_q_lens: jax.Array) -> jax.Array:
    """Kernel output [NB, Hkv, block_q*G, D] -> packed [Q, Hq, D]; rows past cu_q_lens[-1] are zero."""
    nb, hkv, rows, d = out.shape
    block_q = plan.rows.shape[1]
    g = rows // block_q
    per_row = out.reshape(nb, hkv, block_q, g, d).transpose(0, 2, 1, 3, 4).reshape(nb, block_q, hkv * g, d)
    packed = per_row[plan.block_of_row, plan.slot_of_row]
    real = jnp.arange(packed.shape[0]) < cu_q_lens[-1]
    return jnp.where(real[:, None, None], packed, jnp.zeros((), packed.dtype))


def num_key_blocks(max_q_len: int, block_q: int) -> int:
    """Key blocks per sequence for its new rows (static); block_q must be whole mask words."""
    if block_q < BITS_PER_WORD or block_q % BITS_PER_WORD:
        raise ValueError(f"block_q must be a positive multiple of {BITS_PER_WORD} (whole mask words), got {block_q}")
    return max(1, pl.cdiv(max_q_len, block_q))
