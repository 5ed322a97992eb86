"""Tree attention on a mesh: each device runs the kernel on its own heads, under shard_map.

GSPMD cannot partition a Pallas custom call by itself: handed sharded operands
it gathers them around the call.  `shard_map` states the split instead: query
and KV heads over the head axis ("model"), the batch over the batch axis
("data"), and every device attends its local heads to its local cache shard,
no communication.  Heads must divide the head axis; a model whose heads do not
is padded first (``specjax.models.sharding.mesh_config`` / ``shard_model``).

    attention = sharded_tree_attention(mesh, impl="auto")
    out = attention(q, cache.k, cache.v, lengths, k_new, v_new, mask, layer=i)

The object is frozen and hashable, so it can be a static `jit` argument in
place of an impl string.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from jax.sharding import Mesh, PartitionSpec as P

from .tree_attention import IMPLS, check_shapes, tree_attention


@dataclasses.dataclass(frozen=True)
class ShardedTreeAttention:
    """`tree_attention` under shard_map over `head_axis` (heads) and `batch_axis` (batch)."""

    mesh: Mesh
    impl: str = "auto"
    backend: Optional[str] = None
    head_axis: str = "model"
    batch_axis: Optional[str] = "data"
    interpret: bool = False
    block_sizes: tuple[tuple[str, Any], ...] = ()

    def __call__(self, q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, *, layer=None, sm_scale=None):
        """Same arguments and result as `tree_attention` (impl and kernel options fixed here)."""
        check_shapes(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, layer)
        b, _, hq, d = q.shape
        hkv = k_cache.shape[-3]
        heads = self.mesh.shape[self.head_axis]
        if hq % heads or hkv % heads:
            raise ValueError(
                f"{hq} query heads and {hkv} kv heads must both divide the {heads}-way {self.head_axis!r} "
                "mesh axis; pad the model's heads first (specjax.models.sharding.mesh_config / shard_model)")
        batch = self._batch_axis(b)
        head_major = P(batch, None, self.head_axis, None)  # q, tree K/V, output: [B, T, H, D]
        cache = P(batch, self.head_axis, None, None)
        if layer is not None:
            cache = P(None, *cache)
        scale = d ** -0.5 if sm_scale is None else float(sm_scale)
        options = dict(self.block_sizes)

        def local(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, *layer_arg):
            return tree_attention(q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask, impl=self.impl,
                                  backend=self.backend, layer=layer_arg[0] if layer_arg else None, sm_scale=scale,
                                  interpret=self.interpret, **options)

        operands = (q, k_cache, v_cache, lengths, tree_k, tree_v, tree_mask) + (() if layer is None else (layer,))
        in_specs = (head_major, cache, cache, P(batch), head_major, head_major, P(batch, None, None))
        in_specs += () if layer is None else (P(),)
        # check_vma off: a pallas_call does not declare how its outputs vary over the mesh.
        sharded = jax.shard_map(local, mesh=self.mesh, in_specs=in_specs, out_specs=head_major, check_vma=False)
        return sharded(*operands)

    def _batch_axis(self, batch_size: int) -> Optional[str]:
        """The batch axis when it divides the batch; otherwise each batch shard repeats the whole batch."""
        if self.batch_axis is None or batch_size % self.mesh.shape[self.batch_axis]:
            return None
        return self.batch_axis


def sharded_tree_attention(mesh: Mesh, impl: str = "auto", *, backend: Optional[str] = None, head_axis: str = "model",
                           batch_axis: Optional[str] = "data", interpret: bool = False,
                           **block_sizes: int) -> ShardedTreeAttention:
    """A mesh-aware drop-in for `tree_attention(..., impl=impl)`: see the module docstring."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {IMPLS}")
    for axis in (head_axis, batch_axis):
        if axis is not None and axis not in mesh.shape:
            raise ValueError(f"mesh has no axis {axis!r}; its axes are {tuple(mesh.shape)}")
    return ShardedTreeAttention(mesh, impl, backend, head_axis, batch_axis, interpret,
                                tuple(sorted(block_sizes.items())))
