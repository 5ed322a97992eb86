"""Read karpathy's llama2.c checkpoints and convert them to Hugging Face Llama directories.

llama2.c (https://github.com/karpathy/llama2.c, MIT) stores a model as raw float32
tensors behind a small header. Two layouts exist:

- version 0 (legacy, e.g. the ``tinyllamas`` ``stories*.bin`` files): 7 int32
  ``dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len``, where a
  negative ``vocab_size`` means a separate classifier follows the weights; then the
  token embedding, the per-layer tensors stacked over layers (attention RMSNorm,
  wq, wk, wv, wo, FFN RMSNorm, w1, w2, w3), the final RMSNorm and the unused RoPE
  tables ``freq_cis_real`` / ``freq_cis_imag`` [seq_len, head_dim / 2].
- version 1: a 256-byte header (uint32 magic ``0x616b3432`` "ak42", int32 version,
  the same 7 int32 with a positive vocab, a uint8 shared-classifier flag, zero
  padding), then norms first: attention norms, FFN norms, final norm, embedding,
  wq, wk, wv, wo, w1, w2, w3 and the classifier if not shared. No RoPE tables.
  Version 2 (Q8_0 int8) is refused.

The file is parsed with numpy at explicit offsets (never unpickled) and its size
must equal exactly what the header implies. llama2.c applies RoPE to interleaved
pairs (dims 2i, 2i+1) while Hugging Face Llama rotates halves (dims i, i + d/2), so
the converter permutes the rows of wq and wk per head (the permutation of
transformers' ``convert_llama_weights_to_hf``). RMSNorm eps 1e-5 and RoPE theta
10000 are fixed by llama2.c's ``run.c``.

llama2.c models come with a SentencePiece tokenizer (``tokenizer.bin`` /
``tok512.model``) that is not part of the checkpoint: the converted directory has
no ``tokenizer.json`` and works in token space (BOS = 1, EOS = 2).

Command line: ``specjax convert-llama2c IN.bin OUT_DIR``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

import numpy as np

from specjax.models.loading import hf_tensor_name
from specjax.models.safetensors_io import CheckpointError

MAGIC = 0x616B3432  # "ak42" as a little-endian uint32
V0_HEADER_BYTES = 7 * 4
V1_HEADER_BYTES = 256
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0
BOS_ID, EOS_ID = 1, 2
_MAX_DIM = 1 << 20  # no header field of a real model comes near this


@dataclasses.dataclass(frozen=True)
class Llama2cHeader:
    """The hyperparameters of a llama2.c checkpoint (``vocab_size`` always positive)."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim


def tensor_shapes(h: Llama2cHeader) -> dict[str, tuple[int, ...]]:
    """Every tensor of the file in its on-disk order for ``h.version``, keyed by llama2.c's names."""
    L, D, F, V = h.n_layers, h.dim, h.hidden_dim, h.vocab_size
    shapes = {
        "token_embedding_table": (V, D),
        "rms_att_weight": (L, D), "rms_ffn_weight": (L, D), "rms_final_weight": (D,),
        "wq": (L, D, D), "wk": (L, h.kv_dim, D), "wv": (L, h.kv_dim, D), "wo": (L, D, D),
        "w1": (L, F, D), "w2": (L, D, F), "w3": (L, F, D),
        "freq_cis_real": (h.seq_len, h.head_dim // 2), "freq_cis_imag": (h.seq_len, h.head_dim // 2),
        "wcls": (V, D),
    }
    if h.version == 0:
        order = ["token_embedding_table", "rms_att_weight", "wq", "wk", "wv", "wo", "rms_ffn_weight",
                 "w1", "w2", "w3", "rms_final_weight", "freq_cis_real", "freq_cis_imag"]
    else:
        order = ["rms_att_weight", "rms_ffn_weight", "rms_final_weight", "token_embedding_table",
                 "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    if not h.shared_classifier:
        order.append("wcls")
    return {name: shapes[name] for name in order}


def expected_file_bytes(h: Llama2cHeader) -> int:
    """The exact size of a well-formed file with header ``h``."""
    floats = sum(int(np.prod(s)) for s in tensor_shapes(h).values())
    return (V0_HEADER_BYTES if h.version == 0 else V1_HEADER_BYTES) + 4 * floats


def _parse_header(path: str, head: bytes) -> Llama2cHeader:
    if len(head) < V0_HEADER_BYTES:
        raise CheckpointError(f"{path}: {len(head)} bytes, too short for a llama2.c header ({V0_HEADER_BYTES} bytes)")
    (magic,) = struct.unpack("<I", head[:4])
    if magic != MAGIC:
        dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", head[:V0_HEADER_BYTES])
        header = Llama2cHeader(dim, hidden, layers, heads, kv_heads, abs(vocab), seq_len,
                               shared_classifier=vocab > 0, version=0)
    else:
        if len(head) < V1_HEADER_BYTES:
            raise CheckpointError(f"{path}: {len(head)} bytes, too short for a llama2.c version 1 header "
                                  f"({V1_HEADER_BYTES} bytes)")
        (version,) = struct.unpack("<i", head[4:8])
        if version != 1:
            kind = "Q8_0 int8-quantized " if version == 2 else ""
            raise CheckpointError(f"{path}: llama2.c {kind}export version {version} is not supported "
                                  "(only the float32 versions 0 and 1)")
        fields = struct.unpack("<7i", head[8:36])
        header = Llama2cHeader(*fields, shared_classifier=bool(head[36]), version=1)
    _check_header(path, header)
    return header


def _check_header(path: str, h: Llama2cHeader) -> None:
    """Refuse headers no llama2.c export produces, naming the bad field."""
    for name in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"):
        value = getattr(h, name)
        if not 0 < value <= _MAX_DIM:
            raise CheckpointError(f"{path}: llama2.c header field {name}={value} is out of range "
                                  f"(1..{_MAX_DIM}); not a llama2.c checkpoint or corrupt")
    if h.dim % h.n_heads or h.head_dim % 2:
        raise CheckpointError(f"{path}: dim={h.dim} must split into n_heads={h.n_heads} heads of even size")
    if h.n_heads % h.n_kv_heads:
        raise CheckpointError(f"{path}: n_heads={h.n_heads} is not a multiple of n_kv_heads={h.n_kv_heads}")


def read_llama2c(path: str) -> tuple[Llama2cHeader, dict[str, np.ndarray]]:
    """Header and float32 tensors (llama2.c names and [out, in] layout) of a llama2.c checkpoint.

    ``wcls`` is present only for a separate classifier; ``freq_cis_*`` only in version 0.
    Raises ``CheckpointError`` for a bad header or a file size other than the header implies.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(V1_HEADER_BYTES)
    except OSError as e:
        raise CheckpointError(f"cannot open llama2.c checkpoint {path}: {e}") from e
    header = _parse_header(path, head)
    expected = expected_file_bytes(header)
    if size != expected:
        kind = "truncated" if size < expected else "has trailing bytes"
        raise CheckpointError(
            f"{path}: file is {size} bytes but its llama2.c header ({header}) implies exactly "
            f"{expected} bytes: {kind}, or not a llama2.c checkpoint")
    offset = V0_HEADER_BYTES if header.version == 0 else V1_HEADER_BYTES
    weights = {}
    for name, shape in tensor_shapes(header).items():
        count = int(np.prod(shape))
        weights[name] = np.fromfile(path, dtype="<f4", count=count, offset=offset).reshape(shape)
        offset += 4 * count
    return header, weights


def classifier(weights: dict[str, np.ndarray]) -> np.ndarray:
    """The output projection [vocab, dim]: ``wcls`` if separate, else the token embedding."""
    return weights.get("wcls", weights["token_embedding_table"])


# ---------------------------------------------------------------------------------------------
# Reference forward: llama2.c's run.c in numpy, independent of the converter and of specjax.

def _rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_NORM_EPS))


def _rope_interleaved(x: np.ndarray, head_dim: int) -> np.ndarray:
    """run.c's RoPE on x[T, n_heads * head_dim]: rotate each pair (2i, 2i+1) of every head."""
    t, width = x.shape
    pos = np.arange(t, dtype=np.float32)[:, None]
    freq = 1.0 / ROPE_THETA ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    angle = pos * freq  # [T, head_dim/2]
    cos, sin = np.cos(angle)[:, None], np.sin(angle)[:, None]
    pairs = x.reshape(t, width // head_dim, head_dim // 2, 2)
    v0, v1 = pairs[..., 0], pairs[..., 1]
    out = np.stack([v0 * cos - v1 * sin, v0 * sin + v1 * cos], axis=-1)
    return out.reshape(t, width)


def numpy_forward(weights: dict[str, np.ndarray], header: Llama2cHeader, tokens) -> np.ndarray:
    """float32 logits [T, vocab] of a causal pass over ``tokens`` (1-D ids), as llama2.c computes them."""
    h = header
    tokens = np.asarray(tokens, np.int64)
    t, hd, rep = len(tokens), h.head_dim, h.n_heads // h.n_kv_heads
    x = weights["token_embedding_table"][tokens].astype(np.float32)
    causal = np.tril(np.ones((t, t), bool))
    for layer in range(h.n_layers):
        xb = _rmsnorm(x, weights["rms_att_weight"][layer])
        q = _rope_interleaved(xb @ weights["wq"][layer].T, hd).reshape(t, h.n_heads, hd)
        k = _rope_interleaved(xb @ weights["wk"][layer].T, hd).reshape(t, h.n_kv_heads, hd)
        v = (xb @ weights["wv"][layer].T).reshape(t, h.n_kv_heads, hd)
        k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)  # query head i reads kv head i // rep
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(np.float32(hd))
        scores = np.where(causal, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        attn = np.einsum("hqk,khd->qhd", probs, v).reshape(t, h.dim)
        x = x + attn @ weights["wo"][layer].T
        xb = _rmsnorm(x, weights["rms_ffn_weight"][layer])
        gate = xb @ weights["w1"][layer].T
        up = xb @ weights["w3"][layer].T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ weights["w2"][layer].T
    x = _rmsnorm(x, weights["rms_final_weight"])
    return (x @ classifier(weights).T).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Conversion to a Hugging Face Llama directory.

def interleaved_to_halves(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute the rows of a q/k projection [n_heads * head_dim, in] from llama2.c's interleaved
    RoPE pairs (2i, 2i+1) to Hugging Face's halves (i, i + head_dim/2), head by head."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def hf_config(h: Llama2cHeader) -> dict:
    """config.json of the converted model (transformers' LlamaForCausalLM)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": h.vocab_size,
        "hidden_size": h.dim,
        "intermediate_size": h.hidden_dim,
        "num_hidden_layers": h.n_layers,
        "num_attention_heads": h.n_heads,
        "num_key_value_heads": h.n_kv_heads,
        "head_dim": h.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": h.seq_len,
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": h.shared_classifier,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": "float32",
    }


def hf_tensors(h: Llama2cHeader, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{Hugging Face tensor name: float32 array}, with wq/wk permuted to rotate-half RoPE."""
    per_layer = {
        "attn_norm": weights["rms_att_weight"], "mlp_norm": weights["rms_ffn_weight"],
        "wq": [interleaved_to_halves(w, h.n_heads) for w in weights["wq"]],
        "wk": [interleaved_to_halves(w, h.n_kv_heads) for w in weights["wk"]],
        "wv": weights["wv"], "wo": weights["wo"],
        "w_gate": weights["w1"], "w_down": weights["w2"], "w_up": weights["w3"],
    }
    out = {hf_tensor_name(("embed",)): weights["token_embedding_table"],
           hf_tensor_name(("final_norm",)): weights["rms_final_weight"]}
    if not h.shared_classifier:
        out[hf_tensor_name(("lm_head",))] = weights["wcls"]
    for name, stacked in per_layer.items():
        for layer in range(h.n_layers):
            out[hf_tensor_name(("layers", name), layer)] = np.ascontiguousarray(stacked[layer], np.float32)
    return out


def convert_llama2c(in_path: str, out_dir: str) -> Llama2cHeader:
    """Write ``out_dir`` (config.json, generation_config.json, model.safetensors in float32)
    from the llama2.c checkpoint ``in_path``; returns the checkpoint's header."""
    from safetensors.numpy import save_file

    header, weights = read_llama2c(in_path)
    os.makedirs(out_dir, exist_ok=True)
    save_file(hf_tensors(header, weights), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(header), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}, f, indent=2)
    return header
