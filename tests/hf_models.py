"""Tiny random checkpoints built by transformers itself: the peer every model is checked against."""

from __future__ import annotations

import os

CONFIGS = {
    "llama": dict(model_type="llama"),
    "llama3_rope": dict(
        model_type="llama", rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32)),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", head_dim=24),
}

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build_hf_model(name: str, seed: int = 0, **overrides):
    """A transformers model with random weights (std 0.1 so logits are not flat)."""
    import torch
    import transformers

    spec = dict(CONFIGS[name])
    model_type = spec.pop("model_type")
    config_cls = transformers.AutoConfig.for_model(model_type).__class__
    config = config_cls(**{**BASE, **spec, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 or "bias" in str(p):
                p.normal_(0.0, 0.1)
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif "norm" in n:
                p.uniform_(0.5, 1.5)
    return model.eval()


def save_hf_model(name: str, directory: str, seed: int = 0, **overrides) -> str:
    model = build_hf_model(name, seed, **overrides)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


def prefill_logits(model, tokens):
    """specjax's logits for every position of ``tokens`` [B, T] from an empty cache, to compare with
    the transformers model's."""
    import jax.numpy as jnp
    import numpy as np

    from specjax.models import decoder

    b, t = tokens.shape
    cache = decoder.KVCache.zeros(model.config, b, t + 8)
    positions = np.broadcast_to(np.arange(t), (b, t))
    out = decoder.forward(model.params, model.config, jnp.asarray(tokens), jnp.asarray(positions), cache,
                          jnp.zeros(b, jnp.int32), decoder.causal_mask(b, t))
    return np.asarray(out.logits)
