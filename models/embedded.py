"""The checkpoint shipped inside the package: a tiny Llama text-to-SQL model (see assets/README.md)."""

from __future__ import annotations

import os

from specjax.models.safetensors_io import CheckpointError

EMBEDDED_MODEL = "tiny-sql"


def default_model_dir() -> str:
    """Path of the embedded tiny text-to-SQL checkpoint (a Hugging Face model directory)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", EMBEDDED_MODEL)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"the embedded model is missing from {path} (was the package installed without its data "
            "files?); rebuild it with: python benchmarks/train_tiny_sql.py --out " + path)
    return path
