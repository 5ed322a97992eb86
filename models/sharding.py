"""Sharding rules: one table mapping parameter paths to PartitionSpecs over ("data", "model").

Tensor parallel over ``model``: attention heads and the MLP hidden dim are split
(column-parallel q/k/v/gate/up, row-parallel o/down), embeddings and the LM head
are split over the vocab, so logits come out vocab-sharded and greedy argmax
reduces across devices instead of gathering full-vocab logits. The KV cache is
split over ``data`` (batch) and ``model`` (kv heads). A dimension the axis size
does not divide is replicated instead (e.g. 2 kv heads on an 8-way model axis).
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, param_shapes

DATA, MODEL = "data", "model"

# Which dimension of each parameter goes on the model axis (None = replicated).
MODEL_AXIS_DIM = {
    "embed": 0, "lm_head": 0, "final_norm": None,
    "attn_norm": None, "mlp_norm": None, "q_norm": None, "k_norm": None,
    "wq": 1, "wk": 1, "wv": 1, "wo": 2, "bq": 1, "bk": 1, "bv": 1, "bo": None,
    "w_gate": 1, "w_up": 1, "w_down": 2, "b_gate": 1, "b_up": 1, "b_down": None,
}


def make_mesh(data: int = 1, model: Optional[int] = None, devices=None) -> Mesh:
    """A ("data", "model") mesh; by default all devices on the model axis."""
    devices = list(jax.devices() if devices is None else devices)
    model = len(devices) // data if model is None else model
    if data * model != len(devices):
        raise ValueError(f"mesh {data}x{model} needs {data * model} devices, have {len(devices)}")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


# Attention projections split whole heads: these count heads, not rows.
_HEADS = {"wq": "num_heads", "bq": "num_heads", "wo": "num_heads",
          "wk": "num_kv_heads", "bk": "num_kv_heads", "wv": "num_kv_heads", "bv": "num_kv_heads"}


def _spec(cfg: ModelConfig, name: str, shape: tuple[int, ...], model_size: int) -> P:
    axes = [None] * len(shape)
    dim = MODEL_AXIS_DIM[name]
    units = getattr(cfg, _HEADS[name]) if name in _HEADS else (shape[dim] if dim is not None else 0)
    if dim is not None and units % model_size == 0:
        axes[dim] = MODEL
    return P(*axes)


def param_specs(cfg: ModelConfig, mesh: Mesh) -> dict:
    """PartitionSpecs with the same tree structure as the params."""
    m = mesh.shape[MODEL]
    shapes = param_shapes(cfg)
    specs = {k: _spec(cfg, k, v, m) for k, v in shapes.items() if k != "layers"}
    specs["layers"] = {k: _spec(cfg, k, v, m) for k, v in shapes["layers"].items()}
    return specs


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def cache_sharding(cfg: ModelConfig, mesh: Mesh, batch_size: int) -> NamedSharding:
    """[layers, B, kv_heads, S, D]: batch over data, kv heads over model when divisible."""
    data = DATA if batch_size % mesh.shape[DATA] == 0 else None
    heads = MODEL if cfg.num_kv_heads % mesh.shape[MODEL] == 0 else None
    return NamedSharding(mesh, P(None, data, heads, None, None))


def shard_params(params: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
    return jax.device_put(params, param_shardings(cfg, mesh))


def placer(cfg: ModelConfig, mesh: Mesh):
    """A ``place(path, host_array)`` for ``load_params``: each tensor straight onto its shards."""
    shardings = param_shardings(cfg, mesh)

    def place(path: tuple[str, ...], array: np.ndarray) -> jax.Array:
        sharding = shardings
        for key in path:
            sharding = sharding[key]
        return jax.device_put(array, sharding)

    return place


def shard_cache(cache: KVCache, sharding: NamedSharding) -> KVCache:
    return KVCache(jax.lax.with_sharding_constraint(cache.k, sharding),
                   jax.lax.with_sharding_constraint(cache.v, sharding))
