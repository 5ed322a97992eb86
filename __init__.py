"""specjax: lossless speculative decoding for JAX.

Subpackages: ``specjax.models`` (decoder LMs, loading), ``specjax.engine``
(draft / verify / accept, generation), ``specjax.drafters`` (suffix index,
prompt lookup, ...), ``specjax.tpu_kernels`` (Pallas tree attention).

The public API: ``from specjax import Engine, load_model, load_drafter, SpecConfig``.
"""

from specjax.engine.compile_cache import enable_compilation_cache

__version__ = "0.1.0"

# The public API, imported on first use so ``import specjax`` stays cheap.
_PUBLIC = {"Engine": "specjax.engine.engine", "load_model": "specjax.models.loading",
           "load_drafter": "specjax.drafters.factory", "SpecConfig": "specjax.engine.spec_config"}
__all__ = ["Engine", "load_model", "load_drafter", "SpecConfig", "enable_compilation_cache"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'specjax' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
