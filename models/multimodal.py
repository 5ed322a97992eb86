"""What every vision-language layout shares: image features merged at the prompt's image tokens,
the loaded model, and the checkpoint reading.

A layout (``llava.py``, ``idefics3.py``) turns images into ``tokens_per_image`` embeddings
each, in the text model's width; they replace, in order, the embeddings of the prompt's
image tokens (``image_token_id``, one per image embedding: a processor expands each image
placeholder to ``tokens_per_image`` of them, ``expand_image_tokens``). The decoder then runs
on those embeddings: the prefill takes them as ``input_embeds``
(``specjax.engine.steps.prefill``), and the cache and the decoding steps are the text
model's, unchanged.

A layout's config has ``text`` (a ``ModelConfig``), ``vision`` (a ``VisionConfig``),
``image_token_id``, ``tokens_per_image``, and ``image_features(params, pixel_values)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from specjax.models.config import UnsupportedModelError
from specjax.models.decoder import KVCache, Params, causal_mask, forward
from specjax.models.image_processing import (ImageInput, ImageProcessorConfig, TileProcessorConfig, preprocess,
                                             read_image_processor)
from specjax.models.loading import (Model, _checked_dtype, _checkpoint_dtype, _lookup, _with_generation_eos,
                                    assemble_params, hf_tensor_name, load_tokenizer, open_weight_files,
                                    read_chat_strings, resolve_auto_dtype)
from specjax.models.safetensors_io import CheckpointError
from specjax.tpu_kernels.tree_attention import new_tokens_attention

# ------------------------------------------------------------------ image tokens


def image_token_mask(cfg, tokens: jax.Array, lengths: Optional[jax.Array] = None) -> jax.Array:
    """bool[B, P]: the image tokens among each row's real (``< lengths[b]``) positions."""
    mask = tokens == cfg.image_token_id
    if lengths is not None:
        mask = mask & (jnp.arange(tokens.shape[1])[None, :] < jnp.asarray(lengths)[:, None])
    return mask


def merge_image_features(embeds: jax.Array, mask: jax.Array, features: jax.Array) -> jax.Array:
    """Put features [n_images, n, H], flattened in order, at the ``mask``ed positions of embeds [B, P, H].

    Row-major, as transformers' ``masked_scatter``: image i of the batch fills the i-th
    run of n image tokens. Counts must agree (``check_image_tokens``); traced inputs
    cannot be checked, and surplus tokens would read clamped rows.
    """
    flat = features.reshape(-1, features.shape[-1]).astype(embeds.dtype)
    order = jnp.cumsum(mask.reshape(-1)) - 1  # the k-th image token takes feature row k
    picked = flat[jnp.clip(order, 0, flat.shape[0] - 1)].reshape(embeds.shape)
    return jnp.where(mask[..., None], picked, embeds)


def input_embeddings(params: Params, cfg, tokens: jax.Array, pixel_values: Optional[jax.Array],
                     lengths: Optional[jax.Array] = None) -> jax.Array:
    """[B, P, text H]: the prompt's token embeddings with the images' features at its image tokens.

    ``params`` holds "text" and the layout's image parts. Pure and jittable; check concrete
    inputs with ``check_image_tokens`` first (``prompt_embeddings`` does both).
    """
    embeds = params["text"]["embed"][tokens]
    if pixel_values is None or pixel_values.shape[0] == 0:
        return embeds
    features = cfg.image_features(params, pixel_values)
    return merge_image_features(embeds, image_token_mask(cfg, tokens, lengths), features)


def sequence_logits(params: Params, cfg, tokens: jax.Array, lengths: jax.Array,
                    pixel_values: Optional[jax.Array]) -> jax.Array:
    """float32 [B, P, V]: whole right-padded sequences in one causal pass, no cache kept.

    Differentiable (the cache is empty, so attention is ``new_tokens_attention``): the training
    loss of a vision-language model, and a reference for decoding that shares no cache or step
    code with ``prefill`` / ``step``.
    """
    b, p = tokens.shape
    embeds = input_embeddings(params, cfg, tokens, pixel_values, lengths)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    out = forward(params["text"], cfg.text, tokens, positions, KVCache.zeros(cfg.text, b, p, embeds.dtype),
                  jnp.zeros(b, jnp.int32), causal_mask(b, p, lengths), attention=new_tokens_attention,
                  input_embeds=embeds)
    return out.logits


def check_image_tokens(cfg, tokens, lengths, num_images: int) -> None:
    """Host check that the prompts hold exactly one run of ``tokens_per_image`` image tokens per image.

    Counts per row, so an image never straddles two rows; raises ValueError naming the counts.
    """
    tokens = np.asarray(tokens)
    mask = tokens == cfg.image_token_id
    if lengths is not None:
        mask &= np.arange(tokens.shape[1])[None, :] < np.asarray(lengths)[:, None]
    per_row, n = mask.sum(axis=1), cfg.tokens_per_image
    if per_row.sum() != num_images * n:
        raise ValueError(f"the prompts hold {int(per_row.sum())} image tokens (id {cfg.image_token_id}) but "
                         f"{num_images} image(s) give {num_images * n} features ({n} per image); expand each "
                         "image placeholder to tokens_per_image tokens (expand_image_tokens)")
    odd = np.flatnonzero(per_row % n)
    if odd.size:
        raise ValueError(f"row {int(odd[0])} holds {int(per_row[odd[0]])} image tokens, not a multiple of the "
                         f"{n} tokens of one image")


_embeddings_jit = jax.jit(input_embeddings, static_argnames=("cfg",))


def prompt_embeddings(params: Params, cfg, tokens, lengths, pixel_values) -> jax.Array:
    """The host entry point: ``check_image_tokens``, then the jitted ``input_embeddings``, ready for
    ``prefill(..., input_embeds=)``. ``pixel_values`` [n_images, C, S, S] (``image_processing.preprocess``)
    or None."""
    n_images = 0 if pixel_values is None else int(np.shape(pixel_values)[0])
    check_image_tokens(cfg, tokens, lengths, n_images)
    pixels = None if pixel_values is None else jnp.asarray(pixel_values)
    return _embeddings_jit(params, cfg=cfg, tokens=jnp.asarray(tokens), pixel_values=pixels,
                           lengths=jnp.asarray(lengths))


def expand_image_tokens(ids: Sequence[int], cfg) -> list[int]:
    """Each image token of ``ids`` repeated ``tokens_per_image`` times (what transformers' processors do to
    the text's image placeholder)."""
    out: list[int] = []
    for t in ids:
        out.extend([t] * cfg.tokens_per_image if t == cfg.image_token_id else [t])
    return out


ImagesPerPrompt = Union[None, ImageInput, Sequence[ImageInput]]


def _image_list(images: ImagesPerPrompt) -> list:
    if images is None:
        return []
    return [images] if isinstance(images, (Image.Image, np.ndarray)) else list(images)


def placed_image_tokens(ids: list[int], num_images: int, cfg) -> list[int]:
    """``ids`` with each image's ``tokens_per_image`` tokens in place.

    A prompt holding one image token per image has them expanded; one holding none gets one
    run per image at its start (LLaVA's layout: the image before the question); one already
    expanded is kept. ``check_image_tokens`` rejects any other count.
    """
    held = sum(t == cfg.image_token_id for t in ids)
    if held == 0 and num_images:
        return [cfg.image_token_id] * (num_images * cfg.tokens_per_image) + ids
    return expand_image_tokens(ids, cfg) if held == num_images else ids


def encode_image_prompts(vlm: VisionLanguageModel, prompts: Sequence[Union[str, Sequence[int]]],
                         images: Sequence[ImagesPerPrompt]) -> tuple[list[list[int]], list[jax.Array]]:
    """Prompts with images -> (token ids per prompt, input embeddings [len(ids), H] per prompt).

    What a caller of ``prefill(..., input_embeds=)`` needs (``pad_input_embeds`` lays the
    embeddings out at the prompt width): ``images[i]`` is prompt i's image, list of images, or
    None. A text prompt is tokenized as the Engine tokenizes text (``tokenizer.encode(text).ids``);
    its image placeholders (``image_token_id``) are expanded, or put first when it has none
    (``placed_image_tokens``). Images are preprocessed with the model's image processor, and
    all prompts run through the tower and the merge in one batch. Tiled processors (Idefics3 /
    SmolVLM) write rows and columns into the prompt text and are not handled here.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image entries (one per prompt: an image, "
                         "a list of images, or None)")
    processor = vlm.image_processor
    if not isinstance(processor, ImageProcessorConfig):
        raise ValueError(f"{vlm.path}: encode_image_prompts needs a CLIP / SigLIP-style preprocessor_config.json, "
                         f"not {type(processor).__name__}")
    cfg = vlm.config
    per_prompt = [_image_list(entry) for entry in images]
    ids = []
    for prompt, imgs in zip(prompts, per_prompt):
        if isinstance(prompt, str):
            if vlm.tokenizer is None:
                raise ValueError(f"{vlm.path} has no tokenizer.json: pass token ids, not text")
            prompt = vlm.tokenizer.encode(prompt).ids
        ids.append(placed_image_tokens([int(t) for t in prompt], len(imgs), cfg))
    lengths = np.array([len(row) for row in ids], np.int32)
    width = int(-(-lengths.max() // 8) * 8)  # a few widths, a few compilations
    tokens = np.zeros((len(ids), width), np.int32)
    for row, row_ids in enumerate(ids):
        tokens[row, : len(row_ids)] = row_ids
    flat = [image for imgs in per_prompt for image in imgs]
    embeds = prompt_embeddings(vlm.params, cfg, tokens, lengths, preprocess(flat, processor) if flat else None)
    return ids, [embeds[row, : len(row_ids)] for row, row_ids in enumerate(ids)]


def pad_input_embeds(embeds: Sequence[jax.Array], width: int) -> jax.Array:
    """Per-prompt embeddings [len_i, H] right-padded with zeros into [B, width, H] (padding is never read)."""
    return jnp.stack([jnp.pad(e, ((0, width - e.shape[0]), (0, 0))) for e in embeds])


# ------------------------------------------------------------------ the loaded model


@dataclasses.dataclass
class VisionLanguageModel:
    """A loaded vision-language model: ``params`` holds "text" (the decoder's pytree) and the layout's
    image parts ("vision", and "projector" or "connector").

    A pytree like ``Model`` (params the leaves, the rest static). ``text_model()`` is the decoder
    alone as a ``Model``, for everything that decodes: after the prefill the images live in the
    KV cache, and every step is the text model's.
    """

    config: Any  # a layout's config: llava.LlavaConfig, idefics3.Idefics3Config
    params: Params
    tokenizer: Any = None
    path: Optional[str] = None
    image_processor: Union[ImageProcessorConfig, TileProcessorConfig, None] = None
    chat_template: Optional[str] = None
    bos_token: Optional[str] = None
    eos_token: Optional[str] = None

    def text_model(self) -> Model:
        return Model(config=self.config.text, params=self.params["text"], tokenizer=self.tokenizer, path=self.path,
                     chat_template=self.chat_template, bos_token=self.bos_token, eos_token=self.eos_token)


jax.tree_util.register_dataclass(
    VisionLanguageModel, data_fields=["params"],
    meta_fields=[f.name for f in dataclasses.fields(VisionLanguageModel) if f.name != "params"])


VISION_LANGUAGE_TYPES = ("llava", "idefics3", "smolvlm")  # the model_types load_vlm reads


def is_vision_language(model_dir: Union[str, os.PathLike]) -> bool:
    """Whether ``model_dir`` is a Hugging Face directory of a vision-language layout ``load_vlm`` reads."""
    path = os.path.expanduser(os.fspath(model_dir))
    if not os.path.isfile(os.path.join(path, "config.json")):
        return False
    return read_hf_config(path).get("model_type") in VISION_LANGUAGE_TYPES


def load_vlm(model_dir: Union[str, os.PathLike], dtype="auto") -> VisionLanguageModel:
    """A vision-language Hugging Face directory, by its ``model_type``: "llava", "idefics3" or "smolvlm"."""
    from specjax.models import idefics3, llava

    loaders = {"llava": llava.load_llava, "idefics3": idefics3.load_idefics3, "smolvlm": idefics3.load_idefics3}
    model_type = read_hf_config(os.path.expanduser(os.fspath(model_dir))).get("model_type")
    if model_type not in loaders:
        raise UnsupportedModelError(f"model_type {model_type!r} is not a supported vision-language layout "
                                    f"({', '.join(loaders)})")
    return loaders[model_type](model_dir, dtype)


# ------------------------------------------------------------------ checkpoint reading


def read_hf_config(model_dir: str) -> dict:
    """A directory's config.json as a dict, with errors naming the file."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir}: no config.json (is this a Hugging Face model directory?)")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from e


def text_config_dict(hf: dict) -> dict:
    """A composite config's ``text_config``, its sizes required (transformers' defaults are not guessed) and
    ``tie_word_embeddings`` as transformers resolves it (tied when the top level or the text config says so)."""
    text = dict(hf.get("text_config") or {})
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in text]
    if missing:
        raise CheckpointError(f"text_config has no {', '.join(missing)}: configs that leave the text model's "
                              "sizes to transformers' defaults are not supported; write them out")
    text.setdefault("model_type", "llama")
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings")) or bool(text.get("tie_word_embeddings"))
    return text


class Checkpoint:
    """A vision-language directory being loaded: its config, dtype and tensors, read one part at a time."""

    def __init__(self, model_dir: Union[str, os.PathLike], dtype, config_from_hf: Callable[[dict], Any]):
        self.dir = os.path.expanduser(os.fspath(model_dir))
        if not os.path.isdir(self.dir):
            raise CheckpointError(f"model directory {self.dir!r} does not exist")
        dtype = _checked_dtype(dtype)
        cfg = config_from_hf(read_hf_config(self.dir))
        # generation_config.json's EOS ids override the text model's, as for a text model.
        self.config = dataclasses.replace(cfg, text=_with_generation_eos(self.dir, cfg.text))
        self.dtype = resolve_auto_dtype(_checkpoint_dtype(self.dir)) if dtype == "auto" else dtype
        self.tensors = open_weight_files(self.dir)

    def prefix(self, prefixes: Sequence[str], probe: str, part: str) -> str:
        """The first of ``prefixes`` under which the checkpoint holds ``probe`` (hub and transformers 5
        checkpoints name the same tensors differently)."""
        for prefix in prefixes:
            if prefix + probe in self.tensors:
                return prefix
        raise CheckpointError(f"no {part} weights in the checkpoint: expected a tensor named "
                              f"{' or '.join(repr(p + probe) for p in prefixes)}")

    def text_params(self, prefixes: Sequence[str], lm_head_names: Sequence[str]) -> Params:
        """The decoder's pytree (``loading.assemble_params``), its names moved under the prefix in use."""
        prefix = self.prefix(prefixes, "embed_tokens.weight", "language model")
        head = next((n for n in lm_head_names if n in self.tensors), lm_head_names[0])

        def read(path, layer, shape):
            name = hf_tensor_name(path, layer)
            name = head if name == "lm_head.weight" else prefix + name.removeprefix("model.")
            return _lookup(self.tensors, name, shape)

        return assemble_params(self.config.text, read, self.dtype)

    def tree(self, shapes: dict, name_of: Callable[[tuple[str, ...], Optional[int]], str]) -> Params:
        """A param tree of ``shapes`` read by ``name_of(path, layer)``, layers stacked, on device."""
        np_dtype = np.dtype(jnp.dtype(self.dtype))

        def build(path, shape):
            if path[0] != "layers":
                return jax.device_put(_lookup(self.tensors, name_of(path, None), shape).astype(np_dtype))
            out = np.empty(shape, np_dtype)
            for layer in range(shape[0]):
                out[layer] = _lookup(self.tensors, name_of(path, layer), shape[1:])
            return jax.device_put(out)

        return {key: ({name: build((key, name), s) for name, s in value.items()} if key == "layers"
                      else build((key,), value)) for key, value in shapes.items()}

    def model(self, params: Params) -> VisionLanguageModel:
        """The loaded model, with the directory's tokenizer, chat strings and image processor."""
        return VisionLanguageModel(config=self.config, params=params, tokenizer=load_tokenizer(self.dir),
                                   path=self.dir, image_processor=read_image_processor(self.dir),
                                   **read_chat_strings(self.dir))
