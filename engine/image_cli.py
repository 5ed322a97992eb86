"""``specjax generate-image``: class-conditional digits from the shipped image generators, with
MuLo-SD drafting (the 8 x 8 model drafts, its up-sampler maps the drafts to 16 x 16 proposals, the
16 x 16 target verifies blocks of rows).

The default acceptance is exact (lossless: the images are the target's own samples for the seed).
``--acceptance pooled`` is MuLo-SD's relaxed rule: faster, LOSSY, and said so on stderr, in the
JSON (``"lossy": true``) and in the PNG's title.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def add_image_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated digits, one image each")
    p.add_argument("--out", default="digits.png", help="the PNG the images are written to, side by side")
    p.add_argument("--drafter", choices=("mulo", "none"), default="mulo",
                   help="mulo: the 8 x 8 model drafts through its trained up-sampler; none: plain decoding")
    p.add_argument("--acceptance", choices=("exact", "pooled"), default="exact",
                   help="exact (default): lossless; pooled: MuLo-SD's relaxed rule, LOSSY")
    p.add_argument("--tau", type=float, default=0.3, help="pooled (LOSSY) only: the acceptance threshold")
    p.add_argument("--radius", type=float, default=1.0,
                   help="pooled (LOSSY) only: the codebook neighbourhood, in palette coordinates")
    p.add_argument("--expand", type=int, default=1, help="pooled (LOSSY) only: local rejection's radius l")
    p.add_argument("--block-rows", type=int, default=2, help="token rows verified per target pass")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a JSON report instead of a summary")


def parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise SystemExit(f"--classes must be comma-separated digits, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise SystemExit(f"--classes must name digits in [0, {num_classes}), got {text!r}")
    return classes


def generate_image_main(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from specjax.drafters.mulo import UPSAMPLER_FILE, MuloDrafter, load_upsampler
    from specjax.engine.engine import Engine
    from specjax.engine.mulo import generate_mulo, pooled_neighbours
    from specjax.models.embedded import image_gen_dirs
    from specjax.models.image_tokens import ImageVocab, decode
    from specjax.models.loading import load_model

    vocab = ImageVocab()
    classes = parse_classes(args.classes, vocab.num_classes)
    lossy = args.drafter == "mulo" and args.acceptance == "pooled"
    if args.acceptance == "pooled" and args.drafter != "mulo":
        raise SystemExit("--acceptance pooled needs --drafter mulo")
    lo_dir, hi_dir = image_gen_dirs()
    hi = load_model(hi_dir, dtype=jnp.float32)
    grid = asset_grid(hi_dir)
    prompts = [vocab.prompt(c) for c in classes]
    if args.drafter == "none":
        results = Engine(hi, None).generate(prompts, grid * grid, temperature=args.temperature, seed=args.seed)
        tokens = [np.reshape(r.token_ids, (grid, grid)) for r in results]
        passes = [r.target_passes for r in results]
    else:
        lo = load_model(lo_dir, dtype=jnp.float32)
        drafter = MuloDrafter(lo, asset_grid(lo_dir), load_upsampler(os.path.join(lo_dir, UPSAMPLER_FILE)),
                              args.temperature, args.seed)
        pooled = dict(acceptance="pooled", tau=args.tau, neighbours=pooled_neighbours(vocab, args.radius),
                      expand=args.expand) if lossy else {}
        results = generate_mulo(hi, drafter, prompts, grid=grid, block_rows=args.block_rows,
                                temperature=args.temperature, seed=args.seed, **pooled)
        tokens, passes = [r.tokens for r in results], [r.target_passes for r in results]
    label = "pooled acceptance (LOSSY)" if lossy else "exact acceptance (lossless)"
    if lossy:
        print("LOSSY: pooled acceptance; these images are not the target's own samples", file=sys.stderr)
    write_png(args.out, decode(np.stack(tokens)), f"{args.drafter}, {label}" if args.drafter == "mulo" else "plain")
    report = {"classes": classes, "out": args.out, "drafter": args.drafter, "acceptance": args.acceptance,
              "lossy": lossy, "target_passes": passes, "tokens_per_image": grid * grid}
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{len(classes)} images ({label}): {np.mean(passes):.1f} target passes per image for "
              f"{grid * grid} tokens; wrote {args.out}")
    return 0


def asset_grid(model_dir: str) -> int:
    """The token grid side of a shipped image generator (its ``image_tokens.json``)."""
    with open(os.path.join(model_dir, "image_tokens.json")) as f:
        return int(json.load(f)["grid"])


def write_png(path: str, images: np.ndarray, title: str) -> None:
    """The images side by side, 4x enlarged, under a one-line title strip (Pillow only)."""
    from PIL import Image, ImageDraw

    strip = np.concatenate(list(images), axis=1).repeat(4, axis=0).repeat(4, axis=1)
    canvas = Image.new("RGB", (strip.shape[1], strip.shape[0] + 16), "white")
    canvas.paste(Image.fromarray(strip), (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), title, fill="black")
    canvas.save(path)
