"""A declarative speculative-decoding setup in vLLM's and transformers' words.

``SpecConfig(method="ngram", num_speculative_tokens=4, prompt_lookup_max=3)`` or
``SpecConfig.from_dict(vllm_speculative_config)`` names a specjax drafter and the
Engine settings it runs with; ``Engine.from_pretrained(model, speculative_config=...)``
builds both. The field names are those of vLLM's ``speculative_config``; ``from_dict``
also takes transformers' ``generate`` words (``prompt_lookup_num_tokens``,
``max_matching_ngram_size``, ``assistant_model``, ``num_assistant_tokens``). Keys and
methods specjax does not implement are refused by name, never ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Optional, Union

# method (vLLM's name, or specjax's) -> the specjax drafter (``load_drafter`` name)
METHODS = {"auto": "auto", "ngram": "prompt-lookup", "suffix": "suffix", "draft_model": "draft-model",
           "eagle3": "eagle3", "token_recycling": "token-recycling", "graft": "graft", "taps": "taps",
           "none": "none"}
_METHOD_ALIASES = {"prompt_lookup": "ngram", "[ngram]": "ngram", "ngram_gpu": "ngram"}
_UNSUPPORTED_METHODS = {
    "eagle": "specjax runs EAGLE-3 heads (method='eagle3'), not EAGLE-1/2 heads",
    "medusa": "Medusa heads are not implemented",
    "mlp_speculator": "MLP speculators are not implemented",
    "mtp": "multi-token-prediction layers are not implemented",
}
MODEL_METHODS = ("draft_model", "eagle3", "graft", "taps")  # the ones that read drafter weights from ``model``
_NGRAM_FIELDS = ("prompt_lookup_min", "prompt_lookup_max", "prompt_lookup_branches")
_SUFFIX_OPTIONS = {"suffix_decoding_max_tree_depth": "max_depth", "suffix_decoding_max_spec_factor": "max_spec_factor",
                   "suffix_decoding_min_token_prob": "min_token_prob",
                   "suffix_decoding_max_cached_requests": "max_cached_requests"}
_TREE_FIELDS = ("tree_topk", "tree_depth")
# transformers' generate() words -> SpecConfig fields
TRANSFORMERS_KEYS = {"prompt_lookup_num_tokens": "num_speculative_tokens", "max_matching_ngram_size": "prompt_lookup_max",
                     "assistant_model": "model", "num_assistant_tokens": "num_speculative_tokens"}
# vLLM keys with no specjax counterpart: refused with the reason rather than silently dropped
_VLLM_UNSUPPORTED_KEYS = {
    "draft_tensor_parallel_size": "the drafter shares the Engine's mesh (Engine(mesh=...))",
    "quantization": "weights load dequantized (load_model's dtype)",
    "max_model_len": "the cache is sized per request (Engine.generate's max_new_tokens, Engine.session)",
    "revision": "model names resolve through load_model (a directory, registry name or hf:Org/Repo)",
    "code_revision": "model names resolve through load_model (a directory, registry name or hf:Org/Repo)",
    "disable_by_batch_size": "draft_capacity='auto' chooses plain steps where drafts do not pay",
    "speculative_token_tree": "tree shapes come from the drafter (tree_topk / tree_depth for model drafters)",
}


class SpecConfigError(ValueError):
    """A speculative config specjax cannot run: an unknown key or method, or a bad value."""


@dataclasses.dataclass(frozen=True)
class SpecConfig:
    """What to draft with and how much to verify per step (see the README's mapping table).

    Args:
      method: "ngram" (prompt lookup), "suffix" (the suffix index), "draft_model", "eagle3",
        "token_recycling", "graft", "taps", "auto" (``load_drafter("auto")``) or "none" (plain
        decoding). None: "eagle3" if ``model``'s name says so, "draft_model" for any other
        ``model``, else "auto" (as vLLM infers it from ``model``).
      num_speculative_tokens: draft tokens (tree slots) verified per request and step, at most.
        None: ``Engine.from_pretrained``'s ``max_draft``.
      model: the drafter's weights for the model methods: a directory, a registry name
        (draft_model) or comma-separated directories (taps).
      prompt_lookup_min / prompt_lookup_max: the n-gram sizes matched, longest first (defaults 1, 3).
      prompt_lookup_branches: earlier matches merged into one tree (default 4; 1 = vLLM's chain).
      suffix_decoding_*: the suffix index's tree depth, speculation factor, minimum token
        probability and cached requests (defaults 64, 1.0, 0.1, 10000).
      suffix_history: the suffix index's pre-filled responses: "auto" (the embedded model's), a
        file, or "none".
      tree_topk / tree_depth: a model drafter's tree (top-k 1 = a chain, as vLLM drafts).
      adaptive: True: specjax's auto policy verifies 0 (a plain step) up to
        ``num_speculative_tokens`` slots, whichever its measured costs say pays; False: always
        the full number, as vLLM does.
    """

    method: Optional[str] = None
    num_speculative_tokens: Optional[int] = None
    model: Optional[str] = None
    prompt_lookup_min: Optional[int] = None
    prompt_lookup_max: Optional[int] = None
    prompt_lookup_branches: Optional[int] = None
    suffix_decoding_max_tree_depth: Optional[int] = None
    suffix_decoding_max_spec_factor: Optional[float] = None
    suffix_decoding_min_token_prob: Optional[float] = None
    suffix_decoding_max_cached_requests: Optional[int] = None
    suffix_history: Optional[str] = "auto"
    tree_topk: Optional[int] = None
    tree_depth: Optional[int] = None
    adaptive: bool = True

    def __post_init__(self):
        object.__setattr__(self, "method", _canonical_method(self.method, self.model))
        for name in ("num_speculative_tokens", "tree_topk", "tree_depth", "prompt_lookup_min", "prompt_lookup_max",
                     "prompt_lookup_branches", "suffix_decoding_max_tree_depth"):
            _check_int(name, getattr(self, name))
        _check_int("suffix_decoding_max_cached_requests", self.suffix_decoding_max_cached_requests, minimum=0)
        _check_number("suffix_decoding_max_spec_factor", self.suffix_decoding_max_spec_factor, 0.0, float("inf"))
        _check_number("suffix_decoding_min_token_prob", self.suffix_decoding_min_token_prob, 0.0, 1.0)
        if self.model is not None and not isinstance(self.model, str):
            raise SpecConfigError(f"speculative config 'model' must be a path or name (str), got "
                                  f"{type(self.model).__name__}")
        self._check_fields_apply()
        if not isinstance(self.adaptive, bool):
            raise SpecConfigError(f"speculative config 'adaptive' must be True or False, got {self.adaptive!r}")
        if not self.adaptive and self.num_speculative_tokens is None:
            raise SpecConfigError("adaptive=False verifies a fixed number of draft tokens: set num_speculative_tokens")

    def _check_fields_apply(self) -> None:
        """Settings of another method's drafter are refused: they would otherwise do nothing."""
        applies = {"model": self.method in MODEL_METHODS,
                   **{f: self.method == "ngram" for f in _NGRAM_FIELDS},
                   **{f: self.method == "suffix" for f in _SUFFIX_OPTIONS},
                   **{f: self.method in ("draft_model", "eagle3") for f in _TREE_FIELDS}}
        for name, ok in applies.items():
            if getattr(self, name) is not None and not ok:
                raise SpecConfigError(f"speculative config {name!r} does not apply to method {self.method!r}")

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "SpecConfig":
        """A config from vLLM's ``speculative_config`` dict (or transformers' ``generate`` words).

        ``{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}`` and
        ``{"prompt_lookup_num_tokens": 5, "max_matching_ngram_size": 4}`` are the same config.
        """
        if not isinstance(config, Mapping):
            raise SpecConfigError(f"a speculative config is a dict, got {type(config).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in config.items():
            name = TRANSFORMERS_KEYS.get(key, key)
            if key in _VLLM_UNSUPPORTED_KEYS:
                raise SpecConfigError(f"speculative config key {key!r} is not supported by specjax: "
                                      f"{_VLLM_UNSUPPORTED_KEYS[key]}")
            if name not in fields:
                raise SpecConfigError(f"unknown speculative config key {key!r}{_did_you_mean(key, fields)}; "
                                      f"known: {', '.join(sorted(fields | set(TRANSFORMERS_KEYS)))}")
            if name in values and values[name] != value:
                raise SpecConfigError(f"speculative config gives {name!r} twice with different values "
                                      f"({values[name]!r} and {value!r}, the latter as {key!r})")
            values[name] = value
        if "prompt_lookup_num_tokens" in config and values.get("method") is None:
            values["method"] = "ngram"  # transformers: prompt lookup is on when this is set
        return cls(**values)

    @property
    def drafter_name(self) -> str:
        """The ``load_drafter`` name this config's method runs."""
        return METHODS[self.method]

    def drafter_options(self) -> dict:
        """Constructor keywords of the host drafter (prompt lookup, suffix index) this config sets."""
        if self.method == "ngram":
            options = {"min_ngram": self.prompt_lookup_min, "max_ngram": self.prompt_lookup_max,
                       "max_branches": self.prompt_lookup_branches}
            if self.prompt_lookup_min is not None and self.prompt_lookup_max is None:
                options["max_ngram"] = max(3, self.prompt_lookup_min)  # the default max, never below min
        else:
            options = {arg: getattr(self, name) for name, arg in _SUFFIX_OPTIONS.items()}
        return {k: v for k, v in options.items() if v is not None}

    def build(self, target, max_draft: int) -> tuple[Any, dict]:
        """(the drafter for ``target``, the Engine keyword arguments: ``draft_capacity`` and
        ``max_draft_capacity``). ``max_draft`` stands in for an unset ``num_speculative_tokens``."""
        from specjax.drafters.factory import load_drafter

        slots = self.num_speculative_tokens or max_draft
        drafter = load_drafter(self.drafter_name, target, drafter_model=self.model,
                               draft_capacity=slots if self.num_speculative_tokens else "auto",
                               max_draft_capacity=slots, tree_topk=self.tree_topk, tree_depth=self.tree_depth,
                               suffix_history=self.suffix_history, drafter_options=self.drafter_options())
        return drafter, {"draft_capacity": "auto" if self.adaptive else slots, "max_draft_capacity": slots}


def as_spec_config(config: Union[SpecConfig, Mapping[str, Any]]) -> SpecConfig:
    """A ``SpecConfig`` from itself or a dict (``SpecConfig.from_dict``)."""
    return config if isinstance(config, SpecConfig) else SpecConfig.from_dict(config)


def _canonical_method(method: Optional[str], model: Optional[str]) -> str:
    """vLLM's method name for ``method``, inferred from ``model`` when None, as vLLM infers it."""
    if method is None:
        if not model or not isinstance(model, str):
            return "auto"
        return "eagle3" if "eagle3" in model.lower() else "draft_model"
    if not isinstance(method, str):
        raise SpecConfigError(f"speculative config 'method' must be a string, got {type(method).__name__}")
    key = method.strip().lower().replace("-", "_")
    key = _METHOD_ALIASES.get(key, key)
    if key in METHODS:
        return key
    reason = _UNSUPPORTED_METHODS.get("mtp" if key.endswith("mtp") else key)
    known = ", ".join(METHODS)
    if reason:
        raise SpecConfigError(f"speculative method {method!r} is not supported by specjax ({reason}); supported: {known}")
    raise SpecConfigError(f"unknown speculative method {method!r}{_did_you_mean(key, METHODS)}; supported: {known}")


def _check_int(name: str, value, minimum: int = 1) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise SpecConfigError(f"speculative config {name!r} must be {kind}, got {value!r}")


def _check_number(name: str, value, low: float, high: float) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high):
        raise SpecConfigError(f"speculative config {name!r} must be a number in [{low}, {high}], got {value!r}")


def _did_you_mean(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def pretrained_parts(model, drafter=None, *, max_draft: Optional[int] = None,
                     speculative_config: Union[SpecConfig, Mapping[str, Any], None] = None, dtype="auto",
                     engine_kwargs: Optional[dict] = None) -> tuple[Any, Any, dict]:
    """(target, drafter, Engine keyword arguments) for ``Engine.from_pretrained``.

    ``model``: a loaded ``Model`` or what ``load_model`` takes. ``drafter``: a ``load_drafter`` name
    (default "prompt-lookup") or a drafter object; or, instead, a ``speculative_config``.
    """
    from specjax.drafters.factory import default_max_capacity, load_drafter
    from specjax.models.loading import Model, load_model

    engine_kwargs = dict(engine_kwargs or {})
    if "max_draft_capacity" in engine_kwargs:
        raise ValueError("from_pretrained takes the tree budget as max_draft (or num_speculative_tokens in "
                         "speculative_config), not max_draft_capacity")
    if max_draft is not None and (isinstance(max_draft, bool) or not isinstance(max_draft, int) or max_draft < 1):
        raise ValueError(f"max_draft must be a positive int, got {max_draft!r}")
    max_draft = max_draft or default_max_capacity()
    target = model if isinstance(model, Model) else load_model(model, dtype=dtype)
    if speculative_config is not None:
        if drafter is not None:
            raise ValueError("pass either a drafter or a speculative_config, not both")
        if "draft_capacity" in engine_kwargs:
            raise ValueError("with a speculative_config, set the tree size there (num_speculative_tokens, "
                             "adaptive), not as draft_capacity")
        drafter, settings = as_spec_config(speculative_config).build(target, max_draft)
        return target, drafter, {**settings, **engine_kwargs}
    if drafter is None or isinstance(drafter, str):
        drafter = load_drafter(drafter or "prompt-lookup", target, max_draft_capacity=max_draft)
    return target, drafter, {"max_draft_capacity": max_draft, **engine_kwargs}
