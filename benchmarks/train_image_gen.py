"""Build ``image-gen-lo`` and ``image-gen-hi``: class-conditional Llama decoders over image tokens.

Two LlamaGen-style autoregressive image generators for the image speculative-decoding work
(issue 22: plain raster decoding, lossless drafters, MuLo-SD), trained here on CPU from
images a program draws; nothing is downloaded:

1. data: seven-segment digits drawn by ``specjax.models.image_tokens.draw_digits`` (10 classes,
   random colours, size, stroke and position), a fresh batch per step as a pure function of
   (seed, step), so ``--resume`` continues on exactly the data an uninterrupted run would see;
2. tokens: the fixed palette quantizer of ``image_tokens`` (64 colours), an 8 x 8 grid for the
   low-resolution model and 16 x 16 for the high-resolution one; a sequence is
   ``[bos, class token, raster tokens]`` and the loss covers the image tokens only;
3. the models: specjax's own decoder (``models.decoder.forward``), AdamW with warmup + cosine
   (``models.training.make_optimizer``), orbax checkpoints (``TrainCheckpointer``);
4. each model as a Hugging Face directory (config.json, model.safetensors in bf16) plus
   ``image_tokens.json`` (grid, palette levels, classes, token ids) and ``training.json``.

Rebuild both shipped models (about 10 minutes on 2 shared CPU cores)::

    python benchmarks/train_image_gen.py
    # interrupted? the same command with --resume continues from the last checkpoints
    python benchmarks/train_image_gen.py --resume

Deterministic for a given ``--seed`` on a given platform.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, causal_mask, forward, init_params
from specjax.drafters.mulo import UPSAMPLER_FILE, ConvUpsampler, save_upsampler
from specjax.models.image_tokens import IMAGE_SIZE, ImageVocab, token_pairs, training_batch
from specjax.models.training import (TrainCheckpointer, TrainState, check_run_args, export_llama,
                                     llama_hf_config, make_optimizer)
from specjax.tpu_kernels.tree_attention import new_tokens_attention

HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.normpath(os.path.join(HERE, "..", "models", "assets"))
# (grid, hidden, layers, heads, kv heads, MLP, steps, batch, lr) per model.
SHAPES = {"lo": dict(grid=8, hidden=96, layers=2, heads=4, kv_heads=2, mlp=256, steps=500, batch=32, lr=3e-3),
          "hi": dict(grid=16, hidden=128, layers=3, heads=4, kv_heads=2, mlp=384, steps=600, batch=16, lr=3e-3)}


def model_config(shape: dict, vocab: ImageVocab) -> ModelConfig:
    """A Llama of ``shape`` over the image vocabulary; no EOS (an image has a fixed length)."""
    return ModelConfig(model_type="llama", vocab_size=vocab.vocab_size, hidden_size=shape["hidden"],
                       intermediate_size=shape["mlp"], num_layers=shape["layers"], num_heads=shape["heads"],
                       num_kv_heads=shape["kv_heads"], head_dim=shape["hidden"] // shape["heads"],
                       rms_norm_eps=1e-5, tie_word_embeddings=True,
                       max_position_embeddings=2 * (2 + shape["grid"] ** 2), eos_token_ids=())


def image_loss(params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy (nats) of the image tokens of ``[bos, class, tokens...]`` sequences."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = forward(params, cfg, tokens, positions, KVCache.zeros(cfg, b, t), jnp.zeros(b, jnp.int32),
                  causal_mask(b, t), attention=new_tokens_attention)
    logp = jax.nn.log_softmax(out.logits[:, 1:-1], axis=-1)  # position i predicts token i + 1 (from the class on)
    # A one-hot product, not take_along_axis: its gradient is a multiply, not a (slow on CPU) scatter.
    return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(tokens[:, 2:], cfg.vocab_size, dtype=logp.dtype), axis=-1))


def build_train_step(cfg: ModelConfig, optimizer):
    import optax

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(image_loss)(params, cfg, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def write_model_dir(out: str, params, cfg: ModelConfig, shape: dict, vocab: ImageVocab, meta: dict) -> None:
    hf_config = llama_hf_config(cfg, tie_word_embeddings=True, bos_token_id=vocab.bos)
    export_llama(out, params, hf_config)
    with open(os.path.join(out, "image_tokens.json"), "w") as f:
        json.dump({"grid": shape["grid"], "image_size": IMAGE_SIZE, "palette_levels": vocab.palette.levels,
                   "codebook_size": vocab.codebook_size, "num_classes": vocab.num_classes,
                   "class_token_ids": [vocab.class_token(c) for c in range(vocab.num_classes)],
                   "bos_token_id": vocab.bos, "prompt": "[bos, class token]",
                   "output": f"{shape['grid']} x {shape['grid']} palette tokens in raster order"}, f, indent=2)
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(meta, f, indent=1)


def heldout_loss(params, cfg: ModelConfig, grid: int, seed: int, batches: int = 4) -> float:
    """Image-token loss on batches no training step draws (steps past any run's end)."""
    loss_fn = jax.jit(lambda p, x: image_loss(p, cfg, x))
    return float(np.mean([loss_fn(params, jnp.asarray(training_batch(10 ** 9 + i, 32, grid, seed)[0]))
                          for i in range(batches)]))


def train_one(name: str, args) -> dict:
    """Train (or resume) one model and write its directory; returns its summary."""
    shape = dict(SHAPES[name], steps=getattr(args, f"{name}_steps"))
    vocab = ImageVocab()
    out = os.path.join(args.out_root, f"image-gen-{name}")
    ckpt_dir = os.path.join(args.checkpoint_root, f"image-gen-{name}")
    check_run_args(ckpt_dir, {"shape": shape, "seed": args.seed}, args.resume)
    cfg = model_config(shape, vocab)
    params = init_params(cfg, jax.random.key(args.seed), jnp.float32, scale=0.02)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    optimizer = make_optimizer(shape["lr"], shape["steps"], min(30, shape["steps"] // 10))
    state = TrainState(params=params, opt_state=optimizer.init(params), rng=jax.random.key(args.seed))
    ckpt = TrainCheckpointer(ckpt_dir, args.save_every, keep=2)
    if args.resume and (restored := ckpt.restore_latest(state)) is not None:
        state = restored
        print(f"{name}: resumed at step {state.step} from {ckpt_dir}")
    step_fn = build_train_step(cfg, optimizer)
    params, opt_state = state.params, state.opt_state
    losses, ema = [], None
    t0 = time.perf_counter()
    bar = tqdm(range(state.step, shape["steps"]), initial=state.step, total=shape["steps"],
               desc=f"train {name} ({shape['grid']}x{shape['grid']})", file=sys.stdout, mininterval=5.0)
    for step in bar:
        tokens, _ = training_batch(step, shape["batch"], shape["grid"], args.seed)
        params, opt_state, loss = step_fn(params, opt_state, jnp.asarray(tokens))
        if step % 10 == 0 or step == shape["steps"] - 1:
            loss = float(loss)
            losses.append((step, round(loss, 4)))
            ema = loss if ema is None else 0.7 * ema + 0.3 * loss
            bar.set_postfix(loss=f"{ema:.3f}")
        ckpt.save(TrainState(params, opt_state, step + 1, (step + 1) * shape["batch"], state.rng),
                  force=step == shape["steps"] - 1)
    bar.close()
    ckpt.close()
    train_s = time.perf_counter() - t0
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    held = heldout_loss(rounded, cfg, shape["grid"], args.seed)
    meta = {"model": f"image-gen-{name}", "params": int(n_params), "shape": shape, "seed": args.seed,
            "data": "image_tokens.training_batch(step, batch, grid, seed): seven-segment digits, 10 classes",
            "train_loss_curve": losses, "heldout_image_token_loss": round(held, 4),
            "train_seconds_this_run": round(train_s), "build": "python benchmarks/train_image_gen.py"}
    write_model_dir(out, params, cfg, shape, vocab, meta)
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{name}: {n_params / 1e6:.2f}M params, held-out image-token loss {held:.3f} nats, "
          f"{train_s:.0f}s this run; wrote {out} ({size / 1e6:.2f} MB)")
    return meta


def train_upsampler(args) -> dict:
    """Train the ``ConvUpsampler`` on token pairs; written next to the low-resolution model."""
    import optax

    from specjax.drafters.mulo import NearestUpsampler, init_upsampler, upsampler_logits

    vocab = ImageVocab()
    ckpt_dir = os.path.join(args.checkpoint_root, "upsampler")
    check_run_args(ckpt_dir, {"steps": args.upsampler_steps, "seed": args.seed}, args.resume)
    params = init_upsampler(jax.random.key(args.seed), vocab.codebook_size)
    optimizer = make_optimizer(3e-3, args.upsampler_steps, min(30, args.upsampler_steps // 10))
    state = TrainState(params=params, opt_state=optimizer.init(params), rng=jax.random.key(args.seed))
    ckpt = TrainCheckpointer(ckpt_dir, args.save_every, keep=2)
    if args.resume and (restored := ckpt.restore_latest(state)) is not None:
        state = restored
        print(f"upsampler: resumed at step {state.step} from {ckpt_dir}")

    def loss_fn(params, low, high):
        logp = jax.nn.log_softmax(upsampler_logits(params, low), -1)
        return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(high, vocab.codebook_size), -1))

    @jax.jit
    def step_fn(params, opt_state, low, high):
        loss, grads = jax.value_and_grad(loss_fn)(params, low, high)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = state.params, state.opt_state
    bar = tqdm(range(state.step, args.upsampler_steps), initial=state.step, total=args.upsampler_steps,
               desc="train up-sampler", file=sys.stdout, mininterval=5.0)
    for step in bar:
        low, high = token_pairs(step, 64, args.seed)
        params, opt_state, loss = step_fn(params, opt_state, jnp.asarray(low), jnp.asarray(high))
        if step % 10 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
        ckpt.save(TrainState(params, opt_state, step + 1, (step + 1) * 64, state.rng),
                  force=step == args.upsampler_steps - 1)
    bar.close()
    ckpt.close()
    low, high = token_pairs(10 ** 9, 256, args.seed)  # held out: a step no run reaches
    trained = ConvUpsampler(jax.tree.map(np.asarray, params))
    accuracy = {"trained": float((trained(low) == high).mean()),
                "nearest": float((NearestUpsampler(2)(low) == high).mean())}
    out = os.path.join(args.out_root, "image-gen-lo")
    save_upsampler(os.path.join(out, UPSAMPLER_FILE), trained)
    print(f"up-sampler: held-out token accuracy {accuracy['trained']:.3f} (nearest up-sampling "
          f"{accuracy['nearest']:.3f}); wrote {os.path.join(out, UPSAMPLER_FILE)}")
    return accuracy


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-root", default=ASSETS, help="writes image-gen-lo/ and image-gen-hi/ here")
    p.add_argument("--checkpoint-root",
                   default=os.path.normpath(os.path.join(HERE, "..", "build", "image-gen-checkpoints")))
    p.add_argument("--resume", action="store_true", help="continue the runs checkpointed in --checkpoint-root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lo-steps", type=int, default=SHAPES["lo"]["steps"])
    p.add_argument("--hi-steps", type=int, default=SHAPES["hi"]["steps"])
    p.add_argument("--upsampler-steps", type=int, default=400)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--only", choices=("lo", "hi", "upsampler"), help="train one part only")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("lo", "hi"):
        if args.only in (None, name):
            train_one(name, args)
    if args.only in (None, "upsampler"):
        train_upsampler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
