import os
import sys

# Eight virtual CPU devices for the sharding tests; must be set before jax initializes.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

sys.path.insert(0, os.path.dirname(__file__))
# Hermetic tests: no persistent compilation cache unless a test turns it on.
os.environ.setdefault("SPECJAX_COMPILATION_CACHE", "off")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Each test file's compiled programs and models are freed when it ends: a worker runs many files,
    and jit caches kept for the whole session grew two workers past this machine's 24 GB."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture
def wrong_sampler(monkeypatch):
    """The negative control of the sampling tests: acceptance walks the tree with one noise for
    every depth (``test_lossless_sampling.wrong_walk("same_noise")``), which is not plain sampling's."""
    import specjax.engine.steps as steps
    from test_lossless_sampling import wrong_walk

    monkeypatch.setattr(steps, "_sampled_walk", wrong_walk("same_noise"))
    steps.step.clear_cache()
    yield
    monkeypatch.undo()
    steps.step.clear_cache()
