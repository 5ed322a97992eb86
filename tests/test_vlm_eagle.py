"""EagleVLM: an EAGLE-3 head with SpecVLM's elastic visual compressor, on a vision-language target.

The compressor's operators against numpy references, the compacted sequence the head reads
(with wrong shifts as controls), lossless decoding with every operator and the gate (the
target still sees every visual token), online distillation with images, the checkpoint round
trip, clear errors, and the shipped head (``models/assets/tiny-vlm-eagle``): trained on training
scenes only, and at least 2 tokens per pass on held-out images at T = 60.
"""

import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.drafters import visual_compressor as vc
from specjax.drafters.eagle3 import Eagle3Config, Eagle3Drafter, default_hidden_layers, init_params, load_eagle3
from specjax.drafters.training import TrainOptions, train_drafter
from specjax.drafters.training.export import eagle3_hf_config
from specjax.engine.engine import Engine
from specjax.models.embedded import shape_scenes as S
from specjax.models.embedded import tiny_vlm_dir
from specjax.models.multimodal import expand_image_tokens, load_vlm

ASSETS = os.path.join(os.path.dirname(__file__), "..", "models", "assets")
HEAD_DIR = os.path.join(ASSETS, "tiny-vlm-eagle")
CFG = vc.CompressorConfig(image_token_id=2, grid=6, factor=2)


@pytest.fixture(scope="module")
def vlm():
    return load_vlm(tiny_vlm_dir(), dtype=jnp.float32)


def random_head(vlm, seed: int = 0) -> tuple[Eagle3Config, dict]:
    """A random EAGLE-3 head with a compressor for tiny-vlm (the target's embedding shared)."""
    text = vlm.config.text
    cfg = Eagle3Config.from_hf(eagle3_hf_config(text, default_hidden_layers(text.num_layers), CFG))
    params = init_params(cfg, jax.random.key(seed), jnp.float32, scale=0.1)
    params["embed"] = vlm.params["text"]["embed"]
    params["d2t"] = jnp.zeros(cfg.draft_vocab_size, jnp.int32)
    return cfg, params


def held_out(n: int, question_index: int = -1):
    rows = list(zip(range(n), S.read_held_out(os.path.join(tiny_vlm_dir(), S.HELD_OUT_FILE))))
    return ([S.prompt_text(qa[question_index][0]) for _, (_, _, qa) in rows],
            [[image] for _, (_, image, _) in rows])


# ------------------------------------------------------------------ the operators


def test_operators_match_numpy_references():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, 36, 8)).astype(np.float32)
    grid = image.reshape(2, 3, 2, 3, 2, 8)  # [B, out row, in row, out col, in col, H]
    want_pool = grid.mean(axis=(2, 4)).reshape(2, 9, 8)
    np.testing.assert_allclose(vc.pool(CFG, jnp.asarray(image)), want_pool, rtol=1e-6)
    # Controls: pooling along the flat order, or over transposed windows, is not the grid's pooling.
    assert not np.allclose(image.reshape(2, 9, 4, 8).mean(axis=2), want_pool)
    assert not np.allclose(grid.transpose(0, 3, 2, 1, 4, 5).mean(axis=(2, 4)).reshape(2, 9, 8), want_pool)
    norms = (image ** 2).sum(-1)
    keep = np.sort(np.argsort(-norms, axis=1)[:, :9], axis=1)
    np.testing.assert_array_equal(vc.prune(CFG, jnp.asarray(image)), np.take_along_axis(image, keep[..., None], 1))
    params = vc.init_params(CFG, 8, jax.random.key(1))
    # Initialized, the convolution and the resampler are the pool (they start from it and learn).
    np.testing.assert_allclose(vc.conv(CFG, params, jnp.asarray(image)), want_pool, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(vc.resampler(CFG, params, jnp.asarray(image)), want_pool, rtol=1e-5, atol=1e-6)
    moved = dict(params, wo=jnp.eye(8), conv_b=jnp.ones(8))
    assert not np.allclose(vc.resampler(CFG, moved, jnp.asarray(image)), want_pool)
    assert not np.allclose(vc.conv(CFG, moved, jnp.asarray(image)), want_pool)
    assert vc.compress_all(CFG, params, jnp.asarray(image)).shape == (4, 2, 9, 8)


def test_compact_shifts_the_text_after_the_image_and_keeps_each_pairing():
    """Row 0: 2 text tokens, the 36 image tokens, 3 text tokens; row 1 has no image. The head's
    sequence: text, the 9 compressed tokens, then the text that followed the image, 27 places earlier."""
    p = 48
    tokens = np.full((2, p), 0, np.int32)
    tokens[0, :41] = [10, 11] + [2] * 36 + [20, 21, 22]
    tokens[1, :5] = [10, 11, 12, 13, 14]
    lengths = jnp.asarray([41, 5])
    fused = jnp.asarray(np.arange(2 * p, dtype=np.float32).reshape(2, p, 1) * np.ones(4, np.float32))
    span = vc.image_span(CFG, jnp.asarray(tokens), lengths)
    assert span.start.tolist() == [2, p] and span.removed.tolist() == [27, 0]
    compressed = jnp.full((2, 9, 4), -1.0)
    shifted = jnp.asarray(np.roll(tokens, -1, axis=1))  # pair j holds token j + 1
    out, (pairs,) = vc.compact(span, 9, compressed, fused, [shifted])
    row = np.asarray(pairs[0])
    assert row[:2].tolist() == [11, 2] and row[2:10].tolist() == [2] * 8
    assert row[10] == 20  # the last compressed token is paired with the first token after the image
    assert row[11:13].tolist() == [21, 22]
    feats = np.asarray(out[0, :, 0])
    assert feats[:2].tolist() == [0, 1] and (feats[2:11] == -1).all() and feats[11:14].tolist() == [38, 39, 40]
    np.testing.assert_array_equal(out[1], fused[1])  # no image: nothing moves
    assert (lengths - span.removed).tolist() == [14, 5]
    # Controls: dropping all 36 tokens (or shifting by 36 - 9 + 1) breaks the pairing after the image.
    for wrong in (36, 28):
        bad, (bad_pairs,) = vc.compact(vc.ImageSpan(span.start, span.removed.at[0].set(wrong)), 9, compressed,
                                       fused, [shifted])
        assert np.asarray(bad_pairs[0])[10:13].tolist() != [20, 21, 22]


def test_compressor_config_rejects_a_factor_that_does_not_divide_the_grid():
    with pytest.raises(ValueError, match="dividing the grid"):
        vc.CompressorConfig(image_token_id=2, grid=6, factor=4)
    with pytest.raises(ValueError, match="mode"):
        vc.CompressorConfig(image_token_id=2, grid=6, mode="zip")


# ------------------------------------------------------------------ lossless decoding


def test_every_operator_and_the_gate_decode_what_plain_greedy_decodes(vlm):
    """A random head (far from the target) with each compressor mode: the target verifies every
    token with the whole image, so greedy output equals plain decoding; a text-only row rides along."""
    cfg, params = random_head(vlm)
    prompts, images = held_out(3)
    prompts.append("how many shapes are there ?")
    images.append([])
    plain = [r.token_ids for r in Engine(vlm, None).generate(prompts, 12, images=images)]
    accepted = {}
    for mode in vc.MODES:
        drafter = Eagle3Drafter(cfg, params, vlm.config.text.num_layers, capacity=8, topk=2, depth=3,
                                visual_mode=mode)
        results = Engine(vlm, drafter, draft_capacity=8).generate(prompts, 12, images=images)
        assert [r.token_ids for r in results] == plain, mode
        accepted[mode] = sum(r.target_passes for r in results)
    assert len(set(accepted.values())) > 1  # the modes really draft differently


def test_a_text_head_has_no_visual_mode(vlm):
    text = vlm.config.text
    cfg = Eagle3Config.from_hf(eagle3_hf_config(text, default_hidden_layers(text.num_layers)))
    with pytest.raises(ValueError, match="visual compressor"):
        Eagle3Drafter(cfg, init_params(cfg, jax.random.key(0)), text.num_layers, visual_mode="pool")


# ------------------------------------------------------------------ online distillation with images


def _prompts(vlm, n: int):
    rng = np.random.default_rng(0)
    scenes = S.scenes(n, 0, "train")
    prompts = [expand_image_tokens(vlm.tokenizer.encode(S.prompt_text(S.questions(s, rng)[-1][0])).ids, vlm.config)
               for s in scenes]
    return prompts, [S.draw(s) for s in scenes]


def test_online_distillation_with_images_trains_and_round_trips(vlm, tmp_path):
    prompts, images = _prompts(vlm, 8)
    opts = TrainOptions(batch_size=4, seq_len=72, ttt_steps=2, save_every=50)
    result = train_drafter(vlm, "eagle3", "online", 3, str(tmp_path), prompts=prompts, images=images,
                           options=opts, progress=False)
    assert np.isfinite(result.history["loss"]).all()
    head = load_eagle3(str(tmp_path), vlm.text_model(), dtype=jnp.float32)
    assert head.cfg.compressor == CFG and head.compression == "gate"
    for name, value in result.params["compressor"].items():  # bf16 on disk
        np.testing.assert_allclose(head.params["compressor"][name], value, rtol=1e-2, atol=1e-2)
    # The compressor's weights were trained (the gate and the resampler's queries moved).
    fresh = vc.init_params(CFG, head.cfg.hidden_size, jax.random.key(0))
    assert not np.allclose(result.params["compressor"]["gate_w"], fresh["gate_w"])


def test_training_rejects_mismatched_images_and_prompts(vlm, tmp_path):
    prompts, images = _prompts(vlm, 2)
    with pytest.raises(ValueError, match="equal length"):
        train_drafter(vlm, "eagle3", "online", 1, str(tmp_path), prompts=prompts, images=images[:1], progress=False)
    with pytest.raises(ValueError, match="image tokens"):
        train_drafter(vlm, "eagle3", "online", 1, str(tmp_path), prompts=[[5, 6, 7]] * 2, images=images,
                      progress=False)
    with pytest.raises(ValueError, match="text only"):
        train_drafter(vlm.text_model(), "eagle3", "online", 1, str(tmp_path), prompts=prompts, images=images,
                      progress=False)
    with pytest.raises(ValueError, match="opd"):
        train_drafter(vlm, "eagle3", "opd", 1, str(tmp_path), prompts=prompts, images=images, progress=False)


def test_cli_trains_a_vision_language_head_from_a_prompts_and_images_file(vlm, tmp_path):
    """``specjax train-drafter --target <a VLM> --prompts FILE``: one image file per line; the head
    written has the compressor. A line naming a missing image is an error that names it."""
    from PIL import Image

    from specjax.engine.cli import main

    rows = []
    for k, scene in enumerate(S.scenes(4, 0, "train")):
        Image.fromarray(S.draw(scene)).save(tmp_path / f"scene{k}.png")
        rows.append(json.dumps({"prompt": S.DESCRIBE, "image": f"scene{k}.png"}))  # the image goes first
    (tmp_path / "prompts.jsonl").write_text("\n".join(rows) + "\n")
    common = ["train-drafter", "--target", tiny_vlm_dir(), "--kind", "eagle3", "--method", "online",
              "--batch-size", "2", "--seq-len", "72", "--ttt-steps", "2", "--steps", "1"]
    assert main(common + ["--prompts", str(tmp_path / "prompts.jsonl"), "--out", str(tmp_path / "head")]) == 0
    head = load_eagle3(str(tmp_path / "head"), vlm.text_model())
    assert head.cfg.compressor == CFG
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": S.DESCRIBE, "image": "missing.png"}) + "\n")
    with pytest.raises(ValueError, match="missing.png"):
        main(common + ["--prompts", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "bad")])


@pytest.mark.skipif(not os.path.isfile(os.path.join(HEAD_DIR, "config.json")), reason="no shipped head")
def test_cli_eagle3_on_tiny_vlm_uses_the_shipped_head():
    import argparse

    from specjax.engine.cli import choose_model, resolve_drafter_args

    args = argparse.Namespace(model="tiny-vlm", drafter="eagle3", drafter_model=None)
    choose_model(args)
    resolve_drafter_args(args)
    assert os.path.realpath(args.drafter_model) == os.path.realpath(HEAD_DIR)
    other = argparse.Namespace(model=None, drafter="eagle3", drafter_model=None)  # the embedded text model
    resolve_drafter_args(other)
    assert os.path.realpath(other.drafter_model) != os.path.realpath(HEAD_DIR)


# ------------------------------------------------------------------ the shipped head

shipped = pytest.mark.skipif(not os.path.isfile(os.path.join(HEAD_DIR, "config.json")),
                             reason="the shipped tiny-vlm-eagle head is not installed")


@shipped
def test_shipped_head_trained_on_training_scenes_only():
    with open(os.path.join(HEAD_DIR, "training.json")) as f:
        meta = json.load(f)
    args = meta["args"]
    scenes = S.scenes(args["train_scenes"], args["seed"], "train")
    assert hashlib.sha256("\n".join(s.key() for s in scenes).encode()).hexdigest() == meta["train_scenes_sha256"]
    trained = {s.key() for s in scenes}
    held = [scene.key() for scene, _, _ in S.read_held_out(os.path.join(tiny_vlm_dir(), S.HELD_OUT_FILE))]
    assert not trained & set(held)
    # Control: the held-out stream's own scenes do collide with a set built from them.
    assert set(held[:5]) & {s.key() for s in S.scenes(5, 1, "held_out")}


@shipped
def test_shipped_head_drafts_two_tokens_per_pass_on_held_out_descriptions_losslessly(vlm):
    prompts, images = held_out(8)
    plain = [r.token_ids for r in Engine(vlm, None).generate(prompts, 32, images=images)]
    rates = {}
    for mode in ("none", "gate"):
        head = load_eagle3(HEAD_DIR, vlm.text_model(), dtype=jnp.float32, capacity=60, visual_mode=mode)
        results = Engine(vlm, head, draft_capacity=60).generate(prompts, 32, images=images)
        assert [r.token_ids for r in results] == plain
        rates[mode] = sum(len(r.token_ids) for r in results) / sum(r.target_passes for r in results)
    assert rates["none"] >= 2.0 and rates["gate"] >= 2.0
    assert rates["gate"] >= 0.9 * rates["none"]  # a 4x cut of the head's visual tokens keeps 90%


def test_the_build_script_measures_each_checkpoint_and_writes_the_head(tmp_path):
    """``benchmarks/train_tiny_vlm_eagle.py`` at toy size: a curve point per checkpoint (lossless runs,
    or it raises), the head's files and the training scenes' hash."""
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import train_tiny_vlm_eagle as build

    out = tmp_path / "head"
    assert build.main(["--out", str(out), "--work-dir", str(tmp_path / "work"), "--steps", "2", "--eval-every", "1",
                       "--eval-scenes", "2", "--train-scenes", "4", "--batch-size", "4"]) == 0
    with open(out / "training.json") as f:
        meta = json.load(f)
    assert [row["step"] for row in meta["curve"]] == [1, 2]
    assert all(row[mode] >= 1.0 for row in meta["curve"] for mode in ("none", "gate"))
    assert load_eagle3(str(out), load_vlm(tiny_vlm_dir()).text_model()).cfg.compressor == CFG
