"""Image preprocessing in numpy and Pillow, equal to transformers' CLIP / LLaVA / SigLIP image processors
(``ImageProcessorConfig``, ``preprocess``) and its Idefics3 / SmolVLM tiling (``TileProcessorConfig``,
``preprocess_tiles``).

The steps and their order are those of transformers' PIL backend (``CLIPImageProcessorPil``,
``LlavaImageProcessorPil``): convert to RGB (transparency over white), optionally pad to a
square with the mean colour (LLaVA's ``do_pad``), resize with Pillow (the shortest edge to
``size["shortest_edge"]``, the long edge truncated, or to a fixed height and width), center
crop (zero-padding an image smaller than the crop), rescale in float64 then cast to float32,
normalize in float32, channels first. Same arithmetic in the same precision, so the pixels are
bit-identical to transformers' (``tests/test_vlm.py``); transformers' torchvision ("fast")
processor resizes differently and is not the reference.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from specjax.models.safetensors_io import CheckpointError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as preprocessor_config.json stores it

ImageInput = Union[Image.Image, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """A ``preprocessor_config.json``; the defaults are CLIPImageProcessor's."""

    do_resize: bool = True
    shortest_edge: Optional[int] = 224  # resize the shortest edge to this ...
    resize_to: Optional[tuple[int, int]] = None  # ... or to this (height, width)
    resample: int = BICUBIC
    do_center_crop: bool = True
    crop_size: tuple[int, int] = (224, 224)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    do_pad: bool = False  # LLaVA: pad to a square with the mean colour before resizing

    @classmethod
    def from_dict(cls, d: dict) -> "ImageProcessorConfig":
        """From a ``preprocessor_config.json`` dict. SigLIP processors default to a fixed 224 x 224 resize,
        no crop, mean and std 0.5."""
        siglip = str(d.get("image_processor_type", "")).startswith("Siglip")
        size = d.get("size", {"height": 224, "width": 224} if siglip else {"shortest_edge": 224})
        if isinstance(size, int):  # old configs: an int is the shortest edge
            size = {"shortest_edge": size}
        crop = d.get("crop_size", 224)
        crop = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
        if "shortest_edge" in size:
            shortest, resize_to = int(size["shortest_edge"]), None
        elif "height" in size and "width" in size:
            shortest, resize_to = None, (int(size["height"]), int(size["width"]))
        else:
            raise CheckpointError(f"image processor size {size} is not supported (shortest_edge, or height and width)")
        half = (0.5, 0.5, 0.5)
        return cls(do_resize=bool(d.get("do_resize", True)), shortest_edge=shortest, resize_to=resize_to,
                   resample=int(d.get("resample", BICUBIC)), do_center_crop=bool(d.get("do_center_crop", not siglip)),
                   crop_size=crop, do_rescale=bool(d.get("do_rescale", True)),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(d.get("do_normalize", True)),
                   image_mean=tuple(d.get("image_mean", half if siglip else OPENAI_CLIP_MEAN)),
                   image_std=tuple(d.get("image_std", half if siglip else OPENAI_CLIP_STD)),
                   do_pad=bool(d.get("do_pad", False)))



def to_rgb(image: ImageInput) -> Image.Image:
    """An RGB Pillow image; transparency is composited over white, as transformers does."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3):
            raise ValueError(f"an image array must be uint8 [height, width] or [height, width, channels], got "
                             f"{image.dtype}{list(image.shape)}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"an image must be a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def pad_to_square(pixels: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    """[H, W, C] centered on a square of ``color`` whose side is the longest edge (LLaVA's ``do_pad``)."""
    h, w, c = pixels.shape
    if h == w:
        return pixels
    side = max(h, w)
    out = np.empty((side, side, c), pixels.dtype)
    out[...] = np.asarray(color, pixels.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    out[top: top + h, left: left + w] = pixels
    return out


def resized_shape(height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """(height, width) after the resize: the shortest edge to ``shortest_edge``, the other truncated."""
    if cfg.resize_to is not None:
        return cfg.resize_to
    short, long = min(height, width), max(height, width)
    new_long = int(cfg.shortest_edge * long / short)
    return (new_long, cfg.shortest_edge) if width <= height else (cfg.shortest_edge, new_long)


def center_crop(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The centered [h, w] window of [H, W, C]; an axis shorter than the window is zero-padded around it."""
    for axis, want in enumerate(size):
        have = pixels.shape[axis]
        if have >= want:
            start = (have - want) // 2
            pixels = np.take(pixels, np.arange(start, start + want), axis=axis)
        else:
            before = math.ceil((want - have) / 2)
            pad = [(0, 0)] * pixels.ndim
            pad[axis] = (before, want - have - before)
            pixels = np.pad(pixels, pad)
    return pixels


def normalized(pixels: np.ndarray, cfg) -> np.ndarray:
    """[H, W, C] uint8 -> float32 [C, H, W], rescaled in float64 and normalized in float32 as transformers does."""
    out = (pixels.astype(np.float64) * cfg.rescale_factor).astype(np.float32) if cfg.do_rescale \
        else pixels.astype(np.float32)
    if cfg.do_normalize:
        out = (out - np.asarray(cfg.image_mean, np.float32)) / np.asarray(cfg.image_std, np.float32)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def preprocess_one(image: ImageInput, cfg: ImageProcessorConfig) -> np.ndarray:
    """One image -> float32 [3, H, W], as transformers' PIL-backend processor computes it."""
    rgb = to_rgb(image)
    if cfg.do_pad:
        color = tuple(int(m * 255) for m in cfg.image_mean)
        rgb = Image.fromarray(pad_to_square(np.asarray(rgb), color))
    if cfg.do_resize:
        h, w = resized_shape(rgb.height, rgb.width, cfg)
        rgb = rgb.resize((w, h), resample=cfg.resample)
    pixels = np.asarray(rgb)
    if cfg.do_center_crop:
        pixels = center_crop(pixels, cfg.crop_size)
    return normalized(pixels, cfg)


def preprocess(images: Sequence[ImageInput], cfg: ImageProcessorConfig) -> np.ndarray:
    """float32 [N, 3, H, W] pixel values of ``images`` (all must come out the same size)."""
    arrays = [preprocess_one(image, cfg) for image in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"preprocessed images differ in size ({sorted(shapes)}); without a center crop or a fixed "
                         "resize they cannot be batched")
    return np.stack(arrays) if arrays else np.zeros((0, 3) + cfg.crop_size, np.float32)


# ------------------------------------------------------------------ Idefics3 / SmolVLM: tiles

LANCZOS = 1  # PIL.Image.Resampling.LANCZOS
MAX_IMAGE_SIZE = 4096  # transformers' cap on the resized longest edge


@dataclasses.dataclass(frozen=True)
class TileProcessorConfig:
    """An Idefics3 / SmolVLM ``preprocessor_config.json``; the defaults are SmolVLMImageProcessor's."""

    do_resize: bool = True
    longest_edge: int = 4 * 364  # the whole image's longest edge is resized to this ...
    tile_size: int = 364  # ... then cut into tiles of this side (``max_image_size``), plus a global view
    resample: int = LANCZOS
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, d: dict) -> "TileProcessorConfig":
        defaults = cls()
        return cls(do_resize=bool(d.get("do_resize", True)),
                   longest_edge=int((d.get("size") or {}).get("longest_edge", defaults.longest_edge)),
                   tile_size=int((d.get("max_image_size") or {}).get("longest_edge", defaults.tile_size)),
                   resample=int(d.get("resample", LANCZOS)),
                   do_image_splitting=bool(d.get("do_image_splitting", True)),
                   do_rescale=bool(d.get("do_rescale", True)), rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   do_normalize=bool(d.get("do_normalize", True)),
                   image_mean=tuple(d.get("image_mean", defaults.image_mean)),
                   image_std=tuple(d.get("image_std", defaults.image_std)))


def longest_edge_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """(height, width) with the longest edge at ``longest``, the other scaled and rounded up to even, then
    both capped at 4096 (transformers' ``get_resize_output_image_size`` for Idefics3)."""
    aspect = width / height
    if width >= height:
        width, height = longest, int(longest / aspect)
        height += height % 2
    else:
        height, width = longest, int(longest * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect)
    return max(height, 1), max(width, 1)


def tile_grid_shape(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) rounded up to whole tiles, the short edge from the aspect ratio first."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def preprocess_tiles(image: ImageInput, cfg: TileProcessorConfig) -> tuple[np.ndarray, int, int]:
    """One image -> (float32 [n_tiles, 3, tile, tile], rows, cols), as transformers' PIL-backend
    SmolVLM / Idefics3 processors compute it.

    A large image is cut into rows x cols tiles (row-major) followed by the whole image resized to one
    tile (the global view); an image that fits one tile, or ``do_image_splitting=False``, is that one
    tile, with rows = cols = 0. Each tile is one "image" of ``tokens_per_image`` image tokens.
    """
    rgb = to_rgb(image)
    if cfg.do_resize:
        h, w = longest_edge_shape(rgb.height, rgb.width, cfg.longest_edge)
        rgb = rgb.resize((w, h), resample=cfg.resample)
    t = cfg.tile_size
    if not cfg.do_image_splitting:
        return normalized(np.asarray(rgb.resize((t, t), resample=cfg.resample)), cfg)[None], 0, 0
    h, w = tile_grid_shape(rgb.height, rgb.width, t)
    rgb = rgb.resize((w, h), resample=cfg.resample)
    if h <= t and w <= t:
        return normalized(np.asarray(rgb), cfg)[None], 0, 0
    rows, cols, pixels = h // t, w // t, np.asarray(rgb)
    tiles = [pixels[r * t: (r + 1) * t, c * t: (c + 1) * t] for r in range(rows) for c in range(cols)]
    tiles.append(np.asarray(rgb.resize((t, t), resample=cfg.resample)))
    return np.stack([normalized(tile, cfg) for tile in tiles]), rows, cols


def read_image_processor(model_dir: str) -> Union[ImageProcessorConfig, TileProcessorConfig, None]:
    """The directory's ``preprocessor_config.json`` (a ``TileProcessorConfig`` for Idefics3 / SmolVLM), or None."""
    path = os.path.join(model_dir, "preprocessor_config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e
    tiled = str(d.get("image_processor_type", "")).startswith(("SmolVLM", "Idefics3"))
    return TileProcessorConfig.from_dict(d) if tiled else ImageProcessorConfig.from_dict(d)
