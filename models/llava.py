"""The LLaVA layout (``LlavaForConditionalGeneration``): vision tower, projector, and a decoder LM.

An image becomes ``tokens_per_image`` embeddings: the tower's hidden states at the
configured feature layer(s) (``vision_feature_layer``; several are concatenated on
the feature axis), the class token dropped unless the strategy is "full", then the
projector (linear, activation, linear) into the text model's width. They replace,
in order, the embeddings of the prompt's image tokens (``image_token_id``, one per
image embedding: a processor expands each ``<image>`` to ``tokens_per_image`` of
them, ``expand_image_tokens``). The decoder then runs on those embeddings: the
prefill takes them as ``input_embeds`` (``specjax.engine.steps.prefill``), and
the cache and the decoding steps are the text model's, unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from specjax.models import vision
from specjax.models.config import ModelConfig, UnsupportedModelError
from specjax.models.decoder import Params, linear
from specjax.models.image_processing import ImageProcessorConfig
from specjax.models.loading import (Model, _checked_dtype, _checkpoint_dtype, _lookup, _with_generation_eos,
                                    assemble_params, hf_tensor_name, load_tokenizer, open_weight_files,
                                    read_chat_strings, resolve_auto_dtype)
from specjax.models.safetensors_io import CheckpointError, SafetensorsFile

_STRATEGIES = ("default", "full")
_TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class LlavaConfig:
    """Static description of a LLaVA model (hashable: a jit static argument)."""

    text: ModelConfig
    vision: vision.VisionConfig
    image_token_id: int
    feature_layers: tuple[int, ...] = (-2,)  # as in config.json: indices into the tower's hidden states
    select_strategy: str = "default"  # "default" drops the class token, "full" keeps it
    projector_act: str = "gelu"
    projector_bias: bool = True

    def __post_init__(self):
        if self.select_strategy not in _STRATEGIES:
            raise UnsupportedModelError(f"vision_feature_select_strategy {self.select_strategy!r} is not "
                                        f"supported ({', '.join(_STRATEGIES)})")
        vision.activation(self.projector_act)
        n = self.vision.num_layers + 1
        bad = [k for k in self.feature_layers if not -n <= k < n]
        if bad or not self.feature_layers:
            raise ValueError(f"vision_feature_layer {list(self.feature_layers)} must index the tower's {n} hidden "
                             f"states (the embeddings and {n - 1} layers)")

    @property
    def resolved_feature_layers(self) -> tuple[int, ...]:
        """The feature layers as non-negative hidden-state indices (-2 of 24 layers is 23)."""
        return tuple(k % (self.vision.num_layers + 1) for k in self.feature_layers)

    @property
    def vision_layers_used(self) -> int:
        """How many tower layers feed the features: the rest are never run (nor loaded)."""
        return max(self.resolved_feature_layers)

    @property
    def tokens_per_image(self) -> int:
        """Image embeddings (and image tokens in the prompt) per image."""
        return self.vision.num_positions - int(self.select_strategy == "default")

    @classmethod
    def from_hf(cls, hf: dict) -> "LlavaConfig":
        """Build from a LLaVA ``config.json`` dict (transformers 4.x or 5.x)."""
        if hf.get("model_type") != "llava":
            raise UnsupportedModelError(f"model_type {hf.get('model_type')!r} is not a LLaVA model ('llava')")
        text_hf = dict(hf.get("text_config") or {})
        missing = [k for k in _TEXT_FIELDS if k not in text_hf]
        if missing:
            raise CheckpointError(f"text_config has no {', '.join(missing)}: configs that leave the text model's "
                                  "sizes to transformers' defaults are not supported; write them out")
        text_hf.setdefault("model_type", "llama")
        # transformers ties the LM head when either the top level or the text config says so.
        text_hf["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings")) or bool(text_hf.get("tie_word_embeddings"))
        layers = hf.get("vision_feature_layer", -2)
        image_token = hf.get("image_token_id", hf.get("image_token_index"))
        if image_token is None:
            raise CheckpointError("config.json names no image_token_id / image_token_index")
        return cls(text=ModelConfig.from_hf(text_hf), vision=vision.VisionConfig.from_hf(hf.get("vision_config") or {}),
                   image_token_id=int(image_token),
                   feature_layers=tuple(int(k) for k in (layers if isinstance(layers, (list, tuple)) else [layers])),
                   select_strategy=hf.get("vision_feature_select_strategy", "default"),
                   projector_act=hf.get("projector_hidden_act", "gelu"),
                   projector_bias=bool(hf.get("multimodal_projector_bias", True)))


def projector_shapes(cfg: LlavaConfig) -> dict:
    """The projector's shapes: [text H, vision H x feature layers] then [text H, text H] (+ biases)."""
    h, v = cfg.text.hidden_size, cfg.vision.hidden_size * len(cfg.feature_layers)
    shapes = {"w1": (h, v), "w2": (h, h)}
    if cfg.projector_bias:
        shapes.update(b1=(h,), b2=(h,))
    return shapes


def project(params: Params, cfg: LlavaConfig, features: jax.Array) -> jax.Array:
    """The multi-modal projector: linear, activation, linear (vision features -> text embeddings)."""
    h = vision.activation(cfg.projector_act)(linear(features, params["w1"], params.get("b1")))
    return linear(h, params["w2"], params.get("b2"))


def select_features(cfg: LlavaConfig, hidden: jax.Array) -> jax.Array:
    """[n, num_positions, H] per feature layer (from ``vision.hidden_states``) -> the projector's input."""
    picked = [hidden[k] for k in cfg.resolved_feature_layers]
    if cfg.select_strategy == "default":  # transformers drops position 0 whatever the tower (class token in CLIP)
        picked = [h[:, 1:] for h in picked]
    return jnp.concatenate(picked, axis=-1)


def image_features(params: Params, cfg: LlavaConfig, pixel_values: jax.Array) -> jax.Array:
    """[n_images, C, S, S] preprocessed pixels -> [n_images, tokens_per_image, text H]."""
    hidden = vision.hidden_states(params["vision"], cfg.vision, pixel_values)
    return project(params["projector"], cfg, select_features(cfg, hidden))


def image_token_mask(cfg: LlavaConfig, tokens: jax.Array, lengths: Optional[jax.Array] = None) -> jax.Array:
    """bool[B, P]: the image tokens among each row's real (``< lengths[b]``) positions."""
    mask = tokens == cfg.image_token_id
    if lengths is not None:
        mask = mask & (jnp.arange(tokens.shape[1])[None, :] < jnp.asarray(lengths)[:, None])
    return mask


def merge_image_features(embeds: jax.Array, mask: jax.Array, features: jax.Array) -> jax.Array:
    """Put features [n_images, n, H], flattened in order, at the ``mask``ed positions of embeds [B, P, H].

    Row-major, as transformers' ``masked_scatter``: image i of the batch fills the i-th
    run of n image tokens. Counts must agree (``check_image_tokens``); traced inputs
    cannot be checked, and surplus tokens would read clamped rows.
    """
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    order = jnp.cumsum(mask.reshape(-1)) - 1  # the k-th image token takes feature row k
    picked = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(embeds.shape)
    return jnp.where(mask[..., None], picked, embeds)


def input_embeddings(params: Params, cfg: LlavaConfig, tokens: jax.Array, pixel_values: Optional[jax.Array],
                     lengths: Optional[jax.Array] = None) -> jax.Array:
    """[B, P, text H]: the prompt's token embeddings with the images' features at its image tokens.

    ``params`` holds "text", "vision" and "projector". Pure and jittable; check concrete inputs
    with ``check_image_tokens`` first (``prompt_embeddings`` does both).
    """
    embeds = params["text"]["embed"][tokens]
    if pixel_values is None or pixel_values.shape[0] == 0:
        return embeds
    features = image_features(params, cfg, pixel_values)
    return merge_image_features(embeds, image_token_mask(cfg, tokens, lengths), features)


def check_image_tokens(cfg: LlavaConfig, tokens, lengths, num_images: int) -> None:
    """Host check that the prompts hold exactly one run of ``tokens_per_image`` image tokens per image.

    Counts per row, so an image never straddles two rows; raises ValueError naming the counts.
    """
    tokens = np.asarray(tokens)
    mask = tokens == cfg.image_token_id
    if lengths is not None:
        mask &= np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]
    per_row, n = mask.sum(axis=1), cfg.tokens_per_image
    if per_row.sum() != num_images * n:
        raise ValueError(f"the prompts hold {int(per_row.sum())} image tokens (id {cfg.image_token_id}) but "
                         f"{num_images} image(s) give {num_images * n} features ({n} per image); expand each "
                         "image placeholder to tokens_per_image tokens (expand_image_tokens)")
    odd = np.flatnonzero(per_row % n)
    if odd.size:
        raise ValueError(f"row {int(odd[0])} holds {int(per_row[odd[0]])} image tokens, not a multiple of the "
                         f"{n} tokens of one image")


_embeddings_jit = jax.jit(input_embeddings, static_argnames=("cfg",))


def prompt_embeddings(params: Params, cfg: LlavaConfig, tokens, lengths, pixel_values) -> jax.Array:
    """The host entry point: ``check_image_tokens``, then the jitted ``input_embeddings``, ready for
    ``prefill(..., input_embeds=)``. ``pixel_values`` [n_images, C, S, S] (``image_processing.preprocess``)
    or None."""
    n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    check_image_tokens(cfg, tokens, lengths, n_images)
    pixels = None if pixel_values is None else jnp.asarray(pixel_values)
    return _embeddings_jit(params, cfg=cfg, tokens=jnp.asarray(tokens), pixel_values=pixels,
                           lengths=jnp.asarray(lengths))


def expand_image_tokens(ids: Sequence[int], cfg: LlavaConfig) -> list[int]:
    """Each image token of ``ids`` repeated ``tokens_per_image`` times (what transformers' processor does to
    the text's ``<image>``)."""
    out: list[int] = []
    for t in ids:
        out.extend([t] * cfg.tokens_per_image if t == cfg.image_token_id else [t])
    return out


# ------------------------------------------------------------------ loading


@dataclasses.dataclass
class VisionLanguageModel:
    """A loaded LLaVA model: ``params`` holds "text" (the decoder's pytree), "vision" and "projector".

    A pytree like ``Model`` (params the leaves, the rest static). ``text_model()`` is the decoder
    alone as a ``Model``, for everything that decodes: after the prefill the images live in the
    KV cache, and every step is the text model's.
    """

    config: LlavaConfig
    params: Params
    tokenizer: Any = None
    path: Optional[str] = None
    image_processor: Optional[ImageProcessorConfig] = None
    chat_template: Optional[str] = None
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None

    def text_model(self) -> Model:
        return Model(config=self.config.text, params=self.params["text"], tokenizer=self.tokenizer, path=self.path,
                     chat_template=self.chat_template, bos_token=self.bos_token, eos_token=self.eos_token)


jax.tree_util.register_dataclass(
    VisionLanguageModel, data_fields=["params"],
    meta_fields=[f.name for f in dataclasses.fields(VisionLanguageModel) if f.name != "params"])

# Where each part's tensors live: transformers 4.x / hub checkpoints first, then transformers 5's own names.
_VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                    "model.vision_tower.")
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_LM_HEAD_NAMES = ("language_model.lm_head.weight", "lm_head.weight")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
_PROJECTOR_NAMES = {"w1": "linear_1.weight", "b1": "linear_1.bias", "w2": "linear_2.weight", "b2": "linear_2.bias"}


def _prefix(tensors: dict[str, SafetensorsFile], prefixes: Sequence[str], probe: str, part: str) -> str:
    """The first of ``prefixes`` under which the checkpoint holds ``probe``."""
    for prefix in prefixes:
        if prefix + probe in tensors:
            return prefix
    raise CheckpointError(f"no {part} weights in the checkpoint: expected a tensor named "
                          f"{' or '.join(repr(p + probe) for p in prefixes)}")


def _text_reader(tensors: dict[str, SafetensorsFile]):
    """``assemble_params``' reader for the decoder, its names moved under the LLaVA prefix in use."""
    prefix = _prefix(tensors, _TEXT_PREFIXES, "embed_tokens.weight", "language model")
    head = next((n for n in _LM_HEAD_NAMES if n in tensors), _LM_HEAD_NAMES[0])

    def read(path, layer, shape):
        name = hf_tensor_name(path, layer)
        name = head if name == "lm_head.weight" else prefix + name.removeprefix("model.")
        return _lookup(tensors, name, shape)

    return read


def _read_tree(shapes: dict, name_of, tensors: dict[str, SafetensorsFile], np_dtype) -> Params:
    """A param tree of ``shapes`` read by ``name_of(path, layer)``, layers stacked, on device."""
    def build(path, shape):
        if path[0] != "layers":
            return jax.device_put(_lookup(tensors, name_of(path, None), shape).astype(np_dtype))
        out = np.empty(shape, np_dtype)
        for layer in range(shape[0]):
            out[layer] = _lookup(tensors, name_of(path, layer), shape[1:])
        return jax.device_put(out)

    return {key: ({name: build((key, name), s) for name, s in value.items()} if key == "layers"
                  else build((key,), value)) for key, value in shapes.items()}


def read_llava_config(model_dir: str) -> LlavaConfig:
    """config.json of a LLaVA directory (generation_config.json's EOS ids override the text model's)."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    cfg = LlavaConfig.from_hf(hf)
    return dataclasses.replace(cfg, text=_with_generation_eos(model_dir, cfg.text))


def load_llava(model_dir: Union[str, os.PathLike], dtype="auto") -> VisionLanguageModel:
    """A LLaVA Hugging Face directory (config.json + safetensors) as a ``VisionLanguageModel``.

    Reads hub (transformers 4.x) and transformers 5 tensor names. The tower's layers past the
    deepest feature layer are not loaded (never run). ``dtype`` as in ``load_model``; the image
    processor comes from ``preprocessor_config.json`` when the directory has one.
    """
    model_dir = os.path.expanduser(os.fspath(model_dir))
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist")
    dtype = _checked_dtype(dtype)
    cfg = read_llava_config(model_dir)
    if dtype == "auto":
        dtype = resolve_auto_dtype(_checkpoint_dtype(model_dir))
    np_dtype = np.dtype(jnp.dtype(dtype))
    tensors = open_weight_files(model_dir)
    vision_prefix = _prefix(tensors, _VISION_PREFIXES, vision.hf_tensor_name(("patch_embed",)), "vision tower")
    projector_prefix = _prefix(tensors, _PROJECTOR_PREFIXES, _PROJECTOR_NAMES["w1"], "multi-modal projector")
    params = {
        "text": assemble_params(cfg.text, _text_reader(tensors), dtype),
        "vision": _read_tree(vision.param_shapes(cfg.vision, cfg.vision_layers_used),
                             lambda path, layer: vision_prefix + vision.hf_tensor_name(path, layer), tensors, np_dtype),
        "projector": _read_tree(projector_shapes(cfg), lambda path, _: projector_prefix + _PROJECTOR_NAMES[path[0]],
                                tensors, np_dtype),
    }
    return VisionLanguageModel(config=cfg, params=params, tokenizer=load_tokenizer(model_dir), path=model_dir,
                               image_processor=ImageProcessorConfig.from_dir(model_dir),
                               **read_chat_strings(model_dir))
