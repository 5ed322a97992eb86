"""specjax models against transformers on the same random weights."""

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hf_models import CONFIGS, prefill_logits, save_hf_model
from specjax.models import decoder
from specjax.models.loading import load_model

NAMES = sorted(CONFIGS)


@pytest.fixture(scope="module", params=NAMES)
def pair(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    save_hf_model(request.param, directory, seed=NAMES.index(request.param))
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    return hf, load_model(directory, dtype=jnp.float32)


def test_logits_match_transformers(pair):
    hf, model = pair
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 19))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(prefill_logits(model, tokens), expected, atol=1e-4, rtol=1e-4)


def test_tree_forward_equals_causal_path(pair):
    """Each node of a draft tree gets the logits of running its root-to-node path causally."""
    _, model = pair
    cfg = model.config
    rng = np.random.default_rng(1)
    prefix_len, n = 7, 9
    prefix = rng.integers(0, cfg.vocab_size, prefix_len)
    parents = np.array([-1, 0, 0, 1, -1, 3, 2, 6, 4])
    node_tokens = rng.integers(0, cfg.vocab_size, n)
    anc = np.eye(n, dtype=bool)
    depth = np.zeros(n, int)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
            depth[i] = depth[p] + 1
    cache = decoder.KVCache.zeros(cfg, 1, prefix_len + n + 4)
    pre = decoder.forward(model.params, cfg, jnp.asarray(prefix[None]), jnp.arange(prefix_len)[None], cache,
                          jnp.zeros(1, jnp.int32), decoder.causal_mask(1, prefix_len))
    tree_out = decoder.forward(model.params, cfg, jnp.asarray(node_tokens[None]),
                               jnp.asarray(prefix_len + depth)[None], pre.cache,
                               jnp.full(1, prefix_len, jnp.int32), jnp.asarray(anc[None]))
    # Every root-to-node path as its own causal sequence, right-padded into one batch.
    paths = [np.concatenate([prefix, node_tokens[anc[i]]]) for i in range(n)]  # ancestors come first
    width = max(len(p) for p in paths)
    batch = np.zeros((n, width), np.int64)
    for i, p in enumerate(paths):
        batch[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in paths])
    causal = decoder.forward(model.params, cfg, jnp.asarray(batch), jnp.broadcast_to(jnp.arange(width), (n, width)),
                             decoder.KVCache.zeros(cfg, n, width), jnp.zeros(n, jnp.int32),
                             decoder.causal_mask(n, width, lengths)).logits
    last = np.asarray(causal)[np.arange(n), np.asarray(lengths) - 1]
    np.testing.assert_allclose(np.asarray(tree_out.logits[0]), last, atol=1e-4, rtol=1e-4)


def test_greedy_continuation_matches_generate(pair):
    from specjax.engine.plain import greedy_generate

    hf, model = pair
    prompts = [[5, 17, 33, 8], [9, 2 + 40, 61, 7, 7, 3, 90]]
    ours = greedy_generate(model, prompts, max_new_tokens=32, stop_at_eos=False)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32,
                              eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()


def test_hidden_states_match_transformers(pair):
    hf, model = pair
    tokens = np.random.default_rng(3).integers(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        hs = hf(torch.tensor(tokens), output_hidden_states=True).hidden_states
    b, t = tokens.shape
    out = decoder.forward(model.params, model.config, jnp.asarray(tokens), jnp.arange(t)[None],
                          decoder.KVCache.zeros(model.config, b, t), jnp.zeros(b, jnp.int32),
                          decoder.causal_mask(b, t), hidden_layers=(0, 1))
    np.testing.assert_allclose(np.asarray(out.hidden[0]), hs[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.hidden[1]), hs[1].numpy(), atol=1e-4)
