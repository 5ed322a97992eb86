"""The image generators: the palette tokenizer, the shipped class-conditional decoders, plain
raster decoding through the Engine, and specjax's lossless drafters on the 16 x 16 model
(greedy output identical to plain decoding)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine.engine import Engine
from specjax.engine.plain import generate_plain
from specjax.models.image_tokens import (IMAGE_SIZE, ImageVocab, Palette, decode, draw_digits, encode,
                                         training_batch, upsample_nearest)

VOCAB = ImageVocab()
CLASSES = (0, 3, 7)


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("grid", [8, 16])
def test_decode_then_encode_is_the_identity(grid):
    tokens = np.random.default_rng(grid).integers(0, VOCAB.codebook_size, (5, grid, grid))
    images = decode(tokens)
    assert images.shape == (5, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(encode(images, grid), tokens)


@pytest.mark.parametrize("grid", [8, 16])
def test_encode_then_decode_is_a_fixed_point(grid):
    """A drawn image's tokens describe a palette image whose tokens are the same again."""
    tokens = encode(draw_digits(np.arange(10), np.random.default_rng(0)), grid)
    np.testing.assert_array_equal(encode(decode(tokens), grid), tokens)


def test_the_two_grids_share_one_palette():
    """A low-resolution token is the high-resolution tokens of the patches it covers (on a palette
    image that is flat at the low resolution), so nearest up-sampling proposes exact tokens there."""
    low = np.random.default_rng(1).integers(0, VOCAB.codebook_size, (4, 8, 8))
    np.testing.assert_array_equal(encode(decode(low), 16), upsample_nearest(low, 2))


def test_drawn_digits_are_labelled_and_seeded():
    a, b = (draw_digits(np.arange(10), np.random.default_rng(3)) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert len({img.tobytes() for img in a}) == 10
    # The digit is drawn: every image has exactly two colours, a palette background and foreground.
    colours = Palette().colours.astype(np.uint8)
    for img in a:
        used = np.unique(img.reshape(-1, 3), axis=0)
        assert len(used) == 2 and all((colours == c).all(1).any() for c in used)


def test_codebook_neighbours_have_coordinates():
    palette = Palette()
    near = palette.neighbours(1.0)
    assert near.shape == (64, 64) and (near == near.T).all() and near.diagonal().all()
    assert near[palette.index((1, 1, 1))].sum() == 7 and near[palette.index((0, 0, 0))].sum() == 4
    np.testing.assert_array_equal(palette.neighbours(0.0), np.eye(64, dtype=bool))


def test_training_batches_are_a_function_of_the_step():
    a, labels = training_batch(5, 4, 16, seed=0)
    b, _ = training_batch(5, 4, 16, seed=0)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 2 + 256)
    assert (a[:, 0] == VOCAB.bos).all() and (a[:, 1] == [VOCAB.class_token(c) for c in labels]).all()
    assert (a[:, 2:] < VOCAB.codebook_size).all()


# ---------------------------------------------------------------- the shipped models


@pytest.fixture(scope="module")
def hi_model():
    from specjax.models.embedded import image_gen_dirs
    from specjax.models.loading import load_model

    return load_model(image_gen_dirs()[1], dtype=jnp.float32)


SEED = 11


@pytest.fixture(scope="module")
def plain(hi_model):
    """Plain decoding's images of CLASSES: greedy (all background: a greedy raster decoder never
    starts a stroke whose first token is less likely than the background, as is usual for
    autoregressive image models), and sampled at temperature 1 with seeds SEED + i."""
    prompts = [VOCAB.prompt(c) for c in CLASSES]
    return {"greedy": generate_plain(hi_model, prompts, 256, stop_at_eos=False),
            "sampled": generate_plain(hi_model, prompts, 256, temperature=1.0, seed=SEED, stop_at_eos=False)}


def generate_both(engine: Engine) -> dict:
    prompts = [VOCAB.prompt(c) for c in CLASSES]
    return {"greedy": engine.generate(prompts, 256),
            "sampled": engine.generate(prompts, 256, temperature=1.0, seed=SEED)}


def test_shipped_models_match_the_vocabulary():
    from specjax.models.embedded import image_gen_dirs

    for path, grid in zip(image_gen_dirs(), (8, 16)):
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        with open(os.path.join(path, "image_tokens.json")) as f:
            meta = json.load(f)
        assert config["vocab_size"] == VOCAB.vocab_size and "eos_token_id" not in config
        assert meta["grid"] == grid and meta["bos_token_id"] == VOCAB.bos
        assert meta["class_token_ids"] == [VOCAB.class_token(c) for c in range(10)]


def test_engine_plain_raster_decoding(hi_model, plain):
    """Plain decoding through the Engine (no drafter): a prompt [bos, class] gives 256 palette
    tokens, the plain baseline's, greedy and sampled; sampled classes give different images."""
    results = generate_both(Engine(hi_model, None))
    for mode in ("greedy", "sampled"):
        for r, p in zip(results[mode], plain[mode]):
            assert r.token_ids == p and r.target_passes == 256
    grids = np.asarray(plain["sampled"])
    assert (grids < VOCAB.codebook_size).all()
    assert len({g.tobytes() for g in grids}) == len(CLASSES)
    assert all(len(np.unique(g)) > 2 for g in grids)  # more than a background: a digit was drawn


@pytest.mark.parametrize("make_drafter", [lambda v: PromptLookupDrafter(max_ngram=4),
                                          lambda v: TokenRecyclingDrafter(v, capacity=16)],
                         ids=["prompt_lookup", "token_recycling"])
def test_lossless_drafters_equal_plain_raster_decoding(hi_model, plain, make_drafter):
    """Greedy output identical to plain raster decoding, and sampled output identical to plain
    sampling with the same seeds (specjax's Seeds rule), drafts accepted in both."""
    results = generate_both(Engine(hi_model, make_drafter(hi_model.config.vocab_size), draft_capacity=16))
    for mode in ("greedy", "sampled"):
        for r, p in zip(results[mode], plain[mode]):
            assert r.token_ids == p
            assert r.accepted_draft_tokens > 0 and r.target_passes < 256
