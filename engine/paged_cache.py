"""Paged KV cache: a host-side page allocator with prefix sharing, and the jitted row moves.

The KV of every running sequence lives in pages of one pool per layer
([num_pages, Hkv, page_size, D], see tpu_kernels.ragged_tree_attention), and a
page table per sequence lists its pages in order.  `PageAllocator` is the
host's bookkeeping (plain Python, between steps): a free list, reference
counts, and a table of full pages keyed by a hash of the whole token prefix
they end, so a request that starts with a prefix already in the pool (a system
prompt, an earlier turn) maps those pages instead of recomputing them.

Only full pages are shared, and a sequence writes only slots at or past its
cached length, which never fall in a full page: no copy-on-write is needed.
A shared page whose last user finishes stays in the table as evictable (least
recently freed first), so a later request with that prefix still finds it;
fresh allocations take never-registered pages first.

`write_rows` puts a step's new rows into the pages (verify writes a tree's
rows at [len, len + rows)); `compact_accepted` then moves the accepted path's
rows to [len, len + 1 + a), as engine/steps does within a contiguous cache.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class OutOfPages(RuntimeError):
    """The pool cannot hold a reservation; nothing was allocated (the scheduler may preempt and retry)."""


def prefix_key(previous: bytes, page_tokens: Sequence[int]) -> bytes:
    """Key of a full page: a hash of the previous page's key and this page's tokens, so of the whole prefix."""
    digest = hashlib.blake2b(previous, digest_size=16)
    digest.update(np.asarray(page_tokens, np.int64).tobytes())
    return digest.digest()


@dataclass
class _Sequence:
    pages: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)  # one per full page, in order
    length: int = 0  # tokens whose KV is written (committed)
    tail: list[int] = field(default_factory=list)  # committed tokens of the page being filled


class PageAllocator:
    """Pages of a shared pool for many sequences; every method is O(pages touched)."""

    def __init__(self, num_pages: int, page_size: int, max_pages_per_seq: int):
        if num_pages < 1 or page_size < 1 or max_pages_per_seq < 1:
            raise ValueError(f"num_pages, page_size and max_pages_per_seq must be positive, got "
                             f"{num_pages}, {page_size}, {max_pages_per_seq}")
        self.num_pages, self.page_size, self.max_pages_per_seq = num_pages, page_size, max_pages_per_seq
        self.refcount = np.zeros(num_pages, np.int32)
        self._free = collections.deque(range(num_pages))  # never registered: taken first
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # registered, unused
        self._page_of_key: dict[bytes, int] = {}
        self._key_of_page: dict[int, bytes] = {}
        self._seqs: dict[Hashable, _Sequence] = {}

    # ------------------------------------------------------------ counts

    @property
    def num_free(self) -> int:
        """Pages a reservation can take: never-registered ones plus evictable cached prefixes."""
        return len(self._free) + len(self._evictable)

    @property
    def num_in_use(self) -> int:
        return int(np.count_nonzero(self.refcount))

    @property
    def num_cached(self) -> int:
        """Full pages findable by prefix (in use or evictable)."""
        return len(self._page_of_key)

    def length(self, seq_id: Hashable) -> int:
        """Committed tokens of a sequence (its cached length)."""
        return self._seqs[seq_id].length

    def pages(self, seq_id: Hashable) -> list[int]:
        return list(self._seqs[seq_id].pages)

    # ------------------------------------------------------------ lifecycle

    def add(self, seq_id: Hashable, prompt: Sequence[int]) -> int:
        """Start a sequence; returns how many prompt tokens are already cached in shared pages.

        Whole pages are matched from the start while their prefix key is in the
        table, but never the prompt's last token: its logits must be computed,
        and its KV written, by this sequence.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already running")
        seq = _Sequence()
        previous = b""
        for start in range(0, (len(prompt) - 1) // self.page_size * self.page_size, self.page_size):
            key = prefix_key(previous, prompt[start: start + self.page_size])
            page = self._page_of_key.get(key)
            if page is None or len(seq.pages) == self.max_pages_per_seq:
                break
            self._evictable.pop(page, None)
            self.refcount[page] += 1
            seq.pages.append(page)
            seq.keys.append(key)
            previous = key
        seq.length = len(seq.pages) * self.page_size
        self._seqs[seq_id] = seq
        return seq.length

    def reserve(self, seq_id: Hashable, num_slots: int) -> None:
        """Make slots [0, num_slots) writable: pages for a step's rows (len + T + 1 for a tree).

        All or nothing: raises OutOfPages without allocating when the pool is
        short, ValueError past max_pages_per_seq.
        """
        seq = self._seqs[seq_id]
        needed = -(-num_slots // self.page_size)
        if needed > self.max_pages_per_seq:
            raise ValueError(f"{num_slots} slots need {needed} pages, more than max_pages_per_seq="
                             f"{self.max_pages_per_seq}")
        missing = needed - len(seq.pages)
        if missing > self.num_free:
            raise OutOfPages(f"sequence {seq_id!r} needs {missing} more pages, {self.num_free} free")
        for _ in range(missing):
            seq.pages.append(self._take_page())

    def commit(self, seq_id: Hashable, tokens: Iterable[int]) -> None:
        """Record that the KV of `tokens` is now written right after the sequence's cached tokens.

        Each page this fills is registered under its prefix key (unless an equal
        prefix is registered already), so later requests can share it.
        """
        seq = self._seqs[seq_id]
        tokens = list(tokens)
        if -(-(seq.length + len(tokens)) // self.page_size) > len(seq.pages):
            raise ValueError(f"sequence {seq_id!r}: committing {len(tokens)} tokens past its reserved pages")
        for token in tokens:
            seq.tail.append(int(token))
            seq.length += 1
            if len(seq.tail) == self.page_size:
                key = prefix_key(seq.keys[-1] if seq.keys else b"", seq.tail)
                if key not in self._page_of_key:  # the page being filled was never registered
                    page = seq.pages[len(seq.keys)]
                    self._page_of_key[key], self._key_of_page[page] = page, key
                seq.keys.append(key)
                seq.tail = []

    def release(self, seq_id: Hashable) -> None:
        """Finish or cancel a sequence: drop its references; pages nobody holds become free."""
        for page in self._seqs.pop(seq_id).pages:
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                if page in self._key_of_page:
                    self._evictable[page] = None
                else:
                    self._free.append(page)

    def page_tables(self, seq_ids: Sequence[Hashable], width: int | None = None) -> np.ndarray:
        """int32[S, width] for the kernels (width default max_pages_per_seq); unused entries are 0."""
        table = np.zeros((len(seq_ids), width or self.max_pages_per_seq), np.int32)
        for row, seq_id in enumerate(seq_ids):
            pages = self._seqs[seq_id].pages
            table[row, : len(pages)] = pages
        return table

    def audit(self) -> list[str]:
        """Broken invariants, empty when sound: every page is free, evictable or held, and a
        held page's count equals the page tables that hold it (so no shared page is free)."""
        held = collections.Counter(page for seq in self._seqs.values() for page in seq.pages)
        problems = []
        free, evictable = set(self._free), set(self._evictable)
        if len(free) != len(self._free) or free & evictable or (free | evictable) & set(held):
            problems.append("a page is listed twice among free, evictable and held")
        if len(free) + len(evictable) + len(held) != self.num_pages:
            problems.append(f"{self.num_pages - len(free) - len(evictable) - len(held)} pages leaked")
        for page in np.flatnonzero(self.refcount != np.bincount(list(held.elements()), minlength=self.num_pages)):
            problems.append(f"page {page}: refcount {self.refcount[page]}, held by {held[page]} sequences")
        if any(page not in self._key_of_page for page in evictable):
            problems.append("an evictable page has no prefix key")
        return problems

    def _take_page(self) -> int:
        """A never-registered page if any, else the least recently freed cached prefix (unregistered)."""
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            del self._page_of_key[self._key_of_page.pop(page)]
        self.refcount[page] = 1
        return page


# ---------------------------------------------------------------- jitted row moves


def _slots(page_tables: jax.Array, seq: jax.Array, slot: jax.Array, page_size: int):
    """(page, offset) of a sequence's slot, through its page table."""
    return page_tables[seq, slot // page_size], slot % page_size


def _over_leading_axes(move, pages: jax.Array):
    """Apply a per-pool move [P, Hkv, page, D] to a pool with leading (layer) axes too."""
    for _ in range(pages.ndim - 4):
        move = jax.vmap(move)
    return move


@jax.jit
def write_rows(k_pages: jax.Array, v_pages: jax.Array, page_tables: jax.Array, cached_lens: jax.Array,
               cu_q_lens: jax.Array, new_k: jax.Array, new_v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write packed rows [..., Q, Hkv, D] at slots cached_lens[s] + r of their sequence s.

    Pools may carry leading layer axes ([L, P, Hkv, page, D] with new rows
    [L, Q, Hkv, D]).  Rows past cu_q_lens[-1] are padding and dropped.  Donate
    the pools when jitting a caller, so the write is in place.
    """
    num_pages, _, page_size, _ = k_pages.shape[-4:]
    total_rows = new_k.shape[-3]
    num_seqs = cached_lens.shape[0]
    seq = jnp.minimum(jnp.searchsorted(cu_q_lens[1:], jnp.arange(total_rows), side="right"), num_seqs - 1)
    page, offset = _slots(page_tables, seq, cached_lens[seq] + jnp.arange(total_rows) - cu_q_lens[seq], page_size)
    page = jnp.where(jnp.arange(total_rows) < cu_q_lens[-1], page, num_pages)  # out of range: dropped

    def write(pages, rows):
        return pages.at[page, :, offset, :].set(rows.astype(pages.dtype), mode="drop")

    write = _over_leading_axes(write, k_pages)
    return write(k_pages, new_k), write(v_pages, new_v)


@jax.jit
def compact_accepted(k_pages: jax.Array, v_pages: jax.Array, page_tables: jax.Array, cached_lens: jax.Array,
                     paths: jax.Array, num_accepted: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Move each sequence's accepted rows to their final slots, within its pages.

    Verify wrote sequence s's row r (0 = root) at slot cached_lens[s] + r;
    paths[s, k] (int32[S, N]) is the row of the k-th accepted token, k <
    num_accepted[s] (root + accepted nodes, the engine's `path`).  Row
    paths[s, k] moves to slot cached_lens[s] + k.  All rows are read before
    any is written, so overlapping moves are safe; the destinations lie past
    the cached length, in pages only this sequence holds.  Pools may carry
    leading layer axes, moved alike.
    """
    num_pages, _, page_size, _ = k_pages.shape[-4:]
    num_seqs, width = paths.shape
    seq = jnp.broadcast_to(jnp.arange(num_seqs)[:, None], (num_seqs, width))
    src_page, src_offset = _slots(page_tables, seq, cached_lens[:, None] + paths, page_size)
    dst_page, dst_offset = _slots(page_tables, seq, cached_lens[:, None] + jnp.arange(width), page_size)
    moved = jnp.arange(width)[None, :] < num_accepted[:, None]
    dst_page = jnp.where(moved, dst_page, num_pages).reshape(-1)  # out of range: dropped
    src_page, src_offset, dst_offset = src_page.reshape(-1), src_offset.reshape(-1), dst_offset.reshape(-1)

    def move(pages):
        rows = pages[src_page, :, src_offset, :]
        return pages.at[dst_page, :, dst_offset, :].set(rows, mode="drop")

    move = _over_leading_axes(move, k_pages)
    return move(k_pages), move(v_pages)
