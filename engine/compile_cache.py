"""JAX's persistent compilation cache, on by default so a second run skips compiling.

The cache lives in ``$SPECJAX_COMPILATION_CACHE`` if set, else
``$XDG_CACHE_HOME/specjax/jax`` (``~/.cache/specjax/jax``). Set
``SPECJAX_COMPILATION_CACHE=off`` to leave JAX's own setting alone (e.g. when
the application configures its own cache).
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

import jax

ENV = "SPECJAX_COMPILATION_CACHE"


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "specjax" / "jax"


def enable_compilation_cache() -> Optional[pathlib.Path]:
    """Point JAX's persistent cache at specjax's directory unless disabled or already set.

    Returns the directory in use, or None when the cache is left off.
    """
    setting = os.environ.get(ENV, "")
    if setting.lower() in ("off", "0", "false", "no"):
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:
        return pathlib.Path(current)
    path = pathlib.Path(setting) if setting else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Small programs too: a decode step of a small model compiles in well under a second.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return path
