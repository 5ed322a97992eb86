"""MuLo-SD on the shipped image generators: target passes per image and CPU wall time, side by side.

Rows (``--images-per-class`` images of each class, the same seeds for every row):

- plain raster decoding (the ``Engine`` without a drafter, fused on-device chunks);
- lossless drafters in raster order: prompt lookup over the image so far, Token Recycling, and an
  EAGLE-3 head for the target (``--eagle3 DIR``, trained by ``specjax train-drafter --target
  models/assets/image-gen-hi --kind eagle3``: on the target's own samples from the class prompts);
- MuLo-SD, exact acceptance (lossless): nearest and trained (conv + pixel shuffle) up-samplers;
- MuLo-SD, pooled acceptance (**LOSSY**): tau, codebook radius, local rejection with expansion
  l (and raster rejection as the comparison).

Quality (``image_quality.py``): a small classifier trained on drawn digits scores each row's images,
class accuracy (is the asked digit drawn) and a Fréchet distance between its features of the row's
images and of 1,000 drawn images (FID's formula; with 50 images it is biased upward, so compare rows,
and the "drawn images" row gives the floor at the same count). Also, per row: the share of image
tokens that differ from lossless sampling with the same seed (0 for every lossless row by
construction; what a lossy row changed), the share of each image's drawn tokens in its class's
colour, and the share of blank images (``colour_quality``).

Writes ``benchmarks/results/mulo.json`` and ``mulo.png`` (rows = settings, columns = classes, the
first image of each).
Every row runs once untimed first (compiles), then ``--repeats`` times (median); Token
Recycling's table stays warm across them (its hot start). CPU timings on a shared 2-core
machine are noisy; ratios within one run are the comparison.

    python benchmarks/bench_mulo.py --temperature 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import numpy as np

from specjax.drafters.eagle3 import load_eagle3
from specjax.drafters.mulo import UPSAMPLER_FILE, MuloDrafter, NearestUpsampler, load_upsampler
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine.engine import Engine
from specjax.engine.mulo import generate_mulo, pooled_neighbours
from specjax.models.embedded import image_gen_dirs
from specjax.models.image_tokens import BACKGROUNDS, FOREGROUNDS, ImageVocab, Palette, decode
from specjax.models.loading import load_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import image_quality  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)

HERE = os.path.dirname(os.path.abspath(__file__))
GRID = 16


def engine_row(hi, drafter, prompts, temperature, seed, capacity):
    """(grids [N, 16, 16], target passes per image, accepted drafts, drafted tokens) of an Engine run."""
    engine = Engine(hi, drafter, draft_capacity=capacity) if drafter is not None else Engine(hi, None)
    results = engine.generate(prompts, GRID * GRID, temperature=temperature, seed=seed)
    return (np.stack([np.reshape(r.token_ids, (GRID, GRID)) for r in results]), [r.target_passes for r in results],
            sum(r.accepted_draft_tokens for r in results), sum(s.drafted for r in results for s in r.trace))


def mulo_row(hi, drafter, prompts, temperature, seed, **kwargs):
    results = generate_mulo(hi, drafter, prompts, grid=GRID, temperature=temperature, seed=seed, **kwargs)
    return (np.stack([r.tokens for r in results]), [r.target_passes for r in results],
            sum(r.accepted for r in results), sum(r.drafted for r in results))


def timed(fn, repeats: int):
    """fn() once to compile, then ``repeats`` timed runs: (the last result, median seconds)."""
    fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return out, float(np.median(seconds))


def colour_quality(grids: np.ndarray, labels) -> tuple[float, float]:
    """(class colour share, blank share): per image, the share of its non-background tokens that are
    its class's foreground colour (the digit is drawn in it; edge tokens blend, so plain decoding
    is below 1: compare rows), averaged; and the share of images with under 4 non-background
    tokens (no digit). A stand-in until the classifier of issue 22 exists."""
    palette = Palette()
    backgrounds = [palette.index(c) for c in BACKGROUNDS]
    shares, blank = [], 0
    for g, label in zip(grids, labels):
        drawn = g[~np.isin(g, backgrounds)]
        blank += len(drawn) < 4
        shares.append(float((drawn == palette.index(FOREGROUNDS[label])).mean()) if len(drawn) else 0.0)
    return float(np.mean(shares)), blank / len(grids)


def sample_grid_png(path: str, names: list[str], grids: list[np.ndarray]) -> None:
    """One row of decoded images per setting, labelled; matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(grids), 1, figsize=(10, 1.25 * len(grids)), squeeze=False)
    for ax, name, g in zip(axes[:, 0], names, grids):
        ax.imshow(np.concatenate(list(decode(g[:10])), axis=1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--taus", type=float, nargs="+", default=[0.3, 0.1])
    p.add_argument("--radius", type=float, default=1.0, help="codebook neighbourhood (palette coordinates)")
    p.add_argument("--expand", type=int, nargs="+", default=[0, 1, 2], help="local rejection's l")
    p.add_argument("--block-rows", type=int, default=2)
    p.add_argument("--images-per-class", type=int, default=5)
    p.add_argument("--eagle3", help="an EAGLE-3 head trained for image-gen-hi: adds its lossless row (T=16)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "mulo.json"))
    args = p.parse_args(argv)

    vocab = ImageVocab()
    lo_dir, hi_dir = image_gen_dirs()
    lo, hi = load_model(lo_dir, dtype=jnp.float32), load_model(hi_dir, dtype=jnp.float32)
    trained = load_upsampler(os.path.join(lo_dir, UPSAMPLER_FILE))
    labels = [c for _ in range(args.images_per_class) for c in range(vocab.num_classes)]
    prompts = [vocab.prompt(c) for c in labels]
    common = dict(temperature=args.temperature, seed=args.seed)
    nearest = NearestUpsampler(2)
    rows = [
        ("plain", "lossless", lambda: engine_row(hi, None, prompts, capacity=0, **common)),
        ("prompt lookup T=16", "lossless",
         lambda: engine_row(hi, PromptLookupDrafter(max_ngram=4), prompts, capacity=16, **common)),
        ("token recycling T=16", "lossless",
         lambda: engine_row(hi, TokenRecyclingDrafter(vocab.vocab_size, capacity=16), prompts, capacity=16,
                            **common)),
    ]
    if args.eagle3:
        head = load_eagle3(args.eagle3, hi, dtype=jnp.float32, capacity=16, topk=4, depth=6)
        rows.append(("EAGLE-3 T=16", "lossless", lambda: engine_row(hi, head, prompts, capacity=16, **common)))
    rows += [
        ("MuLo exact, nearest", "lossless",
         lambda: mulo_row(hi, MuloDrafter(lo, 8, nearest, args.temperature, args.seed), prompts,
                          block_rows=args.block_rows, **common)),
        ("MuLo exact, trained", "lossless",
         lambda: mulo_row(hi, MuloDrafter(lo, 8, trained, args.temperature, args.seed), prompts,
                          block_rows=args.block_rows, **common)),
    ]
    neighbours = pooled_neighbours(vocab, args.radius)
    for tau in args.taus:
        for rejection, expands in (("raster", [0]), ("local", args.expand)):
            for l in expands:
                name = f"MuLo pooled LOSSY tau={tau} r={args.radius:g} " + (
                    "raster" if rejection == "raster" else f"local l={l}")
                rows.append((name, "LOSSY", lambda tau=tau, rejection=rejection, l=l: mulo_row(
                    hi, MuloDrafter(lo, 8, trained, args.temperature, args.seed), prompts, block_rows=args.block_rows,
                    acceptance="pooled", tau=tau, neighbours=neighbours, expand=l, rejection=rejection, **common)))

    table, names, grids = [], [], []
    reference = None
    classifier = image_quality.train_classifier()
    drawn_features = image_quality.features(classifier, image_quality.drawn_images(1000, seed=12345)[0])
    floor_images, floor_labels = image_quality.drawn_images(len(prompts), seed=54321)
    floor = {"class_accuracy": image_quality.class_accuracy(classifier, floor_images, floor_labels),
             "frechet_distance": image_quality.frechet_distance(image_quality.features(classifier, floor_images),
                                                                drawn_features)}
    print(f"drawn images (the data, {len(prompts)}): class accuracy {floor['class_accuracy']:.2f}, Frechet distance "
          f"{floor['frechet_distance']:.1f}")
    for name, kind, fn in rows:
        (tokens, passes, accepted, drafted), seconds = timed(fn, args.repeats)
        reference = tokens if reference is None else reference
        colour, blank = colour_quality(tokens, labels)
        images = decode(tokens)
        table.append({"setting": name, "acceptance": kind, "target_passes_per_image": float(np.mean(passes)),
                      "draft_acceptance": accepted / drafted if drafted else None, "wall_s": round(seconds, 3),
                      "tokens_differing_from_lossless_sampling": float((tokens != reference).mean()),
                      "class_accuracy": image_quality.class_accuracy(classifier, images, labels),
                      "frechet_distance": image_quality.frechet_distance(
                          image_quality.features(classifier, images), drawn_features),
                      "class_colour_share": colour, "blank_images": blank})
        names.append(name)
        grids.append(tokens)
        print(f"{name:44s} {kind:8s} passes/image {np.mean(passes):6.1f}  wall {seconds:6.2f}s", flush=True)
    plain_s = table[0]["wall_s"]
    for row in table:
        row["wall_ratio_vs_plain"] = round(plain_s / row["wall_s"], 3)
    print("\n| setting | acceptance | target passes / image | drafts accepted | CPU wall speedup vs plain | "
          "tokens != lossless | class accuracy | Frechet distance | class colour share | blank images |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in table:
        accepted = "-" if row["draft_acceptance"] is None else f"{row['draft_acceptance']:.0%}"
        print(f"| {row['setting']} | {row['acceptance']} | {row['target_passes_per_image']:.1f} | {accepted} | "
              f"{row['wall_ratio_vs_plain']:.2f}x | {row['tokens_differing_from_lossless_sampling']:.1%} | "
              f"{row['class_accuracy']:.2f} | {row['frechet_distance']:.1f} | "
              f"{row['class_colour_share']:.2f} | {row['blank_images']:.0%} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "images": len(prompts), "grid": GRID, "device": "cpu", "rows": table,
                   "drawn_images_floor": floor,
                   "note": "pooled rows are LOSSY (relaxed acceptance); quality from benchmarks/image_quality.py"},
                  f, indent=1)
    sample_grid_png(os.path.splitext(args.out)[0] + ".png", names, grids)
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
