"""Image tokens for the class-conditional image generators: program-drawn digits, a fixed
patch/palette quantizer, and the token vocabulary the decoders read and write.

Why a fixed quantizer and not a VQ autoencoder: a VQ-VAE worth having needs an encoder, a
decoder and a codebook trained for hours with tricks against codebook collapse; on a shared
2-core CPU that budget goes to the two decoders instead. A fixed quantizer is also exact and
deterministic: the same image always gives the same tokens on every machine, so tests can
compare token grids bit for bit, and the codebook's geometry is known in closed form, which
the pooled acceptance rule needs ("codebook neighbours" are palette colours near each other).

- **Images**: 32 x 32 RGB seven-segment digits (``draw_digits``), 10 classes, drawn by numpy
  in the class's colour on a random dark background (both palette colours), with a random
  box size, stroke width and position: a class is a distribution over images, not one image.
- **Codebook**: a palette of ``levels ** 3`` RGB colours on a grid (4 levels: 64 entries).
  Entry ``i`` has integer coordinates ``(r, g, b)`` in ``[0, levels)``; its colour is
  ``coordinate * 255 / (levels - 1)``. Neighbours within ``radius`` are entries whose
  coordinates lie within that Euclidean distance (radius 1: itself and the 6 face neighbours).
- **Tokens**: an image at grid ``g`` is cut into ``32 / g``-pixel square patches; each patch
  becomes the palette entry nearest its mean colour. Two grids share one palette (8 x 8 and
  16 x 16 here), so a low-resolution token is a proposal for the high-resolution patches it
  covers (``upsample_nearest``). ``decode`` paints each patch with its entry's colour.
- **Vocabulary**: ``[codebook | class tokens | bos]``; a prompt is ``[bos, class token]`` and
  the model's output is the raster-order grid (row by row, left to right).
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_SIZE = 32
NUM_CLASSES = 10
LEVELS = 4

# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom),
# e (bottom left), f (top left), g (middle).
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abged", 3: "abgcd", 4: "fgbc", 5: "afgcd", 6: "afgedc", 7: "abc",
            8: "abcdefg", 9: "abcdfg"}
# Colours as palette coordinates. The background is black three times in four, else dark blue
# (its codebook neighbour); each class has its own bright foreground. A greedy decoder then
# draws the digit: where a foreground colour is likely, that colour is one token, not six.
BACKGROUNDS = ((0, 0, 0), (0, 0, 1))
BACKGROUND_ODDS = (0.75, 0.25)
FOREGROUNDS = ((3, 3, 3), (3, 3, 0), (0, 3, 3), (3, 1, 1), (1, 3, 1), (3, 2, 0), (3, 0, 3), (2, 2, 3), (3, 3, 2),
               (1, 2, 3))
JITTER = 2  # pixels the digit's box moves from the centre, each way


@dataclasses.dataclass(frozen=True)
class Palette:
    """The codebook: ``levels ** 3`` RGB colours on a grid, each with integer coordinates."""

    levels: int = LEVELS

    @property
    def size(self) -> int:
        return self.levels ** 3

    @property
    def coords(self) -> np.ndarray:
        """int32[K, 3]: entry i's (r, g, b) grid coordinates (i = r * levels^2 + g * levels + b)."""
        grid = np.arange(self.levels)
        return np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1).reshape(-1, 3).astype(np.int32)

    @property
    def colours(self) -> np.ndarray:
        """float32[K, 3] RGB colours in [0, 255]."""
        return self.coords.astype(np.float32) * (255.0 / (self.levels - 1))

    def index(self, coords) -> int:
        r, g, b = coords
        return int((r * self.levels + g) * self.levels + b)

    def neighbours(self, radius: float) -> np.ndarray:
        """bool[K, K]: entries within Euclidean ``radius`` of each other in coordinate space
        (each entry is its own neighbour). The pooled acceptance rule sums the target's
        probability over a drafted token's row."""
        diff = self.coords[:, None, :] - self.coords[None, :, :]
        return (diff * diff).sum(-1) <= radius * radius + 1e-9


@dataclasses.dataclass(frozen=True)
class ImageVocab:
    """Token ids: ``[0, K)`` the palette, then one token per class, then bos."""

    palette: Palette = Palette()
    num_classes: int = NUM_CLASSES

    @property
    def codebook_size(self) -> int:
        return self.palette.size

    @property
    def bos(self) -> int:
        return self.codebook_size + self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.bos + 1

    def class_token(self, label: int) -> int:
        if not 0 <= label < self.num_classes:
            raise ValueError(f"class {label} outside [0, {self.num_classes})")
        return self.codebook_size + int(label)

    def prompt(self, label: int) -> list[int]:
        """The generation prompt of a class: ``[bos, class token]``."""
        return [self.bos, self.class_token(label)]


def draw_digits(labels, rng: np.random.Generator, palette: Palette = Palette()) -> np.ndarray:
    """uint8[N, 32, 32, 3]: one seven-segment digit per label in its class's colour, with a random
    background, box size, stroke width and position (drawn from ``rng`` in label order, so a seed
    fixes the images)."""
    colours = palette.colours
    out = np.empty((len(labels), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for n, label in enumerate(labels):
        bg = colours[palette.index(BACKGROUNDS[rng.choice(len(BACKGROUNDS), p=BACKGROUND_ODDS)])]
        fg = colours[palette.index(FOREGROUNDS[int(label)])]
        h, w, t = int(rng.choice((20, 24))), int(rng.choice((12, 16))), int(rng.choice((3, 4)))
        y0 = (IMAGE_SIZE - h) // 2 + int(rng.integers(-JITTER, JITTER + 1))
        x0 = (IMAGE_SIZE - w) // 2 + int(rng.integers(-JITTER, JITTER + 1))
        img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        img[:] = bg
        mid = y0 + (h - t) // 2
        boxes = {"a": (y0, x0, t, w), "d": (y0 + h - t, x0, t, w), "g": (mid, x0, t, w),
                 "f": (y0, x0, h // 2, t), "e": (y0 + h // 2, x0, h - h // 2, t),
                 "b": (y0, x0 + w - t, h // 2, t), "c": (y0 + h // 2, x0 + w - t, h - h // 2, t)}
        for seg in SEGMENTS[int(label)]:
            y, x, hh, ww = boxes[seg]
            img[y: y + hh, x: x + ww] = fg
        out[n] = img.astype(np.uint8)
    return out


def encode(images: np.ndarray, grid: int, palette: Palette = Palette()) -> np.ndarray:
    """int32[N, grid, grid]: each patch's mean colour quantized to the nearest palette entry."""
    images = np.asarray(images, np.float32)
    n, size = images.shape[0], images.shape[1]
    if size % grid:
        raise ValueError(f"a {size}-pixel image does not split into a {grid} x {grid} grid of patches")
    p = size // grid
    means = images.reshape(n, grid, p, grid, p, 3).mean(axis=(2, 4))
    dist = ((means[..., None, :] - palette.colours) ** 2).sum(-1)
    return np.argmin(dist, axis=-1).astype(np.int32)


def decode(tokens: np.ndarray, image_size: int = IMAGE_SIZE, palette: Palette = Palette()) -> np.ndarray:
    """uint8[N, S, S, 3]: each token's patch painted with its palette colour.

    A token outside the palette (a class or bos id: never a training target, so only a
    sampled output could hold one) paints black."""
    tokens = np.asarray(tokens)
    grid = tokens.shape[-1]
    colours = np.concatenate([palette.colours, np.zeros((1, 3), np.float32)])
    safe = np.where((tokens >= 0) & (tokens < palette.size), tokens, palette.size)
    p = image_size // grid
    return np.repeat(np.repeat(colours[safe], p, axis=-3), p, axis=-2).astype(np.uint8)


def upsample_nearest(tokens: np.ndarray, factor: int) -> np.ndarray:
    """[..., g, g] -> [..., g * factor, g * factor]: each token proposed for every patch it covers."""
    return np.repeat(np.repeat(np.asarray(tokens), factor, axis=-2), factor, axis=-1)


def training_batch(step: int, batch_size: int, grid: int, seed: int,
                   vocab: ImageVocab = ImageVocab()) -> tuple[np.ndarray, np.ndarray]:
    """(int32[B, 2 + grid^2] sequences ``[bos, class, raster tokens]``, int32[B] labels) of one
    training step: a pure function of (seed, step), so a resumed run draws the same data."""
    rng = np.random.default_rng((seed, step))
    labels = rng.integers(0, vocab.num_classes, batch_size)
    grids = encode(draw_digits(labels, rng, vocab.palette), grid, vocab.palette)
    prompts = np.stack([vocab.prompt(int(c)) for c in labels])
    return np.concatenate([prompts, grids.reshape(batch_size, -1)], axis=1).astype(np.int32), labels


def token_pairs(step: int, batch_size: int, seed: int, low_grid: int = 8,
                high_grid: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(int32[B, low, low], int32[B, high, high]) tokens of the same drawn images, the up-sampler's
    training pairs: a pure function of (seed, step), drawn apart from ``training_batch``'s images."""
    rng = np.random.default_rng((seed, 1, step))
    images = draw_digits(rng.integers(0, NUM_CLASSES, batch_size), rng)
    return encode(images, low_grid), encode(images, high_grid)
