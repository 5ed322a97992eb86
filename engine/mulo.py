"""MuLo-SD decoding for image generators: exact (lossless, the default) or pooled (LOSSY).

``generate_mulo(target, drafter, prompts, grid=...)`` decodes one class-conditional image per
prompt with a ``drafters.mulo.MuloDrafter`` (low-resolution drafts, up-sampled):

- ``acceptance="exact"`` (default): the ``Engine`` with the drafter and a fixed tree of one
  block of rows (a chain: ``block_rows * grid`` up-sampled tokens from the current position).
  The engine's acceptance keeps the deepest prefix equal to the target's own draws, so greedy
  output is plain decoding's and sampled output plain sampling's, token for token.
- ``acceptance="pooled"``: **LOSSY**, MuLo-SD's relaxed rule (after LANTERN), opt-in only (it
  needs ``tau``). A window of the next ``block_rows * grid`` drafts is verified in one target
  pass; a draft counts if the target's probability pooled over its codebook neighbours
  (``neighbours[d]``: palette colours within a radius, ``pooled_neighbours``) reaches ``tau``.
  Rejections are corrected by

  - ``rejection="local"`` (MuLo-SD): the rejected positions' connected components
    (``rejection_islands``) are expanded by ``expand`` positions (Chebyshev radius, clipped to
    the window, ``expand_islands``) and only those neighbourhoods are resampled, all in
    parallel from the verify pass's distributions; every other draft of the window is kept,
    though its context may have changed (that is the approximation);
  - ``rejection="raster"``: the window is cut at the first rejection, which is resampled (the
    usual speculative rule with the pooled test), and the next window starts after it.

  A window's committed tokens are fed to the target again at the head of the next pass (with
  the next window's drafts, one chain), so their keys and values come from the committed
  tokens, not the drafts; one pass per window, no extra passes. Resampled tokens are drawn
  with the target's per-position noise (``engine.sampling``'s Seeds rule). With ``radius`` 0,
  ``tau`` 1, greedy and raster rejection the loop is plain greedy decoding (a test checks it).

Why ``engine/`` and not ``drafters/``: the pooled rule and local rejection decide what is
accepted, so they are a decoding loop; the drafter (``drafters/mulo.py``) only proposes and
also serves the engine's exact loop unchanged.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.mulo import MuloDrafter
from specjax.engine.buckets import next_power_of_two
from specjax.engine.plain import pad_prompts
from specjax.engine.sampling import (SamplingParams, position_keys, request_keys, request_seeds, row_keys,
                                     sample_or_argmax, target_probs)
from specjax.engine.steps import prefill, verify
from specjax.engine.tree import DraftTree
from specjax.models.image_tokens import ImageVocab
from specjax.models.loading import Model

EXACT, POOLED = "exact", "pooled"
REJECTIONS = ("local", "raster")


@dataclasses.dataclass
class ImageResult:
    """One generated image and what it cost. ``lossy`` is True for pooled acceptance, whose
    ``acceptance`` label reads "pooled (LOSSY)"."""

    tokens: np.ndarray  # int32[grid, grid], raster order
    target_passes: int  # prefill counts as one
    drafted: int  # draft tokens verified
    accepted: int  # drafts the rule accepted
    resampled: int  # tokens drawn from the target after a rejection (pooled; exact: bonus tokens)
    islands: int  # rejection islands resampled (local rejection only)
    acceptance: str
    lossy: bool
    wall_s: float = 0.0


# ------------------------------------------------------------------ local rejection


def rejection_islands(rejected: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """int32[H, W] labels of the connected components of ``rejected`` (0 = not rejected; islands
    numbered 1, 2, ... in the raster order of their first position).

    Min-label propagation: each rejected position repeatedly takes the smallest label among
    itself and its rejected neighbours (4- or 8-connected) until nothing changes, so every
    component ends with the raster index of its first position."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    rejected = np.asarray(rejected, bool)
    h, w = rejected.shape
    big = h * w + 1
    labels = np.where(rejected, np.arange(1, h * w + 1).reshape(h, w), big)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
              if (dy, dx) != (0, 0) and (connectivity == 8 or dy == 0 or dx == 0)]
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        best = labels.copy()
        for dy, dx in shifts:
            best = np.minimum(best, padded[1 + dy: 1 + dy + h, 1 + dx: 1 + dx + w])
        best = np.where(rejected, best, big)
        if np.array_equal(best, labels):
            break
        labels = best
    ids = np.unique(labels[rejected])
    out = np.zeros((h, w), np.int32)
    out[rejected] = np.searchsorted(ids, labels[rejected]) + 1
    return out


def expand_islands(labels: np.ndarray, radius: int, allowed: np.ndarray) -> np.ndarray:
    """bool[K, H, W]: island k's neighbourhood, every position within Chebyshev ``radius`` of one of
    its positions, restricted to ``allowed`` (the positions that may still change)."""
    labels = np.asarray(labels)
    k = int(labels.max(initial=0))
    h, w = labels.shape
    islands = labels[None] == np.arange(1, k + 1)[:, None, None]
    padded = np.pad(islands, ((0, 0), (radius, radius), (radius, radius)))
    grown = np.zeros_like(islands)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            grown |= padded[:, dy: dy + h, dx: dx + w]
    return grown & np.asarray(allowed, bool)[None]


def local_resample_region(rejected: np.ndarray, allowed: np.ndarray, radius: int,
                          connectivity: int = 8) -> tuple[np.ndarray, int]:
    """(bool[H, W] positions to resample, number of islands): the union of every rejection
    island's neighbourhood of ``radius``, within ``allowed``."""
    labels = rejection_islands(rejected, connectivity)
    grown = expand_islands(labels, radius, allowed)
    return grown.any(axis=0) if len(grown) else np.zeros(labels.shape, bool), len(grown)


# ------------------------------------------------------------------ acceptance


def pooled_neighbours(vocab: ImageVocab, radius: float) -> np.ndarray:
    """bool[V, V]: palette entries within ``radius`` of each other in colour coordinates; class and
    bos tokens are only their own neighbours."""
    out = np.eye(vocab.vocab_size, dtype=bool)
    k = vocab.codebook_size
    out[:k, :k] = vocab.palette.neighbours(radius)
    return out


@jax.jit
def _score(logits: jax.Array, next_tokens: jax.Array, neighbours: jax.Array, sampling: SamplingParams,
           rng: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per tree node j (root-indexed, j < N - 1): the target's probability pooled over the codebook
    neighbours of node j + 1's token, and the target's own draw after node j (its argmax, or a
    sample with the noise of its absolute position ``lengths + j + 1``)."""
    b, n, v = logits.shape
    probs = target_probs(logits, sampling)
    pooled = jnp.einsum("bnu,ut->bnt", probs, neighbours.astype(jnp.float32))
    mass = jnp.take_along_axis(pooled[:, :-1], next_tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    keys = jnp.repeat(row_keys(rng, b), n)
    positions = (lengths[:, None] + jnp.arange(n)[None, :] + 1).reshape(-1)
    per_node = SamplingParams(*(jnp.repeat(x, n) for x in (sampling.temperature, sampling.top_k, sampling.top_p)))
    draws = sample_or_argmax(position_keys(keys, positions), logits.reshape(b * n, v), per_node).reshape(b, n)
    return mass, draws[:, :-1]


# ------------------------------------------------------------------ decoding


def generate_mulo(target: Model, drafter: MuloDrafter, prompts: Sequence[Sequence[int]], *, grid: int,
                  block_rows: int = 2, acceptance: str = EXACT, tau: Optional[float] = None,
                  neighbours: Optional[np.ndarray] = None, expand: int = 1, rejection: str = "local",
                  temperature: float = 0.0, seed: int = 0, attention: str = "xla") -> list[ImageResult]:
    """One ``grid x grid`` image per prompt (``[bos, class token]``), verifying a block of
    ``block_rows`` rows of up-sampled drafts per target pass.

    ``acceptance="exact"`` (the default) is lossless (the ``Engine``'s rule). ``acceptance="pooled"``
    is LOSSY and needs ``tau`` and ``neighbours`` (``pooled_neighbours``); ``rejection`` and
    ``expand`` choose how its rejections are corrected (see the module docstring).
    """
    if acceptance not in (EXACT, POOLED):
        raise ValueError(f"acceptance must be 'exact' (lossless) or 'pooled' (LOSSY), got {acceptance!r}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if acceptance == EXACT:
        if tau is not None:
            raise ValueError("tau belongs to acceptance='pooled' (LOSSY); the exact rule has no threshold")
        return _generate_exact(target, drafter, prompts, grid, block_rows * grid, temperature, seed, attention)
    if tau is None or neighbours is None:
        raise ValueError("acceptance='pooled' is LOSSY and opt-in: pass tau and neighbours explicitly")
    if rejection not in REJECTIONS:
        raise ValueError(f"rejection must be one of {REJECTIONS}, got {rejection!r}")
    if expand < 0:
        raise ValueError(f"expand must be >= 0, got {expand}")
    return _generate_pooled_lossy(target, drafter, prompts, grid, block_rows * grid, float(tau),
                                  np.asarray(neighbours, bool), expand, rejection, temperature, seed, attention)


def _generate_exact(target, drafter, prompts, grid, block, temperature, seed, attention) -> list[ImageResult]:
    from specjax.engine.engine import Engine

    t0 = time.perf_counter()
    engine = Engine(target, drafter, draft_capacity=block, max_batch_size=len(prompts), attention=attention)
    results = engine.generate([list(p) for p in prompts], grid * grid, temperature=temperature, seed=seed)
    wall = time.perf_counter() - t0
    return [ImageResult(np.asarray(r.token_ids, np.int32).reshape(grid, grid), r.target_passes,
                        sum(s.drafted for s in r.trace), r.accepted_draft_tokens, r.target_passes - 1, 0, EXACT,
                        False, wall) for r in results]


def _generate_pooled_lossy(target, drafter, prompts, grid, block, tau, neighbours, expand, rejection, temperature,
                           seed, attention) -> list[ImageResult]:
    """acceptance="pooled" (LOSSY): see the module docstring."""
    t0 = time.perf_counter()
    cfg, params = target.config, target.params
    n_rows, hw = len(prompts), grid * grid
    if neighbours.shape != (cfg.vocab_size, cfg.vocab_size):
        raise ValueError(f"neighbours must be [{cfg.vocab_size}, {cfg.vocab_size}], got {list(neighbours.shape)}")
    rids = [("mulo-pooled", i) for i in range(n_rows)]
    for rid, prompt in zip(rids, prompts):
        drafter.start_request(rid, prompt)
    drafts = np.stack([drafter.high_res_grid(rid).reshape(-1) for rid in rids])
    for rid in rids:
        drafter.stop_request(rid)
    capacity = 2 * block - 1  # the previous window's committed tokens after the root, then the next window
    tokens, lengths = pad_prompts(prompts, cfg.vocab_size, multiple=1)
    max_len = next_power_of_two(tokens.shape[1] + hw + capacity + 1, 64)
    sampling = SamplingParams.make(n_rows, temperature)
    pre = prefill(params, cfg, tokens, lengths, np.full(n_rows, hw, np.int32),
                  request_keys(request_seeds(seed, n_rows)), sampling, max_len=max_len, attention=attention)
    state = pre.state
    committed = [[int(t)] for t in np.asarray(pre.first_tokens)]
    cached = np.zeros(n_rows, np.int64)  # image tokens in the cache; committed[b][cached[b]] is the root
    stats = {k: np.zeros(n_rows, np.int64) for k in ("passes", "drafted", "accepted", "resampled", "islands")}
    stats["passes"] += 1
    neighbours_j = jnp.asarray(neighbours)
    parents = np.broadcast_to(np.arange(-1, capacity - 1, dtype=np.int32), (n_rows, capacity))
    while any(len(c) < hw for c in committed):
        chain = np.zeros((n_rows, capacity), np.int32)
        valid = np.zeros((n_rows, capacity), bool)
        windows = []
        for b in range(n_rows):
            pending = committed[b][cached[b] + 1:]
            n = len(committed[b])
            window = drafts[b, n: min(n + block, hw)]
            windows.append((len(pending), n, window))
            if len(window):
                row = pending + window.tolist()
                chain[b, : len(row)], valid[b, : len(row)] = row, True
        state, logits, _ = verify(params, state, DraftTree(chain, parents, valid), cfg=cfg, attention=attention)
        mass, draws = jax.device_get(_score(logits, jnp.asarray(chain), neighbours_j, state.sampling, state.rng,
                                            state.lengths))
        advance = np.zeros(n_rows, np.int32)
        for b, (p, n, window) in enumerate(windows):
            if not len(window):
                continue
            k = len(window)
            accepted = mass[b, p: p + k] >= tau
            new = _correct(window, accepted, draws[b, p: p + k], n, grid, expand, rejection, stats, b)
            stats["passes"][b] += 1
            stats["drafted"][b] += k
            stats["accepted"][b] += int(accepted.sum())
            committed[b].extend(new.tolist())
            advance[b] = 1 + p
        cached += advance
        roots = [committed[b][cached[b]] for b in range(n_rows)]
        state = state.replace(lengths=state.lengths + jnp.asarray(advance),
                              last_tokens=jnp.asarray(roots, jnp.int32))
    wall = time.perf_counter() - t0
    return [ImageResult(np.asarray(committed[b][:hw], np.int32).reshape(grid, grid), int(stats["passes"][b]),
                        int(stats["drafted"][b]), int(stats["accepted"][b]), int(stats["resampled"][b]),
                        int(stats["islands"][b]), "pooled (LOSSY)", True, wall) for b in range(n_rows)]


def _correct(window: np.ndarray, accepted: np.ndarray, draws: np.ndarray, start: int, grid: int, expand: int,
             rejection: str, stats: dict, row: int) -> np.ndarray:
    """The tokens committed for one window of drafts at raster positions ``start ...``."""
    k = len(window)
    if accepted.all():
        return window
    if rejection == "raster":
        first = int(np.argmin(accepted))
        stats["resampled"][row] += 1
        return np.append(window[:first], draws[first])
    rejected = np.zeros(grid * grid, bool)
    rejected[start: start + k] = ~accepted
    allowed = np.zeros(grid * grid, bool)
    allowed[start: start + k] = True
    region, islands = local_resample_region(rejected.reshape(grid, grid), allowed.reshape(grid, grid), expand)
    region = region.reshape(-1)[start: start + k]
    stats["resampled"][row] += int(region.sum())
    stats["islands"][row] += islands
    return np.where(region, draws, window)
