"""A paused host drafter's plain steps run fused on the device (``device_loop.run_plain_chunk``).

While "auto" has stopped asking a host drafter, the ``Engine`` runs the plain steps before the next
probe as one on-device chunk instead of one dispatch and sync per token. The output must not change:
greedy equals plain greedy, sampled equals plain sampling with the same seeds, logprobs equal the
plain loop's, streaming and sessions carry on as before.
"""

import numpy as np
import pytest

from engine_helpers import GarbageDrafter, tiny_model
from specjax.engine import autotune, device_loop
from specjax.engine import engine as engine_module
from specjax.engine.engine import Engine
from specjax.engine.plain import generate_plain, greedy_generate

MODEL = tiny_model(5)
PROMPTS = [[3, 9, 4, 3, 9], [17, 2, 5]]
NEW = 48


def counted(monkeypatch) -> dict:
    """Count the host loop's step dispatches and the fused plain chunks."""
    calls = {"step": 0, "chunk": 0}

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(engine_module, "step", counting("step", engine_module.step))
    monkeypatch.setattr(device_loop, "run_plain_chunk", counting("chunk", device_loop.run_plain_chunk))
    return calls


@pytest.mark.parametrize("fused", [True, False])
def test_a_paused_drafter_plain_steps_run_fused_and_the_output_is_plain_greedy(monkeypatch, fused):
    expected = greedy_generate(MODEL, PROMPTS, NEW)
    assert all(MODEL.config.vocab_size - 1 not in out for out in expected)  # the drafts are always wrong
    if not fused:  # the control: every plain step its own dispatch, as before
        monkeypatch.setattr(autotune.CapacityPolicy, "plain_steps_ahead", lambda self: 0)
    engine = Engine(MODEL, GarbageDrafter(MODEL.config.vocab_size), max_draft_capacity=4)
    engine.warmup(batch_size=len(PROMPTS), prompt_len=5, max_new_tokens=NEW)  # no timing steps below
    calls = counted(monkeypatch)
    results = engine.generate(PROMPTS, NEW)
    assert [r.token_ids for r in results] == expected
    steps = max(r.target_passes for r in results) - 1
    assert all(len(r.trace) == r.target_passes - 1 for r in results)  # chunks' passes traced one by one
    if fused:
        assert calls["chunk"] > 0 and calls["step"] < 0.25 * steps
    else:
        assert calls["chunk"] == 0 and calls["step"] >= steps


def test_sampling_logprobs_and_streaming_through_fused_chunks(monkeypatch):
    settings = dict(temperature=1.3, top_p=0.95, seed=[11, 12])
    expected = generate_plain(MODEL, PROMPTS, NEW, **settings)
    plain = Engine(MODEL, None).generate(PROMPTS, NEW, logprobs=True, **settings)  # fused plain decoding
    assert [r.token_ids for r in plain] == expected
    engine = Engine(MODEL, GarbageDrafter(MODEL.config.vocab_size), max_draft_capacity=4)
    calls = counted(monkeypatch)
    streamed = {0: [], 1: []}
    results = engine.generate(PROMPTS, NEW, logprobs=True, on_tokens=lambda i, t: streamed[i].extend(t),
                              **settings)
    assert calls["chunk"] > 0
    assert [r.token_ids for r in results] == expected
    assert [streamed[0], streamed[1]] == expected
    for got, want in zip(results, plain):
        np.testing.assert_allclose(got.logprobs, want.logprobs, atol=1e-5)


def test_a_session_continues_after_fused_chunks(monkeypatch):
    engine = Engine(MODEL, GarbageDrafter(MODEL.config.vocab_size), max_draft_capacity=4)
    calls = counted(monkeypatch)
    session = engine.session(256)
    first = engine.generate([PROMPTS[0]], NEW, session=session)[0].token_ids
    follow_up = PROMPTS[0] + first + [7, 8, 9]
    second = engine.generate([follow_up], NEW, session=session)[0].token_ids
    assert calls["chunk"] > 0
    assert [first, second] == [greedy_generate(MODEL, [p], NEW)[0] for p in (PROMPTS[0], follow_up)]
