"""Target sharded over CPU device meshes: same tokens, same logits, specs as the rule table says."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from engine_helpers import OracleTreeDrafter, tiny_model
from hf_models import save_hf_model
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, causal_mask, forward, init_params
from specjax.models.loading import load_model, load_params, read_config
from specjax.models.sharding import (HeadLayout, cache_sharding, head_layout, make_mesh, mesh_config, mesh_placer,
                                     pad_param, pad_params, param_specs, shard_model)
from specjax.tpu_kernels import tree_attention as ta
from specjax.tpu_kernels.sharded_attention import sharded_tree_attention
from specjax.tpu_kernels.tree_attention import tree_attention
from test_tree_attention import Case, make_inputs

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")

PROMPTS = [[3, 9, 4, 3, 9], [17, 2, 5, 5, 40, 41], [60, 1, 7]]


def _model(heads: int, kv_heads: int):
    base = tiny_model(4)
    cfg = dataclasses.replace(base.config, num_heads=heads, num_kv_heads=kv_heads, head_dim=4, vocab_size=64)
    return type(base)(cfg, init_params(cfg, jax.random.key(4), scale=0.5))


# 8 / 8 heads divide every axis; 7 / 1 (Qwen2.5-7B's 28 / 4 scaled down) is laid out as 8 / 8 on 8 devices.
MODELS = {"8q_8kv": _model(8, 8), "7q_1kv": _model(7, 1)}
REFERENCES = {name: greedy_generate(m, PROMPTS, 16) for name, m in MODELS.items()}


@pytest.mark.parametrize("data, model, name", [(1, 8, "7q_1kv"), (2, 4, "8q_8kv"), (8, 1, "8q_8kv")])
def test_sharded_speculative_greedy_equals_unsharded(data, model, name):
    mesh = make_mesh(data, model)
    params, cfg = shard_model(MODELS[name].params, MODELS[name].config, mesh)
    target = dataclasses.replace(MODELS[name], params=params, config=cfg)
    refs = {tuple(p): r for p, r in zip(PROMPTS, REFERENCES[name])}
    drafter = OracleTreeDrafter(refs, [[-1, 0, 1, -1, 3]], 0.8, 64, seed=0)
    engine = Engine(target, drafter, draft_capacity=5, attention=sharded_tree_attention(mesh, "xla"), mesh=mesh)
    assert engine.target.params["layers"]["wq"].sharding.spec == P(None, "model", None)
    results = engine.generate(PROMPTS, max_new_tokens=16)
    assert [r.token_ids for r in results] == REFERENCES[name]


def test_param_shardings_follow_the_rule_table(tmp_path):
    """Loading onto a 2x4 mesh: heads/MLP/vocab split over model; 2 kv heads repeated to 4, never replicated."""
    d = save_hf_model("qwen2", str(tmp_path / "q"), vocab_size=96)
    mesh = make_mesh(2, 4)
    cfg = read_config(d)
    mesh_cfg, place = mesh_placer(cfg, mesh)
    assert (cfg.num_heads, cfg.num_kv_heads, mesh_cfg.num_heads, mesh_cfg.num_kv_heads) == (4, 2, 4, 4)
    layers = load_params(d, cfg, jnp.float32, place)["layers"]
    for name, spec in [("wq", P(None, "model", None)), ("wo", P(None, None, "model")), ("wk", P(None, "model", None)),
                       ("bv", P(None, "model")), ("bq", P(None, "model")), ("w_gate", P(None, "model", None)),
                       ("w_down", P(None, None, "model")), ("attn_norm", P(None, None))]:
        assert layers[name].sharding.spec == spec, name
    # Every attention shard is a piece, not a full copy: one kv head (16 rows) and 1 query head per device.
    assert layers["wk"].addressable_shards[0].data.shape == (2, 16, 64)
    assert layers["wq"].addressable_shards[0].data.shape == (2, 16, 64)
    unsharded = load_model(d, jnp.float32).params["layers"]
    for name in ("wq", "wk", "bv", "wo", "w_up"):
        np.testing.assert_array_equal(np.asarray(layers[name]), pad_param(name, np.asarray(unsharded[name]), cfg, mesh))
    wide = make_mesh(1, 8)
    assert param_specs(mesh_config(cfg, wide), wide)["embed"] == P("model", None)


def test_unpadded_heads_that_do_not_divide_warn():
    cfg = MODELS["7q_1kv"].config
    with pytest.warns(UserWarning, match="7 query / 1 kv heads do not both divide the 4-way model axis"):
        specs = param_specs(cfg, make_mesh(2, 4))
    assert specs["layers"]["wq"] == P(None, None, None)


@pytest.mark.parametrize("heads, kv_heads, axis, expected", [
    (28, 4, 8, HeadLayout(32, 8, 2, 4)),     # Qwen2.5-7B on a v5e-8: each kv head twice, 7 -> 4 + 3 (+1 pad)
    (7, 1, 4, HeadLayout(8, 4, 4, 2)),
    (7, 1, 8, HeadLayout(8, 8, 8, 1)),
    (28, 28, 8, HeadLayout(32, 32, 1, 1)),   # MHA: 4 zero kv heads beat repeating all 28
    (40, 8, 16, HeadLayout(48, 16, 2, 3)),
    (32, 8, 8, HeadLayout(32, 8, 1, 4)),     # already divides: unchanged
    (32, 8, 1, HeadLayout(32, 8, 1, 4)),
])
def test_head_layout(heads, kv_heads, axis, expected):
    layout = head_layout(heads, kv_heads, axis)
    assert layout == expected
    assert layout.num_heads % axis == 0 and layout.num_kv_heads % axis == 0
    assert layout.num_heads == layout.num_kv_heads * layout.group
    assert layout.repeat * layout.group >= heads // kv_heads  # room for every real query head


# ---------------------------------------------------------------- heads that do not divide the model axis

B, PROMPT, CACHE = 4, 6, 16
TREE_PARENTS = [-1, 0, 0]


def _cfg(**overrides):
    base = dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=7,
                num_kv_heads=1, head_dim=8, qkv_bias=True, max_position_embeddings=64)
    return ModelConfig(**{**base, **overrides})


# 7 heads / 1 kv head is Qwen2.5-7B's 28 / 4 scaled down; 6 / 2 with q/k norms has groups split across copies.
CONFIGS = {"7q_1kv_bias": _cfg(), "6q_2kv_qknorm": _cfg(model_type="qwen3", num_heads=6, num_kv_heads=2,
                                                         qkv_bias=False, qk_norm=True)}
_forward = jax.jit(forward, static_argnames=("cfg", "attention", "hidden_layers"))


def two_forward_passes(params, cfg, attention, cache_sharding=None):
    """Prefill a causal prompt, then a 3-node tree over it: both passes' logits."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, PROMPT)), jnp.int32)
    lengths = jnp.asarray([6, 3, 5, 1], jnp.int32)
    cache = KVCache.zeros(cfg, B, CACHE)
    if cache_sharding is not None:
        cache = jax.device_put(cache, cache_sharding)
    positions = jnp.broadcast_to(jnp.arange(PROMPT), (B, PROMPT))
    first = _forward(params, cfg, tokens, positions, cache, jnp.zeros(B, jnp.int32),
                     causal_mask(B, PROMPT, lengths), attention=attention)
    depth = jnp.asarray([0, 1, 1])
    tree_tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, 3)), jnp.int32)
    mask = jnp.broadcast_to(jnp.asarray([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool), (B, 3, 3))
    second = _forward(params, cfg, tree_tokens, lengths[:, None] + depth[None], first.cache, lengths, mask,
                      attention=attention)
    return first.logits, second.logits


@functools.lru_cache(maxsize=None)
def unsharded_logits(name):
    cfg = CONFIGS[name]
    params = init_params(cfg, jax.random.key(1), scale=0.5)
    return cfg, params, two_forward_passes(params, cfg, "xla")


@pytest.mark.parametrize("name, data, model, impl", [("7q_1kv_bias", 2, 4, "pallas"), ("6q_2kv_qknorm", 1, 8, "xla")])
def test_padded_heads_split_over_model_axis_same_logits(name, data, model, impl):
    cfg, params, expected = unsharded_logits(name)
    mesh = make_mesh(data, model)
    sharded, mesh_cfg = shard_model(params, cfg, mesh)
    layers = sharded["layers"]
    assert layers["wq"].sharding.spec == P(None, "model", None)
    assert layers["wk"].sharding.spec == P(None, "model", None)
    assert layers["wo"].sharding.spec == P(None, None, "model")
    assert cfg.qkv_bias is False or layers["bq"].sharding.spec == P(None, "model")
    per_device_rows = mesh_cfg.num_heads * cfg.head_dim // model
    assert layers["wq"].addressable_shards[0].data.shape == (cfg.num_layers, per_device_rows, cfg.hidden_size)
    sharding = cache_sharding(mesh_cfg, mesh, B)
    assert sharding.spec == P(None, "data", "model", None, None)
    attention = sharded_tree_attention(mesh, impl)
    got = two_forward_passes(sharded, mesh_cfg, attention, sharding)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-4, rtol=1e-4)


def test_shard_model_is_idempotent_and_layout_preserves_logits_only_when_right():
    """Negative controls: kv copies in the wrong order, or padded query heads with non-zero
    wo columns, change the logits; the right layout (unsharded) does not."""
    cfg, params, expected = unsharded_logits("6q_2kv_qknorm")
    mesh = make_mesh(2, 4)
    mesh_cfg = mesh_config(cfg, mesh)
    padded = pad_params(jax.device_get(params), cfg, mesh)
    np.testing.assert_allclose(np.asarray(two_forward_passes(padded, mesh_cfg, "xla")[1]), np.asarray(expected[1]),
                               atol=1e-4, rtol=1e-4)
    again, again_cfg = shard_model(padded, mesh_cfg, mesh)
    assert again_cfg == mesh_cfg
    np.testing.assert_array_equal(np.asarray(again["layers"]["wq"]), np.asarray(padded["layers"]["wq"]))

    d, hkv = cfg.head_dim, mesh_cfg.num_kv_heads
    tiled = {name: padded["layers"][name].reshape(cfg.num_layers, hkv // 2, 2, d, -1).swapaxes(1, 2)
             .reshape(padded["layers"][name].shape) for name in ("wk", "wv")}
    real = pad_param("bq", np.ones((1, cfg.num_heads * d), np.float32), cfg, mesh)[0] > 0
    assert (~real).sum() == (mesh_cfg.num_heads - cfg.num_heads) * d
    wo = np.asarray(padded["layers"]["wo"]).copy()
    wo[:, :, ~real] = 0.1
    for wrong in ({**padded["layers"], **tiled}, {**padded["layers"], "wo": jnp.asarray(wo)}):
        logits = two_forward_passes({**padded, "layers": wrong}, mesh_cfg, "xla")[1]
        assert np.abs(np.asarray(logits) - np.asarray(expected[1])).max() > 1e-2


# ---------------------------------------------------------------- the kernels under shard_map


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_kernel_under_shard_map_matches_reference(backend):
    case = Case("sharded", 4, 5, 8, 4, 32, 70, [70, 33, 0, 12], num_invalid=1)
    q, _, _, lengths, tree_k, tree_v, mask = make_inputs(case, jnp.float32)
    rng = np.random.default_rng(2)
    k_stack, v_stack = (jnp.asarray(rng.standard_normal((3, 4, 4, 70, 32)), jnp.float32) for _ in range(2))
    attention = sharded_tree_attention(make_mesh(2, 4), "pallas", backend=backend, block_k=32)
    layer = jnp.int32(1)
    out = jax.jit(functools.partial(tree_attention, impl=attention))(q, k_stack, v_stack, lengths, tree_k, tree_v,
                                                                     mask, layer=layer)
    assert tuple(out.sharding.spec)[:3] == ("data", None, "model")
    expected = ta.tree_attention_ref(q, k_stack, v_stack, lengths, tree_k, tree_v, mask, layer=layer)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_sharded_attention_refuses_heads_that_do_not_divide():
    q, k, v, lengths, tree_k, tree_v, mask = make_inputs(Case("odd", 2, 3, 6, 2, 16, 8, [3, 8]), jnp.float32)
    attention = sharded_tree_attention(make_mesh(2, 4), "xla")
    with pytest.raises(ValueError, match="6 query heads and 2 kv heads must both divide the 4-way 'model'"):
        attention(q, k, v, lengths, tree_k, tree_v, mask)
    with pytest.raises(ValueError, match="mesh has no axis 'heads'"):
        sharded_tree_attention(make_mesh(2, 4), head_axis="heads")


def test_sharded_logits_match_and_greedy_accept_does_not_gather_vocab():
    from specjax.engine.sampling import SamplingParams
    from specjax.engine.steps import accept, prefill, verify
    from specjax.engine.tree import DraftTree

    mesh = make_mesh(2, 4)
    params, cfg = shard_model(MODELS["8q_8kv"].params, MODELS["8q_8kv"].config, mesh)
    tokens = jnp.asarray([p + [0] * (8 - len(p)) for p in PROMPTS] + [[1] * 8], jnp.int32)
    lengths = jnp.asarray([len(p) for p in PROMPTS] + [8], jnp.int32)
    tree = DraftTree(jnp.ones((4, 3), jnp.int32), jnp.asarray([[-1, 0, 0]] * 4, jnp.int32), jnp.ones((4, 3), bool))

    def run(p, sharding, attention):
        state = prefill(p, cfg, tokens, lengths, jnp.full(4, 9, jnp.int32), jax.random.key(0),
                        SamplingParams.make(4), max_len=32, cache_sharding=sharding, attention=attention).state
        return verify(p, state, tree, cfg=cfg, attention=attention)

    state, logits, _ = run(params, cache_sharding(cfg, mesh, 4), sharded_tree_attention(mesh, "xla"))
    _, ref_logits, _ = run(MODELS["8q_8kv"].params, None, "xla")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-4)
    assert logits.sharding.spec[-1] == "model"  # logits stay vocab-sharded
    hlo = accept.lower(state, tree, logits).compile().as_text()
    gathered_vocab = [line for line in hlo.splitlines() if "all-gather" in line and ",64]" in line]
    assert not gathered_vocab, gathered_vocab[:3]
