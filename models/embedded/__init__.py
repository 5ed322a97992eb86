"""The checkpoints shipped inside the package (``models/assets/``, see its README.md).

``tiny-sql`` (the default model: a tiny Llama text-to-SQL demo) and ``stdlib-code``
(a small Llama code model trained on Python's standard library, a real target
for drafter benchmarks). ``toy_corpus`` is the tiny-sql model's synthetic corpus
and its demo prompts; the build scripts are ``benchmarks/train_tiny_sql.py`` and
``benchmarks/build_suffix_history.py``. ``tiny-vlm`` is a tiny LLaVA trained on drawn scenes
(``shape_scenes``, ``benchmarks/train_tiny_vlm.py``), ``tiny-vlm-eagle`` its EagleVLM head
(``benchmarks/train_tiny_vlm_eagle.py``).
"""

from __future__ import annotations

import os
from typing import Optional

from specjax.models.safetensors_io import CheckpointError

EMBEDDED_MODEL = "tiny-sql"
EMBEDDED_DRAFTER = "tiny-sql-drafter"
EMBEDDED_EAGLE3 = "tiny-sql-eagle3"
CODE_MODEL = "stdlib-code"
IMAGE_GEN_LO, IMAGE_GEN_HI = "image-gen-lo", "image-gen-hi"
TINY_VLM, TINY_VLM_EAGLE = "tiny-vlm", "tiny-vlm-eagle"
_BUILD_SCRIPTS = {EMBEDDED_MODEL: "train_tiny_sql.py", CODE_MODEL: "train_code_model.py",
                  IMAGE_GEN_LO: "train_image_gen.py", IMAGE_GEN_HI: "train_image_gen.py",
                  TINY_VLM: "train_tiny_vlm.py", TINY_VLM_EAGLE: "train_tiny_vlm_eagle.py"}
_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")


def _asset_dir(name: str) -> str:
    path = os.path.join(_ASSETS, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"the embedded model is missing from {path} (was the package installed without its data "
            f"files?); rebuild it with: python benchmarks/{_BUILD_SCRIPTS[name]} --out " + path)
    return path


def default_model_dir() -> str:
    """Path of the embedded tiny text-to-SQL checkpoint (a Hugging Face model directory)."""
    return _asset_dir(EMBEDDED_MODEL)


def code_model_dir() -> str:
    """Path of the shipped stdlib code model (a Hugging Face model directory)."""
    return _asset_dir(CODE_MODEL)


def image_gen_dirs() -> tuple[str, str]:
    """Paths of the shipped class-conditional image generators: (8 x 8 tokens, 16 x 16 tokens)."""
    return _asset_dir(IMAGE_GEN_LO), _asset_dir(IMAGE_GEN_HI)


def tiny_vlm_dir() -> str:
    """Path of the shipped tiny vision-language model (a LLaVA directory for ``multimodal.load_vlm``)."""
    return _asset_dir(TINY_VLM)


def tiny_vlm_eagle_dir() -> str:
    """Path of the EagleVLM head shipped for tiny-vlm (an EAGLE-3 head with a visual compressor)."""
    return _asset_dir(TINY_VLM_EAGLE)


def _shipped_drafter(name: str) -> Optional[str]:
    path = os.path.join(_ASSETS, name)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def embedded_drafter_dir() -> Optional[str]:
    """Path of the draft model shipped for the embedded model, or None where it is not installed."""
    return _shipped_drafter(EMBEDDED_DRAFTER)


def embedded_eagle3_dir() -> Optional[str]:
    """Path of the EAGLE-3 head shipped for the embedded model, or None where it is not installed."""
    return _shipped_drafter(EMBEDDED_EAGLE3)


EMBEDDED_SUFFIX_HISTORY = "suffix_history.jsonl.gz"


def embedded_suffix_history() -> Optional[str]:
    """Path of the suffix-index history shipped with the embedded model (its greedy answers to
    training-split questions, none of the demo's), or None where it is not installed."""
    path = os.path.join(default_model_dir(), EMBEDDED_SUFFIX_HISTORY)
    return path if os.path.isfile(path) else None
