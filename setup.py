"""Builds the compiled core of the suffix drafter; every other setting lives in pyproject.toml.

``optional``: where no C++ compiler is found the install still succeeds and the
drafter runs its pure-Python reference (tests/test_suffix_core.py then fails,
so a CI machine cannot lose the core silently).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "specjax.drafters._suffix_core", sources=["csrc/suffix_core.cpp"], language="c++", optional=True,
    # -ffp-contract=off: no fused multiply-add, so every float matches the Python reference bit for bit.
    extra_compile_args=["-std=c++17", "-O2", "-ffp-contract=off"])])
