"""The Idefics3 / SmolVLM layout: a SigLIP tower, the pixel-shuffle connector, and a Llama decoder.

Chosen as the second, modern layout (over llava-onevision) because it is the one the
smallest real VLMs use (SmolVLM-256M / 500M run on a CPU, and the issue's tiny VLM
wants a small connector), and because its connector is static: pixel shuffle folds
each ``scale_factor`` x ``scale_factor`` block of patches into one token (a reshape),
then one linear map without bias, so every tile gives the same number of image
tokens, ``(image_size / patch_size)^2 / scale_factor^2``. llava-onevision's anyres
tiling unpads each image to its aspect ratio and adds newline tokens: a
data-dependent token count per image.

An image reaches the model as tiles of ``image_size`` x ``image_size``
(``image_processing.preprocess_tiles``: a large image's grid of tiles plus a downscaled
global view, each a separate "image" here with its run of image tokens in the prompt).
transformers' processors only ever give whole tiles: their ``pixel_attention_mask``
marks all-zero padding tiles of a batch, which are simply not passed here. The tower's
bucketed positions and masked attention for partial tiles are not implemented.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Union

import jax

from specjax.models import vision
from specjax.models.config import ModelConfig, UnsupportedModelError
from specjax.models.decoder import Params, linear
from specjax.models.multimodal import Checkpoint, VisionLanguageModel, text_config_dict
from specjax.models.safetensors_io import CheckpointError

MODEL_TYPES = ("idefics3", "smolvlm")


@dataclasses.dataclass(frozen=True)
class Idefics3Config:
    """Static description of an Idefics3 / SmolVLM model (hashable: a jit static argument)."""

    text: ModelConfig
    vision: vision.VisionConfig
    image_token_id: int
    scale_factor: int = 2

    def __post_init__(self):
        grid = self.vision.image_size // self.vision.patch_size
        if grid % self.scale_factor:
            raise UnsupportedModelError(f"scale_factor {self.scale_factor} does not divide the tower's "
                                        f"{grid} x {grid} patch grid")

    @property
    def vision_layers_used(self) -> int:
        return self.vision.num_layers

    @property
    def tokens_per_image(self) -> int:
        """Image tokens per tile: the patches, folded ``scale_factor^2`` to a token."""
        return self.vision.num_patches // self.scale_factor ** 2

    def image_features(self, params: Params, pixel_values: jax.Array) -> jax.Array:
        """The layout's image path (``multimodal.input_embeddings`` calls it): see ``image_features``."""
        return image_features(params, self, pixel_values)

    @classmethod
    def from_hf(cls, hf: dict) -> "Idefics3Config":
        """Build from an Idefics3 or SmolVLM ``config.json`` dict."""
        if hf.get("model_type") not in MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {hf.get('model_type')!r} is not an Idefics3 layout "
                                        f"({', '.join(MODEL_TYPES)})")
        vision_hf = {"model_type": f"{hf['model_type']}_vision", **(hf.get("vision_config") or {})}
        if "image_token_id" not in hf:
            raise CheckpointError("config.json names no image_token_id")
        return cls(text=ModelConfig.from_hf(text_config_dict(hf)), vision=vision.VisionConfig.from_hf(vision_hf),
                   image_token_id=int(hf["image_token_id"]), scale_factor=int(hf.get("scale_factor", 2)))


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
    """[N, g*g, H] patches -> [N, (g/s)^2, s*s*H]: each s x s block of patches becomes one token.

    transformers' ``Idefics3Connector.pixel_shuffle`` step for step (its views and permutes
    fix the order of the s*s*H features).
    """
    n, seq, h = x.shape
    g = int(round(seq ** 0.5))
    x = x.reshape(n, g, g // scale, h * scale).transpose(0, 2, 1, 3)
    x = x.reshape(n, g // scale, g // scale, h * scale * scale).transpose(0, 2, 1, 3)
    return x.reshape(n, seq // scale ** 2, h * scale * scale)


def image_features(params: Params, cfg: Idefics3Config, pixel_values: jax.Array) -> jax.Array:
    """[n_tiles, C, S, S] preprocessed pixels -> [n_tiles, tokens_per_image, text H]."""
    hidden = vision.last_hidden_state(params["vision"], cfg.vision, pixel_values)
    return linear(pixel_shuffle(hidden, cfg.scale_factor), params["connector"]["proj"])


def image_prompt_string(rows: int, cols: int, tokens_per_image: int, image_token: str = "<image>",
                        fake_token: str = "<fake_token_around_image>", global_token: str = "<global-img>") -> str:
    """The text that stands for one image's tiles (``preprocess_tiles``' rows and cols) in a prompt, as
    transformers' SmolVLM processor writes it: each tile's ``<row_r_col_c>`` and image tokens, then the
    global view's; a single tile (rows = cols = 0) is the global view alone."""
    run = image_token * tokens_per_image
    text = "".join(f"{fake_token}<row_{r + 1}_col_{c + 1}>{run}" + ("\n" if c == cols - 1 else "")
                   for r in range(rows) for c in range(cols))
    return text + ("\n" if rows or cols else "") + f"{fake_token}{global_token}{run}{fake_token}"


def connector_shapes(cfg: Idefics3Config) -> dict:
    return {"proj": (cfg.text.hidden_size, cfg.vision.hidden_size * cfg.scale_factor ** 2)}


_TEXT_PREFIXES = ("model.text_model.",)
_LM_HEAD_NAMES = ("lm_head.weight",)
_VISION_PREFIXES = ("model.vision_model.",)
_CONNECTOR_NAME = "model.connector.modality_projection.proj.weight"


def load_idefics3(model_dir: Union[str, os.PathLike], dtype="auto") -> VisionLanguageModel:
    """An Idefics3 or SmolVLM Hugging Face directory (config.json + safetensors) as a ``VisionLanguageModel``
    (``dtype`` as in ``load_model``)."""
    ckpt = Checkpoint(model_dir, dtype, Idefics3Config.from_hf)
    cfg = ckpt.config
    tower = ckpt.prefix(_VISION_PREFIXES, vision.hf_tensor_name(("patch_embed",)), "vision tower")
    return ckpt.model({
        "text": ckpt.text_params(_TEXT_PREFIXES, _LM_HEAD_NAMES),
        "vision": ckpt.tree(vision.param_shapes(cfg.vision, cfg.vision_layers_used),
                            lambda path, layer: tower + vision.hf_tensor_name(path, layer)),
        "connector": ckpt.tree(connector_shapes(cfg), lambda path, _: _CONNECTOR_NAME),
    })
