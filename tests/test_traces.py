"""Per-pass traces and emitted-token logprobs, in the host loop, the on-device loop and Graft's loop.

The logprobs are checked against a plain forward pass over the final sequence
(``specjax.models.decoder``, no engine involved); wrong gathers (the root's
logits for every token, the next position's) are kept as negative controls.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import OracleTreeDrafter, tiny_model
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.graft import GraftDrafter
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.engine import Engine, GenerationResult
from specjax.engine.plain import greedy_generate
from specjax.engine.sampling import SamplingParams, target_probs
from specjax.engine.trace import TraceStep, acceptance_by_depth
from specjax.models.decoder import KVCache, causal_mask, forward

V = 64
TARGET = tiny_model(0, vocab=V)
PROMPTS = [[3, 9, 4, 3, 9], [17, 2, 5, 5, 40, 41, 42, 17, 2, 5, 5], [60, 1, 7]]
NEW = 16
CHAIN = [[-1, 0, 1, 2]]  # the oracle's tree: a chain of 4


def sequence_logits(prompt: list, output: list) -> np.ndarray:
    """float32[len(output), V]: the target's logits before each output token, from one causal forward
    pass over prompt + output (logits at position len(prompt) - 1 + k predict output[k])."""
    tokens = jnp.asarray([prompt + output], jnp.int32)
    n = tokens.shape[1]
    cache = KVCache.zeros(TARGET.config, 1, n, jnp.float32)
    out = forward(TARGET.params, TARGET.config, tokens, jnp.arange(n)[None], cache, jnp.zeros(1, jnp.int32),
                  causal_mask(1, n))
    return np.asarray(out.logits[0, len(prompt) - 1: n - 1])


def reference_logprobs(prompt: list, output: list) -> np.ndarray:
    logp = np.asarray(jax.nn.log_softmax(sequence_logits(prompt, output), axis=-1))
    return logp[np.arange(len(output)), output]


def host_engine() -> Engine:
    truth = {tuple(p): o for p, o in zip(PROMPTS, greedy_generate(TARGET, PROMPTS, 64))}
    return Engine(TARGET, OracleTreeDrafter(truth, CHAIN, follow_prob=0.8, vocab=V, seed=1), draft_capacity=4)


def device_engine() -> Engine:  # the target drafting for itself: every chain accepted
    return Engine(TARGET, DraftModelDrafter(TARGET, V, capacity=4), draft_capacity=4)


def graft_engine() -> Engine:  # Graft's own loop: the target's chain plus prompt lookup's retrieval
    return Engine(TARGET, GraftDrafter(DraftModelDrafter(TARGET, V, capacity=4), PromptLookupDrafter(), capacity=4))


ENGINES = pytest.mark.parametrize("make_engine", [host_engine, device_engine, graft_engine],
                                  ids=["host", "device", "graft"])


@ENGINES
def test_greedy_logprobs_equal_a_plain_forward_pass(make_engine):
    results = make_engine().generate(PROMPTS, NEW, logprobs=True)
    assert [r.token_ids for r in results] == greedy_generate(TARGET, PROMPTS, NEW)
    assert max(s.accepted for r in results for s in r.trace) >= 2  # steps emitting several tokens
    for prompt, r in zip(PROMPTS, results):
        want = reference_logprobs(prompt, r.token_ids)
        got = np.asarray(r.logprobs)
        np.testing.assert_allclose(got, want, atol=1e-4)
        # Negative controls: the next position's logits, or every token scored at its step's root.
        shifted = np.asarray(jax.nn.log_softmax(sequence_logits(prompt, r.token_ids + [0])[1:], axis=-1))
        assert not np.allclose(got, shifted[np.arange(len(got)), r.token_ids], atol=1e-2)
        logp = np.asarray(jax.nn.log_softmax(sequence_logits(prompt, r.token_ids), axis=-1))
        assert not np.allclose(got, logp[_roots(r), r.token_ids], atol=1e-2)


def _roots(result: GenerationResult) -> np.ndarray:
    """For each emitted token, the position of the root of the pass that emitted it."""
    starts = np.cumsum([1] + [s.emitted for s in result.trace])[:-1]
    per_token = [0] + [int(start) for start, s in zip(starts, result.trace) for _ in range(s.emitted)]
    return np.asarray(per_token[: len(result.token_ids)])


def test_sampled_logprobs_are_of_the_filtered_distribution():
    """Sampled rows score each token under temperature, top-k and top-p (``target_probs``), not the
    raw softmax."""
    engine = host_engine()
    results = engine.generate(PROMPTS, NEW, logprobs=True, temperature=0.8, top_k=8, seed=3)
    sampling = SamplingParams.make(1, 0.8, 8, 1.0)
    for prompt, r in zip(PROMPTS, results):
        logits = sequence_logits(prompt, r.token_ids)
        probs = np.asarray(target_probs(jnp.asarray(logits)[None], sampling))[0]
        want = np.log(probs[np.arange(len(r.token_ids)), r.token_ids])
        np.testing.assert_allclose(r.logprobs, want, atol=1e-4)
        raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))[np.arange(len(r.token_ids)), r.token_ids]
        assert not np.allclose(r.logprobs, raw, atol=1e-2)  # negative control: the unfiltered softmax


def test_no_logprobs_unless_asked():
    assert all(r.logprobs is None for r in host_engine().generate(PROMPTS, 4))


@ENGINES
def test_traces_add_up_to_the_results(make_engine):
    results = make_engine().generate(PROMPTS, NEW)
    for r in results:
        assert len(r.trace) == r.target_passes - 1  # one record per pass after prefill
        assert 1 + sum(s.emitted for s in r.trace) == len(r.token_ids)
        assert sum(s.accepted for s in r.trace) == r.accepted_draft_tokens
        assert all(s.capacity == 4 and 0 <= s.accepted <= s.drafted <= 4 and s.step_s > 0 for s in r.trace)
        assert all(s.emitted <= s.accepted + 1 for s in r.trace)


def test_device_traces_follow_the_auto_size_per_chunk():
    engine = Engine(TARGET, DraftModelDrafter(TARGET, V, capacity=4), max_draft_capacity=4)
    results = engine.generate(PROMPTS, NEW)
    (policy,) = engine._chunk_policies.values()
    used = {t for t, steps in policy.history if steps > 0}
    assert {s.capacity for r in results for s in r.trace} <= used
    for r in results:
        assert len(r.trace) == r.target_passes - 1 and 1 + sum(s.emitted for s in r.trace) == len(r.token_ids)
        assert all(s.accepted == 0 for s in r.trace if s.capacity == 0)


def _result(*passes) -> GenerationResult:
    trace = [TraceStep(t, d, a, a + 1, 0.0, 1.0) for t, d, a in passes]
    return GenerationResult([0] * (1 + sum(a + 1 for _, _, a in passes)), None, 1 + len(passes),
                            sum(a for _, _, a in passes), 0.0, 0.0, 0.0, trace=trace)


def test_acceptance_by_depth_counts_speculative_passes_only():
    results = [_result((4, 4, 0), (4, 4, 2), (0, 0, 0)), _result((2, 1, 1), (4, 3, 3), (4, 0, 0))]
    # Speculative passes (T > 0 and drafted > 0) accepted 0, 2, 1 and 3 tokens.
    np.testing.assert_allclose(acceptance_by_depth(results), [3 / 4, 2 / 4, 1 / 4, 0])
    assert acceptance_by_depth(results).sum() == pytest.approx((0 + 2 + 1 + 3) / 4)  # mean accepted length
    # Wrong variants: counting plain and empty passes, or depth 0 as a depth.
    every = np.array([0, 2, 0, 1, 3, 0])
    assert not np.allclose(acceptance_by_depth(results), [(every >= d).mean() for d in range(1, 5)])
    assert not np.allclose(acceptance_by_depth(results), [(np.array([0, 2, 1, 3]) >= d).mean() for d in range(4)])
    assert acceptance_by_depth([_result((0, 0, 0))]).shape == (0,)
