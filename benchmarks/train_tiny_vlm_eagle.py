"""Build the shipped EagleVLM head: an EAGLE-3 head with SpecVLM's visual compressor for ``tiny-vlm``.

Online-logit distillation (``specjax.drafters.training``, method ``online``): every
step the frozen tiny-vlm answers a fresh batch of questions about drawn scenes
(its tower embeds the images on the fly), and the head learns its next-token
distributions and, through the training-time test, its own multi-step drafts.
Nothing is stored but the prompts. The compressor (pruning, pooling, a strided
convolution, a one-layer resampler, and the question-aware gate choosing among
them) is trained with the head (``visual_compressor.py``, ``training/losses.py``).

Data: the target's own training scenes (``shape_scenes.scenes(n, 0, "train")``),
for each its description ("describe the picture ?", the long answer) and one other
question. Measured on the shipped held-out scenes of tiny-vlm, which no training
stream can draw (the split is a hash of the scene; ``tests/test_vlm_eagle.py``
asserts it on the shipped files).

Each checkpoint is measured as it is written: tokens per target pass of the
engine at T = 60 on held-out descriptions, uncompressed and through the gate (the
training-time curve in ``training.json``).

    python benchmarks/train_tiny_vlm_eagle.py --out models/assets/tiny-vlm-eagle
    # interrupted? the same command with --resume continues from the last checkpoint
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import jax.numpy as jnp
import numpy as np

from specjax.drafters.eagle3 import default_hidden_layers, load_eagle3
from specjax.drafters.training import TrainOptions, train_drafter
from specjax.drafters.training.export import eagle3_hf_config, export_eagle3
from specjax.drafters.training.loop import visual_compressor_for
from specjax.engine.engine import Engine
from specjax.models.embedded import shape_scenes as S
from specjax.models.embedded import tiny_vlm_dir
from specjax.models.multimodal import VisionLanguageModel, expand_image_tokens, load_vlm

CURVE_MODES = ("none", "gate")


def training_prompts(vlm: VisionLanguageModel, scene_list, seed: int) -> tuple[list[list[int]], list[np.ndarray]]:
    """Per scene its description and one other question, as expanded token ids, with its drawing."""
    rng = np.random.default_rng([seed, 0xEA61E])
    prompts, images = [], []
    for scene in scene_list:
        qa = S.questions(scene, rng)
        other = qa[int(rng.integers(len(qa) - 1))]
        image = S.draw(scene)
        for question, _ in (qa[-1], other):
            prompts.append(expand_image_tokens(vlm.tokenizer.encode(S.prompt_text(question)).ids, vlm.config))
            images.append(image)
    return prompts, images


def held_out_descriptions(model_dir: str, n: int) -> tuple[list[str], list[list[np.ndarray]]]:
    """The first ``n`` held-out scenes' "describe the picture ?" prompts and images (the shipped file)."""
    prompts, images = [], []
    for _, image, qa in S.read_held_out(os.path.join(model_dir, S.HELD_OUT_FILE)):
        if len(prompts) == n:
            break
        question = next(q for q, _ in qa if q == S.DESCRIBE)
        prompts.append(S.prompt_text(question))
        images.append([image])
    return prompts, images


def tokens_per_pass(vlm: VisionLanguageModel, head_dir: str, prompts, images, mode: str, capacity: int = 60,
                    max_new_tokens: int = 32, reference=None) -> float:
    """The engine's tokens per target pass (prefill counted) with the head in ``mode``; checks the
    tokens against ``reference`` (plain greedy) when given."""
    drafter = load_eagle3(head_dir, vlm.text_model(), dtype=jnp.float32, capacity=capacity, visual_mode=mode)
    results = Engine(vlm, drafter, draft_capacity=capacity).generate(prompts, max_new_tokens, images=images)
    if reference is not None and [r.token_ids for r in results] != reference:
        raise AssertionError(f"mode {mode}: the tokens differ from plain greedy decoding")
    return sum(len(r.token_ids) for r in results) / sum(r.target_passes for r in results)


def parse_args(argv=None) -> argparse.Namespace:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None, help="the tiny-vlm directory (default: the shipped one)")
    p.add_argument("--out", default=os.path.join(here, "..", "models", "assets", "tiny-vlm-eagle"))
    p.add_argument("--work-dir", default=os.path.join(here, "..", "build", "tiny-vlm-eagle"),
                   help="checkpoints and curves while training (not shipped)")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=72)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--factor", type=int, default=2, help="the compressor shrinks each side of the 6 x 6 grid by this")
    p.add_argument("--train-scenes", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-scenes", type=int, default=24)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    target_dir = args.target or tiny_vlm_dir()
    vlm = load_vlm(target_dir, dtype=jnp.float32)
    scenes = S.scenes(args.train_scenes, args.seed, "train")
    prompts, images = training_prompts(vlm, scenes, args.seed)
    eval_prompts, eval_images = held_out_descriptions(target_dir, args.eval_scenes)
    reference = [r.token_ids for r in Engine(vlm, None).generate(eval_prompts, 32, images=eval_images)]
    options = TrainOptions(batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed,
                           save_every=args.eval_every, keep=2, visual_factor=args.factor)
    hf_config = eagle3_hf_config(vlm.config.text, default_hidden_layers(vlm.config.text.num_layers),
                                 visual_compressor_for(vlm, args.factor))
    curve = []

    def measure(step: int, params: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            export_eagle3(tmp, hf_config, params)
            row = {"step": step, **{mode: round(tokens_per_pass(vlm, tmp, eval_prompts, eval_images, mode,
                                                                   reference=reference), 3) for mode in CURVE_MODES}}
        curve.append(row)
        print(f"step {step}: tokens/pass on {len(eval_prompts)} held-out descriptions: "
              + ", ".join(f"{m} {row[m]}" for m in CURVE_MODES), flush=True)

    if not args.resume:
        shutil.rmtree(args.work_dir, ignore_errors=True)
    result = train_drafter(vlm, "eagle3", "online", args.steps, args.work_dir, prompts=prompts, images=images,
                           options=options, resume=args.resume, on_checkpoint=measure)
    os.makedirs(args.out, exist_ok=True)
    for name in ("config.json", "model.safetensors", "curves.png"):
        shutil.copy(os.path.join(args.work_dir, name), os.path.join(args.out, name))
    h = result.history
    meta = {"target": "tiny-vlm", "method": "online (online-logit distillation, greedy target rollouts)",
            "data": f"shape_scenes.scenes({args.train_scenes}, seed={args.seed}, split='train'): per scene the "
                    "description and one other question",
            "train_scenes_sha256": hashlib.sha256("\n".join(s.key() for s in scenes).encode()).hexdigest(),
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "work_dir", "resume", "target")},
            "final_loss": round(float(np.mean(h["loss"][-20:])), 4),
            "estimated_chain_tokens_per_pass": round(float(np.mean(h["tokens_per_pass"][-20:])), 3),
            "target_tokens": h["target_tokens"][-1] if h["target_tokens"] else 0,
            "curve": curve, "curve_prompts": f"the first {args.eval_scenes} held-out scenes' descriptions, T=60",
            "wall_seconds_this_run": round(time.perf_counter() - t0),
            "command": "python benchmarks/train_tiny_vlm_eagle.py --out models/assets/tiny-vlm-eagle"}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(json.dumps({k: meta[k] for k in ("final_loss", "curve", "wall_seconds_this_run")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
