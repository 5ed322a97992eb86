"""A batch shrinks to its live rows in the on-device loop (``device_loop.live_rows``) without
changing a token: every drafter kind, greedy and sampled rows, fixed and auto tree sizes."""

import dataclasses

import numpy as np
import pytest

from engine_helpers import near_copy, tiny_model
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine import device_loop
from specjax.engine.autotune import ChunkPolicy
from specjax.engine.device_loop import NoDrafter, generate_on_device, live_rows
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from test_device_loop import random_eagle3

# Seed 5's greedy rows end (EOS 61 or 3) after 1 to 9 tokens, except the last one, which runs on:
# the batch of 8 shrinks to 2 rows and then to 1.
MODEL = tiny_model(5, vocab=64, eos=(61, 3))
PROMPTS = [[i, (3 * i) % 64, (7 * i + 1) % 64] for i in range(1, 9)]
NEW_TOKENS = 24
TEMPERATURES = [0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_live_rows_keeps_the_live_rows_padded_to_a_power_of_two():
    finished = np.zeros(16, bool)
    assert live_rows(finished) is None  # nothing finished
    finished[:7] = True
    assert live_rows(finished) is None  # 9 of 16 still decode: no smaller power of two holds them
    finished[7] = True
    np.testing.assert_array_equal(live_rows(finished), np.arange(8, 16))
    finished = np.ones(16, bool)
    finished[[3, 9, 12]] = False
    np.testing.assert_array_equal(live_rows(finished), [3, 9, 12, 0])  # padded with a finished row
    assert live_rows(np.ones(16, bool)) is None  # all finished: nothing to run
    assert live_rows(np.zeros(1, bool)) is None


def scripted_choose(self) -> int:
    """Plain, then every tree size in turn, at every row count: trees run right after a shrink too
    (a lazy drafter catches up there on rows taken from the bigger batch)."""
    script = (0,) + self.buckets[1:]
    return script[len(self.history) % len(script)]


def late_choose(self) -> int:
    """Plain for four chunks at every row count, then trees: the batch shrinks before its first
    tree, so a lazy drafter reads the prompts (and an EAGLE head the target's features) of the
    rows left."""
    script = (0, 0, 0, 0) + self.buckets[1:]
    return script[min(len(self.history), len(script) - 1)]


DRAFTERS = {
    "plain": (lambda m: NoDrafter(), False),
    "token_recycling_auto": (lambda m: TokenRecyclingDrafter(m.config.vocab_size, capacity=8), True),
    "draft_model_fixed": (lambda m: DraftModelDrafter(near_copy(m, 0.25, seed=9), 64, capacity=6, topk=2,
                                                      depth=3), False),
    "draft_model_scripted": (lambda m: DraftModelDrafter(near_copy(m, 0.25, seed=9), 64, capacity=6, topk=2,
                                                         depth=3), True),
    "eagle3_scripted": (lambda m: dataclasses.replace(random_eagle3(m), capacity=4), True),
    "eagle3_late": (lambda m: dataclasses.replace(random_eagle3(m), capacity=4), True),
}
SCRIPTS = {"scripted": scripted_choose, "late": late_choose}


def run(name: str, shrink: bool) -> list:
    make, auto = DRAFTERS[name]
    engine = Engine(MODEL, attention="xla", max_batch_size=8, shrink_batches=shrink)
    return generate_on_device(engine, PROMPTS, NEW_TOKENS, temperature=TEMPERATURES, seed=3, drafter=make(MODEL),
                              steps_per_sync=2, auto=auto, logprobs=True)


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_a_shrinking_batch_emits_what_the_whole_batch_does(name, monkeypatch):
    script = SCRIPTS.get(name.rsplit("_", 1)[-1])
    if script is not None:
        monkeypatch.setattr(ChunkPolicy, "choose", script)
    shrinks = []  # rows after each shrink
    take = device_loop._take_loop_rows
    monkeypatch.setattr(device_loop, "_take_loop_rows", lambda loop, index, **kw: shrinks.append(len(index)) or
                        take(loop, index, **kw))
    whole = run(name, False)
    assert shrinks == []
    shrunk = run(name, True)
    assert shrinks and shrinks[-1] < 8  # the batch did shrink
    assert [r.token_ids for r in shrunk] == [r.token_ids for r in whole]
    greedy = [i for i, t in enumerate(TEMPERATURES) if t == 0]
    expected = greedy_generate(MODEL, [PROMPTS[i] for i in greedy], NEW_TOKENS)
    assert [shrunk[i].token_ids for i in greedy] == expected
    assert max(len(r.token_ids) for r in shrunk) == NEW_TOKENS > min(len(r.token_ids) for r in shrunk)
    for a, b in zip(shrunk, whole):
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
        assert len(a.trace) == a.target_passes - 1  # one trace step per pass after prefill, kept across shrinks
        assert sum(s.emitted for s in a.trace) == len(a.token_ids) - 1
        if not DRAFTERS[name][1]:  # fixed trees: the same passes (auto's choices depend on the row count)
            assert (a.target_passes, a.accepted_draft_tokens) == (b.target_passes, b.accepted_draft_tokens)
