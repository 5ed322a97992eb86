"""Sharding rules: one table mapping parameter paths to PartitionSpecs over ("data", "model").

Tensor parallel over ``model``: attention heads and the MLP hidden dim are split
(column-parallel q/k/v/gate/up, row-parallel o/down), embeddings and the LM head
are split over the vocab, so logits come out vocab-sharded and greedy argmax
reduces across devices instead of gathering full-vocab logits. The KV cache is
split over ``data`` (batch) and ``model`` (kv heads); attention runs under
``shard_map`` (``specjax.tpu_kernels.sharded_attention``), each device on its
own heads.

Heads are split whole, so both head counts must divide the model axis. A model
whose heads do not is laid out for the mesh first (``mesh_config``,
``pad_params``, ``shard_model``), with the math unchanged: each kv head is
repeated (its k/v weights and cache rows duplicated) and each query group is
padded with zero-weight query heads whose ``wo`` columns are zero, so they add
nothing. E.g. Qwen2.5-7B (28 heads, 4 kv heads) on 8 devices runs as 32 heads /
8 kv heads: every device holds 4 query heads (one of them padding on half the
devices) and 1 kv head, instead of a full replica of the attention weights.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, Params, param_shapes
from specjax.models.quant import NIBBLE_BLOCK, QuantizedWeight, is_quantized, map_components

DATA, MODEL = "data", "model"

# Which dimension of each parameter goes on the model axis (None = replicated).
MODEL_AXIS_DIM = {
    "embed": 0, "lm_head": 0, "final_norm": None,
    "attn_norm": None, "mlp_norm": None, "q_norm": None, "k_norm": None,
    "wq": 1, "wk": 1, "wv": 1, "wo": 2, "bq": 1, "bk": 1, "bv": 1, "bo": None,
    "w_gate": 1, "w_up": 1, "w_down": 2, "b_gate": 1, "b_up": 1, "b_down": None,
}

# Attention projections split whole heads: the axis holds (query or kv) heads x head_dim.
QUERY_HEAD_PARAMS = ("wq", "bq", "wo")
KV_HEAD_PARAMS = ("wk", "bk", "wv", "bv")


def make_mesh(data: int = 1, model: Optional[int] = None, devices=None) -> Mesh:
    """A ("data", "model") mesh; by default all devices on the model axis."""
    devices = list(jax.devices() if devices is None else devices)
    model = len(devices) // data if model is None else model
    if data * model != len(devices):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


@dataclasses.dataclass(frozen=True)
class HeadLayout:
    """Heads laid out for a model axis: each of the model's kv heads `repeat` times,
    then zero kv heads up to `num_kv_heads`; `group` query heads per kv head."""

    num_heads: int
    num_kv_heads: int
    repeat: int
    group: int


def head_layout(num_heads: int, num_kv_heads: int, model_size: int) -> HeadLayout:
    """The fewest query heads (then kv heads) that divide `model_size` and keep the math.

    A query group of G heads spread over `repeat` copies of its kv head needs
    ceil(G / repeat) query heads per copy; copies are padded with zero kv heads
    (whose query heads are all padding) up to a multiple of the axis. Ties go to
    fewer zero kv heads. Heads that already divide the axis keep their layout
    (repeat 1, nothing padded).
    """
    group = num_heads // num_kv_heads

    def layout(repeat: int) -> HeadLayout:
        kv = -(-num_kv_heads * repeat // model_size) * model_size
        per_copy = -(-group // repeat)
        return HeadLayout(kv * per_copy, kv, repeat, per_copy)

    def cost(h: HeadLayout) -> tuple[int, int, int]:  # query heads, kv heads, zero kv heads
        return h.num_heads, h.num_kv_heads, h.num_kv_heads - num_kv_heads * h.repeat

    return min((layout(r) for r in range(1, model_size + 1)), key=cost)


def _model_size(mesh: Mesh) -> int:
    return mesh.shape[MODEL]


def mesh_config(cfg: ModelConfig, mesh: Mesh) -> ModelConfig:
    """The config a model runs with on `mesh`: head counts from `head_layout` (head_dim unchanged)."""
    layout = head_layout(cfg.num_heads, cfg.num_kv_heads, _model_size(mesh))
    return dataclasses.replace(cfg, num_heads=layout.num_heads, num_kv_heads=layout.num_kv_heads)


def pad_param(name: str, array, cfg: ModelConfig, mesh: Mesh):
    """One parameter of `cfg`'s layout in `mesh_config(cfg, mesh)`'s layout (numpy in, numpy out).

    Query-head params (wq, bq rows; wo columns): each group's heads go to the
    copies of its kv head in order, the rest of each copy is zero. kv-head
    params (wk, wv, bk, bv rows): each head repeated, then zero heads.
    """
    layout = head_layout(cfg.num_heads, cfg.num_kv_heads, _model_size(mesh))
    unchanged = (layout.num_heads, layout.num_kv_heads) == (cfg.num_heads, cfg.num_kv_heads)
    if unchanged or name not in QUERY_HEAD_PARAMS + KV_HEAD_PARAMS:
        return array
    if is_quantized(array):  # values, scales and mins padded alike: zero scales dequantize to zero
        _check_whole_heads(name, array, cfg)
        return map_components(lambda a: pad_param(name, a, cfg, mesh), array)
    xp = np if isinstance(array, np.ndarray) else jnp
    axis = MODEL_AXIS_DIM[name]
    heads = cfg.num_heads if name in QUERY_HEAD_PARAMS else cfg.num_kv_heads
    d, hkv, shape = array.shape[axis] // heads, cfg.num_kv_heads, array.shape  # head_dim, or per head packed
    before, after = shape[:axis], shape[axis + 1:]

    def pad(x, ax, size):
        widths = [(0, 0)] * x.ndim
        widths[ax] = (0, size - x.shape[ax])
        return xp.pad(x, widths)

    if name in QUERY_HEAD_PARAMS:
        group = cfg.num_heads // hkv
        x = array.reshape(before + (hkv, group, d) + after)
        x = pad(x, axis + 1, layout.repeat * layout.group)
        x = x.reshape(before + (hkv * layout.repeat, layout.group, d) + after)
        x = pad(x, axis, layout.num_kv_heads)
        return x.reshape(before + (layout.num_heads * d,) + after)
    x = xp.repeat(array.reshape(before + (hkv, d) + after), layout.repeat, axis=axis)
    x = pad(x, axis, layout.num_kv_heads)
    return x.reshape(before + (layout.num_kv_heads * d,) + after)


def _check_whole_heads(name: str, w: QuantizedWeight, cfg: ModelConfig) -> None:
    """A quantized ``wo`` is padded per head along its inputs: groups (and nibble blocks) must not straddle heads."""
    if name != "wo":
        return
    d = cfg.head_dim
    if d % w.group_size or (w.kind != "int8" and d % NIBBLE_BLOCK):
        raise ValueError(f"quantized wo (group size {w.group_size}, {w.kind}) cannot be padded for the mesh: "
                         f"its groups straddle heads of dim {d}; use a group size dividing {d}")


def _quantized_spec(spec: P, w: QuantizedWeight, model_size: int) -> QuantizedWeight:
    """The float weight's spec for values, scales and mins, where every shard holds whole groups (and
    whole nibble blocks) along a split input dim; replicated otherwise."""
    if spec and spec[-1] == MODEL:
        inputs = w.shape[-1] // model_size
        if inputs % w.group_size or (w.kind != "int8" and inputs % NIBBLE_BLOCK):
            spec = P(*([None] * len(spec)))
    return QuantizedWeight(spec, spec, None if w.mins is None else spec, w.kind, w.dtype)


def with_quantized_specs(specs: dict, params: Params, model_size: int) -> dict:
    """``specs`` (a tree of PartitionSpecs) with the quantized weights of ``params`` given one per component."""
    one = lambda spec, value: _quantized_spec(spec, value, model_size) if is_quantized(value) else spec
    out = {k: one(v, params[k]) for k, v in specs.items() if k != "layers"}
    out["layers"] = {k: one(v, params["layers"][k]) for k, v in specs["layers"].items()}
    return out


def pad_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """Every parameter in `mesh_config(cfg, mesh)`'s layout (see `pad_param`)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    out["layers"] = {k: pad_param(k, v, cfg, mesh) for k, v in params["layers"].items()}
    return out


def _spec(cfg: ModelConfig, name: str, shape: tuple[int, ...], model_size: int) -> P:
    axes = [None] * len(shape)
    dim = MODEL_AXIS_DIM[name]
    if dim is not None and _units(cfg, name, shape) % model_size == 0:
        axes[dim] = MODEL
    return P(*axes)


def _units(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> int:
    """What the model axis splits: whole heads for attention projections, else elements."""
    if name in QUERY_HEAD_PARAMS:
        return cfg.num_heads
    if name in KV_HEAD_PARAMS:
        return cfg.num_kv_heads
    return shape[MODEL_AXIS_DIM[name]]


def param_specs(cfg: ModelConfig, mesh: Mesh) -> dict:
    """PartitionSpecs with the same tree structure as the params of `cfg`.

    Heads that do not divide the model axis leave their projections replicated
    (a warning says so): lay such a model out with `shard_model` / `mesh_placer`.
    """
    m = _model_size(mesh)
    shapes = param_shapes(cfg)
    specs = {k: _spec(cfg, k, v, m) for k, v in shapes.items() if k != "layers"}
    specs["layers"] = {k: _spec(cfg, k, v, m) for k, v in shapes["layers"].items()}
    if cfg.num_heads % m or cfg.num_kv_heads % m:
        warnings.warn(
            f"{cfg.num_heads} query / {cfg.num_kv_heads} kv heads do not both divide the {m}-way model axis: "
            "their projections are replicated and attention repeated on every device; lay the model out for "
            "the mesh first (shard_model or mesh_placer)", stacklevel=2)
    return specs


def param_shardings(cfg: ModelConfig, mesh: Mesh, params: Optional[Params] = None) -> dict:
    """NamedShardings like ``param_specs``; with ``params``, their quantized weights' components too."""
    specs = param_specs(cfg, mesh)
    if params is not None:
        specs = with_quantized_specs(specs, params, _model_size(mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def cache_sharding(cfg: ModelConfig, mesh: Mesh, batch_size: int) -> NamedSharding:
    """[layers, B, kv_heads, S, D]: batch over data (when it divides), kv heads over model."""
    data = DATA if batch_size % mesh.shape[DATA] == 0 else None
    heads = MODEL if cfg.num_kv_heads % _model_size(mesh) == 0 else None
    return NamedSharding(mesh, P(None, data, heads, None, None))


def shard_params(params: Params, cfg: ModelConfig, mesh: Mesh) -> Params:
    """Place params of `cfg` by the rule table (heads must already divide; see `shard_model`)."""
    return jax.device_put(params, param_shardings(cfg, mesh, params))


def shard_model(params: Params, cfg: ModelConfig, mesh: Mesh) -> tuple[Params, ModelConfig]:
    """(params, config) laid out for `mesh` and placed on it; the logits are unchanged.

    Heads are padded/repeated to the model axis (`mesh_config`); params already
    in a mesh layout (e.g. loaded with `mesh_placer`) are only placed.
    """
    mesh_cfg = mesh_config(cfg, mesh)
    if mesh_cfg == cfg:  # device_put moves nothing that is already in place
        return shard_params(params, cfg, mesh), cfg
    pad = lambda p: pad_params(p, cfg, mesh)
    shardings = param_shardings(mesh_cfg, mesh, jax.eval_shape(pad, params))
    padded = jax.jit(pad, out_shardings=shardings)(params)
    return padded, mesh_cfg


def mesh_placer(cfg: ModelConfig, mesh: Mesh):
    """(config, place) for ``load_params(dir, cfg, dtype, place)``: each host tensor is
    padded to the mesh layout and put straight onto its shards; the params it
    builds belong to the returned config, ``mesh_config(cfg, mesh)``."""
    mesh_cfg = mesh_config(cfg, mesh)
    shardings = param_shardings(mesh_cfg, mesh)

    def place(path: tuple[str, ...], array):
        sharding = shardings
        for key in path:
            sharding = sharding[key]
        array = pad_param(path[-1], array, cfg, mesh) if path[0] == "layers" else array
        if is_quantized(array):
            spec = _quantized_spec(sharding.spec, array, _model_size(mesh))
            sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda x: isinstance(x, P))
        return jax.device_put(array, sharding)

    return mesh_cfg, place

def shard_cache(cache: KVCache, sharding: NamedSharding) -> KVCache:
    return KVCache(jax.lax.with_sharding_constraint(cache.k, sharding),
                   jax.lax.with_sharding_constraint(cache.v, sharding))
