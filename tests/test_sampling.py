"""Sort-free temperature / top-k / top-p (engine/sampling.py) against a sort-based reference
and transformers' logits warpers, per-row settings, validation, and no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specjax.engine.sampling import SamplingParams, first_argmax, sample_or_argmax, vocab_top_k
from specjax.engine.sampling import target_probs as eager_target_probs

target_probs = jax.jit(eager_target_probs)  # one compile per shape instead of op-by-op dispatch

# Boundary margin: a row whose top-p cut is this close to a cumulative mass is float-ambiguous.
AMBIGUOUS = 1e-5


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> tuple[np.ndarray, bool]:
    """One row [V] by sorting, in float64 after the float32 temperature division.

    Returns the probabilities and whether the top-p cut is float-ambiguous."""
    vocab = logits.shape[-1]
    if temperature == 0:
        return np.eye(vocab)[np.argmax(logits)], False
    scaled = (logits.astype(np.float32) / np.float32(temperature)).astype(np.float64)
    if 0 < top_k < vocab:
        kth = np.sort(scaled)[::-1][top_k - 1]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    ambiguous = False
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        kept = order[mass_before < top_p]
        ambiguous = bool(np.min(np.abs(mass_before - top_p)) < AMBIGUOUS)
        probs = np.where(np.isin(np.arange(vocab), kept), probs, 0.0)
        probs /= probs.sum()
    return probs, ambiguous


def hf_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Rows [R, V] through transformers' warpers in HF order (argmax one-hot when greedy)."""
    vocab = logits.shape[-1]
    if temperature == 0:
        return np.eye(vocab)[np.argmax(logits, axis=-1)]
    scores = torch.tensor(logits, dtype=torch.float32)
    scores = TemperatureLogitsWarper(float(temperature))(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(int(top_k))(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(float(top_p))(None, scores)
    return torch.softmax(scores, dim=-1).numpy()


def random_case(seed: int, shape: tuple[int, ...]):
    """Peaked random logits and per-row settings mixing greedy rows, top-k, top-p, both and neither."""
    rng = np.random.default_rng(seed)
    vocab, batch = shape[-1], shape[0]
    logits = (rng.standard_normal(shape) * rng.uniform(0.5, 4.0)).astype(np.float32)
    temperature = rng.choice([0.0, 0.5, 1.0, 1.7], batch)
    temperature[0], temperature[1:2] = 0.0, 1.0  # at least one greedy and one sampled row
    top_k = rng.choice([0, 1, 3, vocab // 2, vocab, vocab + 5], batch)
    top_p = rng.choice([1.0, 0.3, 0.9, float(rng.uniform(0.05, 0.99))], batch)
    return logits, temperature, top_k, top_p


SHAPES = [(6, 50), (5, 3, 37), (4, 2, 3, 64), (3, 1000)]


def _rows(logits, temperature, top_k, top_p):
    """Yield (b, node logits [R, V], settings) per batch row."""
    for b in range(logits.shape[0]):
        yield b, logits[b].reshape(-1, logits.shape[-1]), (temperature[b], top_k[b], top_p[b])


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_sort_reference_and_transformers(shape, seed):
    logits, temperature, top_k, top_p = random_case(seed, shape)
    sp = SamplingParams.make(shape[0], temperature, top_k, top_p)
    ours = np.asarray(target_probs(jnp.asarray(logits), sp))
    assert ours.shape == shape
    compared = 0
    for b, rows, settings in _rows(logits, temperature, top_k, top_p):
        got = ours[b].reshape(rows.shape)
        hf = hf_probs(rows, *settings)
        for r in range(rows.shape[0]):
            want, ambiguous = reference_probs(rows[r], *settings)
            if ambiguous:
                continue
            compared += 1
            np.testing.assert_array_equal(got[r] > 0, want > 0, err_msg=f"kept set, row {b} {settings}")
            np.testing.assert_allclose(got[r], want, atol=2e-6, err_msg=f"row {b} {settings}")
            np.testing.assert_allclose(got[r], hf[r], atol=2e-6, err_msg=f"vs transformers, row {b} {settings}")
    assert compared >= 0.9 * np.prod(shape[:-1])


@pytest.mark.parametrize("temperature", [1e-4, 1e-2, 30.0, 1e4])
def test_extreme_temperatures(temperature):
    logits, _, top_k, top_p = random_case(7, (6, 3, 40))
    temps = np.full(6, temperature)
    ours = np.asarray(target_probs(jnp.asarray(logits), SamplingParams.make(6, temps, top_k, top_p)))
    assert np.all(np.isfinite(ours))
    for b, rows, settings in _rows(logits, temps, top_k, top_p):
        for r in range(rows.shape[0]):
            want, ambiguous = reference_probs(rows[r], *settings)
            if not ambiguous:
                np.testing.assert_allclose(ours[b].reshape(rows.shape)[r], want, atol=2e-6)


def test_filters_off_is_plain_softmax():
    logits = jax.random.normal(jax.random.key(0), (3, 2, 20)) * 3
    sp = SamplingParams.make(3, temperature=[1.0, 0.6, 2.0], top_k=[0, 20, 99], top_p=1.0)
    want = jax.nn.softmax(logits / jnp.array([1.0, 0.6, 2.0])[:, None, None], axis=-1)
    np.testing.assert_allclose(target_probs(logits, sp), want, atol=1e-6)


def test_greedy_rows_are_the_first_argmax_and_ignore_filters():
    logits = jnp.array([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
    sp = SamplingParams.make(2, temperature=0.0, top_k=[1, 3], top_p=[0.2, 0.5])
    np.testing.assert_array_equal(target_probs(logits, sp), [[0, 1, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_array_equal(sample_or_argmax(jax.random.key(0), logits, sp), [1, 0])


def _last_index_argmax(x):  # wrong: ties go to the last index
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.max(jnp.where(x == top, index, -1), axis=-1)


def _nan_blind_argmax(x):  # wrong: a row holding a NaN matches nothing (an id past the vocabulary)
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    return jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)


def _argmax_cases() -> np.ndarray:
    """Random rows, and rows made to hit the edge cases: ties (two, all equal), infinities, NaNs."""
    x = np.random.default_rng(0).standard_normal((6, 5, 300)).astype(np.float32)
    x[0, 0, [7, 250]] = 9.0  # a tie between two maxima
    x[0, 1] = 1.5  # every entry tied
    x[0, 2, 40] = np.inf
    x[0, 3] = -np.inf
    x[0, 4, [3, 90]] = np.nan  # NaN wins, as in jnp.argmax: its first one
    x[1, 0, 5], x[1, 0, 200] = np.inf, np.inf
    x[1, 1, 299] = 50.0  # the last index
    x[1, 2, [0, 1]] = np.float32(-0.0), 30.0
    x[1, 3] = np.round(x[1, 3])  # many ties below and at the max
    return x


@pytest.mark.parametrize("candidate, right", [(first_argmax, True), (_last_index_argmax, False),
                                              (_nan_blind_argmax, False)])
def test_first_argmax_is_jnp_argmax_bit_for_bit(candidate, right):
    """The fast argmax every greedy step takes equals ``jnp.argmax`` on ties, infinities and NaNs;
    the negative controls (ties to the last index, NaN rows unmatched) are told apart."""
    x = jnp.asarray(_argmax_cases())
    want = np.asarray(jnp.argmax(x, axis=-1))
    got = np.asarray(jax.jit(candidate)(x))
    assert got.dtype == np.int32 and got.shape == want.shape
    assert np.array_equal(got, want) == right


def _groups_by_rank_top_k(x, k, group=16):  # wrong: candidate groups read best first, not in index order
    grouped = x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))
    best_groups = jax.lax.top_k(jnp.max(grouped, axis=-1), k)[1]
    candidates = jnp.take_along_axis(grouped, best_groups[..., None], axis=-2).reshape(x.shape[:-1] + (k * group,))
    values, at = jax.lax.top_k(candidates, k)
    return values, jnp.take_along_axis(best_groups, at // group, axis=-1) * group + at % group


def _too_few_groups_top_k(x, k, group=16):  # wrong: k / 2 groups (enough when the best k spread out)
    grouped = x.reshape(x.shape[:-1] + (x.shape[-1] // group, group))
    best_groups = jnp.sort(jax.lax.top_k(jnp.max(grouped, axis=-1), k // 2)[1], axis=-1)
    candidates = jnp.take_along_axis(grouped, best_groups[..., None], axis=-2).reshape(x.shape[:-1] + (k // 2 * group,))
    values, at = jax.lax.top_k(candidates, k)
    return values, jnp.take_along_axis(best_groups, at // group, axis=-1) * group + at % group


def _top_k_cases(vocab: int) -> np.ndarray:
    """Random rows, rows of few distinct values (ties across groups), and rows whose best entries
    crowd into one group or sit among -inf."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 3, vocab)).astype(np.float32)
    x[1] = np.round(x[1] * 2)  # many ties, inside and across groups
    x[2, 0, 16:24] = 10.0 + np.arange(8)  # the whole top 8 in one group of 16
    x[2, 1] = -np.inf
    x[2, 1, [3, 700 % vocab, vocab - 1]] = 1.0
    x[3, 0] = 0.0  # every entry tied
    x[4, 0] = -5.0  # a tie between groups whose maxima rank them the other way round
    x[4, 0, [32, 80, 81]] = 1.0, 3.0, 1.0
    return x


@pytest.mark.parametrize("vocab, k", [(1024, 8), (1024, 3), (1024, 1), (49152, 8), (4000, 5), (999, 8)])
def test_vocab_top_k_is_lax_top_k_bit_for_bit(vocab, k):
    """Same values and indices, in the same order, as ``lax.top_k`` (ties to the lower index), on the
    grouped path (1024, 49152, 4000 = 125 x 32), k = 1's argmax and the fallback (999 is odd)."""
    x = jnp.asarray(_top_k_cases(vocab))
    got, want = jax.jit(vocab_top_k, static_argnums=1)(x, k), jax.lax.top_k(x, k)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    assert got[1].dtype == want[1].dtype


@pytest.mark.parametrize("wrong", [_groups_by_rank_top_k, _too_few_groups_top_k])
def test_vocab_top_k_cases_reject_plausible_wrong_groupings(wrong):
    x = jnp.asarray(_top_k_cases(1024))
    got, want = wrong(x, 8), jax.lax.top_k(x, 8)
    assert not all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got, want))


def test_ties_at_the_thresholds_are_all_kept():
    # top-k: the 2nd largest value 1.0 is tied three times (and -0.0 == +0.0 below).
    logits = jnp.array([[2.0, 1.0, 1.0, 1.0, 0.0, -0.0]])
    probs = target_probs(logits, SamplingParams.make(1, 1.0, top_k=2))
    np.testing.assert_array_equal(np.asarray(probs)[0] > 0, [1, 1, 1, 1, 0, 0])
    probs = target_probs(logits, SamplingParams.make(1, 1.0, top_k=5))
    np.testing.assert_array_equal(np.asarray(probs)[0] > 0, [1, 1, 1, 1, 1, 1])
    # top-p: the two most likely are tied; the first alone reaches 0.3, its tie stays too.
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.4, 0.1]]))
    probs = target_probs(logits, SamplingParams.make(1, 1.0, top_p=0.3))
    np.testing.assert_allclose(probs, [[0.0, 0.5, 0.5, 0.0]], atol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.3, 0.15]]))
    kept = lambda p: np.asarray(target_probs(logits, SamplingParams.make(1, 1.0, top_p=p)))[0] > 0
    np.testing.assert_array_equal(kept(0.5), [0, 1, 0, 0])  # 0.5 reaches 0.5 exactly
    np.testing.assert_array_equal(kept(0.51), [0, 1, 1, 0])
    np.testing.assert_array_equal(kept(0.85), [0, 1, 1, 1])
    np.testing.assert_array_equal(kept(0.96), [1, 1, 1, 1])
    np.testing.assert_array_equal(kept(1e-6), [0, 1, 0, 0])


def test_thresholds_split_one_ulp_apart_over_the_widest_range():
    """The bisection is exact: it separates neighbouring floats with -3e38 widening the key range."""
    above_one = float(np.nextafter(np.float32(1.0), np.float32(2.0)))
    logits = jnp.array([[-3e38, 1.0, above_one, 3.0, -2.0]] * 2, jnp.float32)
    probs = np.asarray(target_probs(logits, SamplingParams.make(2, 1.0, top_k=[2, 0], top_p=[1.0, 0.85])))
    np.testing.assert_array_equal(probs > 0, [[0, 0, 1, 1, 0], [0, 0, 1, 1, 0]])


def test_no_full_vocab_sort_in_the_compiled_function():
    logits = jnp.zeros((2, 3, 128))
    text = target_probs.lower(logits, SamplingParams.make(2, 1.0, 5, 0.9)).as_text()
    assert "sort" not in text and "top_k" not in text


def test_samples_follow_target_probs():
    logits = jax.random.normal(jax.random.key(3), (3, 8)) * 2
    sp = SamplingParams.make(3, temperature=[0.0, 1.0, 0.7], top_k=[0, 0, 5], top_p=[1.0, 0.9, 0.95])
    probs = np.asarray(target_probs(logits, sp), np.float64)
    draw_many = jax.jit(jax.vmap(sample_or_argmax, in_axes=(0, None, None)))
    draws = np.asarray(draw_many(jax.random.split(jax.random.key(4), 20000), logits, sp))
    assert np.all(draws[:, 0] == np.argmax(logits[0]))
    for row in (1, 2):
        counts = np.bincount(draws[:, row], minlength=8)
        assert np.all(counts[probs[row] == 0] == 0)
        support = probs[row] > 0
        assert stats.chisquare(counts[support], probs[row][support] / probs[row][support].sum() * 20000).pvalue > 1e-3


def test_changing_values_does_not_recompile():
    probs_fn = jax.jit(lambda logits, sp: eager_target_probs(logits, sp))  # a cache of its own
    sample_fn = jax.jit(lambda key, logits, sp: sample_or_argmax(key, logits, sp))
    logits = jax.random.normal(jax.random.key(0), (4, 3, 16))
    for temperature, top_k, top_p in [(0.0, 0, 1.0), (1.0, 0, 1.0), ([0.0, 0.7, 1.3, 2.0], [0, 3, 16, 40], 0.8),
                                      (0.5, 2, [0.1, 0.5, 1.0, 0.99])]:
        sp = SamplingParams.make(4, temperature, top_k, top_p)
        probs_fn(logits, sp).block_until_ready()
        sample_fn(jax.random.key(1), logits, sp).block_until_ready()
    assert probs_fn._cache_size() == 1
    assert sample_fn._cache_size() == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=[1.0, 0.5]), "temperature.*one value per row"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k.*integer"),
    (dict(top_k=[1, 2, 3, 4]), "top_k.*one value per row"),
    (dict(top_k=2**40), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p="0.9"), "top_p.*numeric"),
])
def test_make_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams.make(3, **kwargs)


@pytest.mark.parametrize("batch_size", [0, -2, 2.0, True])
def test_make_rejects_bad_batch_size(batch_size):
    with pytest.raises(ValueError, match="batch_size"):
        SamplingParams.make(batch_size)


def test_batch_mismatch_is_an_error():
    with pytest.raises(ValueError, match="2 rows but logits have shape"):
        eager_target_probs(jnp.zeros((3, 5)), SamplingParams.make(2, 1.0))
