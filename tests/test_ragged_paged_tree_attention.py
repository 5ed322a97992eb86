"""Ragged paged tree attention: the jnp reference against a float64 loop over explicit key
lists, and both Pallas kernels (Mosaic TPU, Triton GPU) against the reference in interpret
mode on CPU.  Page slots that no live key may read hold NaN, so a kernel that reads past a
cached length or through an unused page-table entry fails loudly."""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.tpu_kernels import _ragged_common as ragged
from specjax.tpu_kernels import ragged_tree_attention as rta


class Seq(NamedTuple):
    cached: int  # cached prefix length
    rows: int  # packed query rows (root + T nodes, or a prefill chunk)
    shape: str = "tree"  # "tree" (random parents) or "chain" (prefill chunk)


class Case(NamedTuple):
    name: str
    seqs: Sequence[Seq]
    q_heads: int
    kv_heads: int
    head_dim: int = 16
    page_size: int = 16
    max_pages: int = 4
    shared: Sequence[tuple[int, int, int]] = ()  # (seq a, seq b, pages): b's first pages are a's
    padding_rows: int = 0


def random_parents(rng: np.random.Generator, rows: int, shape: str) -> list[int]:
    """Parents relative to the sequence's first row: parents[i] < i, -1 = child of the cached prefix."""
    if shape == "chain":
        return list(range(-1, rows - 1))
    return [int(rng.integers(-1, i)) for i in range(rows)]


def make_inputs(case: Case, dtype=jnp.float32, seed: int = 0):
    """Operands in ragged_tree_attention's order; every page slot no live key may read is NaN."""
    rng = np.random.default_rng(seed)
    s, ps, d, hkv = len(case.seqs), case.page_size, case.head_dim, case.kv_heads
    num_pages = s * case.max_pages + 2
    free = list(rng.permutation(num_pages - 1) + 1)  # page 0 is never live: unused entries point at it
    tables = np.zeros((s, case.max_pages), np.int32)
    for i, seq in enumerate(case.seqs):
        tables[i, : -(-seq.cached // ps)] = [free.pop() for _ in range(-(-seq.cached // ps))]
    for a, b, pages in case.shared:
        tables[b, :pages] = tables[a, :pages]
    k_pages = np.full((num_pages, hkv, ps, d), np.nan, np.float32)
    v_pages = k_pages.copy()
    for i, seq in enumerate(case.seqs):
        for t in range(seq.cached):
            page, slot = tables[i, t // ps], t % ps
            if np.isnan(k_pages[page, 0, slot, 0]):
                k_pages[page, :, slot] = rng.standard_normal((hkv, d))
                v_pages[page, :, slot] = rng.standard_normal((hkv, d))
    parents = [p for seq in case.seqs for p in random_parents(rng, seq.rows, seq.shape)] + [0] * case.padding_rows
    total = len(parents)
    cu = np.concatenate([[0], np.cumsum([seq.rows for seq in case.seqs])])
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
    return (
        normal(total, case.q_heads, d),
        jnp.asarray(k_pages, dtype),
        jnp.asarray(v_pages, dtype),
        jnp.asarray(tables),
        jnp.asarray([seq.cached for seq in case.seqs], jnp.int32),
        jnp.asarray(cu, jnp.int32),
        normal(total, hkv, d),
        normal(total, hkv, d),
        jnp.asarray(parents, jnp.int32),
    )


def naive_ragged_attention(q, k_pages, v_pages, tables, cached, cu, new_k, new_v, parents) -> np.ndarray:
    """One query row and head at a time over an explicit key list (pages, then ancestors), in float64."""
    q, k_pages, v_pages, new_k, new_v = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages, new_k, new_v))
    page_size = k_pages.shape[2]
    group = q.shape[1] // k_pages.shape[1]
    out = np.zeros_like(q)
    for s in range(len(cached)):
        for i in range(cu[s], cu[s + 1]):
            ancestors, j = [], i - cu[s]
            while j >= 0:
                ancestors.append(cu[s] + j)
                j = parents[cu[s] + j]
            for h in range(q.shape[1]):
                kv = h // group
                slots = [(tables[s, t // page_size], t % page_size) for t in range(cached[s])]
                keys = [k_pages[p, kv, o] for p, o in slots] + [new_k[a, kv] for a in ancestors]
                values = [v_pages[p, kv, o] for p, o in slots] + [new_v[a, kv] for a in ancestors]
                logits = np.array([q[i, h] @ k for k in keys]) / np.sqrt(q.shape[2])
                weights = np.exp(logits - logits.max())
                out[i, h] = (weights / weights.sum()) @ np.array(values)
    return out


# Page size 16: cached lengths 16 and 32 end on a page boundary, 17 starts a page with one key.
MIXED = Case(
    "mixed_prefill_trees_shared_empty",
    seqs=[Seq(17, 5), Seq(16, 40, "chain"), Seq(32, 0), Seq(40, 9), Seq(0, 1), Seq(33, 1)],
    q_heads=4, kv_heads=2, shared=[(0, 3, 1), (2, 5, 2)], padding_rows=3,
)
CASES = [
    MIXED,
    Case("mqa_page_boundaries_deep_tree", [Seq(48, 34), Seq(64, 3), Seq(15, 2)], q_heads=4, kv_heads=1,
         shared=[(1, 0, 3)]),
    Case("no_prefix_group1", [Seq(0, 6), Seq(0, 33, "chain")], q_heads=2, kv_heads=2, head_dim=32, page_size=32,
         max_pages=2),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_reference_matches_float64_loop(case):
    args = make_inputs(case)
    expected = naive_ragged_attention(*[np.asarray(a) for a in args])
    np.testing.assert_allclose(np.asarray(rta.ragged_tree_attention_ref(*args)), expected, rtol=1e-5, atol=1e-5)


def test_pointer_doubled_words_equal_row_scan_mask():
    """The kernels' bit words (pointer doubling) against the reference's row-by-row ancestor matrix,
    on trees deeper than one mask word (a 70-row chain) and padding rows."""
    rng = np.random.default_rng(3)
    seqs = [Seq(0, 70, "chain"), Seq(0, 0), Seq(0, 45), Seq(0, 1)]
    parents = jnp.asarray([p for s in seqs for p in random_parents(rng, s.rows, s.shape)] + [0, 0], jnp.int32)
    cu = jnp.asarray(np.concatenate([[0], np.cumsum([s.rows for s in seqs])]), jnp.int32)
    words = np.asarray(ragged.ancestor_words(parents, cu, 3)).view(np.uint32)
    bits = (words[:, :, None] >> np.arange(32, dtype=np.uint32)) & 1
    dense = np.asarray(rta.ancestor_matrix(parents, cu))
    row_seq = np.searchsorted(np.asarray(cu)[1:], np.arange(len(parents)), side="right")
    for i in range(len(parents)):
        own = np.zeros(96, bool)
        if row_seq[i] < len(seqs):
            first = int(cu[row_seq[i]])
            own[: int(cu[row_seq[i] + 1]) - first] = dense[i, first: int(cu[row_seq[i] + 1])]
        else:
            assert not dense[i].any()
        np.testing.assert_array_equal(bits[i].reshape(-1).astype(bool), own, err_msg=f"row {i}")


KERNEL_OPTIONS = {"tpu": {}, "gpu": {"num_warps": 4}}
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


@functools.lru_cache(maxsize=None)
def jitted_pallas(backend: str, max_q_len):
    return jax.jit(functools.partial(rta.ragged_tree_attention, impl="pallas", backend=backend,
                                     max_q_len=max_q_len, **KERNEL_OPTIONS[backend]))


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference(case, backend):
    args = make_inputs(case)
    out = jitted_pallas(backend, None)(*args)
    assert out.shape == args[0].shape and np.all(np.isfinite(np.asarray(out)))
    expected = np.asarray(rta.ragged_tree_attention_ref(*args))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[int(args[5][-1]):] == 0.0)  # padding rows


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_bf16_with_row_bound(backend):
    """bf16 pages and queries, and a static max_q_len bound (fewer key-block steps than Q rows)."""
    args = make_inputs(MIXED, jnp.bfloat16, seed=1)
    out = jitted_pallas(backend, 40)(*args)
    assert out.dtype == jnp.bfloat16
    expected = np.asarray(rta.ragged_tree_attention_ref(*args), np.float32)
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_reads_stacked_pools_layer(backend):
    """Pools stacked over 3 layers with different values, read at a traced layer: a kernel that
    ignored `layer` (or read a neighbour) fails for every layer but one."""
    q, k_pages, v_pages, *rest = make_inputs(MIXED, seed=4)
    k_stack, v_stack = (jnp.stack([x * (i + 1) - i for i in range(3)]) for x in (k_pages, v_pages))
    attend = jax.jit(functools.partial(rta.ragged_tree_attention, impl="pallas", backend=backend))
    for layer in (2, 1):
        out = attend(q, k_stack, v_stack, *rest, layer=jnp.int32(layer))
        expected = rta.ragged_tree_attention_ref(q, k_stack[layer], v_stack[layer], *rest)
        np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_takes_mask_words_built_once(backend):
    """Words built once per step (for a row bound of 40, so fewer words than Q rows would give) serve
    every layer's call; wrong words change the output, so they are read."""
    args = make_inputs(MIXED, seed=5)
    words = rta.tree_mask_words(args[8], args[5], max_q_len=40)
    assert words.shape == (args[0].shape[0], 2)
    attend = functools.partial(rta.ragged_tree_attention, *args, impl="pallas", backend=backend, max_q_len=40)
    expected = np.asarray(rta.ragged_tree_attention_ref(*args))
    np.testing.assert_allclose(np.asarray(attend(mask_words=words)), expected, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(attend(mask_words=words | 1)), expected, atol=1e-3)


@pytest.fixture
def tpu_lowering_on_cpu(monkeypatch):
    """Lowering a Mosaic kernel asks the device for its TPU generation; on CPU, answer v5e."""
    tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
    if not hasattr(tpu_info, "registry"):
        pytest.skip("this jax has no TPU info registry")
    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend, platform", [("tpu", "tpu"), ("gpu", "cuda")])
def test_kernels_lower_for_their_hardware(backend, platform, dtype, tpu_lowering_on_cpu):
    """Interpret mode runs any jnp; the real lowerings (Mosaic MLIR, Triton IR) reject more, such as a ref
    view indexed twice in Triton, and need no accelerator to try."""
    args = [x.astype(dtype) if x.dtype == jnp.float32 else x for x in make_inputs(MIXED)]
    kernel = functools.partial(rta.KERNELS[backend], sm_scale=0.25)
    jax.jit(kernel).trace(*args).lower(lowering_platforms=(platform,))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"impl": "cuda"}, "unknown attention impl 'cuda'"),
        ({"impl": "pallas", "backend": "tpu", "num_warps": 4}, r"unknown block-size options \['num_warps'\]"),
        ({"impl": "pallas", "backend": "tpu", "block_q": 16}, "block_q must be a positive multiple of 32"),
    ],
)
def test_dispatcher_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rta.ragged_tree_attention(*make_inputs(CASES[2]), **kwargs)


@pytest.mark.parametrize(
    "index, bad, message",
    [
        (5, [0, 6, 5], "cu_q_lens must rise from 0"),
        (4, [0, 65], r"cached_lens must lie in \[0, max_pages \* page_size = 64\]"),
        (8, [-1, 0, 2] + [0] * 36, r"parents\[2\] = 2 must be -1 or an earlier row"),
        (8, [-1] * 6 + [-2] + [0] * 32, r"parents\[6\] = -2 must be -1 or an earlier row of its sequence \(row 0"),
    ],
)
def test_dispatcher_rejects_bad_indices(index, bad, message):
    args = list(make_inputs(CASES[2]))
    args[index] = jnp.asarray(bad, jnp.int32)
    with pytest.raises(ValueError, match=message):
        rta.ragged_tree_attention(*args, impl="xla")


def test_dispatcher_rejects_rows_past_max_q_len():
    with pytest.raises(ValueError, match="a sequence has 33 rows, more than max_q_len=32"):
        rta.ragged_tree_attention(*make_inputs(CASES[2]), impl="xla", max_q_len=32)


def test_kernel_two_mask_words_per_key_block():
    """block_q = 64: each key block's bits span two words, and a 70-row tree has two key blocks."""
    args = make_inputs(Case("two_key_blocks", [Seq(20, 70), Seq(5, 3)], q_heads=2, kv_heads=1), seed=2)
    expected = np.asarray(rta.ragged_tree_attention_ref(*args))
    for backend in ("tpu", "gpu"):
        out = rta.ragged_tree_attention(*args, impl="pallas", backend=backend, block_q=64)
        np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5, err_msg=backend)


def test_dispatcher_rejects_bad_shapes():
    args = list(make_inputs(CASES[2]))
    args[8] = args[8][:-1]
    with pytest.raises(ValueError, match=r"parents must be int\[39\]"):
        rta.ragged_tree_attention(*args, impl="xla")
    with pytest.raises(ValueError, match=r"with `layer`, k_pages and v_pages must be the stacked"):
        rta.ragged_tree_attention(*make_inputs(CASES[2]), impl="xla", layer=jnp.int32(0))
