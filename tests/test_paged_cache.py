"""The paged KV cache: the host page allocator under random traffic (joins, steps, finishes,
cancellations, prefix sharing, running out of pages), and the jitted row moves against loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.engine.paged_cache import OutOfPages, PageAllocator, compact_accepted, write_rows

PAGE = 4


class TokenPool:
    """Which token's KV each (page, slot) holds: the allocator's contract, checked by content."""

    def __init__(self, alloc: PageAllocator):
        self.alloc = alloc
        self.slots = np.full((alloc.num_pages, alloc.page_size), -1)

    def write(self, seq_id, start: int, tokens) -> None:
        pages = self.alloc.pages(seq_id)
        for pos, token in enumerate(tokens, start):
            page = pages[pos // PAGE]
            assert self.alloc.refcount[page] == 1, "a write into a shared page (would need copy-on-write)"
            self.slots[page, pos % PAGE] = token

    def read(self, seq_id, length: int) -> list[int]:
        pages = self.alloc.pages(seq_id)
        return [int(self.slots[pages[pos // PAGE], pos % PAGE]) for pos in range(length)]


def test_random_traffic_never_leaks_or_frees_a_held_page():
    """1,000 requests with common system prompts, prefill chunks, tree steps that write T+1 rows and
    keep the accepted ones, finishes and cancellations; after every action the allocator's books
    balance and every running sequence reads back exactly its own tokens through its pages."""
    rng = np.random.default_rng(0)
    alloc = PageAllocator(num_pages=24, page_size=PAGE, max_pages_per_seq=12)
    pool = TokenPool(alloc)
    system_prompts = [list(rng.integers(0, 50, n)) for n in (9, 13, 5)]
    running: dict[int, dict] = {}
    counts = dict(joined=0, shared_tokens=0, finished=0, cancelled=0, out_of_pages=0)
    while counts["joined"] < 1000 or running:
        action = rng.random()
        if counts["joined"] < 1000 and (not running or (len(running) < 8 and action < 0.3)):
            seq_id = counts["joined"]
            counts["joined"] += 1
            prompt = system_prompts[rng.integers(3)] + list(rng.integers(0, 50, rng.integers(1, 7)))
            hit = alloc.add(seq_id, prompt)
            assert hit % PAGE == 0 and hit < len(prompt) and pool.read(seq_id, hit) == prompt[:hit]
            counts["shared_tokens"] += hit
            running[seq_id] = dict(tokens=prompt[:hit], pending=prompt[hit:], budget=int(rng.integers(1, 16)))
        elif running and action < 0.9:
            seq_id = list(running)[rng.integers(len(running))]
            seq = running[seq_id]
            length = len(seq["tokens"])
            if seq["pending"]:  # a prefill chunk: its rows are its tokens
                new = seq["pending"][: rng.integers(1, 6)]
                seq["pending"] = seq["pending"][len(new):]
                rows = new
            else:  # a tree step: T+1 rows written, a path of them accepted (tokens from a small vocab,
                rows = list(rng.integers(-9, -1, rng.integers(1, 6)))  # so generated prefixes repeat)
                new = list(rng.integers(0, 3, rng.integers(1, len(rows) + 1)))
                seq["budget"] -= len(new)
            try:
                alloc.reserve(seq_id, length + len(rows))
            except (OutOfPages, ValueError):  # the scheduler would preempt; here the request is cancelled
                counts["out_of_pages"] += 1
                alloc.release(seq_id)
                del running[seq_id]
                continue
            pool.write(seq_id, length, rows)
            pool.write(seq_id, length, new)  # compaction moves the accepted rows to [len, len + a)
            alloc.commit(seq_id, new)
            seq["tokens"] += new
            assert alloc.length(seq_id) == len(seq["tokens"])
            if seq["budget"] <= 0:
                counts["finished"] += 1
                alloc.release(seq_id)
                del running[seq_id]
        elif running:
            seq_id = list(running)[rng.integers(len(running))]
            counts["cancelled"] += 1
            alloc.release(seq_id)
            del running[seq_id]
        assert alloc.audit() == []
        for seq_id, seq in running.items():
            assert pool.read(seq_id, len(seq["tokens"])) == seq["tokens"], f"sequence {seq_id} reads foreign KV"
    assert alloc.num_free == alloc.num_pages and not alloc.refcount.any() and alloc.num_in_use == 0
    assert counts["shared_tokens"] > 1000 and counts["finished"] > 100 and counts["cancelled"] > 100
    assert counts["out_of_pages"] > 0  # the pool was tight enough to run out


def test_finished_prefix_stays_cached_until_evicted():
    alloc = PageAllocator(num_pages=4, page_size=PAGE, max_pages_per_seq=4)
    prompt = list(range(9))
    assert alloc.add("a", prompt) == 0
    alloc.reserve("a", 9)
    alloc.commit("a", prompt)
    alloc.release("a")
    assert alloc.num_free == 4 and alloc.num_cached == 2
    assert alloc.add("b", prompt + [7]) == 8  # both full pages found after "a" finished
    assert alloc.add("c", prompt[:8]) == 4  # the last prompt token is always recomputed
    assert alloc.refcount.tolist().count(2) == 1 and alloc.audit() == []
    alloc.release("b"), alloc.release("c")
    alloc.add("d", [100] * 16)
    alloc.reserve("d", 16)  # needs every page: the cached prefixes are evicted
    assert alloc.num_cached == 0 and alloc.add("e", prompt) == 0 and alloc.audit() == []


def test_reserve_is_all_or_nothing():
    alloc = PageAllocator(num_pages=3, page_size=PAGE, max_pages_per_seq=8)
    alloc.add("a", [1])
    alloc.reserve("a", 8)
    alloc.add("b", [1])
    with pytest.raises(OutOfPages, match="needs 2 more pages, 1 free"):
        alloc.reserve("b", 8)
    assert alloc.pages("b") == [] and alloc.num_free == 1
    with pytest.raises(ValueError, match="more than max_pages_per_seq=8"):
        alloc.reserve("a", 33)
    with pytest.raises(ValueError, match="already running"):
        alloc.add("a", [2])
    with pytest.raises(ValueError, match="past its reserved pages"):
        alloc.commit("b", [1])


def test_page_tables_pad_with_page_zero():
    alloc = PageAllocator(num_pages=6, page_size=PAGE, max_pages_per_seq=3)
    alloc.add("a", [1]), alloc.add("b", [1])
    alloc.reserve("a", 5), alloc.reserve("b", 1)
    np.testing.assert_array_equal(alloc.page_tables(["b", "a"]), [[2, 0, 0], [0, 1, 0]])


# ---------------------------------------------------------------- jitted row moves


def dense_write_and_compact(pools, tables, cached, rows_per_seq, new_rows, paths, num_accepted):
    """Loop reference: write each sequence's rows at cached + r, then move row paths[k] to cached + k."""
    pools = pools.copy()
    row = 0
    for s, n in enumerate(rows_per_seq):
        slot = lambda r: (slice(None), tables[s, (cached[s] + r) // PAGE], slice(None), (cached[s] + r) % PAGE)
        for r in range(n):
            pools[slot(r)] = new_rows[:, row + r]
        row += n
        moved = [pools[slot(p)].copy() for p in paths[s, : num_accepted[s]]]
        for k, values in enumerate(moved):
            pools[slot(k)] = values
    return pools


def test_write_rows_then_compact_accepted_equal_loop():
    """Two layers, page-boundary lengths (8, 3, 0), a root-only acceptance and a full one, padding rows."""
    rng = np.random.default_rng(1)
    layers, num_pages, kv_heads, dim = 2, 12, 2, 8
    cached = np.array([8, 3, 0])
    rows_per_seq = [5, 4, 6]
    tables = rng.permutation(num_pages).reshape(3, 4).astype(np.int32)
    total = sum(rows_per_seq) + 2
    k_pages, v_pages = (rng.standard_normal((layers, num_pages, kv_heads, PAGE, dim)).astype(np.float32)
                        for _ in range(2))
    new_k, new_v = (rng.standard_normal((layers, total, kv_heads, dim)).astype(np.float32) for _ in range(2))
    paths = np.zeros((3, 6), np.int32)
    paths[0, :3] = [0, 2, 4]
    paths[2, :6] = np.arange(6)
    num_accepted = np.array([3, 1, 6])
    cu = np.concatenate([[0], np.cumsum(rows_per_seq)]).astype(np.int32)
    args = [jnp.asarray(x) for x in (tables, cached.astype(np.int32))]
    k, v = write_rows(jnp.asarray(k_pages), jnp.asarray(v_pages), *args, jnp.asarray(cu), jnp.asarray(new_k),
                      jnp.asarray(new_v))
    k, v = compact_accepted(k, v, *args, jnp.asarray(paths), jnp.asarray(num_accepted, np.int32))
    for got, pools, rows in ((k, k_pages, new_k), (v, v_pages, new_v)):
        expected = dense_write_and_compact(pools, tables, cached, rows_per_seq, rows, paths, num_accepted)
        np.testing.assert_array_equal(np.asarray(got), expected)


def test_compact_single_layer_pool_leaves_other_pages_alone():
    rng = np.random.default_rng(2)
    k_pages = jnp.asarray(rng.standard_normal((5, 1, PAGE, 4)), jnp.float32)
    tables = jnp.asarray([[3, 1]], jnp.int32)
    k, v = compact_accepted(k_pages, k_pages, tables, jnp.asarray([2], jnp.int32), jnp.asarray([[0, 3, 5]], jnp.int32),
                            jnp.asarray([3], jnp.int32))
    expected = np.asarray(k_pages).copy()
    expected[3, :, 3] = k_pages[1, :, 1]  # row 3 (slot 5) -> slot 3
    expected[1, :, 0] = k_pages[1, :, 3]  # row 5 (slot 7) -> slot 4
    np.testing.assert_array_equal(np.asarray(k), expected)
    np.testing.assert_array_equal(np.asarray(v), expected)


def test_chunked_prefill_through_pages_equals_one_chunk():
    """write_rows and ragged attention agree on the page layout: two prompts prefilled in two chunks
    (the first written into allocator-given pages, the second reading it back through the page
    tables) attend exactly as the whole prompts in one chunk."""
    from specjax.tpu_kernels.ragged_tree_attention import ragged_tree_attention_ref

    rng = np.random.default_rng(3)
    lengths, first_chunk = [11, 6], [7, 3]
    alloc = PageAllocator(num_pages=8, page_size=PAGE, max_pages_per_seq=4)
    for seq_id, n in enumerate(lengths):
        alloc.add(seq_id, list(range(n)))
        alloc.reserve(seq_id, n)
    tables = jnp.asarray(alloc.page_tables([0, 1]))
    q, k, v = (rng.standard_normal((2, 11, 4 if name == "q" else 2, 8)).astype(np.float32) for name in "qkv")
    pools = [jnp.zeros((8, 2, PAGE, 8), jnp.float32)] * 2

    def attend(chunks, cached):
        """Rows [cached[s], cached[s] + chunks[s]) of each prompt, packed, as one chain per sequence."""
        rows = [np.arange(c, c + n) for c, n in zip(cached, chunks)]
        packed = [np.concatenate([x[s, r] for s, r in enumerate(rows)]) for x in (q, k, v)]
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(chunks)]), jnp.int32)
        parents = jnp.asarray(np.concatenate([np.arange(n) - 1 for n in chunks]), jnp.int32)
        cached = jnp.asarray(cached, jnp.int32)
        out = jax.jit(ragged_tree_attention_ref)(packed[0], *pools, tables, cached, cu, packed[1], packed[2], parents)
        return out, (cached, cu, packed[1], packed[2])

    whole, _ = attend(lengths, [0, 0])
    head, (cached, cu, new_k, new_v) = attend(first_chunk, [0, 0])
    pools[:] = write_rows(*pools, tables, cached, cu, jnp.asarray(new_k), jnp.asarray(new_v))
    tail, _ = attend([n - c for n, c in zip(lengths, first_chunk)], first_chunk)
    chunked = np.concatenate([head[:7], tail[:4], head[7:], tail[4:]])
    np.testing.assert_allclose(chunked, np.asarray(whole), rtol=1e-5, atol=1e-5)
