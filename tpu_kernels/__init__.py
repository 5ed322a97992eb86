"""specjax.tpu_kernels: Pallas kernels, each tested against a plain-jnp reference.

tree_attention.tree_attention(..., impl="auto" | "xla" | "pallas") is the switch
the models use: TPU -> Mosaic kernel (tree_attention_tpu), GPU -> Triton kernel
(tree_attention_gpu), CPU -> the jnp reference (tree_attention_ref).
"""
