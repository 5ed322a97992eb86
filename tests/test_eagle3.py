"""EAGLE-3 head: a checkpoint in the public layout loads, and its draft logits match an
independent PyTorch implementation built from transformers' Llama building blocks."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine_helpers import tiny_model
from specjax.drafters.eagle3 import Eagle3Drafter, default_hidden_layers, head_block, load_eagle3
from specjax.models.safetensors_io import CheckpointError

V, VD, H = 64, 40, 32
HEAD = dict(hidden_size=H, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64,
            rms_norm_eps=1e-5, vocab_size=V, max_position_embeddings=512, rope_theta=10000.0)


class TorchEagle3(torch.nn.Module):
    """The EAGLE-3 equations from transformers' Llama pieces: fc(3H -> H), one decoder layer over
    [input_layernorm(embed(token)), hidden_norm(h)] with residual h, final norm, reduced LM head."""

    def __init__(self, seed: int):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama import modeling_llama as ml

        cfg = LlamaConfig(**HEAD, num_hidden_layers=1)
        cfg._attn_implementation = "eager"
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(V, H)
        self.fc = torch.nn.Linear(3 * H, H, bias=False)
        self.input_layernorm, self.hidden_norm = ml.LlamaRMSNorm(H, 1e-5), ml.LlamaRMSNorm(H, 1e-5)
        self.post_attention_layernorm, self.norm = ml.LlamaRMSNorm(H, 1e-5), ml.LlamaRMSNorm(H, 1e-5)
        self.self_attn = ml.LlamaAttention(cfg, layer_idx=0)
        for name in ("q_proj", "k_proj", "v_proj"):  # attention input is 2H
            old = getattr(self.self_attn, name)
            setattr(self.self_attn, name, torch.nn.Linear(2 * H, old.out_features, bias=False))
        self.mlp = ml.LlamaMLP(cfg)
        self.lm_head = torch.nn.Linear(H, VD, bias=False)
        self.rotary = ml.LlamaRotaryEmbedding(cfg)
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0.0, 0.1)
        rng = np.random.default_rng(seed)
        self.draft_ids = np.sort(rng.choice(V, VD, replace=False))

    def layer(self, tokens, feats):
        """Causal pass over pairs (token j + 1, feature j) at positions 0..t-1."""
        t = tokens.shape[1]
        x = torch.cat([self.input_layernorm(self.embed(tokens)), self.hidden_norm(feats)], dim=-1)
        cos, sin = self.rotary(x, torch.arange(t)[None])
        mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
        h = feats + self.self_attn(x, (cos, sin), mask)[0]
        return h + self.mlp(self.post_attention_layernorm(h))

    def logits(self, out):
        return self.lm_head(self.norm(out))

    def save(self, directory: str, with_embed: bool) -> None:
        from safetensors.torch import save_file

        names = {"fc.weight": self.fc.weight, "norm.weight": self.norm.weight, "lm_head.weight": self.lm_head.weight}
        for part in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            names[f"midlayer.{part}.weight"] = getattr(self, part).weight
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names[f"midlayer.self_attn.{proj}.weight"] = getattr(self.self_attn, proj).weight
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names[f"midlayer.mlp.{proj}.weight"] = getattr(self.mlp, proj).weight
        if with_embed:
            names["embed_tokens.weight"] = self.embed.weight
        tensors = {k: v.detach().contiguous() for k, v in names.items()}
        tensors["d2t"] = torch.tensor(self.draft_ids - np.arange(VD), dtype=torch.int64)
        t2d = torch.zeros(V, dtype=torch.bool)
        t2d[torch.tensor(self.draft_ids)] = True
        tensors["t2d"] = t2d
        os.makedirs(directory, exist_ok=True)
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump({**HEAD, "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
                       "num_hidden_layers": 1, "draft_vocab_size": VD}, f)


def _target(embed):
    """A 6-layer target (so the default feature layers 2, 3, 3 exist) sharing the head's embedding."""
    target = tiny_model(5, vocab=V, layers=6)
    params = dict(target.params, embed=jnp.asarray(embed))
    return type(target)(target.config, params)


@pytest.fixture(scope="module", params=[False, True], ids=["target_embed", "own_embed"])
def head(request, tmp_path_factory):
    ref = TorchEagle3(seed=3).eval()
    directory = str(tmp_path_factory.mktemp("eagle3"))
    ref.save(directory, with_embed=request.param)
    embed = ref.embed.weight.detach().numpy()
    if request.param:  # the checkpoint's own table must win over the target's
        target = _target(np.zeros_like(embed))
    else:
        target = _target(embed)
    drafter = load_eagle3(directory, target, dtype=jnp.float32, capacity=3, topk=1, depth=3)
    return ref, drafter


def _pairs(rng, lengths, width):
    tokens = rng.integers(0, V, (len(lengths), width))
    first = rng.integers(0, V, len(lengths))
    feats = rng.normal(0, 1, (3, len(lengths), width, H)).astype(np.float32)
    return tokens, first, feats


def test_loaded_head_matches_torch_on_prompt_and_chain(head):
    """Prefill pairs of two rows of different lengths, then a 3-token chain fed by the head itself."""
    ref, drafter = head
    assert drafter.hidden_layers == default_hidden_layers(6) == (2, 3, 3)
    rng = np.random.default_rng(0)
    lengths, width = [7, 4], 8
    tokens, first, feats = _pairs(rng, lengths, width)
    params = drafter.params
    dstate = drafter.init_state(2, 64)
    dstate = drafter.prefill(params, dstate, jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(first),
                             jnp.asarray(feats))
    tree, _ = drafter.propose(params, dstate, jnp.asarray(first), jnp.asarray(lengths),
                              type("Greedy", (), {"temperature": 0.0}), jax.random.key(0))
    for b, n in enumerate(lengths):
        seq = np.append(tokens[b, 1:n], first[b])
        with torch.no_grad():
            fused = ref.fc(torch.tensor(np.concatenate(list(feats[:, b, :n]), axis=-1)))[None]
            out = ref.layer(torch.tensor(seq)[None], fused)
            logits = ref.logits(out)[0]
            np.testing.assert_allclose(np.asarray(dstate.root_hidden[b]), out[0, -1].numpy(), atol=1e-4)
            # Greedy chain: the head feeds its own output hidden state with the drafted token.
            chain, prob = [], 1.0
            step_logits = logits[-1]
            for _ in range(3):
                p = torch.softmax(step_logits, -1)
                draft_id = int(torch.argmax(p))
                prob *= float(p[draft_id])
                chain.append(int(ref.draft_ids[draft_id]))
                seq = np.append(seq, chain[-1])
                fused = torch.cat([fused, out[:, -1:]], dim=1)
                out = ref.layer(torch.tensor(seq)[None], fused)
                step_logits = ref.logits(out)[0, -1]
                np.testing.assert_allclose(float(tree.draft_probs[b, len(chain) - 1]), prob, rtol=1e-4)
        assert np.asarray(tree.tokens[b]).tolist() == chain
        assert np.asarray(tree.parents[b]).tolist() == [-1, 0, 1]


def test_block_logits_match_torch_at_every_position(head):
    ref, drafter = head
    rng = np.random.default_rng(1)
    tokens, _, feats = _pairs(rng, [6], 6)
    from specjax.drafters.eagle3 import draft_logits, fuse_features

    params = drafter.params
    cache = drafter.init_state(1, 64).cache
    out, _ = head_block(drafter.cfg, params, cache, jnp.zeros(1, jnp.int32), jnp.asarray(tokens),
                        fuse_features(params, jnp.asarray(feats)), jnp.asarray([6]))
    with torch.no_grad():
        fused = ref.fc(torch.tensor(np.concatenate(list(feats[:, 0]), axis=-1)))[None]
        expected = ref.logits(ref.layer(torch.tensor(tokens), fused)).numpy()
    np.testing.assert_allclose(np.asarray(draft_logits(drafter.cfg, params, out)), expected, atol=1e-4)


def test_pickle_weights_are_refused_with_the_conversion_command(tmp_path):
    ref = TorchEagle3(seed=1)
    ref.save(str(tmp_path), with_embed=False)
    os.rename(tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors.torch as st.*save_file"):
        load_eagle3(str(tmp_path), _target(np.zeros((V, H), np.float32)), dtype=jnp.float32)


def test_missing_tensor_and_vocab_mismatch_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = TorchEagle3(seed=1)
    ref.save(str(tmp_path), with_embed=False)
    target = _target(np.zeros((V, H), np.float32))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["midlayer.hidden_norm.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="midlayer.hidden_norm.weight"):
        load_eagle3(str(tmp_path), target, dtype=jnp.float32)
    with pytest.raises(ValueError, match="vocab_size 64 != target vocab_size 65"):
        load_eagle3(str(tmp_path), type(target)(tiny_model(0, vocab=65, layers=6).config, target.params))


def test_feature_layers_are_checked():
    from specjax.drafters.eagle3 import Eagle3Config, init_params
    from specjax.models.config import ModelConfig

    cfg = Eagle3Config(ModelConfig.from_hf({**HEAD, "model_type": "llama", "num_hidden_layers": 1}), VD, H)
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="3 target layers"):
        Eagle3Drafter(cfg, params, target_num_layers=4, hidden_layers=(1, 2, 7))
