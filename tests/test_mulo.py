"""MuLo-SD: local rejection against brute force, the exact mode's losslessness (greedy equality on
the shipped image models, chi-square on a tiny model) and the pooled mode's LOSSY labelling.

Negative controls: raster resampling and unexpanded islands are run through the same
brute-force comparison as the real local rejection and must fail it; the pooled (LOSSY) rule
is run through the same chi-square as the exact rule and must fail it.
"""

import functools
import itertools
import os

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from engine_helpers import tiny_model
from specjax.drafters.mulo import (UPSAMPLER_FILE, ConvUpsampler, MuloDrafter, NearestUpsampler, load_upsampler,
                                   save_upsampler)
from specjax.engine.mulo import (EXACT, expand_islands, generate_mulo, local_resample_region, pooled_neighbours,
                                 rejection_islands)
from specjax.engine.plain import generate_plain
from specjax.engine.sampling import SamplingParams, target_probs
from specjax.models.decoder import KVCache, causal_mask, forward
from specjax.models.image_tokens import ImageVocab, token_pairs

# ---------------------------------------------------------------- local rejection vs brute force


def brute_islands(rejected: np.ndarray, connectivity: int) -> np.ndarray:
    """Depth-first flood fill from each unlabelled rejected position in raster order."""
    h, w = rejected.shape
    labels = np.zeros((h, w), np.int32)
    steps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
             if (dy, dx) != (0, 0) and (connectivity == 8 or abs(dy) + abs(dx) == 1)]
    count = 0
    for y, x in itertools.product(range(h), range(w)):
        if not rejected[y, x] or labels[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        labels[y, x] = count
        while stack:
            cy, cx = stack.pop()
            for dy, dx in steps:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < h and 0 <= nx < w and rejected[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    stack.append((ny, nx))
    return labels


def brute_region(rejected: np.ndarray, allowed: np.ndarray, radius: int) -> np.ndarray:
    """Every allowed position within Chebyshev ``radius`` of some rejected position, by a double loop."""
    h, w = rejected.shape
    out = np.zeros((h, w), bool)
    bad = np.argwhere(rejected)
    for y, x in itertools.product(range(h), range(w)):
        out[y, x] = allowed[y, x] and any(max(abs(y - by), abs(x - bx)) <= radius for by, bx in bad)
    return out


def raster_region(rejected, allowed, radius):
    """Negative control: everything allowed from the first rejection on, in raster order."""
    flat = rejected.reshape(-1)
    out = np.zeros(flat.shape, bool)
    if flat.any():
        out[int(np.argmax(flat)):] = True
    return out.reshape(rejected.shape) & allowed


def unexpanded_region(rejected, allowed, radius):
    """Negative control: the rejected positions alone (islands not expanded)."""
    return local_resample_region(rejected, allowed, 0)[0]


def real_region(rejected, allowed, radius):
    return local_resample_region(rejected, allowed, radius)[0]


def random_cases(n: int = 200, seed: int = 0):
    """Random grids with a window of allowed positions (a raster run, as a decoding window is)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = rng.integers(2, 9, 2)
        start = int(rng.integers(0, h * w))
        stop = int(rng.integers(start + 1, h * w + 1))
        allowed = np.zeros(h * w, bool)
        allowed[start:stop] = True
        rejected = (rng.random(h * w) < rng.uniform(0.05, 0.5)) & allowed
        yield rejected.reshape(h, w), allowed.reshape(h, w), int(rng.integers(1, 3))


def matches_brute_force(region_fn) -> bool:
    return all(np.array_equal(region_fn(r, a, l), brute_region(r, a, l)) for r, a, l in random_cases())


grids = st.integers(1, 9).flatmap(lambda h: st.integers(1, 9).flatmap(
    lambda w: st.lists(st.booleans(), min_size=h * w, max_size=h * w).map(lambda v: np.array(v).reshape(h, w))))


@settings(max_examples=150, deadline=None)
@given(grids, st.sampled_from([4, 8]))
def test_islands_equal_a_flood_fill(rejected, connectivity):
    np.testing.assert_array_equal(rejection_islands(rejected, connectivity), brute_islands(rejected, connectivity))


@settings(max_examples=100, deadline=None)
@given(grids, st.integers(0, 3), st.data())
def test_each_island_expands_to_its_own_neighbourhood(rejected, radius, data):
    allowed = np.array(data.draw(st.lists(st.booleans(), min_size=rejected.size, max_size=rejected.size)),
                       bool).reshape(rejected.shape)
    labels = brute_islands(rejected, 8)
    grown = expand_islands(rejection_islands(rejected), radius, allowed)
    assert len(grown) == labels.max()
    for k in range(len(grown)):
        np.testing.assert_array_equal(grown[k], brute_region(labels == k + 1, allowed, radius))


def test_local_resample_region_equals_brute_force():
    assert matches_brute_force(real_region)


@pytest.mark.parametrize("wrong", [raster_region, unexpanded_region], ids=["raster", "no_expansion"])
def test_wrong_resampling_regions_are_detected(wrong):
    assert not matches_brute_force(wrong)


def test_island_count():
    rejected = np.array([[1, 0, 0, 1], [0, 0, 0, 1], [0, 1, 0, 0]], bool)
    assert local_resample_region(rejected, np.ones_like(rejected), 1)[1] == 3
    assert rejection_islands(rejected, 8).max() == 3
    diagonal = np.eye(3, dtype=bool)
    assert rejection_islands(diagonal, 8).max() == 1 and rejection_islands(diagonal, 4).max() == 3


# ---------------------------------------------------------------- exact mode on the shipped models


@pytest.fixture(scope="module")
def image_models():
    from specjax.models.loading import load_model
    from specjax.models.embedded import image_gen_dirs

    lo_dir, hi_dir = image_gen_dirs()
    return load_model(lo_dir, dtype=jnp.float32), load_model(hi_dir, dtype=jnp.float32)


VOCAB = ImageVocab()
CLASSES = (1, 4, 8)


SEED = 11


@pytest.fixture(scope="module")
def plain_greedy(image_models):
    _, hi = image_models
    return generate_plain(hi, [VOCAB.prompt(c) for c in CLASSES], 256, stop_at_eos=False)


@pytest.fixture(scope="module")
def trained_upsampler():
    from specjax.models.embedded import image_gen_dirs

    return load_upsampler(os.path.join(image_gen_dirs()[0], UPSAMPLER_FILE))


def test_trained_upsampler_beats_nearest_on_held_out_pairs(trained_upsampler, tmp_path):
    low, high = token_pairs(10 ** 9 + 1, 128, seed=0)
    trained, nearest = (float((up(low) == high).mean()) for up in (trained_upsampler, NearestUpsampler(2)))
    assert trained > nearest + 0.05, (trained, nearest)
    save_upsampler(str(tmp_path / "up.safetensors"), trained_upsampler)
    again = load_upsampler(str(tmp_path / "up.safetensors"))
    assert isinstance(again, ConvUpsampler) and again.factor == 2
    np.testing.assert_array_equal(again(low), trained_upsampler(low))


def test_exact_mulo_equals_plain_decoding(image_models, plain_greedy, trained_upsampler):
    """Greedy: plain greedy decoding's images. Sampled (target and low-resolution drafter at
    temperature 1): plain sampling's images with the same seeds, token for token."""
    lo, hi = image_models
    prompts = [VOCAB.prompt(c) for c in CLASSES]
    greedy = generate_mulo(hi, MuloDrafter(lo, 8, trained_upsampler), prompts, grid=16)
    sampled = generate_mulo(hi, MuloDrafter(lo, 8, trained_upsampler, temperature=1.0, seed=3), prompts, grid=16,
                            temperature=1.0, seed=SEED)
    plain_sampled = generate_plain(hi, prompts, 256, temperature=1.0, seed=SEED, stop_at_eos=False)
    for results, plain in ((greedy, plain_greedy), (sampled, plain_sampled)):
        for r, p in zip(results, plain):
            np.testing.assert_array_equal(r.tokens.reshape(-1), p)
            assert r.acceptance == EXACT and not r.lossy
    assert sum(r.accepted for r in sampled) > 0 and sum(r.target_passes for r in sampled) < 3 * 256


def test_pooled_degenerate_setting_is_plain_greedy(image_models, plain_greedy):
    """radius 0, tau 1, greedy, raster rejection: the pooled loop's bookkeeping (committed tokens fed
    again at the head of the next pass, windows, positions) reproduces plain greedy decoding."""
    lo, hi = image_models
    results = generate_mulo(hi, MuloDrafter(lo, 8), [VOCAB.prompt(c) for c in CLASSES], grid=16,
                            acceptance="pooled", tau=1.0, neighbours=pooled_neighbours(VOCAB, 0.0),
                            rejection="raster")
    for r, plain in zip(results, plain_greedy):
        np.testing.assert_array_equal(r.tokens.reshape(-1), plain)
        assert r.lossy and r.acceptance == "pooled (LOSSY)"


def test_pooled_is_opt_in_and_labelled_lossy(image_models):
    lo, hi = image_models
    drafter = MuloDrafter(lo, 8)
    with pytest.raises(ValueError, match="LOSSY"):
        generate_mulo(hi, drafter, [VOCAB.prompt(0)], grid=16, acceptance="pooled")
    with pytest.raises(ValueError, match="LOSSY"):
        generate_mulo(hi, drafter, [VOCAB.prompt(0)], grid=16, tau=0.5)
    local = generate_mulo(hi, drafter, [VOCAB.prompt(c) for c in CLASSES], grid=16, acceptance="pooled", tau=0.5,
                          neighbours=pooled_neighbours(VOCAB, 1.0), expand=1)
    assert all(r.lossy and "LOSSY" in r.acceptance and r.tokens.shape == (16, 16) for r in local)
    assert sum(r.target_passes for r in local) < 3 * 10  # one pass per window of two rows, plus prefill


# ---------------------------------------------------------------- sampling: chi-square on a tiny model

V = 6
TINY = tiny_model(3, vocab=V)
PROMPT = [1, 2]
N = 2048
REAL_CODE_P, CONTROL_P = 1e-4, 1e-6


@functools.lru_cache(maxsize=None)
def exact_pairs() -> np.ndarray:
    """P(t1, t2) of the second and third image tokens, by running every (t0, t1) continuation."""
    seqs = jnp.array([PROMPT + [a, b] for a, b in itertools.product(range(V), repeat=2)])
    b, t = seqs.shape
    logits = forward(TINY.params, TINY.config, seqs, jnp.broadcast_to(jnp.arange(t), (b, t)),
                     KVCache.zeros(TINY.config, b, t), jnp.zeros(b, jnp.int32), causal_mask(b, t)).logits
    p = np.asarray(target_probs(logits, SamplingParams.make(b, 1.0)), np.float64).reshape(V, V, t, V)
    p0, p1, p2 = p[0, 0, 1], p[:, 0, 2], p[:, :, 3]
    return np.einsum("a,ab,abc->bc", p0, p1, p2)


def chi_square_p(pairs: np.ndarray, expected: np.ndarray) -> float:
    observed = np.zeros((V, V))
    np.add.at(observed, (pairs[:, 0], pairs[:, 1]), 1)
    exp, obs = expected.ravel() * len(pairs), observed.ravel()
    if obs[exp == 0].sum() > 0:
        return 0.0
    keep = exp >= 5
    obs, exp = np.append(obs[keep], obs[~keep].sum()), np.append(exp[keep], exp[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


def sampled_pairs(**kwargs) -> tuple[np.ndarray, list]:
    """(t1, t2) of N sampled 2 x 2 "images"; the drafter is the target's own greedy grid (factor 1),
    so drafts are often the likely tokens and acceptance, rejection and the bonus all matter."""
    drafter = MuloDrafter(TINY, 2, NearestUpsampler(1))
    results = generate_mulo(TINY, drafter, [PROMPT] * N, grid=2, block_rows=2, temperature=1.0, seed=7, **kwargs)
    return np.array([r.tokens.reshape(-1)[1:3] for r in results]), results


def test_exact_mulo_sampling_keeps_the_distribution():
    pairs, results = sampled_pairs()
    assert sum(r.accepted for r in results) > N / 2  # the drafts were used
    assert chi_square_p(pairs, exact_pairs()) > REAL_CODE_P


def test_pooled_lossy_sampling_is_detected():
    """Negative control: the pooled rule (here: accept a draft the target gives >= 0.2) is not
    lossless, and the same chi-square rejects it."""
    pairs, results = sampled_pairs(acceptance="pooled", tau=0.2, neighbours=np.eye(V, dtype=bool),
                                   rejection="raster")
    assert all(r.lossy for r in results)
    assert chi_square_p(pairs, exact_pairs()) < CONTROL_P
