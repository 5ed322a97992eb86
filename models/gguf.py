"""Load llama.cpp GGUF checkpoints (Llama family, Qwen2/2.5, Qwen3) into specjax.

A GGUF file holds metadata (architecture hyper-parameters, tokenizer, chat
template) and tensors, most of them in quantized blocks. Each tensor is
dequantized to float32 through ``gguf.quants`` (the package maintained with
llama.cpp, the same routine transformers' GGUF loader uses), then mapped to the
specjax param pytree exactly as ``loading.load_params`` would from the
equivalent Hugging Face checkpoint (the same ``loading.assemble_params``, with
the same ``place`` hook, so meshes work unchanged). With ``quantize="native"``
the blocks that map exactly stay quantized (``specjax.models.quant``).

llama.cpp's converter permutes the rows of Llama's q/k projections (its rotary
kernel pairs adjacent dims, Hugging Face's pairs the two halves); that is undone
here, as transformers does. Qwen2/Qwen3 files are not permuted.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np

from specjax.models.config import ModelConfig
from specjax.models.decoder import Params, param_shapes
from specjax.models.safetensors_io import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Block types dequantized (float and the quantized types of common llama.cpp files). Others are refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K")

_LAYER_TENSORS = {
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "wo": "attn_output.weight", "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "bo": "attn_output.bias", "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "mlp_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight",
    "w_down": "ffn_down.weight",
}
_TOP_TENSORS = {"embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}


class GGUFError(CheckpointError):
    """A GGUF file is not GGUF, truncated, or describes something specjax does not load."""


class GGUFFile:
    """An open GGUF file: decoded metadata and its tensors by name (memory-mapped, nothing read yet)."""

    def __init__(self, path: str):
        self.path = path
        _check_magic(path)
        import gguf

        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, IndexError, KeyError, OverflowError) as e:
            raise GGUFError(f"{path}: corrupt or truncated GGUF file ({e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        size = os.path.getsize(path)
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
                raise GGUFError(f"{path}: tensor {t.name!r} runs past the end of the file "
                                f"({size} bytes): the file is truncated")
        self._meta: dict[str, Any] = {}

    def meta(self, key: str, default: Any = ...) -> Any:
        """A metadata value decoded to Python; without ``default`` a missing key is a GGUFError."""
        if key not in self._meta:
            field = self.reader.fields.get(key)
            if field is None:
                if default is ...:
                    raise GGUFError(f"{self.path}: metadata key {key!r} is missing")
                return default
            self._meta[key] = field_value(field)
        return self._meta[key]

    @property
    def architecture(self) -> str:
        arch = self.meta("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(f"{self.path}: architecture {arch!r} is not supported; supported: "
                            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        return arch

    def tokenizer_meta(self) -> dict[str, Any]:
        """Every ``tokenizer.*`` key, decoded (what the tokenizer builder reads)."""
        return {k: self.meta(k) for k in self.reader.fields if k.startswith("tokenizer.")}

    def _checked(self, name: str, shape: tuple[int, ...]):
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {name!r} is missing")
        kind = t.tensor_type.name
        if kind not in SUPPORTED_TYPES:
            raise GGUFError(f"{self.path}: tensor {name!r} has block type {kind}, which specjax does not "
                            f"dequantize; supported: {', '.join(SUPPORTED_TYPES)}")
        stored = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        if stored != shape:
            raise GGUFError(f"{self.path}: tensor {name!r} has shape {stored}, the metadata implies {shape}")
        return t

    def native_tensor(self, name: str, shape: tuple[int, ...]):
        """One tensor as stored: a ``quant.QuantizedWeight`` of its blocks where they map exactly
        (``quant.GGUF_NATIVE``), else dequantized to float32 like ``tensor``."""
        from specjax.models.quant import GGUF_NATIVE, from_gguf_blocks

        t = self._checked(name, shape)
        if t.tensor_type.name not in GGUF_NATIVE or len(shape) != 2:
            return self.tensor(name, shape)
        return from_gguf_blocks(t.data, t.tensor_type.name, shape)

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """One tensor dequantized to float32 in Hugging Face's [out, in] layout, shape checked."""
        from gguf import quants

        t = self._checked(name, shape)
        kind = t.tensor_type.name
        try:
            values = quants.dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise GGUFError(f"{self.path}: cannot dequantize tensor {name!r} ({kind}): {e}") from e
        return np.asarray(values, np.float32).reshape(shape)


def field_value(field) -> Any:
    """A GGUFReader field as Python: str, int, float, bool, or a list of them for arrays."""
    from gguf import GGUFValueType

    def scalar(part, kind):
        if kind == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        value = part[0].item()
        return bool(value) if kind == GGUFValueType.BOOL else value

    if field.types[0] == GGUFValueType.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], field.types[0])


def _check_magic(path: str) -> None:
    if not os.path.isfile(path):
        raise GGUFError(f"GGUF file {path!r} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {head!r}, expected {GGUF_MAGIC!r})")


def hf_config(g: GGUFFile) -> dict[str, Any]:
    """The Hugging Face ``config.json`` dict equivalent to the file's metadata."""
    arch = g.architecture
    tokens = g.meta("tokenizer.ggml.tokens", None)
    vocab = g.meta(f"{arch}.vocab_size", None) or (len(tokens) if tokens is not None else None)
    if vocab is None:
        vocab = int(g.tensors["token_embd.weight"].shape[1]) if "token_embd.weight" in g.tensors else None
    if vocab is None:
        raise GGUFError(f"{g.path}: no vocabulary size ({arch}.vocab_size, tokenizer.ggml.tokens)")
    heads = int(g.meta(f"{arch}.attention.head_count"))
    hidden = int(g.meta(f"{arch}.embedding_length"))
    from specjax.models.gguf_tokenizer import eos_token_ids

    tok_meta = {k: g.meta(k, None) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                             "tokenizer.ggml.eom_token_id")}
    eos = list(eos_token_ids(tok_meta))
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                           "qwen3": "Qwen3ForCausalLM"}[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(g.meta(f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(g.meta(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.meta(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(g.meta(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(g.meta(f"{arch}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(g.meta(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g.meta(f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "hidden_act": "silu",
        "bos_token_id": g.meta("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "pad_token_id": g.meta("tokenizer.ggml.padding_token_id", None),
    }
    if arch == "qwen2":
        config["use_sliding_window"] = False
    scaling = g.meta(f"{arch}.rope.scaling.type", None)
    if scaling not in (None, "none"):
        raise GGUFError(f"{g.path}: rope scaling {scaling!r} from GGUF metadata is not supported")
    return config


def read_gguf_config(g: GGUFFile) -> ModelConfig:
    cfg = ModelConfig.from_hf(hf_config(g))
    if g.architecture == "qwen2" and "blk.0.attn_q.bias" not in g.tensors:
        raise GGUFError(f"{g.path}: qwen2 file without q/k/v biases (blk.0.attn_q.bias)")
    return cfg


def gguf_tensor_name(path: tuple[str, ...], layer: Optional[int] = None) -> str:
    """The GGUF name of a specjax parameter (``("layers", "wq")`` + layer index)."""
    if path[0] == "layers":
        return f"blk.{layer}.{_LAYER_TENSORS[path[1]]}"
    return _TOP_TENSORS[path[0]]


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (per head, interleaved rotary pairs -> halves)."""
    head_dim = weight.shape[0] // num_heads
    return weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def hf_tensor(g: GGUFFile, cfg: ModelConfig, path: tuple[str, ...], shape: tuple[int, ...],
              layer: Optional[int] = None, native: bool = False):
    """One parameter (one layer's slice for layer params) as Hugging Face float32 values, or with
    ``native`` as its quantized blocks where they map exactly (a ``quant.QuantizedWeight``)."""
    from specjax.models.quant import is_quantized, map_components

    name = gguf_tensor_name(path, layer)
    values = g.native_tensor(name, shape) if native else g.tensor(name, shape)
    heads = {"wq": cfg.num_heads, "bq": cfg.num_heads, "wk": cfg.num_kv_heads, "bk": cfg.num_kv_heads}
    if g.architecture != "llama" or path[-1] not in heads:
        return values
    unpermute = lambda a: unpermute_qk(a, heads[path[-1]])  # whole rows move: blocks stay intact
    return map_components(unpermute, values) if is_quantized(values) else unpermute(values)


def load_gguf_params(
    g: GGUFFile,
    cfg: ModelConfig,
    dtype=jnp.float32,
    place: Optional[Callable[[tuple[str, ...], Any], Any]] = None,
    quantize=None,
) -> Params:
    """The param pytree of a GGUF file, built like ``loading.load_params`` (``assemble_params``).

    ``quantize="native"`` keeps the quantized blocks (``quant.GGUF_NATIVE``) instead of
    dequantizing them; a ``quant.QuantSpec`` re-quantizes the dequantized weights by round to nearest.
    """
    from specjax.models.loading import assemble_params

    native = quantize == "native"
    read = lambda path, layer, shape: hf_tensor(g, cfg, path, shape, layer, native)
    return assemble_params(cfg, read, dtype, place, None if native else quantize)


def load_gguf_tokenizer(g: GGUFFile):
    """The file's tokenizer as a ``tokenizers.Tokenizer``."""
    from specjax.models.gguf_tokenizer import GGUFTokenizerError, build_tokenizer

    try:
        return build_tokenizer(g.tokenizer_meta(), source=g.path)
    except GGUFTokenizerError as e:
        raise GGUFError(str(e)) from e


def chat_strings(g: GGUFFile) -> dict[str, Optional[str]]:
    """``chat_template``, ``bos_token`` and ``eos_token`` as a jinja chat template uses them."""
    from specjax.models.gguf_tokenizer import special_token

    meta = {k: g.meta(k, None) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
                                         "tokenizer.ggml.eos_token_id")}
    return {"chat_template": g.meta("tokenizer.chat_template", None),
            "bos_token": special_token(meta, "bos"), "eos_token": special_token(meta, "eos")}


_SAFETENSORS_DTYPES = {"float32": ("F32", np.float32), "bfloat16": ("BF16", None), "float16": ("F16", np.float16)}


def convert_gguf(path: str, out_dir: str, dtype: str = "float32", progress: bool = True) -> dict[str, Any]:
    """Write a GGUF file as a Hugging Face directory that ``load_model`` and transformers both load.

    Tensors stream one at a time into ``model.safetensors`` (never the whole model in memory);
    ``config.json`` is written last, so an interrupted conversion never looks like a model directory.
    Returns the written config dict.
    """
    import json

    import ml_dtypes
    from tqdm.auto import tqdm

    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(_SAFETENSORS_DTYPES)}")
    g = GGUFFile(path)
    config, cfg = hf_config(g), read_gguf_config(g)
    tokenizer = load_gguf_tokenizer(g)  # fails before anything is written if the tokenizer is unsupported
    os.makedirs(out_dir, exist_ok=True)
    st_name, np_dtype = _SAFETENSORS_DTYPES[dtype]
    np_dtype = np_dtype or ml_dtypes.bfloat16
    entries = list(_hf_entries(cfg))
    tmp = os.path.join(out_dir, "model.safetensors.partial")
    with open(tmp, "wb") as f:
        _write_safetensors_header(f, entries, st_name, np.dtype(np_dtype).itemsize)
        for name, param, layer, shape in tqdm(entries, desc=f"convert {os.path.basename(path)}", unit="tensor",
                                              disable=not progress):
            f.write(np.ascontiguousarray(hf_tensor(g, cfg, param, shape, layer).astype(np_dtype)).tobytes())
    os.replace(tmp, os.path.join(out_dir, "model.safetensors"))
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    strings = chat_strings(g)
    named = {f"{k}_token": _token_by_id(g, f"tokenizer.ggml.{i}_token_id")
             for k, i in (("unk", "unknown"), ("pad", "padding"))}
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                        "add_bos_token": bool(g.meta("tokenizer.ggml.add_bos_token", False)),
                        "add_eos_token": bool(g.meta("tokenizer.ggml.add_eos_token", False)),
                        **{k: v for k, v in {**strings, **named}.items() if v is not None}}
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    config = {k: v for k, v in {**config, "dtype": dtype, "torch_dtype": dtype}.items() if v is not None}
    for name, content in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation),
                          ("config.json", config)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)
    return config


def _token_by_id(g: GGUFFile, key: str) -> Optional[str]:
    token_id, tokens = g.meta(key, None), g.meta("tokenizer.ggml.tokens", None)
    return tokens[token_id] if token_id is not None and tokens is not None and token_id < len(tokens) else None


def _hf_entries(cfg: ModelConfig):
    """(Hugging Face name, specjax param path, layer, per-tensor shape) for every tensor of the model."""
    from specjax.models.loading import hf_tensor_name

    for key, value in param_shapes(cfg).items():
        if key != "layers":
            yield hf_tensor_name((key,)), (key,), None, value
            continue
        for layer in range(cfg.num_layers):
            for name, shape in value.items():
                yield hf_tensor_name(("layers", name), layer), ("layers", name), layer, shape[1:]


def _write_safetensors_header(f, entries, st_dtype: str, itemsize: int) -> None:
    import json
    import struct

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, _, _, shape in entries:
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)) + raw)
