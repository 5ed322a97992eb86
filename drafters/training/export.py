"""The drafter to train and its files: configs, initial params, the exported checkpoints.

An EAGLE-3 head is written in the SafeAILab layout ``load_eagle3`` reads, a
draft model as a Hugging Face Llama directory; ``load_init_params`` reads
either back as the starting point of another run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.eagle3 import Eagle3Config, default_hidden_layers, load_eagle3
from specjax.drafters.visual_compressor import CompressorConfig
from specjax.models.config import ModelConfig
from specjax.models.decoder import init_params
from specjax.models.loading import Model, load_model
from specjax.models.training import export_llama, llama_hf_config, save_hf_checkpoint, to_bf16


def eagle3_hf_config(tcfg: ModelConfig, hidden_layers: Sequence[int],
                     compressor: Optional[CompressorConfig] = None) -> dict:
    """An EAGLE-3 head config.json for this target: one Llama layer of the target's shape,
    full draft vocabulary (d2t = 0), and a vision-language target's visual compressor."""
    extra = {} if compressor is None else {"visual_compressor": compressor.to_hf()}
    return llama_hf_config(dataclasses.replace(tcfg, num_layers=1), "LlamaForCausalLMEagle3",
                           draft_vocab_size=tcfg.vocab_size, target_hidden_size=tcfg.hidden_size,
                           norm_before_residual=False,
                           eagle_config={"eagle_aux_hidden_state_layer_ids": [int(i) for i in hidden_layers]},
                           **extra)


def draft_model_hf_config(tcfg: ModelConfig, layers: int, hidden: Optional[int]) -> dict:
    """A small Llama with the target's vocabulary, tied embeddings, heads of the target's size."""
    hidden = hidden or tcfg.hidden_size
    heads = max(1, hidden // tcfg.head_dim)
    kv_heads = max(1, heads * tcfg.num_kv_heads // tcfg.num_heads)
    while heads % kv_heads:
        kv_heads -= 1
    inter = int(round(tcfg.intermediate_size * hidden / tcfg.hidden_size))
    shape = dataclasses.replace(tcfg, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                                num_heads=heads, num_kv_heads=kv_heads)
    eos = list(tcfg.eos_token_ids)
    return llama_hf_config(shape, tie_word_embeddings=True, bos_token_id=tcfg.bos_token_id,
                           eos_token_id=eos[0] if len(eos) == 1 else eos)


def _target_head(target: Model):
    p = target.params
    return p["embed"] if target.config.tie_word_embeddings else p["lm_head"]


def init_eagle3(target: Model, hidden_layers, key,
                compressor: Optional[CompressorConfig] = None) -> tuple[Eagle3Config, dict, dict]:
    """(config, trainable params, frozen params): fc and the layer random; final norm and LM head
    copied from the target (the head starts out predicting like the target's last layer); the
    token embedding is the target's, frozen (not saved: ``load_eagle3`` shares the target's).
    A ``compressor`` (a vision-language target) is trained with the head."""
    from specjax.drafters.eagle3 import init_params as init_head

    cfg = Eagle3Config.from_hf(eagle3_hf_config(target.config, hidden_layers, compressor))
    fresh = init_head(cfg, key, jnp.float32, scale=0.02)
    params = {"fc": fresh["fc"], "layer": fresh["layer"],
              "final_norm": jnp.asarray(target.params["final_norm"], jnp.float32),
              "lm_head": jnp.asarray(_target_head(target), jnp.float32)}
    if compressor is not None:
        params["compressor"] = fresh["compressor"]
    frozen = {"embed": jnp.asarray(target.params["embed"], jnp.float32),
              "d2t": jnp.zeros(cfg.draft_vocab_size, jnp.int32)}
    return cfg, params, frozen


def init_draft_model(target: Model, layers: int, hidden: Optional[int], key) -> tuple[ModelConfig, dict]:
    cfg = ModelConfig.from_hf(draft_model_hf_config(target.config, layers, hidden))
    params = init_params(cfg, key, jnp.float32, scale=0.02)
    if cfg.hidden_size == target.config.hidden_size:
        params["embed"] = jnp.asarray(_target_head(target), jnp.float32)
        params["final_norm"] = jnp.asarray(target.params["final_norm"], jnp.float32)
    return cfg, params


def export_eagle3(out_dir: str, hf_config: dict, params: dict) -> tuple[str, str]:
    """config.json + model.safetensors in the SafeAILab EAGLE-3 layout ``load_eagle3`` reads."""
    from specjax.drafters.eagle3 import _LAYER_TENSORS

    vocab = hf_config["vocab_size"]
    tensors = {"fc.weight": to_bf16(params["fc"]), "norm.weight": to_bf16(params["final_norm"]),
               "lm_head.weight": to_bf16(params["lm_head"]),
               "d2t": np.zeros(hf_config["draft_vocab_size"], np.int64), "t2d": np.ones(vocab, np.bool_)}
    tensors.update({name: to_bf16(params["layer"][k]) for k, name in _LAYER_TENSORS.items()})
    tensors.update({f"visual_compressor.{k}": to_bf16(v) for k, v in params.get("compressor", {}).items()})
    return save_hf_checkpoint(out_dir, hf_config, tensors)


def export_draft_model(out_dir: str, hf_config: dict, params: dict, target_dir: Optional[str]) -> tuple[str, str]:
    """A Hugging Face Llama directory (plus the target's tokenizer files, when it has them)."""
    paths = export_llama(out_dir, params, hf_config)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if target_dir and os.path.isfile(os.path.join(target_dir, name)):
            shutil.copy(os.path.join(target_dir, name), os.path.join(out_dir, name))
    return paths


def checked_init_params(fresh: dict, given: dict) -> dict:
    """``given`` (float32) in place of ``fresh``: the same names and shapes, or a ValueError naming
    the first difference (a drafter of another shape cannot be fine-tuned into this one)."""
    want = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(fresh)[0]}
    got = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_flatten_with_path(given)[0]}
    if want.keys() != got.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise ValueError(f"initial drafter params do not match this drafter: missing {missing}, unexpected {extra}")
    for name, shape in want.items():
        if got[name] != shape:
            raise ValueError(f"initial drafter params: {name} has shape {got[name]}, this drafter needs {shape}")
    return jax.tree.map(lambda _, g: jnp.asarray(g, jnp.float32), fresh, given)


def load_init_params(kind: str, model_dir: str, target: Model) -> dict:
    """The trainable params of a drafter directory (what ``train_drafter`` writes, or a public
    EAGLE-3 head / small Llama), for ``init_params``."""
    if kind == "eagle3":
        head = load_eagle3(model_dir, target, dtype=jnp.float32)
        wanted = tuple(default_hidden_layers(target.config.num_layers))
        if tuple(head.hidden_layers) != wanted:
            raise ValueError(f"{model_dir}: the head reads target layers {list(head.hidden_layers)}, training uses "
                             f"{list(wanted)}")
        return {name: head.params[name] for name in ("fc", "layer", "final_norm", "lm_head", "compressor")
                if name in head.params}
    return dict(load_model(model_dir, dtype=jnp.float32).params)
