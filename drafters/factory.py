"""Build a drafter by name, as ``specjax generate --drafter NAME`` does, from Python.

``load_drafter("auto", target)`` picks what the CLI's ``--drafter auto`` picks, and a model drafter
(draft-model, eagle3, graft, taps) without ``drafter_model`` takes the weights shipped for the
embedded model when ``target`` is the embedded model.
"""

from __future__ import annotations

import json
import os
from typing import Optional, Union

DRAFTER_NAMES = ("auto", "suffix", "prompt-lookup", "draft-model", "eagle3", "token-recycling", "graft", "taps",
                 "hierarchical", "none")
REAL_MODEL_DRAFTER = "prompt-lookup"  # "auto" for other models: 1.25 vs suffix's 1.17 tokens/pass on the
# shipped tasks with SmolLM2-135M-Instruct at batch 1 on a CPU (suffix warm from the earlier tasks; README)
RECOMMENDED_TREE = "specjax_drafter.json"  # in a drafter directory: {"tree": {"capacity", "topk", "depth"}}


def default_max_capacity() -> int:
    """8 on a CPU (bigger trees rarely pay for their verify cost there), 16 on accelerators."""
    import jax

    return 8 if jax.default_backend() == "cpu" else 16


def is_embedded_model(target) -> bool:
    """Whether ``target`` (a loaded Model) is the embedded tiny text-to-SQL model."""
    from specjax.models.embedded import default_model_dir
    from specjax.models.safetensors_io import CheckpointError

    path = getattr(target, "path", None)
    if path is None:
        return False
    try:
        return os.path.realpath(path) == os.path.realpath(default_model_dir())
    except CheckpointError:  # the embedded model is not installed
        return False


def shipped_drafter_dirs(model_is_embedded: bool) -> dict:
    """The drafter directories shipped for the embedded model, by drafter name ({} for other models)."""
    if not model_is_embedded:
        return {}
    from specjax.models.embedded import embedded_drafter_dir, embedded_eagle3_dir

    draft, eagle3 = embedded_drafter_dir(), embedded_eagle3_dir()
    taps = f"{eagle3},{draft}" if eagle3 and draft else None
    named = {"draft-model": draft, "eagle3": eagle3, "graft": eagle3 or draft, "taps": taps, "hierarchical": draft}
    return {name: path for name, path in named.items() if path}


def resolve_drafter_name(name: str, drafter_model: Optional[str] = None, *,
                         model_is_embedded: bool) -> tuple[str, Optional[str]]:
    """(drafter name, drafter directory) that ``name`` means. "auto": with the embedded model on a
    TPU/GPU, the draft model shipped for it (a verified chain costs about one decode step there);
    otherwise the suffix index (on a CPU a step's cost grows with the nodes verified, and the chain does
    not pay: see the README). Other models have no shipped drafter: ``REAL_MODEL_DRAFTER`` on every
    device. A model drafter without ``drafter_model`` takes the weights shipped for the embedded model:
    draft-model the draft model, eagle3 and graft the EAGLE-3 head, taps both, hierarchical the draft model
    (as the intermediate)."""
    import jax

    if name not in DRAFTER_NAMES:
        raise ValueError(f"unknown drafter {name!r}; expected one of {', '.join(DRAFTER_NAMES)}")
    shipped_dirs = shipped_drafter_dirs(model_is_embedded)
    if not drafter_model and name in shipped_dirs:
        return name, shipped_dirs[name]
    if name != "auto":
        return name, drafter_model
    shipped = shipped_dirs.get("draft-model")
    if shipped is not None and not drafter_model and jax.default_backend() != "cpu":
        return "draft-model", shipped
    return ("suffix" if model_is_embedded else REAL_MODEL_DRAFTER), drafter_model


def suffix_history_path(choice: Optional[str], model_is_embedded: bool) -> Optional[str]:
    """The history file ``choice`` names: a path, "none", or "auto" (the embedded model's, when it runs)."""
    if not choice or choice == "none":
        return None
    if choice != "auto":
        return choice
    if not model_is_embedded:
        return None
    from specjax.models.embedded import embedded_suffix_history

    return embedded_suffix_history()


def tree_shape(drafter_model: str, fixed: Optional[int], defaults: tuple[int, int, int],
               tree_topk: Optional[int] = None, tree_depth: Optional[int] = None) -> tuple[int, int, int]:
    """(capacity, topk, depth): the arguments, else the drafter directory's recommended tree, else
    ``defaults`` (top-k and depth never above the capacity)."""
    recommended = {}
    path = os.path.join(drafter_model, RECOMMENDED_TREE)
    if os.path.isfile(path):
        with open(path) as f:
            recommended = json.load(f).get("tree", {})
    capacity = fixed or int(recommended.get("capacity", defaults[0]))
    topk = tree_topk or int(recommended.get("topk", min(defaults[1], capacity)))
    depth = tree_depth or int(recommended.get("depth", min(defaults[2], capacity)))
    return capacity, min(topk, capacity), min(depth, capacity)


def load_drafter(name: str, target=None, *, drafter_model: Optional[str] = None,
                 draft_capacity: Union[int, str] = "auto", max_draft_capacity: Optional[int] = None,
                 tree_topk: Optional[int] = None, tree_depth: Optional[int] = None, routing: str = "confidence",
                 retrieval: str = "suffix", suffix_history: Optional[str] = "auto",
                 model_is_embedded: Optional[bool] = None, drafter_options: Optional[dict] = None):
    """The drafter called ``name`` (one of ``DRAFTER_NAMES``; None for "none") for ``target``.

    Device drafters (draft-model, eagle3, token-recycling, graft, taps) need ``target``; model
    drafters read their weights from ``drafter_model`` (taps: comma-separated directories), by default
    the ones shipped for the embedded model. ``draft_capacity`` an int fixes the tree slots per step;
    ``max_draft_capacity`` (default: ``default_max_capacity()``) is the device drafters' default size.
    ``model_is_embedded`` defaults to whether ``target`` is the embedded model. ``drafter_options`` are
    keyword arguments of a host drafter's constructor (``PromptLookupDrafter``,
    ``SuffixDecodingDrafter``), over the CLI's defaults."""
    if model_is_embedded is None:
        model_is_embedded = target is not None and is_embedded_model(target)
    name, drafter_model = resolve_drafter_name(name, drafter_model, model_is_embedded=model_is_embedded)
    options = dict(drafter_options or {})
    if name == "none":
        return None
    if name == "prompt-lookup":
        from specjax.drafters.prompt_lookup import PromptLookupDrafter

        return PromptLookupDrafter(**{"max_ngram": 3, "max_branches": 4, **options})
    if name == "suffix":
        return _suffix_drafter(target, suffix_history_path(suffix_history, model_is_embedded), options)
    if options:
        raise ValueError(f"drafter_options configure the host drafters (prompt-lookup, suffix), not {name!r}: "
                         f"got {sorted(options)}")
    if target is None:
        raise ValueError(f"drafter {name!r} runs on the device and needs the target model")
    fixed = draft_capacity if isinstance(draft_capacity, int) and draft_capacity > 0 else None
    if name == "token-recycling":
        from specjax.drafters.token_recycling import TokenRecyclingDrafter

        return TokenRecyclingDrafter(target.config.vocab_size, capacity=fixed or 80)
    if not drafter_model:
        raise ValueError(f"--drafter {name} needs --drafter-model DIR (the drafter's weights)")
    max_capacity = max_draft_capacity or default_max_capacity()
    if name == "graft":
        retriever = load_drafter(retrieval, target, suffix_history=suffix_history,
                                 model_is_embedded=model_is_embedded)
        return _graft(target, drafter_model, retriever, fixed or max_capacity)
    if name == "taps":
        return _taps(target, drafter_model, routing, fixed or max_capacity)
    if name == "hierarchical":  # --drafter-model INTERMEDIATE[,HEAD]: HierSpec, Token Recycling on top by default
        from specjax.drafters.hierarchical import load_hierarchical

        return load_hierarchical(target, drafter_model, capacity=fixed)
    dtype = target.params["embed"].dtype
    if name == "draft-model":
        from specjax.drafters.draft_model import DraftModelDrafter
        from specjax.models.loading import load_model

        capacity, topk, depth = tree_shape(drafter_model, fixed, (max_capacity, 4, 6), tree_topk, tree_depth)
        return DraftModelDrafter(load_model(drafter_model, dtype=dtype), target.config.vocab_size,
                                 capacity=capacity, topk=topk, depth=depth)
    from specjax.drafters.eagle3 import DEFAULT_CAPACITY, DEFAULT_DEPTH, DEFAULT_TOPK, load_eagle3

    capacity, topk, depth = tree_shape(drafter_model, fixed, (DEFAULT_CAPACITY, DEFAULT_TOPK, DEFAULT_DEPTH),
                                       tree_topk, tree_depth)
    return load_eagle3(drafter_model, target, dtype=dtype, capacity=capacity, topk=topk, depth=depth)


def _suffix_drafter(target, history: Optional[str], options: dict):
    """A suffix-decoding drafter, its global index pre-filled from ``history`` (a responses file)."""
    from specjax.drafters.suffix_index import SuffixDecodingDrafter

    drafter = SuffixDecodingDrafter(**options)
    if history is not None:
        if target is None:
            raise ValueError("a suffix history needs the target model (its vocabulary and tokenizer)")
        from specjax.drafters.suffix_history import load_history

        drafter.remember(load_history(history, vocab_size=target.config.vocab_size, tokenizer=target.tokenizer))
    return drafter


def _graft(target, drafter_model: str, retriever, capacity: int):
    """Graft: one drafter directory plus a retrieval drafter."""
    from specjax.drafters.graft import GraftDrafter
    from specjax.drafters.hybrid import load_device_drafter

    dirs = [d for d in drafter_model.split(",") if d]
    if len(dirs) != 1:
        raise ValueError(f"--drafter graft takes one --drafter-model DIR, got {len(dirs)}")
    return GraftDrafter(load_device_drafter(dirs[0], target, capacity), retriever, capacity=capacity)


def _taps(target, drafter_model: str, routing: str, capacity: int):
    """TAPS: two or more drafter directories (comma-separated), routed per step and row."""
    from specjax.drafters.hybrid import load_device_drafter
    from specjax.drafters.routing import TapsDrafter

    dirs = [d for d in drafter_model.split(",") if d]
    if len(dirs) < 2:
        raise ValueError(f"--drafter taps needs at least two drafters: --drafter-model DIR1,DIR2, got {len(dirs)}")
    return TapsDrafter([load_device_drafter(d, target, capacity) for d in dirs], target.config.vocab_size,
                       routing=routing, capacity=capacity)
