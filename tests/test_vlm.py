"""The vision-language layouts against transformers on random weights (issue 21).

Image preprocessing equals transformers' PIL-backend processors bit for bit. LLaVA: the
vision tower's hidden states, the projector's output, the merged prompt embeddings and the
logits match ``LlavaForConditionalGeneration`` (a CLIP tower on a Llama decoder, and a SigLIP
tower with two concatenated feature layers and the "full" strategy on a Qwen2 decoder).
SmolVLM (the Idefics3 layout): the post-normed tower, the pixel-shuffle connector, the merged
embeddings and the logits match ``SmolVLMForConditionalGeneration``. For both, greedy
decoding after an image prefill equals transformers' ``generate``, with and without drafts.
Negative controls: the wrong feature layer, keeping the class token, and folding patches
without pixel shuffle's permutes must each fail the comparison.
"""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.sampling import SamplingParams
from specjax.engine.steps import PREFILL_CHUNK, prefill, step
from specjax.engine.tree import DraftTree
from specjax.models import decoder, idefics3, llava, multimodal, vision
from specjax.models.image_processing import (ImageProcessorConfig, TileProcessorConfig, preprocess, preprocess_tiles,
                                             read_image_processor)
from specjax.models.safetensors_io import CheckpointError

IMAGE_TOKEN = 96
TEXT = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=30,
              patch_size=10)
VARIANTS = {
    # LLaVA-1.5's choices: CLIP, the second-to-last layer, the class token dropped.
    "clip_llama": dict(tower="clip_vision_model", text="llama", vision_feature_layer=-2,
                       vision_feature_select_strategy="default"),
    # Two feature layers concatenated, every position kept, on a Qwen2 decoder (q/k/v biases).
    "siglip_qwen2": dict(tower="siglip_vision_model", text="qwen2", vision_feature_layer=[0, -1],
                         vision_feature_select_strategy="full"),
}
SMALL_IMAGES = ImageProcessorConfig(shortest_edge=30, crop_size=(30, 30))


def build_hf_llava(variant: str, seed: int = 0):
    """A transformers LLaVA with random weights (std 0.1, norms in [0.5, 1.5], so nothing is flat)."""
    spec = dict(VARIANTS[variant])
    tower, text = spec.pop("tower"), spec.pop("text")
    vision_cfg = transformers.AutoConfig.for_model(tower, **VISION)
    text_cfg = transformers.AutoConfig.for_model(text, **TEXT, tie_word_embeddings=False)
    config = transformers.LlavaConfig(vision_config=vision_cfg.to_dict(), text_config=text_cfg.to_dict(),
                                      image_token_id=IMAGE_TOKEN, **spec)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp(request.param))
    hf = build_hf_llava(request.param, seed=sorted(VARIANTS).index(request.param))
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, llava.load_llava(directory, dtype=jnp.float32), directory


def random_images(seed: int, sizes) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def pixels(seed: int, n: int) -> np.ndarray:
    return preprocess(random_images(seed, [(40 + 7 * i, 33 + 5 * i) for i in range(n)]), SMALL_IMAGES)


def prompt(model, seed: int, n_images: int, text_len: int = 6) -> list[int]:
    """Text tokens (never the image token) with each image's run of image tokens inside."""
    words = np.random.default_rng(seed).integers(3, IMAGE_TOKEN, text_len).tolist()
    ids = words[:2] + [IMAGE_TOKEN] * n_images + words[2:]
    return multimodal.expand_image_tokens(ids, model.config)


def hf_vision_hidden(hf, px):
    with torch.no_grad():
        return [h.numpy() for h in hf.model.vision_tower(torch.tensor(px), output_hidden_states=True).hidden_states]


def hf_features(hf, px):
    with torch.no_grad():
        return torch.stack(list(hf.model.get_image_features(torch.tensor(px)).pooler_output)).numpy()


# ------------------------------------------------------------------ preprocessing


@pytest.mark.parametrize("processor", ["clip", "clip_224", "llava_pad", "siglip"])
def test_preprocessing_equals_transformers_pil_processor(processor, tmp_path):
    """Bit-identical pixels on random images of several sizes and modes, the config read back from
    the processor's own preprocessor_config.json."""
    small = dict(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    hf = {"clip": lambda: transformers.CLIPImageProcessorPil(**small),
          "clip_224": lambda: transformers.CLIPImageProcessorPil(),
          "llava_pad": lambda: transformers.LlavaImageProcessorPil(do_pad=True, **small),
          "siglip": lambda: transformers.SiglipImageProcessorPil(size={"height": 30, "width": 30})}[processor]()
    hf.save_pretrained(str(tmp_path))
    ours = read_image_processor(str(tmp_path))
    images = random_images(7, [(37, 53), (64, 40), (30, 30), (12, 90), (250, 199)])
    images.append(images[0].convert("RGBA"))
    images[-1].putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 53), dtype=np.uint8)))
    images.append(images[1].convert("L"))
    expected = hf(images, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(preprocess(images, ours), expected)


# ------------------------------------------------------------------ parity


def test_vision_tower_hidden_states_match_transformers(pair):
    hf, model, _ = pair
    px = pixels(0, 3)
    ours = np.asarray(vision.hidden_states(model.params["vision"], model.config.vision, jnp.asarray(px)))
    expected = hf_vision_hidden(hf, px)
    assert ours.shape[0] == model.config.vision_layers_used + 1  # layers past the deepest feature layer: not run
    for k in range(ours.shape[0]):
        np.testing.assert_allclose(ours[k], expected[k], atol=1e-5, rtol=1e-5)


def test_projected_image_features_match_transformers(pair):
    hf, model, _ = pair
    px = pixels(1, 2)
    ours = np.asarray(llava.image_features(model.params, model.config, jnp.asarray(px)))
    assert ours.shape == (2, model.config.tokens_per_image, model.config.text.hidden_size)
    np.testing.assert_allclose(ours, hf_features(hf, px), atol=1e-5, rtol=1e-5)


def test_wrong_feature_selection_fails_the_comparison(tmp_path):
    """Negative controls on the CLIP model: the last layer instead of the second to last, and keeping
    the class token (dropping the last patch to keep the shape) must both be caught."""
    hf = build_hf_llava("clip_llama")
    px = pixels(2, 2)
    expected = hf_features(hf, px)
    hf.config.vision_feature_layer = -1  # saved so: every tower layer is loaded, the wrong one included
    hf.save_pretrained(str(tmp_path), safe_serialization=True)
    model = llava.load_llava(str(tmp_path), dtype=jnp.float32)
    right = dataclasses.replace(model.config, feature_layers=(-2,))
    features = lambda cfg: np.asarray(llava.image_features(model.params, cfg, jnp.asarray(px)))
    np.testing.assert_allclose(features(right), expected, atol=1e-5, rtol=1e-5)  # the controls' control
    assert not np.allclose(features(model.config), expected, atol=1e-3)
    hidden = vision.hidden_states(model.params["vision"], right.vision, jnp.asarray(px))
    keeps_cls = np.asarray(llava.project(model.params["projector"], right, hidden[1][:, :-1]))
    assert not np.allclose(keeps_cls, expected, atol=1e-3)


def _merged_embeddings_hf(hf, ids, px):
    """What transformers feeds its language model: the input_embeds argument, caught by a hook."""
    caught = {}
    decoder_module = hf.model.language_model if hasattr(hf.model, "language_model") else hf.model.text_model
    hook = decoder_module.register_forward_pre_hook(
        lambda module, args, kwargs: caught.update(embeds=kwargs["inputs_embeds"].numpy()), with_kwargs=True)
    try:
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.numpy()
    finally:
        hook.remove()
    return caught["embeds"], logits


def test_merged_embeddings_and_logits_match_transformers(pair):
    """Two rows, the second with two images, so features fill image tokens in batch order."""
    hf, model, _ = pair
    n = model.config.tokens_per_image
    ids = np.array([prompt(model, 3, 1, text_len=4 + n), prompt(model, 4, 2, text_len=4)])  # one width, no padding
    px = pixels(3, 3)
    width = ids.shape[1]
    lengths = np.full(2, width)
    expected_embeds, expected_logits = _merged_embeddings_hf(hf, ids, px)
    embeds = multimodal.prompt_embeddings(model.params, model.config, ids, lengths, px)
    np.testing.assert_allclose(np.asarray(embeds), expected_embeds, atol=1e-5, rtol=1e-5)
    cfg = model.config.text
    out = decoder.forward(model.params["text"], cfg, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(width), (2, width)),
                          decoder.KVCache.zeros(cfg, 2, width), jnp.zeros(2, jnp.int32),
                          decoder.causal_mask(2, width), input_embeds=embeds)
    np.testing.assert_allclose(np.asarray(out.logits), expected_logits, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ errors


def test_image_token_count_must_match_the_images(pair):
    _, model, _ = pair
    cfg, n = model.config, model.config.tokens_per_image
    ids = np.array([prompt(model, 5, 1)])
    lengths = np.array([ids.shape[1]])
    with pytest.raises(ValueError, match=rf"{n} image tokens .* but 2 image\(s\) give {2 * n} features"):
        multimodal.prompt_embeddings(model.params, cfg, ids, lengths, pixels(5, 2))
    with pytest.raises(ValueError, match=rf"{n} image tokens .* but 0 image\(s\)"):
        multimodal.prompt_embeddings(model.params, cfg, ids, lengths, None)
    # The right total, but row 0 holds a partial run: an image would straddle the rows.
    rows = np.array([[3, 3] + [IMAGE_TOKEN] * 5 + [4] * (2 * n - 5), [3, 3] + [IMAGE_TOKEN] * (2 * n - 5) + [4] * 5])
    with pytest.raises(ValueError, match="row 0 holds 5 image tokens, not a multiple"):
        multimodal.prompt_embeddings(model.params, cfg, rows, np.full(2, rows.shape[1]), pixels(5, 2))
    with pytest.raises(ValueError, match="pixel_values have shape"):
        llava.image_features(model.params, cfg, jnp.zeros((1, 3, 20, 20)))


def _rewritten_checkpoint(directory: str, target: str, change) -> str:
    from safetensors.numpy import load_file, save_file

    out = directory + "_" + change.__name__
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    shutil.copy(os.path.join(directory, "config.json"), out)
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    name = next(n for n in tensors if target in n)
    tensors = change(tensors, name)
    save_file(tensors, os.path.join(out, "model.safetensors"))
    return out, name


def test_missing_or_misshapen_tensors_are_named(pair):
    _, _, directory = pair

    def dropped(tensors, name):
        return {k: v for k, v in tensors.items() if k != name}

    def truncated(tensors, name):
        return {**tensors, name: tensors[name][:-1]}

    for target in ("layers.0.self_attn.q_proj.weight", "multi_modal_projector.linear_2.weight",
                   "encoder.layers.0.mlp.fc1.weight"):
        broken, name = _rewritten_checkpoint(directory, target, dropped)
        with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
            llava.load_llava(broken, dtype=jnp.float32)
        broken, name = _rewritten_checkpoint(directory, target, truncated)
        with pytest.raises(CheckpointError, match=f"tensor '{name}' has shape"):
            llava.load_llava(broken, dtype=jnp.float32)
    broken, _ = _rewritten_checkpoint(directory, "embeddings.patch_embedding.weight", dropped)
    with pytest.raises(CheckpointError, match="no vision tower weights"):
        llava.load_llava(broken, dtype=jnp.float32)


# ------------------------------------------------------------------ the image prefill and decoding


def _trees(drafter, rids, capacity: int) -> DraftTree:
    tokens = np.zeros((len(rids), capacity), np.int32)
    parents = np.full((len(rids), capacity), -1, np.int32)
    valid = np.zeros((len(rids), capacity), bool)
    if drafter is not None:
        for row, rid in enumerate(rids):
            p = drafter.propose(rid, capacity)
            tokens[row, : len(p)], parents[row, : len(p)], valid[row, : len(p)] = p.tokens, p.parents, True
    return DraftTree(tokens, parents, valid)


def generate_with_images(model, prompts, px, max_new_tokens: int, drafter=None, capacity: int = 4,
                         temperature: float = 0.0, chunk: int = PREFILL_CHUNK):
    """Decoding with the pure steps: the image prefill (in chunks of ``chunk`` tokens), then ``step`` on
    the text model with trees from a host drafter (or empty trees: plain decoding). Returns (tokens per
    row, drafts accepted)."""
    text = model.text_model()
    cfg = dataclasses.replace(text.config, eos_token_ids=())
    longest = max(len(p) for p in prompts)
    width = longest if longest <= chunk else -(-longest // chunk) * chunk  # wider prompts: whole chunks
    ids = np.array([p + [0] * (width - len(p)) for p in prompts], np.int32)
    lengths = np.array([len(p) for p in prompts], np.int32)
    embeds = multimodal.prompt_embeddings(model.params, model.config, ids, lengths, px)
    budget = np.full(len(prompts), max_new_tokens, np.int32)
    pre = prefill(text.params, cfg, ids, lengths, budget, jax.random.key(0),
                  SamplingParams.make(len(prompts), temperature=temperature), max_len=64, chunk=chunk,
                  input_embeds=embeds)
    state, out, accepted = pre.state, [[int(t)] for t in np.asarray(pre.first_tokens)], 0
    rids = list(range(len(prompts)))
    if drafter is not None:
        for rid, p, first in zip(rids, prompts, out):
            drafter.start_request(rid, p)
            drafter.observe(rid, first)
    while min(len(o) for o in out) < max_new_tokens:
        state, acc = step(text.params, state, _trees(drafter, rids, capacity), cfg=cfg)
        num, toks = np.asarray(acc.num), np.asarray(acc.tokens)
        accepted += int(np.asarray(acc.num_draft_accepted).sum())
        for rid in rids:
            new = toks[rid, : num[rid]].tolist()
            out[rid] += new
            if drafter is not None and new:
                drafter.observe(rid, new)
    return out, accepted


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    hf = build_hf_llava("clip_llama")
    directory = str(tmp_path_factory.mktemp("clip_generate"))
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, llava.load_llava(directory, dtype=jnp.float32)


def test_image_prefill_greedy_equals_transformers_generate_and_speculation_is_lossless(clip):
    """The speculative run also prefills in chunks of 8 tokens, so image runs cross chunk boundaries."""
    hf, model = clip
    prompts = [prompt(model, 11, 1), prompt(model, 12, 2, text_len=4)]
    px = pixels(11, 3)
    n = 24
    plain, none_accepted = generate_with_images(model, prompts, px, n)
    speculative, accepted = generate_with_images(model, prompts, px, n, PromptLookupDrafter(), chunk=8)
    assert none_accepted == 0 and accepted > 0, "the drafter must have had drafts accepted for this to test anything"
    assert speculative == plain
    images = [px[:1], px[1:]]
    for ids, image, ours in zip(prompts, images, plain):
        with torch.no_grad():
            out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(image), do_sample=False,
                              max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        assert ours == out[0, len(ids):].tolist()


# ------------------------------------------------------------------ the second layout: SmolVLM (Idefics3)

SMOL_VISION = dict(model_type="smolvlm_vision", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, image_size=40, patch_size=10)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """A transformers SmolVLM (4 x 4 patches per tile, pixel shuffle 2: 4 image tokens) with random weights."""
    config = transformers.SmolVLMConfig(vision_config=SMOL_VISION, text_config=dict(model_type="llama", **TEXT),
                                        image_token_id=IMAGE_TOKEN, scale_factor=2)
    torch.manual_seed(5)
    hf = transformers.SmolVLMForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name and name.endswith("weight") else p.normal_(0.0, 0.1)
    directory = str(tmp_path_factory.mktemp("smolvlm"))
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, multimodal.load_vlm(directory, dtype=jnp.float32)


def smol_tiles(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 40, 40)).astype(np.float32)


def test_smolvlm_tower_connector_embeddings_and_logits_match_transformers(smol):
    """Row 0 holds one tile, row 1 two; transformers takes them as [rows, max tiles, ...] with an all-zero
    padding tile, which it drops."""
    hf, model = smol
    cfg = model.config
    assert isinstance(cfg, idefics3.Idefics3Config) and cfg.tokens_per_image == 4
    tiles = smol_tiles(0, 3)
    with torch.no_grad():
        tower = hf.model.vision_model(torch.tensor(tiles)).last_hidden_state.numpy()
        connected = hf.model.connector(torch.tensor(tower)).numpy()
    ours_tower = np.asarray(vision.last_hidden_state(model.params["vision"], cfg.vision, jnp.asarray(tiles)))
    np.testing.assert_allclose(ours_tower, tower, atol=1e-5, rtol=1e-5)
    ours = np.asarray(idefics3.image_features(model.params, cfg, jnp.asarray(tiles)))
    np.testing.assert_allclose(ours, connected, atol=1e-5, rtol=1e-5)
    # Negative control: folding the patches without pixel shuffle's permutes must be caught.
    folded = jnp.asarray(ours_tower).reshape(3, cfg.tokens_per_image, -1)
    unshuffled = np.asarray(decoder.linear(folded, model.params["connector"]["proj"]))
    assert not np.allclose(unshuffled, connected, atol=1e-3)

    n = cfg.tokens_per_image
    ids = np.array([prompt(model, 6, 1, text_len=4 + n), prompt(model, 7, 2, text_len=4)])
    batched = np.zeros((2, 2, 3, 40, 40), np.float32)
    batched[0, 0], batched[1] = tiles[0], tiles[1:]
    expected_embeds, expected_logits = _merged_embeddings_hf(hf, ids, batched)
    embeds = multimodal.prompt_embeddings(model.params, cfg, ids, np.full(2, ids.shape[1]), tiles)
    np.testing.assert_allclose(np.asarray(embeds), expected_embeds, atol=1e-5, rtol=1e-5)
    width, text = ids.shape[1], cfg.text
    out = decoder.forward(model.params["text"], text, jnp.asarray(ids), jnp.broadcast_to(jnp.arange(width), (2, width)),
                          decoder.KVCache.zeros(text, 2, width), jnp.zeros(2, jnp.int32),
                          decoder.causal_mask(2, width), input_embeds=embeds)
    np.testing.assert_allclose(np.asarray(out.logits), expected_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splitting", [True, False])
def test_tile_preprocessing_equals_transformers_smolvlm_pil_processor(splitting, tmp_path):
    """Bit-identical tiles, rows and cols for small, wide, tall and large images: split into a grid plus
    the global view, or (without splitting) one tile; the prompt text as transformers writes it."""
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    hf = transformers.SmolVLMImageProcessorPil(size={"longest_edge": 80}, max_image_size={"longest_edge": 40},
                                               do_image_splitting=splitting)
    hf.save_pretrained(str(tmp_path))
    ours = read_image_processor(str(tmp_path))
    assert isinstance(ours, TileProcessorConfig)
    for image in random_images(3, [(30, 20), (70, 100), (121, 45), (300, 299)]):
        expected = hf([image], return_tensors="np", return_row_col_info=True)
        tiles, rows, cols = preprocess_tiles(image, ours)
        assert (rows, cols) == (expected["rows"][0][0], expected["cols"][0][0])
        np.testing.assert_array_equal(tiles, expected["pixel_values"][0])
        assert idefics3.image_prompt_string(rows, cols, 4) == get_image_prompt_string(
            rows, cols, 4, "<fake_token_around_image>", "<image>", "<global-img>")


def test_smolvlm_greedy_equals_transformers_generate_and_speculation_is_lossless(smol):
    """One 70 x 100 image: 2 x 2 tiles and the global view, 5 runs of image tokens."""
    hf, model = smol
    tiles, rows, cols = preprocess_tiles(random_images(4, [(70, 100)])[0],
                                         TileProcessorConfig(longest_edge=80, tile_size=40))
    assert tiles.shape == (5, 3, 40, 40) and (rows, cols) == (2, 2)
    prompts = [prompt(model, 13, len(tiles), text_len=5)]
    plain, _ = generate_with_images(model, prompts, tiles, 20)
    speculative, accepted = generate_with_images(model, prompts, tiles, 20, PromptLookupDrafter())
    assert speculative == plain and accepted > 0
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(prompts), pixel_values=torch.tensor(tiles[None]), do_sample=False,
                          max_new_tokens=20, eos_token_id=None, pad_token_id=0)
    assert plain[0] == out[0, len(prompts[0]):].tolist()


def test_sampling_after_an_image_prefill_equals_plain_sampling(clip):
    """Every draw is a function of the request's key and the position (README, Seeds), so speculative
    sampling after an image prefill emits exactly plain sampling's tokens, as for a text prompt."""
    _, model = clip
    prompts = [prompt(model, 11, 1), prompt(model, 12, 2, text_len=4)]
    px = pixels(11, 3)
    plain, _ = generate_with_images(model, prompts, px, 24, temperature=0.3)
    speculative, accepted = generate_with_images(model, prompts, px, 24, PromptLookupDrafter(), temperature=0.3)
    greedy, _ = generate_with_images(model, prompts, px, 24)
    assert speculative == plain and accepted > 0
    assert plain != greedy  # the control: these rows really sample


def test_llava_loads_hub_and_transformers_5_tensor_names(pair, tmp_path):
    """Hub checkpoints (transformers 4.x) keep the tower under ``vision_tower.vision_model.``; transformers 5's
    own names put everything under ``model.`` with a bare ``lm_head``. Both load to the same params."""
    from safetensors.numpy import load_file, save_file

    _, model, directory = pair
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    renamings = {
        "hub": lambda n: n.replace("vision_tower.", "vision_tower.vision_model.", 1),
        "v5": lambda n: ("lm_head.weight" if n == "language_model.lm_head.weight"
                         else "model." + n.replace("language_model.model.", "language_model.", 1)),
    }
    for name, rename in renamings.items():
        out = tmp_path / name
        out.mkdir()
        shutil.copy(os.path.join(directory, "config.json"), out)
        save_file({rename(n): v for n, v in tensors.items()}, str(out / "model.safetensors"))
        loaded = llava.load_llava(str(out), dtype=jnp.float32)
        jax.tree.map(np.testing.assert_array_equal, loaded.params, model.params)
