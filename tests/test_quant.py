"""Weight-only quantized models: formats, GGUF blocks kept exactly, bytes, and losslessness.

- GGUF blocks (Q8_0 / Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K) become ``QuantizedWeight``s that
  dequantize bit for bit to what ``gguf.quants`` gives, in tiny files written with GGUFWriter,
  and the native model's logits match transformers' GGUF loading.
- Round to nearest stays within half a step (a truncating quantizer, the control, does not).
- int4 params take <= 0.3x the bytes of bf16.
- Verify and decode compute the same numbers on a quantized target (T = 0..64 against one token
  at a time; a verify that dequantizes differently, the control, does not), so greedy speculative
  output equals plain output for host, device and hybrid drafters, and sampling keeps the int4
  target's distribution (a wrong acceptance rule, the control, is rejected).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from engine_helpers import chi_square_p, exact_pair_distribution, exact_tables, tiny_model
from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.graft import GraftDrafter
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.device_loop import generate_on_device
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models import quant
from specjax.models.decoder import KVCache, causal_mask, forward
from specjax.models.loading import Model, load_model
from specjax.models.quant import QuantizedWeight, QuantSpec, QuantizationError

Q = gguf.GGMLQuantizationType
NATIVE_TYPES = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "uint4", "Q4_K": "uint4", "Q5_K": "int8", "Q6_K": "int8"}
WITH_MINS = ("Q4_1", "Q4_K", "Q5_K")


def gguf_blocks(kind: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw blocks uint8 [rows, bytes per row] of random weights (K-quants: random valid blocks)."""
    from test_gguf import _random_k_blocks

    rng = np.random.default_rng(seed)
    if kind.endswith("_K"):
        return _random_k_blocks(rng, rows, cols, kind)
    return gguf.quants.quantize(rng.normal(0, 0.1, (rows, cols)).astype(np.float32), Q[kind])


# ---------------------------------------------------------------- formats


@pytest.mark.parametrize("kind", sorted(NATIVE_TYPES))
def test_quant_gguf_blocks_dequantize_exactly_as_gguf(kind):
    rows, cols = 8, 512
    raw = gguf_blocks(kind, rows, cols)
    expected = gguf.quants.dequantize(raw, Q[kind]).reshape(rows, cols)
    w = quant.from_gguf_blocks(raw, kind, (rows, cols))
    assert w.kind == NATIVE_TYPES[kind] and w.shape == (rows, cols) and (w.mins is not None) == (kind in WITH_MINS)
    np.testing.assert_array_equal(quant.dequantize_np(w), expected)
    traced = np.asarray(jax.jit(quant.dequantize)(jax.device_put(w)))
    if kind in WITH_MINS:  # scale * q + min may become one fused multiply-add inside XLA
        np.testing.assert_allclose(traced, expected, rtol=2 ** -22, atol=2 ** -30)
    else:
        np.testing.assert_array_equal(traced, expected)
    if w.kind != "int8":
        assert w.values.nbytes == rows * cols // 2  # two values per byte


def test_quant_mixed_layer_types_stack_exactly():
    """A K_M file mixes block types across the layers of one weight: stacked exactly, widened to int8."""
    kinds = ("Q4_K", "Q6_K", "Q4_0", "Q8_0")
    raws = [gguf_blocks(k, 4, 256, seed=i) for i, k in enumerate(kinds)]
    stacked = quant.stack([quant.from_gguf_blocks(r, k, (4, 256)) for r, k in zip(raws, kinds)])
    assert stacked.kind == "int8" and stacked.group_size == 16 and stacked.shape == (4, 4, 256)
    expected = np.stack([gguf.quants.dequantize(r, Q[k]).reshape(4, 256) for r, k in zip(raws, kinds)])
    np.testing.assert_array_equal(quant.dequantize_np(stacked), expected)


def test_quant_nibbles_round_trip_and_bad_sizes():
    values = np.random.default_rng(0).integers(0, 16, (3, 64)).astype(np.uint8)
    packed = quant.pack_nibbles(values)
    assert packed.shape == (3, 32)
    np.testing.assert_array_equal(np.asarray(quant.unpack_nibbles(jnp.asarray(packed))), values)
    with pytest.raises(QuantizationError, match="divisible by 32"):
        quant.pack_nibbles(values[:, :48])
    with pytest.raises(QuantizationError, match="not divisible by the group size"):
        quant.quantize_rtn(np.ones((2, 96), np.float32), QuantSpec(4, 64))
    with pytest.raises(QuantizationError, match="multiple of 32"):
        QuantSpec(4, 48)


def _truncating_int4(w: np.ndarray, group: int) -> QuantizedWeight:
    """Control: int4 with a min whose values are truncated instead of rounded."""
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.min(-1), g.max(-1)
    scale = ((hi - lo) / 15).astype(np.float16)
    q = np.clip(np.floor((g - lo[..., None]) / scale.astype(np.float32)[..., None]), 0, 15)
    return QuantizedWeight(quant.pack_nibbles(q.reshape(w.shape).astype(np.uint8)), scale,
                           lo.astype(np.float16), "uint4", np.float32)


@pytest.mark.parametrize("spec", [QuantSpec(8), QuantSpec(4, 32), QuantSpec(4, 128), QuantSpec(4, 64, symmetric=True)],
                         ids=["int8", "int4_g32", "int4_g128", "int4_g64_sym"])
def test_quant_round_to_nearest_is_within_half_a_step(spec):
    w = np.random.default_rng(1).normal(0, 0.05, (64, 256)).astype(np.float32)
    q = quant.quantize_rtn(w, spec)
    group = spec.group_size or 256
    g = w.reshape(64, -1, group)
    levels = 255 if spec.bits == 8 else 15 if not spec.symmetric else 14
    step = ((np.abs(g).max(-1) * 2 if spec.bits == 8 or spec.symmetric else g.max(-1) - g.min(-1)) / levels)
    # half a step, plus float16 rounding of the stored scale (and min) and the float32 arithmetic
    bound = (0.5 + 2 ** -9 * (levels + 2)) * step[..., None] + 1e-7

    def error(qw):
        return np.abs(quant.dequantize_np(qw).reshape(g.shape) - g)

    assert np.all(error(q) <= bound)
    assert error(q).max() > 0.3 * step.min()  # the bound is not loose
    assert np.any(error(_truncating_int4(w, group)) > (0.5 + 2 ** -9 * 17) * (g.max(-1) - g.min(-1))[..., None] / 15)


def test_quant_int4_params_take_at_most_0_3x_bf16_bytes():
    """A model big enough that group 64 is realistic (hidden 256, MLP 512, vocab 512)."""
    from specjax.models.config import ModelConfig
    from specjax.models.decoder import init_params

    cfg = ModelConfig(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=128)
    params = init_params(cfg, jax.random.key(0), dtype=jnp.bfloat16)
    bf16 = quant.param_bytes(params)
    int4 = quant.param_bytes(quant.quantize_params(params, QuantSpec(4, 64)))
    int8 = quant.param_bytes(quant.quantize_params(params, QuantSpec(8)))
    assert int4 <= 0.3 * bf16
    assert 0.5 * bf16 < int8 < 0.6 * bf16  # control: int8 is about half, so the byte count is real
    stored = quant.quantize_params(params, QuantSpec(4, 64))["layers"]["w_up"]
    assert stored.values.dtype == jnp.uint8 and stored.values.shape == (2, 512, 128)


# ---------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("quant_gguf")


def _gguf(gguf_dir, kind: str) -> str:
    from test_gguf import write_gguf

    path = gguf_dir / f"{kind}.gguf"
    if not path.exists():
        write_gguf(str(path), "llama", kind, seed=3)
    return str(path)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q4_K"])
def test_quant_native_gguf_loads_the_exact_weights_and_matches_transformers(gguf_dir, kind):
    torch = pytest.importorskip("torch")  # noqa: F841
    from hf_models import prefill_logits
    from test_gguf import TOKENS, _hf_logits

    path = _gguf(gguf_dir, kind)
    native, dense = load_model(path, quantize="native"), load_model(path)
    layers = native.params["layers"]
    for name in quant.QUANTIZABLE:
        w = layers.get(name, native.params.get(name))
        expected = dense.params["layers"].get(name, dense.params.get(name))
        assert isinstance(w, QuantizedWeight) and w.kind == NATIVE_TYPES[kind], name
        # llama's q/k rows are un-permuted on the blocks, so these equal gguf.quants' values exactly
        np.testing.assert_array_equal(quant.dequantize_np(w), np.asarray(expected), err_msg=name)
    assert not isinstance(layers["attn_norm"], QuantizedWeight)
    assert quant.param_bytes(native.params) < 0.6 * quant.param_bytes(dense.params)
    np.testing.assert_allclose(prefill_logits(native, TOKENS), _hf_logits(path, TOKENS), atol=1e-4, rtol=1e-4)


def test_quant_load_model_quantizes_by_round_to_nearest(gguf_dir):
    path = _gguf(gguf_dir, "F32")
    dense = load_model(path)
    for spec in (QuantSpec(8), QuantSpec(4, 32)):
        loaded = load_model(path, quantize=spec)
        expected = quant.quantize_params(dense.params, spec)
        for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(expected)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert load_model(path, quantize="int8").params["layers"]["wq"].kind == "int8"
    assert load_model(path, quantize="native").params["layers"]["wq"].__class__ is not QuantizedWeight  # F32 file
    with pytest.raises(QuantizationError, match="'int8', 'int4' or 'native'"):
        load_model(path, quantize="int3")


def test_quant_native_is_refused_for_a_hugging_face_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_model(str(tmp_path), quantize="native")


def test_quant_cli_flags_load_a_quantized_model(gguf_dir):
    from specjax.engine import cli

    parser = argparse.ArgumentParser()
    cli._add_generate_args(parser)
    args = parser.parse_args(["--model", _gguf(gguf_dir, "F32"), "--quantize", "int4", "--quant-group", "32"])
    params = cli._load(args).params
    assert params["layers"]["w_up"].kind == "uint4" and params["layers"]["w_up"].group_size == 32


# ---------------------------------------------------------------- meshes


def _mesh_cfg(heads: int, kv_heads: int):
    """Head dim 32 and MLP 256: on 8 devices each shard of wo / w_down holds whole int4 groups."""
    from specjax.models.config import ModelConfig

    return ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=256, num_layers=2,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=32, max_position_embeddings=256)


def _mesh_model(heads: int, kv_heads: int, spec: QuantSpec) -> Model:
    from specjax.models.decoder import init_params

    cfg = _mesh_cfg(heads, kv_heads)
    return Model(cfg, quant.quantize_params(init_params(cfg, jax.random.key(5), scale=0.3), spec))


needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")


@needs_8_devices
@pytest.mark.parametrize("spec", [QuantSpec(4, 32), QuantSpec(8)], ids=["int4", "int8"])
def test_quant_weights_and_scales_carry_partition_specs(spec):
    from jax.sharding import PartitionSpec as P

    from specjax.models.sharding import make_mesh, shard_model

    model = _mesh_model(8, 8, spec)
    params, _ = shard_model(model.params, model.config, make_mesh(1, 8))
    layers, column, row = params["layers"], P(None, "model", None), P(None, None, "model")
    for part in ("values", "scales", "mins"):
        if getattr(layers["wq"], part) is None:
            continue
        assert getattr(layers["wq"], part).sharding.spec == column
        assert getattr(layers["w_up"], part).sharding.spec == column
        # int8 has one scale per output channel: its row-parallel weights cannot split the inputs
        assert getattr(layers["wo"], part).sharding.spec == (row if spec.bits == 4 else P(None, None, None))
        assert getattr(params["embed"], part).sharding.spec == P("model", None)
    assert layers["wq"].values.addressable_shards[0].data.shape[1] == layers["wq"].shape[1] // 8


@needs_8_devices
def test_quant_padded_heads_on_a_1x8_mesh_give_the_same_tokens():
    """7 query / 1 kv heads laid out as 8 / 8: quantized rows repeated, zero heads padded."""
    from specjax.models.sharding import make_mesh
    from specjax.tpu_kernels.sharded_attention import sharded_tree_attention

    model, mesh = _mesh_model(7, 1, QuantSpec(4, 32)), make_mesh(1, 8)
    engine = Engine(model, PromptLookupDrafter(max_branches=2), draft_capacity=4,
                    attention=sharded_tree_attention(mesh, "xla"), mesh=mesh)
    assert engine.target.config.num_heads == 8 and engine.target.params["layers"]["wo"].values.shape[-1] == 8 * 16
    assert [r.token_ids for r in engine.generate(PROMPTS, max_new_tokens=12)] == greedy_generate(model, PROMPTS, 12)


@needs_8_devices
def test_quant_native_gguf_loads_onto_a_mesh(gguf_dir):
    """Straight onto the shards (4 / 2 heads laid out as 8 / 8), with the unsharded weights, padded."""
    from specjax.models.sharding import make_mesh, pad_param

    path, mesh = _gguf(gguf_dir, "Q4_0"), make_mesh(1, 8)
    whole, sharded = load_model(path, quantize="native"), load_model(path, quantize="native", mesh=mesh)
    assert sharded.params["layers"]["wk"].values.sharding.spec[1] == "model"
    for name in ("wq", "wk", "wo", "w_down"):
        expected = pad_param(name, quant.dequantize_np(whole.params["layers"][name]), whole.config, mesh)
        np.testing.assert_array_equal(quant.dequantize_np(sharded.params["layers"][name]), expected)


def test_quant_wo_groups_straddling_heads_are_refused_for_padding():
    from specjax.models.sharding import make_mesh, pad_param

    cfg = _mesh_cfg(8, 2)  # 2 kv heads repeated to 8 on the mesh: wo is re-laid per head
    wo = quant.quantize_rtn(np.ones((1, 32, 256), np.float32), QuantSpec(4, 64))  # groups of 64, heads of 32
    with pytest.raises(ValueError, match="straddle heads"):
        pad_param("wo", wo, cfg, make_mesh(1, 8))


# ---------------------------------------------------------------- lossless


TARGET = tiny_model(0)  # hidden 32, MLP 64: int4 in groups of 32
QUANTIZED = {"int8": Model(TARGET.config, quant.quantize_params(TARGET.params, QuantSpec(8))),
             "int4": Model(TARGET.config, quant.quantize_params(TARGET.params, QuantSpec(4, 32)))}
PROMPTS = [[3, 9, 4, 3, 9, 4, 3], [17, 2, 5, 5, 40, 41, 42, 17, 2, 5, 5], [60, 1, 7]]
NEW_TOKENS = 20
TREE_SIZES = (0, 1, 2, 4, 8, 16, 32, 64)
_forward = jax.jit(forward, static_argnames=("cfg",))


def _bf16_dequantized(params):
    """Control: the same weights dequantized through bfloat16 (a different dequantization)."""
    cast = lambda x: quant.dequantize(x).astype(jnp.bfloat16).astype(jnp.float32) if quant.is_quantized(x) else x
    return jax.tree.map(cast, params, is_leaf=quant.is_quantized)


class Chain:
    """A random prompt cached, and a T + 1 token chain after it, for one model."""

    def __init__(self, model: Model, batch: int = 2, prompt_len: int = 7):
        cfg, rng = model.config, np.random.default_rng(0)
        self.model, self.b, self.start = model, batch, prompt_len
        prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, prompt_len)), jnp.int32)
        self.tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, TREE_SIZES[-1] + 1)), jnp.int32)
        self.cache = self.run(model.params, prompt, 0, KVCache.zeros(cfg, batch, 128)).cache

    def run(self, params, tokens, start: int, cache):
        b, n = tokens.shape
        return _forward(params, self.model.config, tokens, start + jnp.broadcast_to(jnp.arange(n), (b, n)), cache,
                        jnp.full(b, start, jnp.int32), causal_mask(b, n))

    def verified(self, t: int, params=None) -> np.ndarray:
        """Logits of the first t + 1 chain tokens verified in one pass."""
        return np.asarray(self.run(params or self.model.params, self.tokens[:, :t + 1], self.start, self.cache).logits)

    def decoded(self) -> np.ndarray:
        """Logits of the chain fed one token per pass (plain decoding)."""
        cache, out = self.cache, []
        for i in range(self.tokens.shape[1]):
            step = self.run(self.model.params, self.tokens[:, i:i + 1], self.start + i, cache)
            cache = step.cache
            out.append(np.asarray(step.logits[:, 0]))
        return np.stack(out, axis=1)


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_quant_verify_logits_equal_decode_logits_for_every_tree_size(name):
    """Per position, within the float model's own verify-vs-decode tolerance (XLA's CPU matmul sums
    differently for one row than for many, quantized or not)."""
    chain = Chain(QUANTIZED[name])
    decoded = chain.decoded()
    for t in TREE_SIZES:
        np.testing.assert_allclose(chain.verified(t), decoded[:, :t + 1], atol=1e-4, rtol=0, err_msg=f"T={t}")
    np.testing.assert_array_equal(chain.verified(0), decoded[:, :1])  # the same one-token program
    wrong = _bf16_dequantized(QUANTIZED[name].params)
    assert np.abs(chain.verified(8, wrong) - decoded[:, :9]).max() > 1e-3


@pytest.fixture(scope="module")
def plain_outputs():
    return {name: greedy_generate(model, PROMPTS, NEW_TOKENS) for name, model in QUANTIZED.items()}


def _draft_model(quantized: bool) -> DraftModelDrafter:
    draft = tiny_model(7)
    if quantized:
        draft = Model(draft.config, quant.quantize_params(draft.params, QuantSpec(4, 32)))
    return DraftModelDrafter(draft, draft.config.vocab_size, capacity=6, topk=2, depth=3)


@pytest.mark.parametrize("name", sorted(QUANTIZED))
def test_quant_greedy_speculative_equals_plain_with_a_host_drafter(name, plain_outputs):
    engine = Engine(QUANTIZED[name], PromptLookupDrafter(max_branches=2), draft_capacity=6, attention="xla")
    results = engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == plain_outputs[name]
    assert sum(r.accepted_draft_tokens for r in results) > 0  # speculation happened


@pytest.mark.parametrize("name,draft_quantized", [("int8", False), ("int4", True)])
def test_quant_greedy_speculative_equals_plain_with_a_device_drafter(name, draft_quantized, plain_outputs):
    results = generate_on_device(Engine(QUANTIZED[name], attention="xla"), PROMPTS, NEW_TOKENS,
                                 drafter=_draft_model(draft_quantized))
    assert [r.token_ids for r in results] == plain_outputs[name]


def test_quant_greedy_speculative_equals_plain_with_a_hybrid_drafter(plain_outputs):
    graft = GraftDrafter(_draft_model(True), PromptLookupDrafter(), capacity=6)
    results = Engine(QUANTIZED["int4"], graft, attention="xla").generate(PROMPTS, max_new_tokens=NEW_TOKENS)
    assert [r.token_ids for r in results] == plain_outputs["int4"]


# ---------------------------------------------------------------- sampling on an int4 target

V = 6
SAMPLED = Model(tiny_model(3, vocab=V).config,
                quant.quantize_params(tiny_model(3, vocab=V).params, QuantSpec(4, 32)))
SAMPLE_PROMPT = [1, 2, 3]
N = 2048


def _sampled_pairs(seed: int) -> np.ndarray:
    from test_lossless_sampling import LikelyTokensDrafter

    drafter = LikelyTokensDrafter(exact_tables(SAMPLED, SAMPLE_PROMPT, 1.0))
    engine = Engine(SAMPLED, drafter, draft_capacity=9, attention="xla", max_batch_size=N)
    results = engine.generate([SAMPLE_PROMPT] * N, max_new_tokens=3, temperature=1.0, seed=seed)
    assert sum(r.accepted_draft_tokens for r in results) > N / 2  # the drafts were used
    return np.array([r.token_ids[1:3] for r in results])


def test_quant_int4_sampling_keeps_the_distribution():
    pairs = _sampled_pairs(seed=0)
    assert chi_square_p(pairs, exact_pair_distribution(SAMPLED, SAMPLE_PROMPT, 1.0)) > 1e-4
    # the int4 target's distribution is not the float model's: the test tells them apart
    assert chi_square_p(pairs, exact_pair_distribution(tiny_model(3, vocab=V), SAMPLE_PROMPT, 1.0)) < 1e-6


def test_quant_int4_sampling_control_with_a_wrong_acceptance_rule_is_rejected(wrong_sampler):
    pairs = _sampled_pairs(seed=0)
    assert chi_square_p(pairs, exact_pair_distribution(SAMPLED, SAMPLE_PROMPT, 1.0)) < 1e-6
