"""The LLaVA layout (``LlavaForConditionalGeneration``): vision tower, projector, and a decoder LM.

An image becomes ``tokens_per_image`` embeddings: the tower's hidden states at the
configured feature layer(s) (``vision_feature_layer``; several are concatenated on
the feature axis), the class token dropped unless the strategy is "full", then the
projector (linear, activation, linear) into the text model's width. They enter the
prompt at its image tokens (``specjax.models.multimodal``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Union

import jax
import jax.numpy as jnp

from specjax.models import vision
from specjax.models.config import ModelConfig, UnsupportedModelError
from specjax.models.decoder import Params, linear
from specjax.models.multimodal import Checkpoint, VisionLanguageModel, text_config_dict
from specjax.models.safetensors_io import CheckpointError

_STRATEGIES = ("default", "full")


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

    def image_features(self, params: Params, pixel_values: jax.Array) -> jax.Array:
        """The layout's image path (``multimodal.input_embeddings`` calls it): see ``image_features``."""
        return image_features(params, self, pixel_values)

    @classmethod
    def from_hf(cls, hf: dict) -> "LlavaConfig":
        """Build from a LLaVA ``config.json`` dict (transformers 4.x or 5.x)."""
        if hf.get("model_type") != "llava":
            raise UnsupportedModelError(f"model_type {hf.get('model_type')!r} is not a LLaVA model ('llava')")
        layers = hf.get("vision_feature_layer", -2)
        image_token = hf.get("image_token_id", hf.get("image_token_index"))
        if image_token is None:
            raise CheckpointError("config.json names no image_token_id / image_token_index")
        return cls(text=ModelConfig.from_hf(text_config_dict(hf)),
                   vision=vision.VisionConfig.from_hf(hf.get("vision_config") or {}), image_token_id=int(image_token),
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


# ------------------------------------------------------------------ loading


# Where each part's tensors live: transformers 4.x / hub checkpoints first, then transformers 5's own names.
_VISION_PREFIXES = ("vision_tower.vision_model.", "vision_tower.", "model.vision_tower.vision_model.",
                    "model.vision_tower.")
_TEXT_PREFIXES = ("language_model.model.", "model.language_model.")
_LM_HEAD_NAMES = ("language_model.lm_head.weight", "lm_head.weight")
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
_PROJECTOR_NAMES = {"w1": "linear_1.weight", "b1": "linear_1.bias", "w2": "linear_2.weight", "b2": "linear_2.bias"}


def load_llava(model_dir: Union[str, os.PathLike], dtype="auto") -> VisionLanguageModel:
    """A LLaVA Hugging Face directory (config.json + safetensors) as a ``VisionLanguageModel``.

    Reads hub (transformers 4.x) and transformers 5 tensor names. The tower's layers past the
    deepest feature layer are not loaded (never run). ``dtype`` as in ``load_model``; the image
    processor comes from ``preprocessor_config.json`` when the directory has one.
    """
    ckpt = Checkpoint(model_dir, dtype, LlavaConfig.from_hf)
    cfg = ckpt.config
    tower = ckpt.prefix(_VISION_PREFIXES, vision.hf_tensor_name(("patch_embed",)), "vision tower")
    projector = ckpt.prefix(_PROJECTOR_PREFIXES, _PROJECTOR_NAMES["w1"], "multi-modal projector")
    return ckpt.model({
        "text": ckpt.text_params(_TEXT_PREFIXES, _LM_HEAD_NAMES),
        "vision": ckpt.tree(vision.param_shapes(cfg.vision, cfg.vision_layers_used),
                            lambda path, layer: tower + vision.hf_tensor_name(path, layer)),
        "projector": ckpt.tree(projector_shapes(cfg), lambda path, _: projector + _PROJECTOR_NAMES[path[0]]),
    })
