"""The build scripts of the shipped models still train: their forward is differentiable."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from specjax.models.config import ModelConfig
from specjax.models.decoder import init_params
from specjax.tpu_kernels.tree_attention import new_tokens_attention, tree_attention_ref

from engine_helpers import load_benchmark


def test_new_tokens_attention_is_the_reference_on_an_empty_cache():
    keys = jax.random.split(jax.random.key(0), 5)
    b, t, hq, hkv, d, s = 2, 7, 4, 2, 8, 16
    q = jax.random.normal(keys[0], (b, t, hq, d))
    tree_k, tree_v = jax.random.normal(keys[1], (b, t, hkv, d)), jax.random.normal(keys[2], (b, t, hkv, d))
    cache = jax.random.normal(keys[3], (b, hkv, s, d))  # ignored: nothing is cached
    mask = jnp.tril(jnp.ones((t, t), bool))[None].repeat(b, 0)
    lengths = jnp.zeros(b, jnp.int32)
    ours = new_tokens_attention(q, cache, cache, lengths, tree_k, tree_v, mask)
    ref = tree_attention_ref(q, cache, cache, lengths, tree_k, tree_v, mask)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    # Negative control: a mask that lets a token see its future must change the output.
    leaky = new_tokens_attention(q, cache, cache, lengths, tree_k, tree_v, jnp.ones_like(mask))
    assert not np.allclose(np.asarray(leaky), np.asarray(ref), atol=1e-3)


def test_new_tokens_attention_on_padded_rows_is_finite_and_the_reference():
    """Padded batches (every build batch): padded queries give zeros, and valid rows stay exact."""
    from specjax.models.decoder import causal_mask

    keys = jax.random.split(jax.random.key(2), 4)
    b, t, hq, hkv, d = 2, 6, 4, 2, 8
    q = jax.random.normal(keys[0], (b, t, hq, d))
    tree_k, tree_v = jax.random.normal(keys[1], (b, t, hkv, d)), jax.random.normal(keys[2], (b, t, hkv, d))
    cache = jnp.zeros((b, hkv, 4, d))
    lengths = jnp.zeros(b, jnp.int32)
    mask = causal_mask(b, t, jnp.array([6, 3]))
    ours = np.asarray(new_tokens_attention(q, cache, cache, lengths, tree_k, tree_v, mask))
    ref = np.asarray(tree_attention_ref(q, cache, cache, lengths, tree_k, tree_v, mask))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert not ours[1, 3:].any()


def test_tiny_sql_loss_is_finite_on_a_padded_batch():
    script = load_benchmark("train_tiny_sql")
    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    params = init_params(cfg, jax.random.key(1))
    _, loss_fn = script.build_train_step(cfg, optax.identity())
    tokens = jnp.tile(jnp.arange(8, dtype=jnp.int32)[None], (2, 2))
    weights = jnp.ones(tokens.shape, jnp.float32).at[1, 9:].set(0.0)
    assert np.isfinite(float(loss_fn(params, tokens, weights, jnp.array([16, 10]))))  # NaN before the fix


def test_tiny_sql_train_step_differentiates_and_learns():
    script = load_benchmark("train_tiny_sql")
    cfg = ModelConfig(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64, tie_word_embeddings=True)
    params = init_params(cfg, jax.random.key(1))
    optimizer = optax.adam(1e-2)
    step, loss_fn = script.build_train_step(cfg, optimizer)
    tokens = jnp.tile(jnp.arange(8, dtype=jnp.int32)[None], (2, 2))  # a repeated pattern to learn
    weights = jnp.ones(tokens.shape, jnp.float32)
    lengths = jnp.full(2, tokens.shape[1], jnp.int32)
    opt_state = optimizer.init(params)
    first = float(loss_fn(params, tokens, weights, lengths))
    for _ in range(20):
        params, opt_state, loss = step(params, opt_state, tokens, weights, lengths)
    assert float(loss) < 0.7 * first
