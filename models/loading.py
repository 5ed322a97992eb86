"""Load a Hugging Face checkpoint directory into a specjax param pytree.

A directory holds ``config.json``, weights as ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``, and usually ``tokenizer.json``.
Each parameter group is assembled in one host buffer (stacking layers) from
memory-mapped views and placed on device before the next group is built, so at
most one group is ever copied on the host. ``.bin`` pickles are refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models.config import ModelConfig
from specjax.models.decoder import Params, param_shapes
from specjax.models.safetensors_io import CheckpointError, SafetensorsFile

_LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight", "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight", "wo": "self_attn.o_proj.weight",
    "bq": "self_attn.q_proj.bias", "bk": "self_attn.k_proj.bias", "bv": "self_attn.v_proj.bias",
    "bo": "self_attn.o_proj.bias",
    "q_norm": "self_attn.q_norm.weight", "k_norm": "self_attn.k_norm.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
    "b_gate": "mlp.gate_proj.bias", "b_up": "mlp.up_proj.bias", "b_down": "mlp.down_proj.bias",
}
_TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
              "lm_head": "lm_head.weight"}


@dataclasses.dataclass
class Model:
    """A loaded target or draft model: config, params and (optionally) its tokenizer."""

    config: ModelConfig
    params: Params
    tokenizer: Any = None
    path: Optional[str] = None
    chat_template: Optional[str] = None  # jinja source, as transformers renders it
    bos_token: Optional[str] = None  # the strings a chat template refers to as bos_token / eos_token
    eos_token: Optional[str] = None


def hf_tensor_name(path: tuple[str, ...], layer: Optional[int] = None) -> str:
    """The Hugging Face name of a specjax parameter (``("layers", "wq")`` + layer index)."""
    if path[0] == "layers":
        return f"model.layers.{layer}.{_LAYER_NAMES[path[1]]}"
    return _TOP_NAMES[path[0]]


def read_config(model_dir: str) -> ModelConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    return ModelConfig.from_hf(hf)


def open_weight_files(model_dir: str) -> dict[str, SafetensorsFile]:
    """Map every tensor name to the open file holding it (single file or sharded index)."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index_path}: corrupt index ({e})") from e
        files = {fn: SafetensorsFile(os.path.join(model_dir, fn)) for fn in sorted(set(weight_map.values()))}
        return {name: files[fn] for name, fn in weight_map.items()}
    if os.path.isfile(single):
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    if any(n.endswith(".bin") or n.endswith(".pt") or n.endswith(".pth") for n in os.listdir(model_dir)):
        raise CheckpointError(
            f"{model_dir}: only PyTorch pickle weights (*.bin/*.pt) found. specjax never unpickles "
            "weights. Convert once with transformers: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
    raise CheckpointError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def _lookup(tensors: dict[str, SafetensorsFile], name: str, shape: tuple[int, ...]) -> np.ndarray:
    f = tensors.get(name)
    if f is None:
        raise CheckpointError(f"missing tensor {name!r} in the checkpoint's safetensors files")
    arr = f.tensor(name)
    if arr.shape != shape:
        raise CheckpointError(f"{f.path}: tensor {name!r} has shape {arr.shape}, config implies {shape}")
    return arr


def _assemble(tensors, path: tuple[str, ...], shape: tuple[int, ...], dtype) -> np.ndarray:
    """One parameter as a host array in the target dtype, stacking layers if needed."""
    if path[0] != "layers":
        return _lookup(tensors, hf_tensor_name(path), shape).astype(dtype)
    out = np.empty(shape, dtype)
    for layer in range(shape[0]):
        out[layer] = _lookup(tensors, hf_tensor_name(path, layer), shape[1:])
    return out


def load_params(
    model_dir: str,
    cfg: ModelConfig,
    dtype=jnp.bfloat16,
    place: Optional[Callable[[tuple[str, ...], np.ndarray], jax.Array]] = None,
) -> Params:
    """Read the safetensors weights of ``model_dir`` into a param pytree.

    ``place(path, host_array)`` puts one parameter on device(s); by default
    ``jax.device_put``. Sharded loading passes a function that places each
    parameter straight onto its shards.
    """
    place = place or (lambda path, arr: jax.device_put(arr))
    tensors = open_weight_files(model_dir)
    np_dtype = np.dtype(jnp.dtype(dtype))
    shapes = param_shapes(cfg)
    params: dict = {}
    for key, value in shapes.items():
        if key == "layers":
            params["layers"] = {name: place(("layers", name), _assemble(tensors, ("layers", name), shp, np_dtype))
                                for name, shp in value.items()}
        else:
            params[key] = place((key,), _assemble(tensors, (key,), value, np_dtype))
    return params


def load_tokenizer(model_dir: str):
    """The directory's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or None if absent."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # the Rust library raises a plain Exception on bad JSON
        raise CheckpointError(f"{path}: cannot load tokenizer: {e}") from e


def load_model(model_dir: str, dtype="auto", mesh=None) -> Model:
    """Config, weights, tokenizer and chat template of a Hugging Face model directory or a ``.gguf`` file.

    ``dtype="auto"``: on a CPU the checkpoint's own dtype (so greedy output matches transformers
    there; a GGUF file dequantizes to float32), bfloat16 on a TPU/GPU.
    With a ``mesh`` each tensor goes straight onto its shards (see ``specjax.models.sharding``).
    """
    if not os.path.exists(model_dir):  # a registry name or hf:Org/Repo, pulled into the cache on first use
        from specjax.models.pull import resolve_model

        model_dir = resolve_model(model_dir)
    if model_dir.endswith(".gguf") or (os.path.isfile(model_dir) and _is_gguf(model_dir)):
        return _load_gguf_model(model_dir, dtype, mesh)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist")
    cfg = read_config(model_dir)
    cfg = _with_generation_eos(model_dir, cfg)
    if dtype == "auto":
        dtype = resolve_auto_dtype(_checkpoint_dtype(model_dir))
    model_cfg, place = _placement(cfg, mesh)
    return Model(config=model_cfg, params=load_params(model_dir, cfg, dtype, place),
                 tokenizer=load_tokenizer(model_dir), path=model_dir, **read_chat_strings(model_dir))


def resolve_auto_dtype(checkpoint_dtype) -> Any:
    """dtype "auto": the checkpoint's own dtype on a CPU, bfloat16 on a TPU/GPU."""
    return jnp.dtype(checkpoint_dtype) if jax.default_backend() == "cpu" else jnp.dtype(jnp.bfloat16)


def _placement(cfg: ModelConfig, mesh):
    """(config the model runs with, place hook): heads padded / repeated to the model axis for a mesh."""
    if mesh is None:
        return cfg, None
    from specjax.models.sharding import mesh_placer

    model_cfg, place = mesh_placer(cfg, mesh)
    return model_cfg, place


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _load_gguf_model(path: str, dtype, mesh) -> Model:
    from specjax.models.gguf import GGUFFile, chat_strings, load_gguf_params, load_gguf_tokenizer, read_gguf_config

    g = GGUFFile(path)
    cfg = read_gguf_config(g)
    dtype = resolve_auto_dtype(jnp.float32) if dtype == "auto" else dtype
    model_cfg, place = _placement(cfg, mesh)
    return Model(config=model_cfg, params=load_gguf_params(g, cfg, dtype, place),
                 tokenizer=load_gguf_tokenizer(g), path=path, **chat_strings(g))


_TORCH_DTYPES = {"float32": jnp.float32, "float16": jnp.float16, "bfloat16": jnp.bfloat16}


def _checkpoint_dtype(model_dir: str):
    """config.json's ``dtype`` / ``torch_dtype``, else the dtype of the first floating-point tensor stored."""
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    named = hf.get("dtype") or hf.get("torch_dtype")
    if named in _TORCH_DTYPES:
        return _TORCH_DTYPES[named]
    for name, f in open_weight_files(model_dir).items():
        arr = f.tensor(name)
        if np.issubdtype(arr.dtype, np.floating) or arr.dtype == jnp.bfloat16:
            return arr.dtype
    return jnp.float32


def read_chat_strings(model_dir: str) -> dict[str, Optional[str]]:
    """``chat_template``, ``bos_token`` and ``eos_token`` of a Hugging Face directory.

    The template comes from ``chat_template.jinja`` (transformers 5 writes it there) or
    ``tokenizer_config.json``; the tokens from ``tokenizer_config.json`` (a string or an
    AddedToken-like dict with ``content``).
    """
    config_path = os.path.join(model_dir, "tokenizer_config.json")
    config: dict = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON: {e}") from e
    template = config.get("chat_template")
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return {"chat_template": template, "bos_token": _token_text(config.get("bos_token")),
            "eos_token": _token_text(config.get("eos_token"))}


def _token_text(token) -> Optional[str]:
    return token.get("content") if isinstance(token, dict) else token


def _with_generation_eos(model_dir: str, cfg: ModelConfig) -> ModelConfig:
    """generation_config.json's eos ids override config.json's (chat models use several)."""
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return cfg
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return cfg
    ids = tuple(eos) if isinstance(eos, list) else (int(eos),)
    return dataclasses.replace(cfg, eos_token_ids=ids)
