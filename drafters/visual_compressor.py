"""SpecVLM's elastic visual compressor: fewer visual tokens for the drafter, every one for the target.

A vision-language prompt holds a run of ``n = grid**2`` image tokens. The target
verifies with all of them, so the output is the target's whatever the drafter
sees; the EAGLE-3 head only needs enough of the image to guess well, and each
visual token it keeps costs it attention in every draft step. The compressor
turns the fused target features of the image run ([n, H]) into ``m = (grid /
factor)**2`` tokens, by one of four operators:

- ``prune``: keep the m tokens with the largest feature norm, in their order
  (no parameters);
- ``pool``: average each factor x factor window of the grid (no parameters);
- ``conv``: a learned factor x factor convolution with stride factor
  (initialized to the average: it starts as ``pool``);
- ``resampler``: one cross-attention layer, m learned queries (added to the
  pooled tokens, which are also its residual) reading all n tokens;

and ``gate`` picks one per prompt from the question: a linear layer over the
mean fused features of the text after the image and of the image itself. It is
trained to predict which operator gave that prompt the lowest distillation loss
(``training/losses.py``); at inference its argmax decides.

``compact`` then rewrites the head's input sequence: the text before the image,
the m compressed tokens, the text after, shifted left by ``n - m``; the head's
own cache and RoPE positions follow the compacted sequence, while the target's
positions stay what they are (the head's ``lengths`` are its own, see
``eagle3.py``). The last compressed token is paired with the first text token
after the image, as the last image token is in the uncompressed sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from specjax.models.decoder import rms_norm

OPERATORS = ("prune", "pool", "conv", "resampler")
MODES = ("none",) + OPERATORS + ("gate",)


@dataclasses.dataclass(frozen=True)
class CompressorConfig:
    """Where the image run is (``image_token_id``, ``grid`` x ``grid`` tokens) and how far it shrinks."""

    image_token_id: int
    grid: int  # the image run is grid x grid tokens, row-major (a ViT's patch grid)
    factor: int = 2  # each side shrinks by this: m = (grid // factor) ** 2 tokens remain
    mode: str = "gate"  # the default operator (``MODES``)

    def __post_init__(self):
        if self.grid < 1 or self.factor < 1 or self.grid % self.factor:
            raise ValueError(f"the compressor needs a factor dividing the grid, got grid {self.grid}, "
                             f"factor {self.factor}")
        if self.mode not in MODES:
            raise ValueError(f"compressor mode must be one of {MODES}, got {self.mode!r}")

    @property
    def image_tokens(self) -> int:
        return self.grid ** 2

    @property
    def kept(self) -> int:
        return (self.grid // self.factor) ** 2

    def to_hf(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_hf(cls, fields: Optional[dict]) -> Optional["CompressorConfig"]:
        return None if not fields else cls(**{k: fields[k] for k in ("image_token_id", "grid", "factor", "mode")})


def param_shapes(cfg: CompressorConfig, hidden: int) -> dict:
    f2 = cfg.factor ** 2
    return {"conv_w": (hidden, f2 * hidden), "conv_b": (hidden,), "queries": (cfg.kept, hidden),
            "wq": (hidden, hidden), "wk": (hidden, hidden), "wv": (hidden, hidden), "wo": (hidden, hidden),
            "gate_w": (len(OPERATORS), 2 * hidden), "gate_b": (len(OPERATORS),), "norm": (hidden,)}


def init_params(cfg: CompressorConfig, hidden: int, key: jax.Array, scale: float = 0.02) -> dict:
    """Random attention and gate weights; ``conv`` starts as the average pool, the resampler's
    output projection at zero (it starts as ``pool`` too)."""
    shapes = param_shapes(cfg, hidden)
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    out = {name: scale * jax.random.normal(keys[name], shape) for name, shape in shapes.items()}
    f2 = cfg.factor ** 2
    out.update(conv_w=jnp.tile(jnp.eye(hidden), (1, f2)) / f2, conv_b=jnp.zeros(hidden), wo=jnp.zeros((hidden, hidden)),
               gate_b=jnp.zeros(len(OPERATORS)), norm=jnp.ones(hidden))
    return out


# ------------------------------------------------------------------ the operators ([B, n, H] -> [B, m, H])


def _windows(cfg: CompressorConfig, image: jax.Array) -> jax.Array:
    """[B, n, H] -> [B, m, factor**2, H]: each output token's factor x factor window of the grid."""
    b, _, h = image.shape
    g, f = cfg.grid, cfg.factor
    x = image.reshape(b, g // f, f, g // f, f, h).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, cfg.kept, f * f, h)


def prune(cfg: CompressorConfig, image: jax.Array) -> jax.Array:
    """The m tokens of largest L2 norm, kept in grid order."""
    _, keep = jax.lax.top_k(jnp.sum(jnp.square(image.astype(jnp.float32)), axis=-1), cfg.kept)
    return jnp.take_along_axis(image, jnp.sort(keep, axis=-1)[..., None], axis=1)


def pool(cfg: CompressorConfig, image: jax.Array) -> jax.Array:
    return jnp.mean(_windows(cfg, image), axis=2)


def conv(cfg: CompressorConfig, params: dict, image: jax.Array) -> jax.Array:
    windows = _windows(cfg, image)
    flat = windows.reshape(windows.shape[:2] + (-1,))
    return jnp.einsum("bmi,oi->bmo", flat, params["conv_w"].astype(image.dtype)) + params["conv_b"].astype(image.dtype)


def resampler(cfg: CompressorConfig, params: dict, image: jax.Array) -> jax.Array:
    """Pooled tokens plus one single-head cross-attention of (pooled + queries) over all n tokens."""
    base = pool(cfg, image)
    lin = lambda x, w: jnp.einsum("...i,oi->...o", x, params[w].astype(x.dtype))
    q = lin(base + params["queries"].astype(base.dtype), "wq")
    k, v = lin(image, "wk"), lin(image, "wv")
    scores = jnp.einsum("bmh,bnh->bmn", q.astype(jnp.float32), k.astype(jnp.float32)) * image.shape[-1] ** -0.5
    attended = jnp.einsum("bmn,bnh->bmh", jax.nn.softmax(scores, axis=-1), v.astype(jnp.float32))
    return base + lin(attended.astype(image.dtype), "wo")


def apply_operator(cfg: CompressorConfig, params: dict, image: jax.Array, name: str) -> jax.Array:
    """One operator (``OPERATORS``) on the image run [B, n, H] -> [B, m, H]."""
    if name == "prune":
        return prune(cfg, image)
    if name == "pool":
        return pool(cfg, image)
    if name == "conv":
        return conv(cfg, params, image)
    return resampler(cfg, params, image)


def compress_all(cfg: CompressorConfig, params: dict, image: jax.Array) -> jax.Array:
    """Every operator's output, stacked in ``OPERATORS`` order: [len(OPERATORS), B, m, H]."""
    return jnp.stack([apply_operator(cfg, params, image, name) for name in OPERATORS])


def gate_logits(params: dict, image: jax.Array, question: jax.Array, question_mask: jax.Array,
                eps: float = 1e-5) -> jax.Array:
    """[B, len(OPERATORS)] from the mean image token and the mean question token (``question_mask``)."""
    w = question_mask[..., None].astype(question.dtype)
    q_mean = jnp.sum(question * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    x = jnp.concatenate([rms_norm(jnp.mean(image, axis=1), params["norm"], eps), rms_norm(q_mean, params["norm"], eps)],
                        axis=-1)
    return jnp.einsum("bi,oi->bo", x.astype(jnp.float32), params["gate_w"].astype(jnp.float32)) + params["gate_b"]


# ------------------------------------------------------------------ the head's compacted sequence


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ImageSpan:
    """Per row: where the image run starts, and how many of its tokens the drafter drops (0: none)."""

    start: jax.Array  # int32[B] (the sequence width where a row has no image)
    removed: jax.Array  # int32[B]


def image_span(cfg: CompressorConfig, tokens: jax.Array, lengths: jax.Array) -> ImageSpan:
    """The first image run of each row (a row without one: nothing removed)."""
    b, p = tokens.shape
    is_image = (tokens == cfg.image_token_id) & (jnp.arange(p)[None, :] < lengths[:, None])
    has = jnp.any(is_image, axis=1)
    start = jnp.where(has, jnp.argmax(is_image, axis=1), p).astype(jnp.int32)
    return ImageSpan(start, jnp.where(has, cfg.image_tokens - cfg.kept, 0).astype(jnp.int32))


def image_features(cfg: CompressorConfig, fused: jax.Array, span: ImageSpan) -> jax.Array:
    """The fused features of each row's image run: [B, n, H] (rows without one: whatever is there)."""
    idx = jnp.clip(span.start[:, None] + jnp.arange(cfg.image_tokens)[None, :], 0, fused.shape[1] - 1)
    return jnp.take_along_axis(fused, idx[..., None], axis=1)


def question_mask(span: ImageSpan, lengths: jax.Array, width: int, image_tokens: int) -> jax.Array:
    """bool [B, width]: the prompt's tokens after the image run (the question)."""
    i = jnp.arange(width)[None, :]
    return (i >= (span.start + image_tokens)[:, None]) & (i < lengths[:, None])


def compressed_tokens(cfg: CompressorConfig, params: dict, fused: jax.Array, span: ImageSpan,
                      prompt_lengths: jax.Array, mode: str) -> jax.Array:
    """The m tokens replacing each row's image run [B, m, H]. ``mode`` "gate" asks the gate per row;
    an operator name (``OPERATORS``) uses it for every row."""
    image = image_features(cfg, fused, span)
    if mode != "gate":
        return apply_operator(cfg, params, image, mode)
    asked = question_mask(span, prompt_lengths, fused.shape[1], cfg.image_tokens)
    choice = jnp.argmax(gate_logits(params, image, fused, asked), axis=-1)
    return jnp.take_along_axis(compress_all(cfg, params, image), choice[None, :, None, None], axis=0)[0]


def compact(span: ImageSpan, kept: int, compressed: jax.Array, fused: jax.Array,
            aligned: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """The head's sequence without the dropped image tokens: position i reads position i (before
    the image run), compressed token i - start (the run's first ``kept`` places), or position
    i + removed (after). ``aligned`` arrays [B, P, ...] (tokens, teacher logits, ...) follow the
    same shift, so the pairing of each feature with its next token is kept. Returns (fused [B, P, H],
    aligned), the tail past each row's new length holding copies of its last position."""
    p = fused.shape[1]
    i = jnp.arange(p, dtype=jnp.int32)[None, :]
    start, removed = span.start[:, None], span.removed[:, None]
    src = jnp.clip(jnp.where(i < start, i, i + removed), 0, p - 1)

    def shift(x):
        return jnp.take_along_axis(x, src.reshape(src.shape + (1,) * (x.ndim - 2)), axis=1)

    in_run = (i >= start) & (i < start + kept) & (removed > 0)
    from_run = jnp.take_along_axis(compressed, jnp.clip(i - start, 0, kept - 1)[..., None], axis=1)
    return jnp.where(in_run[..., None], from_run.astype(fused.dtype), shift(fused)), [shift(x) for x in aligned]
