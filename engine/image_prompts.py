"""Vision-language prompts in the engine: token ids that carry their input embeddings.

A prompt with images is its token ids (the image tokens expanded) plus the embedding of every
token, the image tokens' replaced by the projected image features
(``models.multimodal.encode_image_prompts``). ``ImagePrompt`` is a list of the ids, so batching,
padding and the drafters treat it as any prompt; only the prefill reads ``embeds``. After the
prefill the images live in the KV cache, and every step is the text model's.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax


class ImagePrompt(list):
    """A prompt's token ids with ``embeds`` [len(ids), hidden], the embeddings its prefill feeds."""

    def __init__(self, ids: Sequence[int], embeds: jax.Array):
        super().__init__(int(t) for t in ids)
        if embeds.ndim != 2 or embeds.shape[0] != len(self):
            raise ValueError(f"embeds of shape {list(embeds.shape)} do not cover {len(self)} prompt tokens")
        self.embeds = embeds


def batch_input_embeds(prompts: Sequence[Sequence[int]], width: int) -> Optional[jax.Array]:
    """[B, width, hidden] for a batch of ``ImagePrompt``s (right-padded with zeros, never read), or None
    for a text batch; a batch mixing the two is refused (text prompts have no embeddings to feed)."""
    with_embeds = [isinstance(p, ImagePrompt) for p in prompts]
    if not any(with_embeds):
        return None
    if not all(with_embeds):
        raise ValueError("a batch mixes prompts with images and without: pass images=None per prompt "
                         "instead (generate(images=[..., None, ...]))")
    from specjax.models.multimodal import pad_input_embeds

    return pad_input_embeds([p.embeds for p in prompts], width)
