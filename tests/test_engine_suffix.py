"""--drafter suffix end to end: lossless, and the global index carries across requests."""

import pytest

from engine_helpers import tiny_model
from specjax.drafters.suffix_index import SuffixDecodingDrafter
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate

MODEL = tiny_model(5)
# Batches of prompts that share long stretches, like repeated tool calls.
BATCHES = [
    [[3, 9, 4, 3, 9, 8, 1], [17, 2, 5, 5, 40, 41, 42, 17, 2, 5, 5], [60, 1, 7]],
    [[3, 9, 4, 3, 9, 8, 1], [60, 1, 7, 11], [17, 2, 5, 5, 40, 41, 42, 17, 2, 5, 5]],
]


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_suffix_drafter_is_lossless_across_requests_and_learns_from_them(tree):
    engine = Engine(MODEL, SuffixDecodingDrafter(tree=tree, min_token_prob=0.0), draft_capacity=12,
                    attention="xla")
    results = []
    for prompts in BATCHES:
        expected = greedy_generate(MODEL, prompts, 32)
        results.append(engine.generate(prompts, max_new_tokens=32))
        assert [r.token_ids for r in results[-1]] == expected
    assert engine.drafter.index.num_cached_requests == 6
    # Requests 0 and 2 of the second batch repeat first-batch requests: the global index drafts
    # them with a budget that grows with the match (1, 3, 7, ... capped at 12 + bonus).
    first = {tuple(p): r.target_passes for p, r in zip(BATCHES[0], results[0])}
    for i in (0, 2):
        repeated = results[1][i].target_passes
        assert repeated <= 8 < first[tuple(BATCHES[1][i])], (repeated, first)
