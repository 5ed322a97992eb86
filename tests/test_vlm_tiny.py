"""The shipped tiny vision-language model (``models/assets/tiny-vlm``) and the Engine's image entry point.

- Its held-out scenes (the shipped ``held_out.jsonl.gz``) are disjoint from its training scenes,
  regenerated to ``training.json``'s hash: no held-out scene, image (by pixels) or
  (image, question) pair is in training; a neighbouring "train" stream, the negative control,
  does collide with training.
- ``encode_image_prompts`` (prompt text or ids, images) -> ids and ``input_embeds``: greedy
  decoding through ``prefill(..., input_embeds=)`` + ``step`` equals a cache-free greedy loop over
  the training forward (``sequence_logits``), and the answers the build recorded; a speculative
  run with prompt-lookup trees equals the plain one token for token.
- The checkpoint is a real LLaVA: transformers loads it and gives the same logits.
"""

import dataclasses
import fnmatch
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.sampling import SamplingParams
from specjax.engine.steps import prefill, step
from specjax.engine.tree import DraftTree
from specjax.models.embedded import shape_scenes as S
from specjax.models.embedded import tiny_vlm_dir
from specjax.models.image_processing import preprocess
from specjax.models.multimodal import (encode_image_prompts, expand_image_tokens, load_vlm, pad_input_embeds,
                                       sequence_logits)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL_DIR = tiny_vlm_dir()
_sequence_logits = jax.jit(sequence_logits, static_argnames=("cfg",))


@pytest.fixture(scope="module")
def meta():
    with open(os.path.join(MODEL_DIR, "training.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def held_out():
    return list(S.read_held_out(os.path.join(MODEL_DIR, "held_out.jsonl.gz")))


@pytest.fixture(scope="module")
def vlm():
    return load_vlm(MODEL_DIR, dtype=jnp.float32)


# ------------------------------------------------------------------ the shipped data


def _image_hash(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels, np.uint8).tobytes()).hexdigest()


def test_held_out_scenes_images_and_questions_are_not_training_data(meta, held_out):
    args = meta["args"]
    train = S.scenes(args["train_scenes"], args["seed"], "train")
    assert hashlib.sha256("\n".join(s.key() for s in train).encode()).hexdigest() == meta["train_scenes_sha256"], \
        "models/embedded/shape_scenes.py changed: rebuild the model"
    train_keys = {s.key() for s in train}
    train_images = {_image_hash(S.draw(s)) for s in train}
    train_pairs = {(s.scene.key(), s.question) for s in S.samples(train, args["seed"])}
    assert len(held_out) == args["held_out_scenes"]
    rng = np.random.default_rng([args["seed"] + 1, 0x9A])  # the file's questions, regenerated
    for scene, image, qa in held_out:
        assert S.is_held_out(scene) and scene.key() not in train_keys
        assert np.array_equal(image, S.draw(scene))  # the shipped PNG is the scene's image
        assert _image_hash(image) not in train_images
        assert not {(scene.key(), q) for q, _ in qa} & train_pairs
        assert qa == S.questions(scene, rng)
    # Negative control: a neighbouring stream's *training* scenes do collide with the training set.
    others = S.scenes(1000, args["seed"] + 1, "train")
    assert sum(s.key() in train_keys for s in others) > 0
    assert sum(_image_hash(S.draw(s)) in train_images for s in others) > 0


def test_shipped_files_are_small_and_packaged():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["specjax.models"]
    names = sorted(os.listdir(MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
            "held_out.jsonl.gz", "README.md"} <= set(names)
    for name in names:
        assert any(fnmatch.fnmatch(f"assets/tiny-vlm/{name}", g) for g in globs), name
    assert sum(os.path.getsize(os.path.join(MODEL_DIR, n)) for n in names) < 4e6


def test_readme_reports_the_measured_accuracy(meta):
    with open(os.path.join(MODEL_DIR, "README.md")) as f:
        readme = f.read()
    result = meta["held_out"]
    assert f"{result['exact_match']:.1%}" in readme and f"{result['questions']:,}" in readme
    assert meta["evaluate_command"] in readme


# ------------------------------------------------------------------ decoding through the engine's steps


def _decode(vlm, ids, embeds, max_new_tokens: int, drafter=None, capacity: int = 4, stop_at_eos: bool = True):
    """Greedy decoding with the pure steps: the image prefill, then ``step`` on prompt-lookup trees (or empty
    trees). Returns (new tokens per prompt, drafts accepted)."""
    text = vlm.text_model()
    cfg = text.config if stop_at_eos else dataclasses.replace(text.config, eos_token_ids=())
    b, width = len(ids), max(len(row) for row in ids)
    tokens = np.array([row + [0] * (width - len(row)) for row in ids], np.int32)
    lengths = np.array([len(row) for row in ids], np.int32)
    pre = prefill(text.params, cfg, tokens, lengths, np.full(b, max_new_tokens, np.int32), jax.random.key(0),
                  SamplingParams.make(b), max_len=width + max_new_tokens + capacity + 2,
                  input_embeds=pad_input_embeds(embeds, width))
    state, out, accepted = pre.state, [[int(t)] for t in np.asarray(pre.first_tokens)], 0
    if drafter is not None:
        for rid, row in enumerate(ids):
            drafter.start_request(rid, row)
            drafter.observe(rid, out[rid])
    while not bool(np.asarray(state.finished).all()):
        tree = DraftTree(np.zeros((b, capacity), np.int32), np.full((b, capacity), -1, np.int32),
                         np.zeros((b, capacity), bool))
        if drafter is not None:
            for rid in range(b):
                p = drafter.propose(rid, capacity)
                n = len(p.tokens)
                tree.tokens[rid, :n], tree.parents[rid, :n], tree.valid[rid, :n] = p.tokens, p.parents, True
        state, acc = step(text.params, state, tree, cfg=cfg)
        num, toks = np.asarray(acc.num), np.asarray(acc.tokens)
        accepted += int(np.asarray(acc.num_draft_accepted).sum())
        for rid in range(b):
            new = toks[rid, : num[rid]].tolist()
            out[rid] += new
            if drafter is not None and new:
                drafter.observe(rid, new)
    return out, accepted


def _reference_greedy(vlm, question: str, image: np.ndarray, max_new_tokens: int) -> list[int]:
    """Greedy answer by re-running the whole sequence through the training forward each token: no cache, no
    prefill or step, no ``encode_image_prompts``. One padded width, so one compilation."""
    cfg = vlm.config
    ids = expand_image_tokens(vlm.tokenizer.encode(S.prompt_text(question)).ids, cfg)
    pixels = jnp.asarray(preprocess([image], vlm.image_processor))
    out = []
    while len(out) < max_new_tokens and not (out and out[-1] in cfg.text.eos_token_ids):
        seq = ids + out
        padded = np.array([seq + [0] * (64 - len(seq))], np.int32)
        logits = _sequence_logits(vlm.params, cfg, padded, np.array([len(seq)], np.int32), pixels)
        out.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return out


def _answer(vlm, row: list[int]) -> str:
    eos = vlm.config.text.eos_token_ids
    return vlm.tokenizer.decode(row[: next((i for i, t in enumerate(row) if t in eos), len(row))])


def _first_samples(held_out, n: int):
    return [(q, image, a) for _, image, qa in held_out for q, a in qa][:n]


def test_greedy_answers_through_prefill_and_step_equal_the_training_forward_and_the_recorded_ones(
        vlm, meta, held_out):
    samples = _first_samples(held_out, 6)
    ids, embeds = encode_image_prompts(vlm, [S.prompt_text(q) for q, _, _ in samples], [im for _, im, _ in samples])
    out, _ = _decode(vlm, ids, embeds, max_new_tokens=4)
    for (q, image, _), row in zip(samples, out):
        assert row == _reference_greedy(vlm, q, image, 4)
    recorded = meta["held_out"]["first_answers"][:6]
    assert [q for q, _, _ in recorded] == [q for q, _, _ in samples]
    assert [_answer(vlm, row) for row in out] == [a for _, a, _ in recorded]


def test_speculative_decoding_with_prompt_lookup_trees_equals_plain(vlm, held_out):
    """Past EOS (stopping disabled) the model repeats itself, so prompt lookup's drafts get accepted."""
    samples = _first_samples(held_out, 4)
    ids, embeds = encode_image_prompts(vlm, [S.prompt_text(q) for q, _, _ in samples], [im for _, im, _ in samples])
    plain, none = _decode(vlm, ids, embeds, 24, stop_at_eos=False)
    speculative, accepted = _decode(vlm, ids, embeds, 24, PromptLookupDrafter(), stop_at_eos=False)
    assert none == 0 and accepted > 0
    assert speculative == plain


# ------------------------------------------------------------------ encode_image_prompts


def test_encode_image_prompts_places_expands_and_batches_image_tokens(vlm, held_out):
    _, image, qa = held_out[0]
    question = qa[0][0]
    cfg, n = vlm.config, vlm.config.tokens_per_image
    placed, _ = encode_image_prompts(vlm, [S.prompt_text(question)], [image])
    bare, bare_embeds = encode_image_prompts(vlm, [question], [[image]])  # no placeholder: the image goes first
    expanded, _ = encode_image_prompts(vlm, [placed[0]], [image])  # already expanded ids are kept
    assert placed == bare == expanded
    assert placed[0][:n] == [cfg.image_token_id] * n and cfg.image_token_id not in placed[0][n:]
    # One batch of mixed prompts (an image, none, two images) equals each prompt alone.
    prompts = [question, "how many shapes are there ?", f"{S.IMAGE_TOKEN} {S.IMAGE_TOKEN} {question}"]
    images = [image, None, [image, held_out[1][1]]]
    ids, embeds = encode_image_prompts(vlm, prompts, images)
    assert [len(row) for row in ids] == [len(bare[0]), 6, len(bare[0]) + n]
    np.testing.assert_allclose(embeds[0], bare_embeds[0], rtol=1e-4, atol=1e-4)  # batch-size rounding
    np.testing.assert_array_equal(embeds[1], vlm.params["text"]["embed"][np.array(ids[1])])
    alone = encode_image_prompts(vlm, prompts[2:], images[2:])[1][0]
    np.testing.assert_allclose(embeds[2], alone, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="image tokens"):
        encode_image_prompts(vlm, [f"{S.IMAGE_TOKEN} {S.IMAGE_TOKEN} {question}"], [image])
    with pytest.raises(ValueError, match="one per prompt"):
        encode_image_prompts(vlm, [question, question], [image])


def test_transformers_loads_the_shipped_checkpoint_with_the_same_logits(vlm, held_out):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(MODEL_DIR, torch_dtype=torch.float32).eval()
    _, image, qa = held_out[2]
    ids, _ = encode_image_prompts(vlm, [S.prompt_text(qa[0][0])], [image])
    pixels = preprocess([image], vlm.image_processor)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.from_numpy(pixels)).logits.numpy()
    ours = sequence_logits(vlm.params, vlm.config, np.array(ids, np.int32), np.array([len(ids[0])], np.int32),
                           jnp.asarray(pixels))
    np.testing.assert_allclose(np.asarray(ours), theirs, rtol=2e-4, atol=2e-4)
