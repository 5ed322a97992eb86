"""specjax.tpu_kernels: Pallas kernels, each tested against a plain-jnp reference.

tree_attention.tree_attention(..., impl="auto" | "xla" | "pallas") is the switch
the models use: TPU -> Mosaic kernel (tree_attention_tpu), GPU -> Triton kernel
(tree_attention_gpu), CPU -> the jnp reference (tree_attention_ref).  Both
kernels read the model's stacked KV cache [layers, B, Hkv, S, D] in place at a
traced layer index.  On a mesh, sharded_attention.sharded_tree_attention(mesh)
is passed as `impl`: the same switch under shard_map, each device on its heads.

ragged_tree_attention.ragged_tree_attention(...) is the same switch for
continuous batching: packed ragged rows of many sequences (tree steps and
prefill chunks mixed), each reading its cached prefix from a page pool through
a page table, with the tree mask built from parent arrays once per step.
"""
