"""specjax.tpu_kernels."""
