"""specjax.tpu_kernels: Pallas kernels, each tested against a plain-jnp reference.

tree_attention.tree_attention(..., impl="auto" | "xla" | "pallas") is the switch
the models use: TPU -> Mosaic kernel (tree_attention_tpu), GPU -> Triton kernel
(tree_attention_gpu), CPU -> the jnp reference (tree_attention_ref).  Both
kernels read the model's stacked KV cache [layers, B, Hkv, S, D] in place at a
traced layer index.  On a mesh, sharded_attention.sharded_tree_attention(mesh)
is passed as `impl`: the same switch under shard_map, each device on its heads.
"""
