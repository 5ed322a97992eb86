"""specjax: lossless speculative decoding for JAX.

Subpackages: ``specjax.models`` (decoder LMs, loading), ``specjax.engine``
(draft / verify / accept, generation), ``specjax.drafters`` (suffix index,
prompt lookup, ...), ``specjax.tpu_kernels`` (Pallas tree attention).
"""

__version__ = "0.1.0"
