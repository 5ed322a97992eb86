"""Generation right up to the end of a cache bucket, with branching trees, equals plain greedy.

Verify writes a tree's T + 1 rows above the cached tokens and accept compacts the
accepted path down from there. Rows past the cache's end are dropped on write
and clamped on read, so a cache without T + 1 slots of headroom silently copies
stale K/V into live slots near its end. These tests fill each row's prompt to
the prompt bucket and ask for exactly the tokens that end the cache bucket
(prompt width + new tokens = 128 or 256), with trees whose accepted nodes sit at
high slot indices, for a host drafter and a device drafter.
"""

import numpy as np
import pytest

from engine_helpers import ReferenceFollower, tiny_model
from specjax.drafters.base import Proposal
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.engine.device_loop import generate_on_device
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate

MODEL = tiny_model(4)
CAPACITY = 16
# (prompt width = every prompt's length, new tokens): each pair ends a cache bucket exactly.
BUCKET_ENDS = [(64, 64), (128, 128)]


def _prompts(width: int, n: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(width)
    return [rng.integers(1, MODEL.config.vocab_size, width).tolist() for _ in range(n)]


class WrongSiblingsThenTruth(ReferenceFollower):
    """Proposes a star of wrong depth-1 siblings first and the true continuation last, as a chain:
    the accepted nodes take the tree's highest slots. Chain lengths cycle, so the steps land at
    every offset from the cache's end."""

    def __init__(self, references: dict, capacity: int):
        super().__init__(references)
        self.capacity = capacity

    def propose(self, rid, max_tokens):
        truth = self.truth(rid)
        chain = truth[: 1 + self.calls % 5]
        self.calls += 1
        n_wrong = max_tokens - len(chain)
        wrong = [(truth[0] + 1 + i) % MODEL.config.vocab_size for i in range(n_wrong)] if truth else [0] * n_wrong
        parents = [-1] * n_wrong + [-1] + list(range(n_wrong, n_wrong + len(chain) - 1))
        tokens = wrong + list(chain)
        return Proposal(np.asarray(tokens, np.int32), np.asarray(parents[: len(tokens)], np.int32),
                        np.ones(len(tokens), np.float32))


@pytest.mark.parametrize("width,new_tokens", BUCKET_ENDS)
def test_host_drafter_up_to_the_end_of_the_cache_bucket(width, new_tokens):
    prompts = _prompts(width)
    expected = greedy_generate(MODEL, prompts, new_tokens)
    drafter = WrongSiblingsThenTruth({tuple(p): o for p, o in zip(prompts, expected)}, CAPACITY)
    engine = Engine(MODEL, drafter, draft_capacity=CAPACITY, attention="xla")
    assert engine.prompt_bucket(width) + new_tokens == width + new_tokens  # the bucket's end is reached
    results = engine.generate(prompts, max_new_tokens=new_tokens)
    assert [r.token_ids for r in results] == expected
    assert all(len(o) == new_tokens for o in expected)  # no EOS: every row runs to the end
    assert min(r.tokens_per_pass for r in results) > 2  # deep nodes at high slots were accepted


@pytest.mark.parametrize("width,new_tokens", BUCKET_ENDS)
def test_device_drafter_up_to_the_end_of_the_cache_bucket(width, new_tokens):
    """The target drafting for itself through a dynamic tree: every step accepts the deepest
    nodes, which sit at the tree's last slots (level order)."""
    prompts = _prompts(width, 8)
    expected = greedy_generate(MODEL, prompts, new_tokens)
    drafter = DraftModelDrafter(MODEL, MODEL.config.vocab_size, capacity=10, topk=3, depth=4)
    results = generate_on_device(Engine(MODEL, attention="xla"), prompts, new_tokens, drafter=drafter,
                                 steps_per_sync=8)
    assert [r.token_ids for r in results] == expected
    assert min(r.tokens_per_pass for r in results) > 3


def test_a_cache_without_headroom_is_refused():
    """The engine refuses a cache bucket that cannot hold the last step's tree, instead of
    dropping its rows silently."""
    engine = Engine(MODEL, WrongSiblingsThenTruth({}, CAPACITY), draft_capacity=CAPACITY, attention="xla")
    engine.cache_bucket = lambda prompt_len, new_tokens: prompt_len + new_tokens  # the mutation: no headroom
    with pytest.raises(ValueError, match="draft scratch"):
        engine.generate(_prompts(64, 1), max_new_tokens=64)
