"""Build the shipped tiny vision-language model: a LLaVA trained here on drawn scenes and questions.

Everything is generated, nothing downloaded:

1. the data: ``specjax.models.embedded.shape_scenes`` draws scenes (coloured shapes and a
   short word on a 48 x 48 image) and asks every question that applies (counts, colours,
   shapes, positions, yes / no, the word, a description of the scene); the training scenes are
   ``scenes(n, seed, "train")``, the held-out ones ``scenes(m, seed + 1, "held_out")``, disjoint by construction (the split
   is a hash of the scene);
2. a word-level tokenizer over the templates' words (``tokenizers``' WordLevel, saved as
   tokenizer.json), ``<image>`` one of its tokens;
3. the LLaVA layout (``LlavaForConditionalGeneration``): a CLIP-style ViT from scratch (patch 8,
   36 image tokens), the two-layer projector, a tiny Llama decoder, trained together with optax
   on the answer tokens' loss of specjax's own forward (``multimodal.sequence_logits``: the tower
   of ``models/vision.py``, the projector of ``models/llava.py``, ``decoder.forward``);
4. a Hugging Face LLaVA directory (config.json, model.safetensors in bf16, tokenizer,
   preprocessor_config.json) that ``specjax.models.multimodal.load_vlm`` and transformers load,
   with the held-out scenes (``held_out.jsonl.gz``: their images as PNG, questions, answers);
5. held-out accuracy: greedy answers of the saved weights through the engine's own steps
   (``encode_image_prompts``, ``prefill(..., input_embeds=)``, then ``step``), exact match.

Rebuild the shipped model (CPU; about 15 minutes on 2 shared cores)::

    python benchmarks/train_tiny_vlm.py --out models/assets/tiny-vlm
    # interrupted? the same command with --resume continues from the last orbax checkpoint
    python benchmarks/train_tiny_vlm.py --out models/assets/tiny-vlm --resume
    # only re-measure the shipped weights on the shipped held-out file
    python benchmarks/train_tiny_vlm.py --out models/assets/tiny-vlm --evaluate-only
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from specjax.models import llava, vision
from specjax.models.config import ModelConfig
from specjax.models.decoder import init_params as init_text_params
from specjax.models.embedded import shape_scenes as S
from specjax.models.image_processing import ImageProcessorConfig, preprocess
from specjax.models.multimodal import expand_image_tokens, sequence_logits
from specjax.models.training import (TrainCheckpointer, TrainState, add_decoder_args, add_optimizer_args,
                                     check_run_args, llama_hf_tensors, make_optimizer, save_hf_checkpoint, to_bf16)

PROCESSOR = ImageProcessorConfig(shortest_edge=S.IMAGE_SIZE, crop_size=(S.IMAGE_SIZE, S.IMAGE_SIZE),
                                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
SEQ_WIDTH = 64  # 36 image tokens + "describe the picture ?" (4) + its longest answer (23) + EOS = 64


def build_tokenizer():
    """A word-level tokenizer over ``shape_scenes.vocabulary()`` (split on whitespace; decode joins with spaces)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(S.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=S.UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([S.PAD, S.EOS, S.IMAGE_TOKEN, S.UNK])
    return tok


def model_config(tok, args) -> llava.LlavaConfig:
    eos = tok.token_to_id(S.EOS)
    text = ModelConfig(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=args.hidden_size,
                       intermediate_size=args.intermediate_size, num_layers=args.num_layers,
                       num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
                       head_dim=args.hidden_size // args.num_heads, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       max_position_embeddings=128, eos_token_ids=(eos,))
    tower = vision.VisionConfig(model_type="clip_vision_model", hidden_size=args.vision_hidden_size,
                                intermediate_size=2 * args.vision_hidden_size, num_layers=args.vision_layers,
                                num_heads=4, image_size=S.IMAGE_SIZE, patch_size=8)
    return llava.LlavaConfig(text=text, vision=tower, image_token_id=tok.token_to_id(S.IMAGE_TOKEN),
                             feature_layers=(-1,))


def init_params(cfg: llava.LlavaConfig, key: jax.Array) -> dict:
    """Random LLaVA params: normal(0.02) weights, LayerNorm scales 1 and biases 0, RMSNorm scales 1."""
    k_text, k_vision, k_proj = jax.random.split(key, 3)

    def tree(shapes, key):
        flat, treedef = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))
        leaves = []
        for (path, shape), k in zip(flat, jax.random.split(key, len(flat))):
            name = path[-1].key
            if name.endswith("bias") or name.startswith("b"):
                leaves.append(jnp.zeros(shape))
            elif "norm" in name or name.startswith("ln"):
                leaves.append(jnp.ones(shape))
            else:
                leaves.append(0.02 * jax.random.normal(k, shape))
        return jax.tree_util.tree_unflatten(treedef, leaves)

    return {"text": init_text_params(cfg.text, k_text, jnp.float32, scale=0.02),
            "vision": tree(vision.param_shapes(cfg.vision, cfg.vision.num_layers), k_vision),
            "projector": tree(llava.projector_shapes(cfg), k_proj)}


def encode_samples(tok, cfg: llava.LlavaConfig, samples) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tokens int32[N, SEQ_WIDTH] (prompt, answer, EOS, padding), loss weights float32[N, SEQ_WIDTH]
    (``weights[:, t]``: predicting ``tokens[:, t + 1]``, answer and EOS only), lengths int32[N]."""
    eos = tok.token_to_id(S.EOS)
    tokens = np.zeros((len(samples), SEQ_WIDTH), np.int32)
    weights = np.zeros((len(samples), SEQ_WIDTH), np.float32)
    lengths = np.zeros(len(samples), np.int32)
    for i, sample in enumerate(samples):
        prompt = expand_image_tokens(tok.encode(S.prompt_text(sample.question)).ids, cfg)
        ids = prompt + tok.encode(sample.answer).ids + [eos]
        tokens[i, : len(ids)], lengths[i] = ids, len(ids)
        weights[i, len(prompt) - 1: len(ids) - 1] = 1.0
    return tokens, weights, lengths


def build_train_step(cfg: llava.LlavaConfig, optimizer):
    def loss_fn(params, tokens, weights, lengths, pixels):
        logits = sequence_logits(params, cfg, tokens, lengths, pixels)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        # A one-hot product, not take_along_axis: its gradient is a multiply, not a (slow on CPU) scatter.
        nll = -jnp.sum(logp * jax.nn.one_hot(tokens[:, 1:], cfg.text.vocab_size, dtype=logp.dtype), axis=-1)
        w = weights[:, :-1]
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def step(params, opt_state, tokens, weights, lengths, pixels):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, weights, lengths, pixels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
    """The samples of training step ``step``: a pure function of it, so a resumed run sees the same data."""
    return np.random.default_rng([seed, 0xBA7C, step]).integers(n, size=batch_size)


# ------------------------------------------------------------------ export


def hf_config(cfg: llava.LlavaConfig, tok) -> dict:
    """A transformers ``LlavaConfig`` dict (CLIP vision config, Llama text config)."""
    t, v = cfg.text, cfg.vision
    eos, pad = tok.token_to_id(S.EOS), tok.token_to_id(S.PAD)
    text = {"model_type": "llama", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
            "hidden_act": "silu", "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope.theta, "tie_word_embeddings": True,
            "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad}
    tower = {"model_type": "clip_vision_model", "hidden_size": v.hidden_size,
             "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_layers,
             "num_attention_heads": v.num_heads, "image_size": v.image_size, "patch_size": v.patch_size,
             "num_channels": 3, "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
             "projection_dim": v.hidden_size}
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "text_config": text,
            "vision_config": tower, "image_token_id": cfg.image_token_id, "image_token_index": cfg.image_token_id,
            "vision_feature_layer": list(cfg.feature_layers)[0], "vision_feature_select_strategy": "default",
            "projector_hidden_act": cfg.projector_act, "multimodal_projector_bias": True,
            "tie_word_embeddings": True, "pad_token_id": pad, "torch_dtype": "bfloat16"}


def hf_tensors(params: dict) -> dict[str, np.ndarray]:
    """The params under transformers 4.x / hub LLaVA names, in bf16."""
    out = {f"language_model.{name}": t for name, t in llama_hf_tensors(params["text"]).items()}
    for key, value in params["vision"].items():
        if key == "layers":
            for name, stacked in value.items():
                for i in range(stacked.shape[0]):
                    out["vision_tower.vision_model." + vision.hf_tensor_name(("layers", name), i)] = to_bf16(stacked[i])
        else:
            out["vision_tower.vision_model." + vision.hf_tensor_name((key,))] = to_bf16(value)
    names = {"w1": "linear_1.weight", "b1": "linear_1.bias", "w2": "linear_2.weight", "b2": "linear_2.bias"}
    out.update({f"multi_modal_projector.{names[k]}": to_bf16(v) for k, v in params["projector"].items()})
    return out


def write_model_dir(out: str, params: dict, cfg: llava.LlavaConfig, tok) -> None:
    config = hf_config(cfg, tok)
    save_hf_checkpoint(out, config, hf_tensors(params))
    tok.save(os.path.join(out, "tokenizer.json"))
    eos, pad = config["text_config"]["eos_token_id"], config["pad_token_id"]
    files = {
        "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": S.EOS,
                                  "pad_token": S.PAD, "bos_token": S.EOS, "image_token": S.IMAGE_TOKEN,
                                  "model_max_length": cfg.text.max_position_embeddings},
        "generation_config.json": {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False},
        "preprocessor_config.json": {"image_processor_type": "CLIPImageProcessor", "do_resize": True,
                                     "size": {"shortest_edge": S.IMAGE_SIZE}, "resample": 3,
                                     "do_center_crop": True,
                                     "crop_size": {"height": S.IMAGE_SIZE, "width": S.IMAGE_SIZE},
                                     "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                                     "image_mean": list(PROCESSOR.image_mean), "image_std": list(PROCESSOR.image_std),
                                     "do_convert_rgb": True},
    }
    for name, content in files.items():
        with open(os.path.join(out, name), "w") as f:
            json.dump(content, f, indent=2)


# ------------------------------------------------------------------ held-out evaluation


def greedy_answers(vlm, questions: list[str], images: list[np.ndarray], max_new_tokens: int = 24,
                   batch_size: int = 64) -> list[str]:
    """The model's greedy answers through the engine's own path: ``encode_image_prompts``, the image
    prefill, then plain ``step``s (empty trees) until EOS or ``max_new_tokens``."""
    from specjax.engine.sampling import SamplingParams
    from specjax.engine.steps import prefill, step
    from specjax.engine.tree import DraftTree
    from specjax.models.multimodal import encode_image_prompts, pad_input_embeds

    text, eos = vlm.text_model(), set(vlm.config.text.eos_token_ids)
    answers = []
    for start in range(0, len(questions), batch_size):
        qs, ims = questions[start: start + batch_size], images[start: start + batch_size]
        ids, embeds = encode_image_prompts(vlm, [S.prompt_text(q) for q in qs], ims)
        b, width = len(ids), SEQ_WIDTH
        tokens = np.array([row + [0] * (width - len(row)) for row in ids], np.int32)
        lengths = np.array([len(row) for row in ids], np.int32)
        pre = prefill(text.params, text.config, tokens, lengths, np.full(b, max_new_tokens, np.int32),
                      jax.random.key(0), SamplingParams.make(b), max_len=width + max_new_tokens + 8,
                      input_embeds=pad_input_embeds(embeds, width))
        state, out = pre.state, [[int(t)] for t in np.asarray(pre.first_tokens)]
        empty = DraftTree(np.zeros((b, 1), np.int32), np.full((b, 1), -1, np.int32), np.zeros((b, 1), bool))
        while not bool(np.asarray(state.finished).all()):
            state, acc = step(text.params, state, empty, cfg=text.config)
            num, toks = np.asarray(acc.num), np.asarray(acc.tokens)
            for row in range(b):
                out[row] += toks[row, : num[row]].tolist()
        answers += [vlm.tokenizer.decode(row[: next((i for i, t in enumerate(row) if t in eos), len(row))])
                    for row in out]
    return answers


def blind_answers(train_samples) -> dict[str, str]:
    """Each training question's most common answer: what a model that never looks at the image can do best."""
    counts = collections.defaultdict(collections.Counter)
    for sample in train_samples:
        counts[sample.question][sample.answer] += 1
    return {q: c.most_common(1)[0][0] for q, c in counts.items()}


def evaluate(model_dir: str, train_samples) -> dict:
    """Exact match of the greedy answers on the shipped held-out file, overall and per question kind, next to
    the blind baseline (``blind_answers`` of ``train_samples``)."""
    from specjax.models.multimodal import load_vlm

    vlm = load_vlm(model_dir, dtype=jnp.float32)
    questions, images, gold, scenes = [], [], [], 0
    for _, image, qa in S.read_held_out(os.path.join(model_dir, S.HELD_OUT_FILE)):
        scenes += 1
        for q, a in qa:
            questions.append(q), images.append(image), gold.append(a)
    answers = greedy_answers(vlm, questions, images)
    blind = blind_answers(train_samples)
    right, blind_right, total = collections.Counter(), collections.Counter(), collections.Counter()
    for q, a, g in zip(questions, answers, gold):
        kind = S.question_kind(q)
        total[kind] += 1
        right[kind] += a == g
        blind_right[kind] += blind.get(q) == g
    rate = lambda counter, n: round(sum(counter.values()) / n, 4)
    return {"exact_match": rate(right, len(gold)), "blind_baseline": rate(blind_right, len(gold)),
            "questions": len(gold), "scenes": scenes,
            "by_kind": {k: {"exact_match": round(right[k] / total[k], 4),
                            "blind_baseline": round(blind_right[k] / total[k], 4), "questions": total[k]}
                        for k in sorted(total)},
            "first_answers": [[q, a, g] for q, a, g in list(zip(questions, answers, gold))[:12]]}


# ------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(here, "..", "models", "assets", "tiny-vlm"))
    p.add_argument("--checkpoint-dir", default=os.path.join(here, "..", "build", "tiny-vlm-checkpoints"),
                   help="orbax checkpoints (not shipped)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --checkpoint-dir")
    p.add_argument("--evaluate-only", action="store_true",
                   help="only measure the held-out accuracy of the model in --out on its held-out file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-scenes", type=int, default=8000)
    p.add_argument("--held-out-scenes", type=int, default=200)
    add_decoder_args(p, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=2)
    p.add_argument("--vision-hidden-size", type=int, default=64)
    p.add_argument("--vision-layers", type=int, default=3)
    add_optimizer_args(p, steps=1800, batch_size=64, lr=1e-3, warmup=100)
    p.add_argument("--save-every", type=int, default=250)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.evaluate_only:
        with open(os.path.join(args.out, "training.json")) as f:
            built = json.load(f)["args"]
        train = S.samples(S.scenes(built["train_scenes"], built["seed"], "train"), built["seed"])
        print(json.dumps(evaluate(args.out, train), indent=2))
        return 0
    t0 = time.perf_counter()
    run_args = {k: v for k, v in vars(args).items() if k not in ("out", "checkpoint_dir", "resume", "evaluate_only")}
    check_run_args(args.checkpoint_dir, run_args, args.resume)

    train_scenes = S.scenes(args.train_scenes, args.seed, "train")
    held_scenes = S.scenes(args.held_out_scenes, args.seed + 1, "held_out")
    samples = S.samples(train_scenes, args.seed)
    tok = build_tokenizer()
    cfg = model_config(tok, args)
    tokens, weights, lengths = encode_samples(tok, cfg, samples)
    scene_index = {scene.key(): i for i, scene in enumerate(train_scenes)}
    image_of = np.array([scene_index[s.scene.key()] for s in samples])
    pixels = preprocess([S.draw(scene) for scene in train_scenes], PROCESSOR)
    print(f"data: {len(train_scenes)} training scenes, {len(samples)} questions (max {int(lengths.max())} tokens); "
          f"{len(held_scenes)} held-out scenes; vocab {tok.get_vocab_size()}")

    params = init_params(cfg, jax.random.key(args.seed))
    sizes = {part: sum(x.size for x in jax.tree.leaves(p)) for part, p in params.items()}
    print("model: " + ", ".join(f"{part} {n / 1e6:.3f}M" for part, n in sizes.items())
          + f"; {cfg.tokens_per_image} image tokens")
    optimizer = make_optimizer(args.lr, args.steps, min(args.warmup, args.steps // 10), args.weight_decay)
    state = TrainState(params=params, opt_state=optimizer.init(params), rng=jax.random.key(args.seed))
    ckpt = TrainCheckpointer(args.checkpoint_dir, args.save_every, keep=2)
    if args.resume:
        restored = ckpt.restore_latest(state)
        if restored is not None:
            state = restored
            print(f"resumed at step {state.step} from {args.checkpoint_dir}")
    step_fn = build_train_step(cfg, optimizer)
    params, opt_state = state.params, state.opt_state
    ema, losses = None, []
    bar = tqdm(range(state.step, args.steps), initial=state.step, total=args.steps, desc="train",
               file=sys.stdout, mininterval=5.0)
    t_train = time.perf_counter()
    for step in bar:
        idx = batch_indices(step, args.batch_size, len(samples), args.seed)
        params, opt_state, loss = step_fn(params, opt_state, tokens[idx], weights[idx], lengths[idx],
                                          pixels[image_of[idx]])
        if step % 25 == 0 or step == args.steps - 1:
            loss = float(loss)
            losses.append((step, round(loss, 4)))
            ema = loss if ema is None else 0.7 * ema + 0.3 * loss
            bar.set_postfix(loss=f"{ema:.3f}")
        ckpt.save(TrainState(params, opt_state, step + 1, (step + 1) * args.batch_size, state.rng),
                  force=step == args.steps - 1)
    bar.close()
    ckpt.close()
    train_s = time.perf_counter() - t_train

    os.makedirs(args.out, exist_ok=True)
    write_model_dir(args.out, params, cfg, tok)
    S.write_held_out(os.path.join(args.out, S.HELD_OUT_FILE), held_scenes, args.seed + 1)
    result = evaluate(args.out, samples)
    meta = {"data": f"shape_scenes.scenes({args.train_scenes}, seed={args.seed}, split='train'), every question "
                    f"(shape_scenes.samples(..., seed={args.seed}))",
            "held_out_set": f"shape_scenes.scenes({args.held_out_scenes}, seed={args.seed + 1}, split='held_out') "
                        f"in {S.HELD_OUT_FILE}",
            "train_scenes_sha256": hashlib.sha256("\n".join(s.key() for s in train_scenes).encode()).hexdigest(),
            "train_questions": len(samples), "params": sizes, "args": run_args,
            "train_seconds_this_run": round(train_s), "wall_seconds_this_run": round(time.perf_counter() - t0),
            "final_loss_ema": None if ema is None else round(ema, 4), "loss_curve": losses,
            "held_out": result,
            "command": "python benchmarks/train_tiny_vlm.py --out models/assets/tiny-vlm",
            "evaluate_command": "python benchmarks/train_tiny_vlm.py --out models/assets/tiny-vlm --evaluate-only"}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(meta, f, indent=2)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(json.dumps(result, indent=2))
    print(f"training {train_s:.0f}s this run; held-out exact match {result['exact_match']:.1%} of "
          f"{result['questions']} questions (blind baseline {result['blind_baseline']:.1%}); wrote {args.out} "
          f"({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
