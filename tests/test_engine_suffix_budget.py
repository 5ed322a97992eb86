"""Budgeted suffix trees in the engine: greedy output equals plain greedy, and repeats are drafted deep."""

from engine_helpers import tiny_model
from specjax.drafters.suffix_index import SuffixDecodingDrafter
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate

MODEL = tiny_model(7)
# Prompts that share long stretches (repeated tool calls), run in two waves so the global index,
# the calibration and the in-flight sharing all take part.
WAVES = [
    [[3, 9, 4, 3, 9, 8, 1], [17, 2, 5, 5, 40, 41, 42, 17, 2, 5, 5], [60, 1, 7], [3, 9, 4, 3, 9, 8, 2]],
    [[3, 9, 4, 3, 9, 8, 1], [60, 1, 7, 11], [17, 2, 5, 5, 40, 41, 42, 17, 2, 5, 5]],
]


def test_budgeted_suffix_trees_are_lossless():
    capacity = 16
    drafter = SuffixDecodingDrafter(tree=True, budget_mode=True, min_token_prob=0.0)
    engine = Engine(MODEL, drafter, draft_capacity=capacity)
    first_passes = {}
    for wave, prompts in enumerate(WAVES):
        results = engine.generate(prompts, max_new_tokens=24)
        assert [r.token_ids for r in results] == greedy_generate(MODEL, prompts, 24)
        for prompt, result in zip(prompts, results):
            if wave == 0:
                first_passes[tuple(prompt)] = result.target_passes
            elif tuple(prompt) in first_passes:
                # A repeated request is drafted from the global index: far fewer target passes.
                assert result.target_passes < first_passes[tuple(prompt)] / 2, (result.target_passes, first_passes)
    assert drafter.index.num_cached_requests == sum(map(len, WAVES))
