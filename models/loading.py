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
from typing import Any, Callable, Optional, Union

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
    """A loaded target or draft model: config, params and (optionally) its tokenizer.

    A pytree: the params are its leaves, everything else is static, so a ``Model`` passes through
    ``jax.jit`` (a new config or tokenizer recompiles, new weights do not) and ``jax.tree_util``
    (``tree_map(lambda x: x.astype(jnp.bfloat16), model)`` is a float model in bfloat16; a quantized
    model's integer leaves must keep their dtype, so cast only its floating leaves).
    """

    config: ModelConfig
    params: Params
    tokenizer: Any = None
    path: Optional[str] = None
    chat_template: Optional[str] = None  # jinja source, as transformers renders it
    bos_token: Optional[str] = None  # the strings a chat template refers to as bos_token / eos_token
    eos_token: Optional[str] = None


jax.tree_util.register_dataclass(
    Model, data_fields=["params"],
    meta_fields=[f.name for f in dataclasses.fields(Model) if f.name != "params"])


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


# read(path, layer, shape) -> one tensor (one layer's slice of layer params) on the host: a float
# array, or a QuantizedWeight where the file stores blocks that map exactly (GGUF with quantize="native").
TensorReader = Callable[[tuple[str, ...], Optional[int], tuple[int, ...]], Any]


def safetensors_reader(model_dir: str) -> TensorReader:
    """The ``read`` function of ``assemble_params`` for a Hugging Face directory's safetensors files."""
    tensors = open_weight_files(model_dir)
    return lambda path, layer, shape: _lookup(tensors, hf_tensor_name(path, layer), shape)


def _read_group(read: TensorReader, path: tuple[str, ...], shape: tuple[int, ...], dtype) -> Any:
    """One parameter on the host in ``dtype``, layers stacked: a float array, or a QuantizedWeight
    when every layer came quantized (a group mixing both is dequantized, exactly, to float)."""
    from specjax.models.quant import dequantize_np, is_quantized, stack

    as_float = lambda x: dequantize_np(x) if is_quantized(x) else x
    if path[0] != "layers":
        one = read(path, None, shape)
        return dataclasses.replace(one, dtype=dtype) if is_quantized(one) else one.astype(dtype)
    first = read(path, 0, shape[1:])
    if is_quantized(first):
        parts = [first] + [read(path, layer, shape[1:]) for layer in range(1, shape[0])]
        if all(is_quantized(x) for x in parts):
            return dataclasses.replace(stack(parts), dtype=dtype)
        return np.stack([as_float(x) for x in parts]).astype(dtype)
    out = np.empty(shape, dtype)
    out[0] = first
    for layer in range(1, shape[0]):
        out[layer] = as_float(read(path, layer, shape[1:]))
    return out


def assemble_params(
    cfg: ModelConfig,
    read: TensorReader,
    dtype=jnp.bfloat16,
    place: Optional[Callable[[tuple[str, ...], Any], Any]] = None,
    quantize=None,
) -> Params:
    """The param pytree of ``cfg`` from ``read``, one parameter at a time.

    Each parameter is assembled in one host buffer (stacking layers) and placed
    before the next is built, so at most one is ever copied on the host.
    ``place(path, host_value)`` puts one parameter on device(s); by default
    ``jax.device_put``; sharded loading places each straight onto its shards.
    ``quantize`` (a ``quant.QuantSpec``) quantizes each float matmul weight by
    round to nearest on the host before it is placed.
    """
    from specjax.models.quant import QUANTIZABLE, is_quantized, quantize_rtn

    place = place or (lambda path, value: jax.device_put(value))
    np_dtype = np.dtype(jnp.dtype(dtype))

    def build(path, shape):
        host = _read_group(read, path, shape, np_dtype)
        if quantize is not None and path[-1] in QUANTIZABLE and not is_quantized(host):
            host = quantize_rtn(host, quantize, np_dtype)
        return place(path, host)

    params: dict = {}
    for key, value in param_shapes(cfg).items():
        if key == "layers":
            params["layers"] = {name: build(("layers", name), shp) for name, shp in value.items()}
        else:
            params[key] = build((key,), value)
    return params


def load_params(
    model_dir: str,
    cfg: ModelConfig,
    dtype=jnp.bfloat16,
    place: Optional[Callable[[tuple[str, ...], Any], Any]] = None,
    quantize=None,
) -> Params:
    """Read the safetensors weights of ``model_dir`` into a param pytree (see ``assemble_params``)."""
    return assemble_params(cfg, safetensors_reader(model_dir), dtype, place, quantize)


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


def load_model(model_dir: Union[str, os.PathLike], dtype="auto", mesh=None, quantize=None) -> Model:
    """Config, weights, tokenizer and chat template of a Hugging Face model directory, a ``.gguf``
    file, a registry name (``specjax pull --list``; pulled on first use) or ``hf:Org/Repo``.

    ``dtype="auto"``: on a CPU the checkpoint's own dtype (so greedy output matches transformers
    there; a GGUF file dequantizes to float32), bfloat16 on a TPU/GPU; else a floating dtype
    (``"float32"``, ``jnp.bfloat16``, ...).
    With a ``mesh`` each tensor goes straight onto its shards (see ``specjax.models.sharding``).
    ``quantize``: None (float), "int8" / "int4" (weight-only, round to nearest; or a
    ``quant.QuantSpec`` for another int4 group size), or "native" for a GGUF file: its quantized
    blocks kept as they are stored wherever they map exactly (``specjax.models.quant``).
    """
    model_dir = os.path.expanduser(os.fspath(model_dir))
    dtype = _checked_dtype(dtype)
    if not os.path.exists(model_dir):  # a registry name or hf:Org/Repo, pulled into the cache on first use
        from specjax.models.pull import resolve_model

        model_dir = resolve_model(model_dir)
    if model_dir.endswith(".gguf") or (os.path.isfile(model_dir) and _is_gguf(model_dir)):
        return _load_gguf_model(model_dir, dtype, mesh, quantize)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist")
    spec = _quant_spec(quantize, model_dir, gguf=False)
    cfg = read_config(model_dir)
    cfg = _with_generation_eos(model_dir, cfg)
    if dtype == "auto":
        dtype = resolve_auto_dtype(_checkpoint_dtype(model_dir))
    model_cfg, place = _placement(cfg, mesh)
    return Model(config=model_cfg, params=load_params(model_dir, cfg, dtype, place, spec),
                 tokenizer=load_tokenizer(model_dir), path=model_dir, **read_chat_strings(model_dir))


def _checked_dtype(dtype) -> Any:
    """``dtype`` as load_model takes it: "auto", or a floating-point dtype (a name or a dtype)."""
    if isinstance(dtype, str) and dtype == "auto":
        return dtype
    try:
        resolved = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"dtype {dtype!r} is not a dtype: use 'auto', 'float32', 'bfloat16' or 'float16'") from e
    if not jnp.issubdtype(resolved, jnp.floating):
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype: weights load as 'auto', 'float32', "
                         "'bfloat16' or 'float16'")
    return resolved


def _quant_spec(quantize, path: str, gguf: bool):
    """load_model's ``quantize`` as a ``QuantSpec`` (or "native" for a GGUF file, or None)."""
    from specjax.models.quant import QuantSpec

    if quantize is None or isinstance(quantize, QuantSpec):
        return quantize
    if quantize == "native":
        if not gguf:
            raise ValueError(f"{path}: quantize='native' keeps a GGUF file's quantized blocks; this is not a "
                             "GGUF file (use 'int8' or 'int4')")
        return quantize
    return QuantSpec.parse(quantize)


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


def _load_gguf_model(path: str, dtype, mesh, quantize=None) -> Model:
    from specjax.models.gguf import GGUFFile, chat_strings, load_gguf_params, load_gguf_tokenizer, read_gguf_config

    g = GGUFFile(path)
    cfg = read_gguf_config(g)
    dtype = resolve_auto_dtype(jnp.float32) if dtype == "auto" else dtype
    model_cfg, place = _placement(cfg, mesh)
    return Model(config=model_cfg, params=load_gguf_params(g, cfg, dtype, place, _quant_spec(quantize, path, True)),
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
