"""Target sharded over CPU device meshes: same tokens, same logits, specs as the rule table says."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from engine_helpers import OracleTreeDrafter, tiny_model
from hf_models import save_hf_model
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models.loading import load_model
from specjax.models.sharding import make_mesh, param_specs

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (virtual) devices")

MESHES = [(1, 8), (2, 4), (8, 1)]
PROMPTS = [[3, 9, 4, 3, 9], [17, 2, 5, 5, 40, 41], [60, 1, 7]]


def _model():
    # 8 heads and 8 kv heads so every dimension divides an 8-way model axis.
    import dataclasses

    base = tiny_model(4)
    cfg = dataclasses.replace(base.config, num_heads=8, num_kv_heads=8, head_dim=4, vocab_size=64)
    from specjax.models.decoder import init_params

    return type(base)(cfg, init_params(cfg, jax.random.key(4), scale=0.5))


MODEL = _model()
REFERENCE = greedy_generate(MODEL, PROMPTS, 16)


@pytest.mark.parametrize("data,model", MESHES)
def test_sharded_speculative_greedy_equals_unsharded(data, model):
    mesh = make_mesh(data, model)
    refs = {tuple(p): r for p, r in zip(PROMPTS, REFERENCE)}
    drafter = OracleTreeDrafter(refs, [[-1, 0, 1, -1, 3]], 0.8, 64, seed=0)
    engine = Engine(MODEL, drafter, draft_capacity=5, attention="xla", mesh=mesh)
    assert engine.target.params["layers"]["wq"].sharding.spec == P(None, "model" if model > 1 else None, None) \
        or model == 1
    results = engine.generate(PROMPTS, max_new_tokens=16)
    assert [r.token_ids for r in results] == REFERENCE


def test_param_shardings_follow_the_rule_table(tmp_path):
    """Loading onto a 2x4 mesh: heads/MLP/vocab split over model; 2 kv heads replicated on 4 devices."""
    d = save_hf_model("qwen2", str(tmp_path / "q"), vocab_size=96)
    mesh = make_mesh(2, 4)
    model = load_model(d, jnp.float32, mesh=mesh)
    layers = model.params["layers"]
    assert layers["wq"].sharding.spec == P(None, "model", None)
    assert layers["wo"].sharding.spec == P(None, None, "model")
    assert layers["w_gate"].sharding.spec == P(None, "model", None)
    assert layers["w_down"].sharding.spec == P(None, None, "model")
    assert layers["bq"].sharding.spec == P(None, "model")
    assert layers["wk"].sharding.spec == P(None, None, None)  # 2 kv heads < 4 devices: replicated
    assert layers["bv"].sharding.spec == P(None, None)
    assert model.params["embed"].sharding.spec == P("model", None)
    assert layers["attn_norm"].sharding.spec == P(None, None)
    assert param_specs(model.config, make_mesh(1, 8))["embed"] == P("model", None)
    # Every parameter's shard is a piece, not a full copy: sizes add up across the model axis.
    wq = layers["wq"]
    assert wq.addressable_shards[0].data.shape == (2, 64 // 4, 64)
    unsharded = load_model(d, jnp.float32)
    np.testing.assert_array_equal(np.asarray(wq), np.asarray(unsharded.params["layers"]["wq"]))


def test_sharded_logits_match_and_greedy_accept_does_not_gather_vocab():
    from specjax.engine.sampling import GREEDY
    from specjax.engine.steps import accept, prefill, verify
    from specjax.engine.tree import DraftTree
    from specjax.models.sharding import cache_sharding, shard_params

    mesh = make_mesh(2, 4)
    params = shard_params(MODEL.params, MODEL.config, mesh)
    tokens = jnp.asarray([p + [0] * (8 - len(p)) for p in PROMPTS] + [[1] * 8], jnp.int32)
    lengths = jnp.asarray([len(p) for p in PROMPTS] + [8], jnp.int32)
    tree = DraftTree(jnp.ones((4, 3), jnp.int32), jnp.asarray([[-1, 0, 0]] * 4, jnp.int32), jnp.ones((4, 3), bool))

    def run(p, sharding):
        state, _ = prefill(p, MODEL.config, tokens, lengths, jnp.full(4, 9, jnp.int32), jax.random.key(0),
                           sampling=GREEDY, max_len=32, cache_sharding=sharding)
        return verify(p, state, tree, cfg=MODEL.config)

    state, logits, _ = run(params, cache_sharding(MODEL.config, mesh, 4))
    _, ref_logits, _ = run(MODEL.params, None)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-4)
    assert logits.sharding.spec[-1] == "model"  # logits stay vocab-sharded
    hlo = accept.lower(state, tree, logits, sampling=GREEDY).compile().as_text()
    gathered_vocab = [line for line in hlo.splitlines() if "all-gather" in line and ",64]" in line]
    assert not gathered_vocab, gathered_vocab[:3]
