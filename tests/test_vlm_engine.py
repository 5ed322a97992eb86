"""``Engine.generate(images=...)`` on a vision-language target: every loop equals transformers.

A random LLaVA (CLIP tower, Llama decoder) as in ``test_vlm``; its images preprocessed by the
engine (``encode_image_prompts``). The host loop with prompt lookup, fused plain decoding and the
on-device loop with Token Recycling all give transformers' greedy tokens; the same prompts without
their images (the control) do not.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_vlm import SMALL_IMAGES, build_hf_llava, random_images  # noqa: E402
from specjax.drafters.prompt_lookup import PromptLookupDrafter  # noqa: E402
from specjax.drafters.token_recycling import TokenRecyclingDrafter  # noqa: E402
from specjax.engine.engine import Engine  # noqa: E402
from specjax.models import llava  # noqa: E402
from specjax.models.image_processing import preprocess  # noqa: E402

NEW = 16


@pytest.fixture(scope="module")
def vlm_pair(tmp_path_factory):
    hf = build_hf_llava("clip_llama", seed=3)
    directory = str(tmp_path_factory.mktemp("vlm_engine"))
    hf.save_pretrained(directory, safe_serialization=True)
    vlm = dataclasses.replace(llava.load_llava(directory, dtype=jnp.float32), image_processor=SMALL_IMAGES)
    return hf, vlm


def transformers_greedy(hf, vlm, ids: list, images: list) -> list:
    """transformers' greedy continuation of ``ids`` (image tokens expanded) up to NEW tokens or EOS."""
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(preprocess(images, SMALL_IMAGES)),
                          do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)
    tokens = out[0, len(ids):].tolist()
    eos = set(vlm.config.text.eos_token_ids)
    stop = next((k + 1 for k, t in enumerate(tokens) if t in eos), len(tokens))
    return tokens[:stop]


@pytest.mark.parametrize("drafter", ["prompt-lookup", "none", "token-recycling"])
def test_generate_with_images_equals_transformers_in_every_loop(vlm_pair, drafter):
    hf, vlm = vlm_pair
    vocab = vlm.config.text.vocab_size
    make = {"prompt-lookup": PromptLookupDrafter, "none": lambda: None,
            "token-recycling": lambda: TokenRecyclingDrafter(vocab, capacity=8)}[drafter]
    engine = Engine(vlm, make())
    images = [random_images(1, [(40, 30)]), random_images(2, [(30, 45), (50, 50)])]
    prompts = [[5, 9, 14, 9, 14], [7, 8, 7, 8, 7]]  # no image token: the images go first
    results = engine.generate(prompts, NEW, images=images)
    image_run = [vlm.config.image_token_id] * vlm.config.tokens_per_image
    for prompt, imgs, result in zip(prompts, images, results):
        expanded = image_run * len(imgs) + prompt
        assert result.token_ids == transformers_greedy(hf, vlm, expanded, imgs)
    # Control: the same prompts without the images' features decode otherwise.
    blind = Engine(vlm.text_model(), None).generate([image_run + prompts[0], image_run * 2 + prompts[1]], NEW)
    assert [r.token_ids for r in blind] != [r.token_ids for r in results]


def test_images_need_a_vision_language_target_and_one_entry_per_prompt(vlm_pair):
    _, vlm = vlm_pair
    with pytest.raises(ValueError, match="vision-language"):
        Engine(vlm.text_model(), None).generate([[5, 6]], 4, images=[random_images(0, [(30, 30)])])
    with pytest.raises(ValueError, match="one per prompt"):
        Engine(vlm, None).generate([[5, 6], [7, 8]], 4, images=[random_images(0, [(30, 30)])])
    with pytest.raises(ValueError, match="session"):
        engine = Engine(vlm, PromptLookupDrafter())
        engine.generate([[5, 6]], 4, images=[random_images(0, [(30, 30)])], session=engine.session(128))
    assert np.isfinite(np.asarray(vlm.params["text"]["embed"])).all()


def test_cli_answers_about_images_with_the_shipped_tiny_vlm(tmp_path, capsys):
    """``specjax generate --model tiny-vlm``: held-out questions with their images, speculative equal
    to plain; ``--prompt`` with ``--image FILE`` equals the library's ``generate(images=...)``."""
    import json

    from PIL import Image

    from specjax.engine.cli import main
    from specjax.models.embedded import shape_scenes, tiny_vlm_dir
    from specjax.models.multimodal import load_vlm

    assert main(["generate", "--model", "tiny-vlm", "--json", "--num-demo-prompts", "3", "--compare-baseline",
                 "--repeat", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical_to_baseline"] is True and len(out["token_ids"]) == 3
    held_out = shape_scenes.read_held_out(f"{tiny_vlm_dir()}/{shape_scenes.HELD_OUT_FILE}")
    _, image, qa = next(held_out)
    Image.fromarray(image).save(tmp_path / "scene.png")
    question = qa[0][0]
    assert main(["generate", "--model", "tiny-vlm", "--json", "--prompt", shape_scenes.prompt_text(question),
                 "--image", str(tmp_path / "scene.png"), "--max-new-tokens", "4"]) == 0
    got = json.loads(capsys.readouterr().out)["token_ids"][0]
    vlm = load_vlm(tiny_vlm_dir(), dtype=jnp.float32)
    want = Engine(vlm, None).generate([shape_scenes.prompt_text(question)], 4, images=[[image]])[0].token_ids
    assert got == want
    with pytest.raises(SystemExit, match="vision-language"):
        main(["generate", "--model", "tiny-sql", "--prompt", "x", "--image", str(tmp_path / "scene.png")])
