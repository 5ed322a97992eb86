"""Weight-only quantized linear layers: int8 / int4 values, a float scale (and min) per group.

A ``QuantizedWeight`` stands in for a float [..., out, in] matmul weight of the
param pytree (stacked over layers like any other leaf, sliced by the layer
scan). It dequantizes to ``scale * q + min`` per group of ``group_size``
consecutive inputs, inside the jitted forward right before the dot, so memory
holds only the quantized values: the decoder's ``linear`` / ``lm_head`` and the
embedding lookup dispatch on it. Verify and decode run the same dequantization
and the same float dot, so speculation stays lossless on a quantized target.

Kinds of values:
- ``int8``: int8 [..., out, in] (RTN int8; GGUF Q8_0, Q5_K, Q6_K);
- ``int4``: two 4-bit values per uint8, value = nibble - 8 (RTN symmetric int4; GGUF Q4_0);
- ``uint4``: two 4-bit values per uint8, value = nibble (RTN int4 with a min; GGUF Q4_1, Q4_K).

Nibbles use llama.cpp's layout: in each block of 32 inputs, byte j holds input j (low
nibble) and input j + 16 (high nibble), so Q4_0 / Q4_1 blocks are used as stored. They are
packed by hand because XLA on CPU keeps ``jnp.int4`` at one byte per value (measured with
``on_device_size_in_bytes``), which would make int4 no smaller than int8 there.

GGUF blocks map exactly (no float round trip): the host dequantization (``dequantize_np``)
equals ``gguf.quants.dequantize`` bit for bit. Inside XLA on CPU, ``scale * q + min`` may be
contracted into one fused multiply-add (at most 1 ulp apart; formats without a min are exact);
every compiled program of the model does the same, so verify and decode still agree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("int8", "int4", "uint4")
# Param names that are matmul weights ([out, in] per layer, or [vocab, hidden]): the ones quantized.
QUANTIZABLE = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "embed", "lm_head")
NIBBLE_BLOCK = 32
DEFAULT_INT4_GROUP = 64


class QuantizationError(ValueError):
    """A weight cannot be quantized as asked (shape, group size, format)."""


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized [..., out, in] weight: ``w[..., o, i] = scales[..., o, g] * q[..., o, i] + mins[..., o, g]``
    with ``g = i // group_size``; ``dtype`` is the float dtype it dequantizes to."""

    values: Any  # int8 [..., out, in] (kind int8) or uint8 [..., out, in // 2] (int4 / uint4)
    scales: Any  # float [..., out, in // group_size]
    mins: Any  # like scales, or None (symmetric)
    kind: str
    dtype: Any

    def __post_init__(self):
        if self.kind not in KINDS:
            raise QuantizationError(f"unknown quantized kind {self.kind!r}; one of {', '.join(KINDS)}")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @property
    def shape(self) -> tuple[int, ...]:
        """The float weight's shape."""
        packed = self.values.shape
        return tuple(packed[:-1]) + (packed[-1] * (1 if self.kind == "int8" else 2),)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def group_size(self) -> int:
        return self.shape[-1] // self.scales.shape[-1]

    def __getitem__(self, index) -> jax.Array:
        """Rows (an embedding lookup), dequantized: only the gathered rows are ever float."""
        return dequantize(jax.tree.map(lambda a: a[index], self))

    def astype(self, dtype) -> jax.Array:
        """The whole weight dequantized to ``dtype`` (a float copy)."""
        return dequantize(self).astype(dtype)


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["values", "scales", "mins"],
                                 meta_fields=["kind", "dtype"])


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def unpack_nibbles(packed, xp=jnp):
    """uint8 [..., n // 2] in llama.cpp's layout -> uint8 [..., n] of the 4-bit values."""
    lead, n = packed.shape[:-1], packed.shape[-1] * 2
    blocks = packed.reshape(tuple(lead) + (n // NIBBLE_BLOCK, 1, NIBBLE_BLOCK // 2))
    both = xp.concatenate([blocks & 0x0F, blocks >> 4], axis=-2)
    return both.reshape(tuple(lead) + (n,))


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 [..., n] of 4-bit values (n a multiple of 32) -> uint8 [..., n // 2] (``unpack_nibbles`` inverts it)."""
    lead, n = values.shape[:-1], values.shape[-1]
    if n % NIBBLE_BLOCK:
        raise QuantizationError(f"4-bit weights need an input size divisible by {NIBBLE_BLOCK}, got {n}")
    blocks = values.astype(np.uint8).reshape(lead + (n // NIBBLE_BLOCK, 2, NIBBLE_BLOCK // 2))
    return (blocks[..., 0, :] | (blocks[..., 1, :] << 4)).reshape(lead + (n // 2,))


def integer_values(w: QuantizedWeight, xp=jnp):
    """The signed integer values q [..., out, in] as int8."""
    if w.kind == "int8":
        return w.values
    q = unpack_nibbles(w.values, xp).astype(xp.int8)
    return q - xp.int8(8) if w.kind == "int4" else q


def _dequantize(w: QuantizedWeight, xp) -> Any:
    q = integer_values(w, xp).astype(xp.float32)
    groups = w.scales.shape[-1]
    q = q.reshape(tuple(q.shape[:-1]) + (groups, q.shape[-1] // groups))
    out = q * w.scales.astype(xp.float32)[..., None]
    if w.mins is not None:
        out = out + w.mins.astype(xp.float32)[..., None]
    return out.reshape(w.shape).astype(w.dtype)


def dequantize(w) -> jax.Array:
    """The float weight (traced: XLA fuses this into the consumer, per layer inside the scan)."""
    return _dequantize(w, jnp) if is_quantized(w) else w


def dequantize_np(w: QuantizedWeight) -> np.ndarray:
    """The float weight on the host (numpy, no fused multiply-add: bit-exact to ``gguf.quants``)."""
    return _dequantize(jax.tree.map(np.asarray, w), np)


# ---------------------------------------------------------------- round to nearest


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How ``quantize_params`` quantizes: ``bits`` 8 (per output channel) or 4 (per group of inputs)."""

    bits: int
    group_size: Optional[int] = None  # None: the whole input dim for int8, DEFAULT_INT4_GROUP for int4
    symmetric: bool = False  # int4 only: scale alone (values -8..7) instead of scale + min (0..15)

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise QuantizationError(f"bits must be 8 or 4, got {self.bits}")
        if self.group_size is not None and (self.group_size <= 0 or (self.bits == 4 and self.group_size % NIBBLE_BLOCK)):
            raise QuantizationError(f"group_size must be a positive multiple of {NIBBLE_BLOCK} for int4 "
                                    f"(positive for int8), got {self.group_size}")

    @classmethod
    def parse(cls, name: str, group_size: Optional[int] = None) -> "QuantSpec":
        """"int8" or "int4" (the CLI's ``--quantize``)."""
        if name not in ("int8", "int4"):
            raise QuantizationError(f"quantize must be 'int8', 'int4' or 'native' (GGUF), got {name!r}")
        return cls(8 if name == "int8" else 4, group_size)


def _scale_dtype(*arrays: np.ndarray):
    """float16 (as llama.cpp stores its scales) unless a value would overflow it."""
    finite = all(np.all(np.abs(a) <= np.finfo(np.float16).max) for a in arrays)
    return np.float16 if finite else np.float32


def quantize_rtn(w: np.ndarray, spec: QuantSpec, dtype=None) -> QuantizedWeight:
    """Round-to-nearest quantization of a float [..., out, in] host array (scales rounded to their
    storage dtype first, so q is chosen for the scale that is actually used)."""
    w = np.asarray(w, np.float32)
    n = w.shape[-1]
    group = spec.group_size or (n if spec.bits == 8 else DEFAULT_INT4_GROUP)
    if n % group:
        raise QuantizationError(f"input size {n} is not divisible by the group size {group}")
    g = w.reshape(w.shape[:-1] + (n // group, group))
    dtype = dtype or w.dtype
    if spec.bits == 8 or spec.symmetric:
        top = 127.0 if spec.bits == 8 else 7.0
        scale = np.abs(g).max(-1) / top
        scale = scale.astype(_scale_dtype(scale))
        s = scale.astype(np.float32)[..., None]
        q = np.clip(np.round(np.divide(g, s, out=np.zeros_like(g), where=s > 0)), -top - (spec.bits == 4), top)
        q = q.reshape(w.shape)
        if spec.bits == 8:
            return QuantizedWeight(q.astype(np.int8), scale, None, "int8", dtype)
        return QuantizedWeight(pack_nibbles((q + 8).astype(np.uint8)), scale, None, "int4", dtype)
    lo, hi = g.min(-1), g.max(-1)
    store = _scale_dtype(lo, hi - lo)
    scale, low = ((hi - lo) / 15.0).astype(store), lo.astype(store)
    s, m = scale.astype(np.float32)[..., None], low.astype(np.float32)[..., None]
    q = np.clip(np.round(np.divide(g - m, s, out=np.zeros_like(g), where=s > 0)), 0, 15).reshape(w.shape)
    return QuantizedWeight(pack_nibbles(q.astype(np.uint8)), scale, low, "uint4", dtype)


def quantize_params(params: dict, spec: QuantSpec) -> dict:
    """Every matmul weight of a param pytree quantized by round to nearest (norms and biases stay float)."""
    def one(name, value):
        if name not in QUANTIZABLE or is_quantized(value):
            return value
        return jax.device_put(quantize_rtn(np.asarray(value, np.float32), spec, value.dtype))

    out = {k: one(k, v) for k, v in params.items() if k != "layers"}
    out["layers"] = {k: one(k, v) for k, v in params["layers"].items()}
    return out


# ---------------------------------------------------------------- stacking and bytes


def stack(weights: Sequence[QuantizedWeight]) -> QuantizedWeight:
    """Per-layer weights stacked on a new leading axis, converted first to one kind / group size
    where layers differ (a llama.cpp "K_M" file mixes Q4_K and Q6_K layers): nibbles widen to
    int8, scales repeat to the smallest group, a missing min becomes 0. All exact."""
    kinds = {w.kind for w in weights}
    group = min(w.group_size for w in weights)
    with_mins = any(w.mins is not None for w in weights)
    scale_dtype = np.result_type(*[w.scales.dtype for w in weights])

    def common(w: QuantizedWeight) -> QuantizedWeight:
        values = integer_values(w, np) if len(kinds) > 1 and w.kind != "int8" else w.values
        kind = "int8" if len(kinds) > 1 else w.kind
        repeat = w.group_size // group
        scales = np.repeat(w.scales, repeat, axis=-1).astype(scale_dtype)
        mins = None if not with_mins else (np.zeros_like(scales) if w.mins is None
                                           else np.repeat(w.mins, repeat, axis=-1).astype(scale_dtype))
        return QuantizedWeight(values, scales, mins, kind, w.dtype)

    parts = [common(w) for w in weights]
    return QuantizedWeight(np.stack([p.values for p in parts]), np.stack([p.scales for p in parts]),
                           np.stack([p.mins for p in parts]) if with_mins else None, parts[0].kind, parts[0].dtype)


def map_components(fn: Callable[[Any], Any], w: QuantizedWeight) -> QuantizedWeight:
    """``fn`` applied to values, scales and mins (e.g. a row permutation; rows stay whole)."""
    return QuantizedWeight(fn(w.values), fn(w.scales), None if w.mins is None else fn(w.mins), w.kind, w.dtype)


def param_bytes(params) -> int:
    """Bytes the param pytree holds (quantized values, scales and mins included)."""
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


# ---------------------------------------------------------------- GGUF blocks


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _q8_0(b):  # d f16, 32 x int8
    return QuantizedWeight(np.ascontiguousarray(b[..., 2:]).view(np.int8), _f16(b[..., :2]), None, "int8", np.float32)


def _q4_0(b):  # d f16, 16 bytes of nibbles (value - 8)
    return QuantizedWeight(b[..., 2:], _f16(b[..., :2]), None, "int4", np.float32)


def _q4_1(b):  # d f16, m f16, 16 bytes of nibbles
    return QuantizedWeight(b[..., 4:], _f16(b[..., :2]), _f16(b[..., 2:4]), "uint4", np.float32)


def _k_scales_mins(b):
    """Q4_K / Q5_K super-block header -> per-32 scales d * sc and mins -(dmin * m), in float32 as gguf computes."""
    from gguf.quants import Q4_K

    lead = b.shape[:-1]
    flat = b.reshape(-1, b.shape[-1])
    d, dmin = _f16(flat[:, :2]).astype(np.float32), _f16(flat[:, 2:4]).astype(np.float32)
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(flat[:, 4:16]))
    scales = d[:, None] * sc.astype(np.float32)
    mins = -(dmin[:, None] * m.astype(np.float32))
    return scales.reshape(lead + (8,)), mins.reshape(lead + (8,))


def _q4_k(b):  # 256 values: d, dmin, 12 bytes of 6-bit scales/mins, 128 bytes: 64-value chunks, lo / hi nibbles
    scales, mins = _k_scales_mins(b)
    qs = b[..., 16:].reshape(b.shape[:-1] + (4, 1, 32))
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(b.shape[:-1] + (256,))
    return QuantizedWeight(pack_nibbles(values), scales, mins, "uint4", np.float32)


def _q5_k(b):  # as Q4_K plus 32 bytes of fifth bits
    scales, mins = _k_scales_mins(b)
    qh = b[..., 16:48].reshape(b.shape[:-1] + (1, 1, 32))
    qs = b[..., 48:].reshape(b.shape[:-1] + (4, 1, 32))
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=-2).reshape(b.shape[:-1] + (8, 32))
    high = ((qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1).reshape(b.shape[:-1] + (8, 32))
    values = (low | (high << 4)).astype(np.int8).reshape(b.shape[:-1] + (256,))
    return QuantizedWeight(values, scales, mins, "int8", np.float32)


def _q6_k(b):  # 256 values: 128 bytes low nibbles, 64 bytes 2-bit highs, 16 int8 scales, d f16; groups of 16
    lead = b.shape[:-1]
    ql = b[..., :128].reshape(lead + (2, 1, 64))
    qh = b[..., 128:192].reshape(lead + (2, 1, 32))
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=-2).reshape(lead + (8, 32))
    high = ((qh >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & 3).reshape(lead + (8, 32))
    values = ((low | (high << 4)).astype(np.int8) - np.int8(32)).reshape(lead + (256,))
    scales = _f16(b[..., 208:210]).astype(np.float32)[..., None] * np.ascontiguousarray(
        b[..., 192:208]).view(np.int8).astype(np.float32)
    return QuantizedWeight(values, scales, None, "int8", np.float32)


# GGUF block type -> (values per block, decoder of [..., bytes] blocks into one block's QuantizedWeight).
GGUF_NATIVE = {"Q8_0": (32, _q8_0), "Q4_0": (32, _q4_0), "Q4_1": (32, _q4_1), "Q4_K": (256, _q4_k),
               "Q5_K": (256, _q5_k), "Q6_K": (256, _q6_k)}


def from_gguf_blocks(raw: np.ndarray, kind: str, shape: tuple[int, ...]) -> QuantizedWeight:
    """A GGUF tensor's raw blocks (uint8 [out, bytes per row], as ``gguf.GGUFReader`` maps them) as a
    QuantizedWeight of float shape ``shape`` [out, in], without dequantizing."""
    block, decode = GGUF_NATIVE[kind]
    out, n = shape
    blocks = np.asarray(raw, np.uint8).reshape(out, n // block, -1)
    w = decode(blocks)  # leaves [out, n // block, ...]: merge the block axis into the row
    flat = lambda a: a.reshape(out, -1)
    return QuantizedWeight(flat(w.values), flat(w.scales), None if w.mins is None else flat(w.mins),
                           w.kind, np.float32)
