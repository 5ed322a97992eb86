"""Builds the compiled core of the suffix drafter; every other setting lives in pyproject.toml.

The build is optional by default: where no C++ compiler is found the install still succeeds (with
setuptools' warning) and the drafter runs its pure-Python reference. ``SPECJAX_REQUIRE_SUFFIX_CORE=1``
makes it required, and CI sets it (.ci/run): a failed build then fails the install, and importing the
suffix drafter without the core fails too (drafters/suffix_index.py), so CI cannot lose the core silently.
"""

import os

from setuptools import Extension, setup

REQUIRED = os.environ.get("SPECJAX_REQUIRE_SUFFIX_CORE", "0")
if REQUIRED not in ("0", "1"):
    raise SystemExit(f"SPECJAX_REQUIRE_SUFFIX_CORE must be 0 or 1, got {REQUIRED!r}")

setup(ext_modules=[Extension(
    "specjax.drafters._suffix_core", sources=["csrc/suffix_core.cpp"], language="c++", optional=REQUIRED == "0",
    # -ffp-contract=off: no fused multiply-add, so every float matches the Python reference bit for bit.
    extra_compile_args=["-std=c++17", "-O2", "-ffp-contract=off"])])
