"""ViT vision towers (CLIP, SigLIP, Idefics3 / SmolVLM) as pure functions over a stacked param pytree.

The towers of LLaVA-style models: non-overlapping patches through one linear map
(the conv of kernel = stride = patch size), learned absolute positions, then
pre-norm encoder layers (LayerNorm, bidirectional multi-head attention, a two-layer
MLP). CLIP prepends a class token and LayerNorms the embeddings ("pre_layrnorm");
SigLIP has neither, a bias on the patch embedding, and tanh-approximated GELU.
LLaVA never reads the final ``post_layernorm`` (it takes ``hidden_states[k]``, the
un-normed output of layer k), so CLIP and SigLIP towers hold none; Idefics3 and
SmolVLM, SigLIP towers whose last layer is read through it, do (``post_norm``).
Their variable-resolution position buckets reduce to plain positions for a full
``image_size`` tile, the only input taken here.

Parameters keep Hugging Face's [out, in] layout, stacked over layers so the encoder
is one ``lax.scan``, as the decoder is. A tower may hold fewer layers than its
config: LLaVA's default feature layer is the second to last, and layers past the
deepest feature layer are never run, so they are neither loaded nor computed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from specjax.models.config import UnsupportedModelError
from specjax.models.decoder import linear

Params = dict

# transformers' defaults for the fields a hub config may leave out (CLIPVisionConfig, SiglipVisionConfig).
_DEFAULTS = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                              num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu",
                              layer_norm_eps=1e-5),
    "siglip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                                hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
    "idefics3_vision": dict(hidden_size=1152, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=16,
                            num_channels=3, image_size=224, patch_size=32, hidden_act="gelu_pytorch_tanh",
                            layer_norm_eps=1e-6),
}
_DEFAULTS["smolvlm_vision"] = _DEFAULTS["idefics3_vision"]

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The elementwise function of a Hugging Face ``hidden_act`` name, or UnsupportedModelError."""
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported ({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Static description of a ViT tower (hashable: a jit static argument)."""

    model_type: str  # "clip_vision_model", "siglip_vision_model", "idefics3_vision" or "smolvlm_vision"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        activation(self.hidden_act)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not a multiple of its "
                             f"{self.num_heads} attention heads")
        if self.image_size % self.patch_size:
            raise UnsupportedModelError(f"image_size {self.image_size} is not a multiple of patch_size "
                                        f"{self.patch_size}")

    @property
    def class_token(self) -> bool:
        """CLIP prepends a learned class token (and LayerNorms the embeddings); SigLIP does neither."""
        return self.model_type == "clip_vision_model"

    @property
    def post_norm(self) -> bool:
        """Idefics3 / SmolVLM read the last layer through the tower's final LayerNorm."""
        return self.model_type in ("idefics3_vision", "smolvlm_vision")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.class_token)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> "VisionConfig":
        """Build from a ``vision_config`` dict; fields it leaves out take transformers' defaults."""
        model_type = hf.get("model_type", "clip_vision_model")
        if model_type not in _DEFAULTS:
            raise UnsupportedModelError(f"vision model_type {model_type!r} is not supported; supported: "
                                        f"{', '.join(_DEFAULTS)}")
        full = {**_DEFAULTS[model_type], **hf}
        return cls(model_type=model_type, hidden_size=int(full["hidden_size"]),
                   intermediate_size=int(full["intermediate_size"]), num_layers=int(full["num_hidden_layers"]),
                   num_heads=int(full["num_attention_heads"]), image_size=int(full["image_size"]),
                   patch_size=int(full["patch_size"]), num_channels=int(full["num_channels"]),
                   layer_norm_eps=float(full["layer_norm_eps"]), hidden_act=str(full["hidden_act"]))


def param_shapes(cfg: VisionConfig, num_layers: int) -> dict:
    """Shapes of a tower holding its first ``num_layers`` layers, keyed like the param pytree."""
    L, H, I, P = num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.patch_size
    shapes: dict = {"patch_embed": (H, cfg.num_channels, P, P), "pos_embed": (cfg.num_positions, H)}
    if cfg.class_token:
        shapes.update(class_embed=(H,), pre_norm=(H,), pre_norm_bias=(H,))
    else:
        shapes["patch_bias"] = (H,)
    if cfg.post_norm:
        shapes.update(post_norm=(H,), post_norm_bias=(H,))
    shapes["layers"] = {
        "ln1": (L, H), "ln1_bias": (L, H), "wq": (L, H, H), "bq": (L, H), "wk": (L, H, H), "bk": (L, H),
        "wv": (L, H, H), "bv": (L, H), "wo": (L, H, H), "bo": (L, H), "ln2": (L, H), "ln2_bias": (L, H),
        "fc1": (L, I, H), "fc1_bias": (L, I), "fc2": (L, H, I), "fc2_bias": (L, H),
    }
    return shapes


_LAYER_NAMES = {
    "ln1": "layer_norm1.weight", "ln1_bias": "layer_norm1.bias",
    "wq": "self_attn.q_proj.weight", "bq": "self_attn.q_proj.bias",
    "wk": "self_attn.k_proj.weight", "bk": "self_attn.k_proj.bias",
    "wv": "self_attn.v_proj.weight", "bv": "self_attn.v_proj.bias",
    "wo": "self_attn.out_proj.weight", "bo": "self_attn.out_proj.bias",
    "ln2": "layer_norm2.weight", "ln2_bias": "layer_norm2.bias",
    "fc1": "mlp.fc1.weight", "fc1_bias": "mlp.fc1.bias", "fc2": "mlp.fc2.weight", "fc2_bias": "mlp.fc2.bias",
}
_TOP_NAMES = {
    "patch_embed": "embeddings.patch_embedding.weight", "patch_bias": "embeddings.patch_embedding.bias",
    "pos_embed": "embeddings.position_embedding.weight", "class_embed": "embeddings.class_embedding",
    "pre_norm": "pre_layrnorm.weight", "pre_norm_bias": "pre_layrnorm.bias",
    "post_norm": "post_layernorm.weight", "post_norm_bias": "post_layernorm.bias",
}


def hf_tensor_name(path: tuple[str, ...], layer: int | None = None) -> str:
    """The Hugging Face name of a tower parameter, relative to the tower (``vision_tower.`` etc. not included)."""
    if path[0] == "layers":
        return f"encoder.layers.{layer}.{_LAYER_NAMES[path[1]]}"
    return _TOP_NAMES[path[0]]


def layer_norm(x: jax.Array, weight: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    """torch's LayerNorm: biased variance, statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * lax.rsqrt(var + eps)).astype(x.dtype) * weight + bias


def embed_patches(params: Params, cfg: VisionConfig, pixel_values: jax.Array) -> jax.Array:
    """[B, C, S, S] pixels -> [B, num_positions, H]: patch embeddings, class token, positions, pre-norm."""
    b, c, height, width = pixel_values.shape
    if (c, height, width) != (cfg.num_channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"pixel_values have shape {list(pixel_values.shape)}; the vision tower takes "
                         f"[batch, {cfg.num_channels}, {cfg.image_size}, {cfg.image_size}] (resized and cropped "
                         "by the image processor)")
    p, grid = cfg.patch_size, cfg.image_size // cfg.patch_size
    dtype = params["pos_embed"].dtype
    # The stride-p conv as a matmul: each patch flattened channel-major, as the conv weight [H, C, p, p] is.
    patches = pixel_values.astype(dtype).reshape(b, c, grid, p, grid, p).transpose(0, 2, 4, 1, 3, 5)
    x = linear(patches.reshape(b, grid * grid, c * p * p), params["patch_embed"].reshape(cfg.hidden_size, -1),
               params.get("patch_bias"))
    if cfg.class_token:
        x = jnp.concatenate([jnp.broadcast_to(params["class_embed"], (b, 1, cfg.hidden_size)).astype(x.dtype), x],
                            axis=1)
    x = x + params["pos_embed"]
    if cfg.class_token:
        x = layer_norm(x, params["pre_norm"], params["pre_norm_bias"], cfg.layer_norm_eps)
    return x


def encoder_layer(cfg: VisionConfig, lp: Params, x: jax.Array) -> jax.Array:
    """One pre-norm encoder layer: every position attends to every position."""
    b, n, _ = x.shape
    heads, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    h = layer_norm(x, lp["ln1"], lp["ln1_bias"], cfg.layer_norm_eps)
    split = lambda y: y.reshape(b, n, heads, d)
    q, k, v = (split(linear(h, lp[w], lp[bias])) for w, bias in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)
    x = x + linear(attn.reshape(b, n, -1), lp["wo"], lp["bo"])
    h = layer_norm(x, lp["ln2"], lp["ln2_bias"], cfg.layer_norm_eps)
    return x + linear(activation(cfg.hidden_act)(linear(h, lp["fc1"], lp["fc1_bias"])), lp["fc2"], lp["fc2_bias"])


def hidden_states(params: Params, cfg: VisionConfig, pixel_values: jax.Array) -> jax.Array:
    """[layers held + 1, B, num_positions, H]: the embeddings, then each held layer's output.

    Index k is transformers' ``hidden_states[k]`` (``pre_layrnorm``'s output at 0, no final norm).
    """
    x = embed_patches(params, cfg, pixel_values)
    _, outputs = lax.scan(lambda x, lp: (encoder_layer(cfg, lp, x),) * 2, x, params["layers"])
    return jnp.concatenate([x[None], outputs], axis=0)


def last_hidden_state(params: Params, cfg: VisionConfig, pixel_values: jax.Array) -> jax.Array:
    """[B, num_positions, H]: the last layer's output through the final LayerNorm (towers with ``post_norm``)."""
    x, _ = lax.scan(lambda x, lp: (encoder_layer(cfg, lp, x), None), embed_patches(params, cfg, pixel_values),
                    params["layers"])
    return layer_norm(x, params["post_norm"], params["post_norm_bias"], cfg.layer_norm_eps)
