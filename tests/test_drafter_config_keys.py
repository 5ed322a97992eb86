"""Device drafters are static jit arguments keyed by their configuration: a new instance with the
same settings reuses the compiled programs, while its own weights still drive them."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import tiny_model
from specjax.drafters.device import KeyedByConfig
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.eagle3 import Eagle3Config, Eagle3Drafter, init_params
from specjax.drafters.graft import GraftDrafter
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.drafters.routing import TapsDrafter
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine import device_loop
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models.config import ModelConfig

TARGET = tiny_model(0)
OTHER_WEIGHTS = tiny_model(5)  # the same config, other random weights
PROMPTS = [[5, 17, 33, 8], [9, 42, 61, 7, 7, 3]]
NEW_TOKENS = 12


def _compiles() -> tuple[int, int]:
    return device_loop.run_steps._cache_size(), device_loop._drafter_prefill._cache_size()


def _run(drafter):
    results = device_loop.generate_on_device(Engine(TARGET, attention="xla"), PROMPTS, NEW_TOKENS, drafter=drafter,
                                             steps_per_sync=4)
    assert [r.token_ids for r in results] == greedy_generate(TARGET, PROMPTS, NEW_TOKENS)
    return min(r.tokens_per_pass for r in results)


def test_equal_config_draft_models_compile_once_and_keep_their_own_weights():
    random_draft = DraftModelDrafter(OTHER_WEIGHTS, 64, capacity=4)
    assert _run(random_draft) < 2  # random weights: few drafts accepted
    compiled = _compiles()
    self_draft = DraftModelDrafter(TARGET, 64, capacity=4)
    # The target drafting for itself: every chain accepted, so nothing of the first drafter's
    # weights was baked into the programs it shares (prefill, propose and update alike).
    assert _run(self_draft) >= 3
    assert _compiles() == compiled
    assert self_draft == random_draft and hash(self_draft) == hash(random_draft)
    # Negative control: another tree size is another program.
    _run(DraftModelDrafter(OTHER_WEIGHTS, 64, capacity=5))
    assert _compiles()[0] > compiled[0]


def _eagle3(seed: int, **shape) -> Eagle3Drafter:
    t = TARGET.config
    layer = ModelConfig(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=64,
                        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5)
    cfg = Eagle3Config(layer, 50, t.hidden_size)
    return Eagle3Drafter(cfg, init_params(cfg, jax.random.key(seed)), t.num_layers,
                         **{"capacity": 6, "topk": 2, "depth": 3, "hidden_layers": (0, 1, 2), **shape})


def test_equal_config_eagle3_heads_share_programs_but_not_weights():
    first, second = _eagle3(0), _eagle3(1)
    assert first == second and hash(first) == hash(second)
    _run(first)
    compiled = _compiles()
    _run(second)
    assert _compiles() == compiled
    # The shared prefill program reads each head's own params: it matches the head run eagerly.
    tokens, lengths = jnp.asarray([[5, 17, 33, 8]]), jnp.asarray([4])
    first_token, hidden = jnp.asarray([3]), jax.random.normal(jax.random.key(2), (3, 1, 4, 32))

    def root(drafter, jitted):
        dstate = drafter.init_state(1, 128)
        if jitted:
            return device_loop._drafter_prefill(drafter.params, dstate, tokens, lengths, first_token, hidden,
                                                drafter=drafter).root_hidden
        return drafter.prefill(drafter.params, dstate, tokens, lengths, first_token, hidden).root_hidden

    np.testing.assert_allclose(root(second, True), root(second, False), rtol=1e-5, atol=1e-5)
    assert not np.allclose(root(second, True), root(first, True))
    # Negative controls: any tree or feature setting makes another key.
    for change in ({"capacity": 7}, {"topk": 3}, {"depth": 4}, {"hidden_layers": (0, 1, 1)}):
        assert _eagle3(0, **change) != first


def test_keys_ignore_learned_state_and_host_parts_but_not_settings():
    recycling = TokenRecyclingDrafter(64, capacity=8)
    key = hash(recycling)
    recycling.table = jnp.zeros((64, 8), jnp.int32)  # what end_batch keeps between batches
    assert hash(recycling) == key and recycling == TokenRecyclingDrafter(64, capacity=8)
    assert recycling != TokenRecyclingDrafter(64, capacity=9)
    recycling.capacity = 9  # the key is cached (each jitted call hashes it), but not past a new setting
    assert hash(recycling) != key and recycling == TokenRecyclingDrafter(64, capacity=9)
    recycling.capacity = 8
    assert hash(recycling) == key
    assert TokenRecyclingDrafter(64, capacity=8, paths=[[0], [0, 0]]) != TokenRecyclingDrafter(64, capacity=8)

    heads = lambda seed: (_eagle3(seed), DraftModelDrafter(tiny_model(seed), 64, capacity=4, topk=2, depth=2))
    assert TapsDrafter(heads(0), 64) == TapsDrafter(heads(1), 64)
    assert TapsDrafter(heads(0), 64) != TapsDrafter(heads(0), 64, routing="entropy")
    assert TapsDrafter(heads(0), 64) != TapsDrafter(heads(0)[::-1], 64)

    graft = lambda seed, **kw: GraftDrafter(_eagle3(seed), PromptLookupDrafter(), **{"capacity": 8, **kw})
    assert graft(0) == graft(1)  # other weights, another retrieval instance: one program
    assert graft(0) != graft(0, min_prob=0.1) and graft(0) != graft(0, capacity=9)
    assert DraftModelDrafter(TARGET, 64, capacity=4) != DraftModelDrafter(tiny_model(0, layers=3), 64, capacity=4)


def test_an_array_setting_is_refused_rather_than_baked_in():
    @dataclasses.dataclass(eq=False)
    class WithArray(KeyedByConfig):
        weights: object

    with pytest.raises(TypeError, match="'weights' holds an array"):
        hash(WithArray(jnp.ones(3)))
