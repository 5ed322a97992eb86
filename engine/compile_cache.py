"""JAX's persistent compilation cache, turned on explicitly so a second run skips compiling.

It is a global JAX setting, so the library never changes it behind a host
program's back: ``Engine`` leaves it alone, the ``specjax`` CLI calls
``enable_compilation_cache()``, and Python users opt in with
``specjax.enable_compilation_cache()``. Without a path the cache lives in
``$SPECJAX_COMPILATION_CACHE`` if set, else ``$XDG_CACHE_HOME/specjax/jax``
(``~/.cache/specjax/jax``); ``SPECJAX_COMPILATION_CACHE=off`` leaves JAX's own
setting alone (e.g. when the application configures its own cache).
"""

from __future__ import annotations

import os
import pathlib
import time
from typing import Callable, Optional, TypeVar, Union

import jax

ENV = "SPECJAX_COMPILATION_CACHE"
OFF = ("off", "0", "false", "no")
# Small programs too: a decode step of a small model compiles in well under a second.
MIN_COMPILE_TIME_S = 0.1


def default_cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "specjax" / "jax"


def enable_compilation_cache(path: Union[str, os.PathLike, None] = None) -> Optional[pathlib.Path]:
    """Point JAX's persistent compilation cache at ``path`` and cache programs compiling in 0.1 s or more.

    Without ``path``: ``$SPECJAX_COMPILATION_CACHE`` (``off`` disables: returns None and changes
    nothing), else the directory JAX already uses if one is set, else ``default_cache_dir()``.
    Returns the directory in use.
    """
    if path is None:
        setting = os.environ.get(ENV, "")
        if setting.lower() in OFF:
            return None
        current = jax.config.jax_compilation_cache_dir
        path = setting or current or default_cache_dir()
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_S)
    return path


# JAX's compile-time events: tracing, lowering, and XLA compilation (or a persistent-cache read).
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


class CompileClock:
    """``with CompileClock() as clock: ...``: ``clock.seconds`` spent compiling inside the block.

    Timed runs subtract it: a program compiled on first use (a tree size the auto policy reaches
    late, a new prompt bucket) is a one-off cost, not the steady state a speedup describes, and
    compiling lazily must not change a measured ratio. It is the union of JAX's compile event spans
    (``COMPILE_EVENTS``), so a jitted function traced inside another counts once.
    """

    def __init__(self):
        self.spans: list[tuple[float, float]] = []

    def __enter__(self) -> "CompileClock":
        jax.monitoring.register_event_time_span_listener(self._record)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_time_span_listener(self._record)

    def _record(self, event: str, start: float, end: float, **kwargs) -> None:
        if event in COMPILE_EVENTS:
            self.spans.append((start, end))

    @property
    def seconds(self) -> float:
        total, reached = 0.0, float("-inf")
        for start, end in sorted(self.spans):
            if end > reached:
                total += end - max(start, reached)
                reached = end
        return total


T = TypeVar("T")


def timed_excluding_compiles(run: Callable[[], T]) -> tuple[T, float, float]:
    """``run()``'s result, its wall seconds less what it spent compiling, and that compile time
    (``CompileClock``): how the CLI times a run whose first use of a tree size compiles it."""
    with CompileClock() as clock:
        start = time.perf_counter()
        result = run()
        wall = time.perf_counter() - start
    return result, wall - clock.seconds, clock.seconds
