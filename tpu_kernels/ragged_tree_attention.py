"""Ragged paged tree attention: many sequences' trees (or prefill chunks) in one call.

For continuous batching: each sequence keeps its KV in pages of a shared pool,
and one step packs every running sequence's new rows along one axis.

Layout (shared by the reference and both kernels):
  q:           [Q, Hq, D]   packed query rows; sequence s owns rows
                            [cu_q_lens[s], cu_q_lens[s+1]); rows past cu_q_lens[S]
                            are padding (zero output)
  k_pages:     [P, Hkv, page_size, D] one layer's page pool (head-major in a page:
                            see ragged_tree_attention_tpu for why); or the stack
                            [L, P, Hkv, page_size, D] with `layer` (a traced int32
                            scalar) naming the layer read in place, as tree_attention
  v_pages:     like k_pages
  page_tables: int32[S, max_pages] sequence s's cached slot t lives in page
                            page_tables[s, t // page_size] at t % page_size; entries
                            past the cached length are never read (any value)
  cached_lens: int32[S]     cached prefix length per sequence
  cu_q_lens:   int32[S+1]   row offsets, cu_q_lens[0] == 0, non-decreasing
  new_k/new_v: [Q, Hkv, D]  keys/values of the packed rows themselves
  parents:     int32[Q]     each row's parent, relative to its sequence's first row:
                            -1 = child of the cached prefix, else < its own index.
                            A draft step's rows are root (-1) + T nodes; a prefill
                            chunk is a chain (-1, 0, 1, ...)
returns        [Q, Hq, D]

Row i of sequence s attends to cached slots [0, cached_lens[s]) through the
page table, and to itself and its ancestors among s's rows.  Sequences may
share pages (a common prompt prefix): the page tables just point at the same
physical pages.  The new rows are separate operands, as in tree_attention:
verify writes them into the pages after the layer scan (paged_cache.write_rows),
and the mask touches only them, never the cached prefix.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from . import _ragged_common as ragged
from ._tree_common import BITS_PER_WORD, MASK_VALUE
from .ragged_tree_attention_gpu import ragged_tree_attention_gpu
from .ragged_tree_attention_tpu import ragged_tree_attention_tpu

IMPLS = ("auto", "xla", "pallas")
KERNELS = {"tpu": ragged_tree_attention_tpu, "gpu": ragged_tree_attention_gpu}
KERNEL_OPTIONS = {"tpu": frozenset({"block_q"}), "gpu": frozenset({"block_q", "num_warps", "num_stages"})}


def check_shapes(q, k_pages, v_pages, page_tables, cached_lens, cu_q_lens, new_k, new_v, parents, layer=None) -> None:
    """Raise ValueError naming the first operand whose shape or dtype breaks the layout."""
    if layer is not None:
        if k_pages.ndim != 5 or v_pages.shape != k_pages.shape:
            raise ValueError(f"with `layer`, k_pages and v_pages must be the stacked [L, P, Hkv, page_size, D], "
                             f"got shapes {k_pages.shape} and {v_pages.shape}")
        if jnp.shape(layer) != () or not jnp.issubdtype(jnp.asarray(layer).dtype, jnp.integer):
            raise ValueError(f"layer must be an integer scalar, got {layer!r}")
        k_pages = v_pages = jax.ShapeDtypeStruct(k_pages.shape[1:], k_pages.dtype)
    if q.ndim != 3:
        raise ValueError(f"q must be packed [Q, Hq, D], got shape {q.shape}")
    total_rows, hq, d = q.shape
    if k_pages.ndim != 4 or k_pages.shape[3] != d:
        raise ValueError(f"k_pages must be [P, Hkv, page_size, D={d}], got shape {k_pages.shape}")
    if v_pages.shape != k_pages.shape:
        raise ValueError(f"v_pages shape {v_pages.shape} differs from k_pages shape {k_pages.shape}")
    hkv = k_pages.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads {hq} must be a multiple of kv heads {hkv}")
    if page_tables.ndim != 2 or not jnp.issubdtype(page_tables.dtype, jnp.integer):
        raise ValueError(f"page_tables must be int[S, max_pages], got {page_tables.dtype}{list(page_tables.shape)}")
    num_seqs = page_tables.shape[0]
    for name, x, shape in (("cached_lens", cached_lens, (num_seqs,)), ("cu_q_lens", cu_q_lens, (num_seqs + 1,)),
                           ("parents", parents, (total_rows,))):
        if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be int{list(shape)}, got {x.dtype}{list(x.shape)}")
    for name, x in (("new_k", new_k), ("new_v", new_v)):
        if x.shape != (total_rows, hkv, d):
            raise ValueError(f"{name} must be [Q, Hkv, D] = {(total_rows, hkv, d)}, got shape {x.shape}")


def check_values(page_tables, cached_lens, cu_q_lens, parents, page_size: int, max_q_len: Optional[int]) -> None:
    """Raise ValueError on concrete index operands the kernels would read wrongly; skipped when traced.

    The kernels clamp every index, so bad values give wrong numbers rather than
    a crash: cu_q_lens must start at 0 and never fall, every row's parent must
    be -1 or an earlier row of its sequence, the cached lengths must fit the
    page tables, and no sequence may have more rows than max_q_len.
    """
    if any(isinstance(x, jax.core.Tracer) for x in (page_tables, cached_lens, cu_q_lens, parents)):
        return
    cu, cached, parents = np.asarray(cu_q_lens), np.asarray(cached_lens), np.asarray(parents)
    if cu[0] != 0 or np.any(np.diff(cu) < 0) or cu[-1] > parents.shape[0]:
        raise ValueError(f"cu_q_lens must rise from 0 to at most Q={parents.shape[0]}, got {cu.tolist()}")
    if np.any(cached < 0) or np.any(cached > page_tables.shape[1] * page_size):
        raise ValueError(f"cached_lens must lie in [0, max_pages * page_size = {page_tables.shape[1] * page_size}], "
                         f"got {cached.tolist()}")
    if max_q_len is not None and np.any(np.diff(cu) > max_q_len):
        raise ValueError(f"a sequence has {int(np.diff(cu).max())} rows, more than max_q_len={max_q_len}")
    rel = np.arange(cu[-1]) - np.repeat(cu[:-1], np.diff(cu))
    bad = np.flatnonzero((parents[: cu[-1]] < -1) | (parents[: cu[-1]] >= rel))
    if bad.size:
        raise ValueError(f"parents[{bad[0]}] = {parents[bad[0]]} must be -1 or an earlier row of its sequence "
                         f"(row {rel[bad[0]]} of it)")


def tree_mask_words(parents: jax.Array, cu_q_lens: jax.Array, max_q_len: Optional[int] = None) -> jax.Array:
    """int32[Q, cdiv(max_q_len, 32)]: the kernels' ancestor bit words (bit j of row i: row j of i's
    sequence is i or an ancestor).  Build them once per step and pass them as `mask_words` to every
    layer's call, so the parents are expanded once, not per layer."""
    return ragged.ancestor_words(parents, cu_q_lens, -(-(max_q_len or parents.shape[0]) // BITS_PER_WORD))


def ancestor_matrix(parents: jax.Array, cu_q_lens: jax.Array) -> jax.Array:
    """bool[Q, Q]: row i may attend to packed row j (j is i or an ancestor of i), row by row.

    Parents precede children, so one pass in row order builds each row from its
    parent's row: the plain definition, kept independent of the kernels'
    pointer-doubled bit words.
    """
    total_rows = parents.shape[0]
    row_seq = ragged.sequence_of_rows(cu_q_lens, total_rows)
    real = row_seq < cu_q_lens.shape[0] - 1
    first = cu_q_lens[jnp.minimum(row_seq, cu_q_lens.shape[0] - 2)]
    eye = jnp.eye(total_rows, dtype=bool)

    def row(i, anc):
        inherited = jnp.where(parents[i] >= 0, anc[jnp.clip(first[i] + parents[i], 0, total_rows - 1)], False)
        return anc.at[i].set((inherited | eye[i]) & real[i])

    return lax.fori_loop(0, total_rows, row, jnp.zeros((total_rows, total_rows), bool))


def ragged_tree_attention_ref(q, k_pages, v_pages, page_tables, cached_lens, cu_q_lens, new_k, new_v, parents,
                              *, layer: Optional[jax.Array] = None, sm_scale: Optional[float] = None) -> jax.Array:
    """Plain-jnp reference in fp32, dense and clear rather than fast.

    Each sequence's cached prefix is gathered from its pages into a contiguous
    [S, Hkv, max_pages * page_size, D] view; every row scores its sequence's
    whole view plus all packed rows, masked to its prefix and its ancestors,
    in one softmax.  With `layer`, that layer of the stacked pools (clamped, as
    lax.dynamic_index_in_dim does).
    """
    check_shapes(q, k_pages, v_pages, page_tables, cached_lens, cu_q_lens, new_k, new_v, parents, layer)
    if layer is not None:
        k_pages = lax.dynamic_index_in_dim(k_pages, layer, keepdims=False)
        v_pages = lax.dynamic_index_in_dim(v_pages, layer, keepdims=False)
    total_rows, hq, d = q.shape
    num_pages, hkv, page_size, _ = k_pages.shape
    num_seqs, max_pages = page_tables.shape
    scale = d ** -0.5 if sm_scale is None else sm_scale
    table = jnp.clip(page_tables, 0, num_pages - 1)

    def contiguous(pages):  # [S, Hkv, C, D], C = max_pages * page_size
        return pages[table].transpose(0, 2, 1, 3, 4).reshape(num_seqs, hkv, max_pages * page_size, d)

    row_seq = jnp.minimum(ragged.sequence_of_rows(cu_q_lens, total_rows), num_seqs - 1)
    ctx_k, ctx_v = contiguous(k_pages)[row_seq], contiguous(v_pages)[row_seq]  # [Q, Hkv, C, D]
    qg = q.reshape(total_rows, hkv, hq // hkv, d).astype(jnp.float32) * scale
    prefix_scores = jnp.einsum("ikgd,ikcd->ikgc", qg, ctx_k.astype(jnp.float32))
    new_scores = jnp.einsum("ikgd,jkd->ikgj", qg, new_k.astype(jnp.float32))
    real = jnp.arange(total_rows) < cu_q_lens[-1]
    prefix_ok = (jnp.arange(max_pages * page_size)[None, :] < cached_lens[row_seq][:, None]) & real[:, None]
    valid = jnp.concatenate([prefix_ok, ancestor_matrix(parents, cu_q_lens)], axis=1)[:, None, None, :]
    scores = jnp.where(valid, jnp.concatenate([prefix_scores, new_scores], axis=-1), MASK_VALUE)
    probs = jnp.where(valid, jnp.exp(scores - scores.max(axis=-1, keepdims=True)), 0.0)
    total = probs.sum(axis=-1, keepdims=True)
    probs = probs / jnp.where(total > 0, total, 1.0)  # a row that sees nothing (padding) gets zeros
    ctx_v = jnp.where(prefix_ok[:, None, :, None], ctx_v.astype(jnp.float32), 0.0)  # stale slots may be NaN
    out = (jnp.einsum("ikgc,ikcd->ikgd", probs[..., : max_pages * page_size], ctx_v)
           + jnp.einsum("ikgj,jkd->ikgd", probs[..., max_pages * page_size:], new_v.astype(jnp.float32)))
    return out.reshape(total_rows, hq, d).astype(q.dtype)


def _kernel_backend(impl: str, backend: Optional[str], platform: str) -> Optional[str]:
    """Which kernel runs ("tpu" / "gpu"), or None for the jnp reference."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    if backend is not None and backend not in KERNELS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {tuple(KERNELS)}")
    if impl == "xla":
        return None
    if impl == "auto":
        return platform if platform in KERNELS else None
    return backend or (platform if platform in KERNELS else "tpu")


def ragged_tree_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_tables: jax.Array,
    cached_lens: jax.Array,
    cu_q_lens: jax.Array,
    new_k: jax.Array,
    new_v: jax.Array,
    parents: jax.Array,
    *,
    impl: str = "auto",
    backend: Optional[str] = None,
    layer: Optional[jax.Array] = None,
    mask_words: Optional[jax.Array] = None,
    sm_scale: Optional[float] = None,
    max_q_len: Optional[int] = None,
    interpret: bool = False,
    **block_sizes: int,
) -> jax.Array:
    """Ragged paged tree attention behind one switch, as tree_attention.tree_attention.

    impl: "xla" the reference; "pallas" the kernel of `backend` (default: the
    platform's, Mosaic on CPU, interpreted off its platform); "auto" TPU ->
    Mosaic, GPU -> Triton, else the reference.  layer: with stacked pools
    [L, P, Hkv, page_size, D], the layer to read (traced int32).  mask_words:
    tree_mask_words(parents, cu_q_lens, max_q_len) built once per step for all
    layers (the kernels build them from `parents` otherwise; the reference
    always reads `parents`).  max_q_len: static bound on
    rows per sequence (the kernels' key-block count; default all Q rows).
    block_sizes: tpu {block_q}; gpu {block_q, num_warps, num_stages}.
    """
    check_shapes(q, k_pages, v_pages, page_tables, cached_lens, cu_q_lens, new_k, new_v, parents, layer)
    check_values(page_tables, cached_lens, cu_q_lens, parents, k_pages.shape[-2], max_q_len)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    operands = (q, k_pages, v_pages, page_tables, cached_lens, cu_q_lens, new_k, new_v, parents)
    platform = jax.default_backend()
    kernel_backend = _kernel_backend(impl, backend, platform)
    if kernel_backend is None:
        return ragged_tree_attention_ref(*operands, layer=layer, sm_scale=scale)
    unknown = set(block_sizes) - KERNEL_OPTIONS[kernel_backend]
    if unknown:
        raise ValueError(f"unknown block-size options {sorted(unknown)} for the {kernel_backend} kernel; "
                         f"expected some of {sorted(KERNEL_OPTIONS[kernel_backend])}")
    if interpret or kernel_backend != platform:
        block_sizes["interpret"] = pltpu.InterpretParams() if kernel_backend == "tpu" else True
    return KERNELS[kernel_backend](*operands, layer, mask_words, sm_scale=scale, max_q_len=max_q_len,
                                   **block_sizes)
