"""One-line entry points: ``load_model`` by name or path, ``Engine.from_pretrained``, ``SpecConfig`` in vLLM's
and transformers' words, and ``Model`` as a pytree."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from engine_helpers import tiny_model
from specjax import Engine, SpecConfig, load_model
from specjax.drafters.factory import default_max_capacity
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.drafters.suffix_index import SuffixDecodingDrafter
from specjax.engine.plain import greedy_generate
from specjax.engine.spec_config import SpecConfigError
from specjax.models.decoder import KVCache, causal_mask, forward
from specjax.models.embedded import default_model_dir
from specjax.models.loading import Model
from specjax.models.pull import PullError

MODEL = tiny_model(seed=3, vocab=64)
PROMPTS = [[5, 9, 5, 9, 5, 9, 12, 7], [1, 2, 3, 1, 2, 3, 1, 2, 3]]


def _logits(model: Model, tokens: jax.Array) -> jax.Array:
    """Causal logits of one unpadded batch, read from a Model as a whole (params and config)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = forward(model.params, model.config, tokens, positions, KVCache.zeros(model.config, b, t),
                  jnp.zeros(b, jnp.int32), causal_mask(b, t))
    return out.logits


# ------------------------------------------------------------------ Model as a pytree


def test_model_leaves_are_exactly_its_params():
    leaves = jax.tree_util.tree_leaves(MODEL)
    param_leaves = jax.tree_util.tree_leaves(MODEL.params)
    assert len(leaves) == len(param_leaves) > 0
    assert all(a is b for a, b in zip(leaves, param_leaves))


def test_a_model_passes_through_jit_with_its_config_static():
    tokens = jnp.asarray([PROMPTS[0]], jnp.int32)
    traces = []

    @jax.jit
    def jitted(model, tokens):
        traces.append(model.config)  # runs only while tracing
        return _logits(model, tokens)

    np.testing.assert_allclose(np.asarray(jitted(MODEL, tokens)), np.asarray(_logits(MODEL, tokens)),
                               rtol=1e-5, atol=1e-5)
    other_weights = tiny_model(seed=4, vocab=64)  # same config: the compiled program is reused
    assert not np.allclose(np.asarray(jitted(other_weights, tokens)), np.asarray(jitted(MODEL, tokens)))
    assert len(traces) == 1
    jitted(tiny_model(seed=3, vocab=64, layers=1), tokens)  # a new config is a new program
    assert len(traces) == 2


def test_tree_map_casts_the_params_and_keeps_the_rest():
    named = Model(MODEL.config, MODEL.params, tokenizer=object(), path="/somewhere", chat_template="{{ x }}")
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), named)
    assert isinstance(half, Model)
    assert (half.config, half.tokenizer, half.path, half.chat_template) == (
        named.config, named.tokenizer, named.path, named.chat_template)
    assert {x.dtype for x in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(named)} == {jnp.dtype(jnp.float32)}


# ------------------------------------------------------------------ load_model


def test_load_model_takes_a_registry_name_in_any_case(monkeypatch):
    """A registry name resolves through ``pull`` (stubbed: no network) to the file it pulled."""
    import specjax.models.pull as pull

    asked = []
    monkeypatch.setattr(pull, "pull", lambda name, root=None: asked.append(name) or default_model_dir())
    model = load_model("SmolLM2-135M-Instruct", dtype="float32")
    assert [n.lower() for n in asked] == ["smollm2-135m-instruct"]
    assert model.path == default_model_dir() and model.params["embed"].dtype == jnp.float32


def test_load_model_takes_paths_and_home_relative_names(tmp_path, monkeypatch):
    (tmp_path / "m").symlink_to(default_model_dir())
    monkeypatch.setenv("HOME", str(tmp_path))
    by_str = load_model(default_model_dir(), dtype=jnp.float32)
    for spec in (pathlib.Path(default_model_dir()), "~/m"):
        model = load_model(spec, dtype=jnp.float32)
        assert model.config == by_str.config
        np.testing.assert_array_equal(np.asarray(model.params["embed"]), np.asarray(by_str.params["embed"]))


def test_load_model_takes_a_gguf_file_by_path(tmp_path):
    pytest.importorskip("torch")  # test_gguf's writer module imports it
    from test_gguf import write_gguf

    path = write_gguf(str(tmp_path / "tiny.gguf"))
    for spec in (path, pathlib.Path(path)):
        model = load_model(spec)
        assert model.path == path and model.tokenizer is not None and model.chat_template
        assert model.params["embed"].dtype == jnp.float32  # "auto" on a CPU: GGUF dequantizes to float32


def test_load_model_names_what_is_wrong():
    with pytest.raises(PullError, match="not-a-model.*smollm2-135m-instruct"):
        load_model("not-a-model")
    with pytest.raises(ValueError, match="'float33' is not a dtype"):
        load_model(default_model_dir(), dtype="float33")
    with pytest.raises(ValueError, match="'int8' is not a floating-point dtype"):
        load_model(default_model_dir(), dtype="int8")


# ------------------------------------------------------------------ Engine.from_pretrained


def test_from_pretrained_in_one_line_is_lossless():
    default = Engine.from_pretrained(MODEL)
    assert isinstance(default.drafter, PromptLookupDrafter) and default.auto
    assert default.max_draft_capacity == default_max_capacity()
    engine = Engine.from_pretrained(MODEL, max_draft=4, draft_capacity=2)  # one tree size: one compile
    assert (engine.max_draft_capacity, engine.capacity, engine.auto) == (4, 2, False)
    results = engine.generate(PROMPTS, max_new_tokens=16)
    assert [r.token_ids for r in results] == greedy_generate(MODEL, PROMPTS, 16)


def test_from_pretrained_loads_a_directory_and_passes_engine_settings():
    engine = Engine.from_pretrained(default_model_dir(), "suffix", dtype=jnp.float32, max_batch_size=2,
                                    draft_capacity=2)
    assert engine.target.path == default_model_dir() and engine.target.params["embed"].dtype == jnp.float32
    assert isinstance(engine.drafter, SuffixDecodingDrafter)
    assert (engine.max_batch_size, engine.capacity, engine.auto) == (2, 2, False)
    drafter = PromptLookupDrafter()
    assert Engine.from_pretrained(MODEL, drafter).drafter is drafter  # a drafter object is used as is
    assert Engine.from_pretrained(MODEL, "none").drafter is None


def test_from_pretrained_refuses_unclear_requests():
    with pytest.raises(ValueError, match="unknown drafter 'ngrams'"):
        Engine.from_pretrained(MODEL, "ngrams")
    with pytest.raises(ValueError, match="not both"):
        Engine.from_pretrained(MODEL, "suffix", speculative_config={"method": "ngram"})
    with pytest.raises(ValueError, match="as max_draft .*not max_draft_capacity"):
        Engine.from_pretrained(MODEL, max_draft_capacity=4)
    with pytest.raises(ValueError, match="max_draft must be a positive int"):
        Engine.from_pretrained(MODEL, max_draft=0)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        Engine.from_pretrained(MODEL, speculative_config={"method": "ngram"}, draft_capacity=4)


# ------------------------------------------------------------------ SpecConfig


def test_vllm_ngram_config_maps_to_prompt_lookup_and_stays_lossless():
    vllm = {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 2, "prompt_lookup_min": 2}
    engine = Engine.from_pretrained(MODEL, speculative_config=vllm)
    drafter = engine.drafter
    assert isinstance(drafter, PromptLookupDrafter)
    assert (drafter.min_ngram, drafter.max_ngram, drafter.max_branches) == (2, 2, 4)
    assert engine.max_draft_capacity == 5 and engine.auto
    engine = Engine.from_pretrained(MODEL, speculative_config=SpecConfig(
        method="ngram", num_speculative_tokens=3, prompt_lookup_branches=1, adaptive=False))
    assert (engine.capacity, engine.auto, engine.drafter.max_branches) == (3, False, 1)
    results = engine.generate(PROMPTS, max_new_tokens=16)
    assert [r.token_ids for r in results] == greedy_generate(MODEL, PROMPTS, 16)


def test_transformers_words_give_the_same_config():
    vllm = SpecConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4})
    assert SpecConfig.from_dict({"prompt_lookup_num_tokens": 5, "max_matching_ngram_size": 4}) == vllm
    assert SpecConfig(method="ngram", num_speculative_tokens=5, prompt_lookup_max=4) == vllm
    assert SpecConfig.from_dict({"assistant_model": "draft-dir", "num_assistant_tokens": 3}) == SpecConfig(
        method="draft_model", model="draft-dir", num_speculative_tokens=3)
    assert vllm.drafter_options() == {"max_ngram": 4}
    assert SpecConfig(method="ngram", prompt_lookup_min=5).drafter_options() == {"min_ngram": 5, "max_ngram": 5}


@pytest.mark.parametrize("method, expected", [
    ("ngram", "ngram"), ("prompt-lookup", "ngram"), ("Suffix", "suffix"), ("draft-model", "draft_model"),
    ("token_recycling", "token_recycling"), (None, "auto")])
def test_method_names_of_vllm_and_specjax(method, expected):
    assert SpecConfig(method=method).method == expected


def test_method_is_inferred_from_model_as_vllm_does():
    assert SpecConfig(model="yuhuili/EAGLE3-LLaMA3.1-Instruct-8B").method == "eagle3"
    assert SpecConfig(model="Qwen/Qwen2.5-0.5B").method == "draft_model"


def test_suffix_and_device_settings_reach_the_drafter():
    suffix = SpecConfig(method="suffix", suffix_decoding_max_tree_depth=24, suffix_decoding_min_token_prob=0.2,
                        suffix_history="none")
    drafter, settings = suffix.build(MODEL, max_draft=8)
    assert isinstance(drafter, SuffixDecodingDrafter)
    assert (drafter.index.max_depth, drafter.index.spec.min_token_prob) == (24, 0.2)
    assert settings == {"draft_capacity": "auto", "max_draft_capacity": 8}
    recycling, settings = SpecConfig(method="token_recycling", num_speculative_tokens=6, adaptive=False).build(
        MODEL, max_draft=8)
    assert recycling.capacity == 6 and settings == {"draft_capacity": 6, "max_draft_capacity": 6}


def test_draft_model_chain_from_the_shipped_weights():
    target = load_model(default_model_dir(), dtype=jnp.float32)
    engine = Engine.from_pretrained(target, speculative_config={"method": "draft_model",
                                                                "num_speculative_tokens": 4, "tree_topk": 1})
    assert (engine.drafter.capacity, engine.drafter.topk, engine.drafter.depth) == (4, 1, 4)
    assert engine.on_device and engine.max_draft_capacity == 4


@pytest.mark.parametrize("config, message", [
    ({"method": "medusa"}, "'medusa' is not supported by specjax.*supported: auto, ngram"),
    ({"method": "eagle"}, "EAGLE-3 heads \\(method='eagle3'\\)"),
    ({"method": "deepseek_mtp"}, "multi-token-prediction"),
    ({"method": "ngramm"}, "unknown speculative method 'ngramm' \\(did you mean 'ngram'\\?\\)"),
    ({"method": "ngram", "prompt_lookup_maxx": 3}, "unknown .* key 'prompt_lookup_maxx' \\(did you mean "
                                                   "'prompt_lookup_max'\\?\\)"),
    ({"method": "ngram", "quantization": "fp8"}, "'quantization' is not supported by specjax"),
    ({"method": "suffix", "prompt_lookup_max": 3}, "'prompt_lookup_max' does not apply to method 'suffix'"),
    ({"method": "ngram", "model": "x"}, "'model' does not apply to method 'ngram'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "'num_speculative_tokens' must be a positive int"),
    ({"method": "suffix", "suffix_decoding_min_token_prob": 1.5}, "'suffix_decoding_min_token_prob' must be a number "
                                                                   "in \\[0.0, 1.0\\]"),
    ({"method": "ngram", "num_speculative_tokens": 4, "num_assistant_tokens": 5}, "twice"),
    ({"method": "ngram", "adaptive": False}, "set num_speculative_tokens"),
    (["ngram"], "is a dict"),
])
def test_bad_configs_are_refused_by_name(config, message):
    with pytest.raises(SpecConfigError, match=message):
        SpecConfig.from_dict(config)



def test_host_drafter_options_reach_only_host_drafters():
    from specjax import load_drafter

    assert load_drafter("prompt-lookup", MODEL, drafter_options={"max_ngram": 5}).max_ngram == 5
    with pytest.raises(ValueError, match="configure the host drafters .* not 'token-recycling'"):
        load_drafter("token-recycling", MODEL, drafter_options={"max_ngram": 5})
