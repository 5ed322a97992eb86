"""``Engine.generate(images=...)`` on a vision-language target: every loop equals transformers.

A random LLaVA (CLIP tower, Llama decoder) as in ``test_vlm``; its images preprocessed by the
engine (``encode_image_prompts``). The host loop with prompt lookup, fused plain decoding and the
on-device loop with Token Recycling all give transformers' greedy tokens; the same prompts without
their images (the control) do not. Speculative sampling with images keeps the distribution that
transformers' logits give (chi-square), and a wrong acceptance rule (the control) does not.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine_helpers import chi_square_p, exact_pair_distribution  # noqa: E402
from test_lossless_sampling import LikelyTokensDrafter  # noqa: E402
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


# ------------------------------------------------------------------ sampling with images

SAMPLES = 2048  # every (t2, t3) cell with mass >= 1/400 expects >= 5 samples
SAMPLE_PROMPT = [5, 9, 14]
TEMPERATURE = 0.5  # the random LLaVA's distributions are flat; sharper ones let the test tell them apart


def softmax64(logits) -> np.ndarray:
    x = logits.double().numpy() / TEMPERATURE
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def transformers_exact_tables(hf, ids: list, images: list) -> tuple:
    """P(t1), P(t2 | t1), P(t3 | t1, t2) at TEMPERATURE from transformers' LLaVA: the prompt's
    embeddings with the image features merged once, then every continuation's tokens embedded as
    text (as generation feeds them, whatever their id)."""
    embed = hf.get_input_embeddings()
    with torch.no_grad():
        features = torch.cat(list(hf.model.get_image_features(
            torch.tensor(preprocess(images, SMALL_IMAGES))).pooler_output))
        prompt = embed(torch.tensor(ids)).clone()
        prompt[torch.tensor(ids) == hf.config.image_token_id] = features
        v = hf.config.text_config.vocab_size
        tails = [[]] + [[a] for a in range(v)] + [[a, b] for a in range(v) for b in range(v)]
        rows = []
        for length in (0, 1, 2):
            batch = [t for t in tails if len(t) == length]
            for start in range(0, len(batch), 1024):
                chunk = torch.tensor(batch[start: start + 1024], dtype=torch.long).reshape(
                    len(batch[start: start + 1024]), length)
                x = torch.cat([prompt.expand(len(chunk), -1, -1), embed(chunk)], dim=1)
                rows.append(softmax64(hf(inputs_embeds=x).logits[:, -1]))
    probs = np.concatenate(rows)
    return probs[0], probs[1: 1 + v], probs[1 + v:].reshape(v, v, v)


def sampled_pairs(vlm, tables, image) -> np.ndarray:
    """(t2, t3) of SAMPLES speculative samples; no end-of-sequence id, so every row draws all three."""
    no_eos = dataclasses.replace(vlm.config.text, eos_token_ids=())
    vlm = dataclasses.replace(vlm, config=dataclasses.replace(vlm.config, text=no_eos))
    engine = Engine(vlm, LikelyTokensDrafter(tables), draft_capacity=9, attention="xla", max_batch_size=SAMPLES)
    results = engine.generate([SAMPLE_PROMPT] * SAMPLES, 3, temperature=TEMPERATURE, seed=0,
                              images=[[image]] * SAMPLES)
    assert sum(r.accepted_draft_tokens for r in results) > SAMPLES / 8  # the drafts were used
    return np.array([r.token_ids[1:3] for r in results])


@pytest.fixture(scope="module")
def image_tables(vlm_pair):
    hf, vlm = vlm_pair
    image = random_images(4, [(36, 30)])[0]
    ids = [vlm.config.image_token_id] * vlm.config.tokens_per_image + SAMPLE_PROMPT
    return image, transformers_exact_tables(hf, ids, [image]), ids


def test_sampling_with_images_keeps_the_targets_distribution(vlm_pair, image_tables):
    _, vlm = vlm_pair
    image, tables, ids = image_tables
    pairs = sampled_pairs(vlm, tables, image)
    assert chi_square_p(pairs, np.einsum("a,ab,abc->bc", *tables)) > 1e-4
    # The test tells distributions apart: the same prompt with the image tokens' own embeddings
    # (the image left out) has another one.
    assert chi_square_p(pairs, exact_pair_distribution(vlm.text_model(), ids, TEMPERATURE)) < 1e-6


def test_sampling_with_images_control_with_a_wrong_acceptance_rule_is_rejected(vlm_pair, image_tables,
                                                                               wrong_sampler):
    _, vlm = vlm_pair
    image, tables, _ = image_tables
    pairs = sampled_pairs(vlm, tables, image)
    assert chi_square_p(pairs, np.einsum("a,ab,abc->bc", *tables)) < 1e-6
