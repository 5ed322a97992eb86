"""EagleVLM on tiny-vlm: tokens per pass and the drafter's cost per visual compressor, prefill vs decode.

The shipped head (``models/assets/tiny-vlm-eagle``: EAGLE-3 with SpecVLM's elastic
visual compressor) drafts for the shipped tiny-vlm at T = 60 on held-out scenes
(the shipped ``held_out.jsonl.gz``, never trained on). Every run's tokens are
checked against plain greedy decoding (the script fails otherwise).

1. Per compressor mode (none, prune, pool, conv, resampler, the gate): tokens per
   target pass on the scenes' descriptions (long answers) and on one short question
   per scene, and the wall-time speedup over plain decoding in the same run (CPU:
   ratios, not absolute times).
2. Per number of visual tokens the head keeps (36, 9, 4, 1: factors 1, 2, 3, 6 of
   the parameter-free operators, pool and prune): tokens per pass, and the head's
   cost of one T = 60 proposal (jitted, the fastest of 30) with that context.
   Speedups are medians of 7 ratios of plain to drafted wall time, each pair run
   back to back after both engines compiled (CPU: ratios, not absolute times).
3. The head's proposal cost with LLaVA-sized image runs (36, 144, 576 tokens, random
   features), uncompressed and pooled 4x / 16x; the gate with the auto tree size
   (``draft_capacity="auto"``) against plain; and the share of prefill (the vision
   tower, projector and the prompt's pass) in a request's time, plain and with the head.
4. The training-time curve the build recorded (tokens per pass against online
   distillation steps, ``training.json``).

Writes ``benchmarks/results/vlm_eagle.json`` and ``vlm_eagle.png``::

    python benchmarks/bench_vlm_eagle.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters import visual_compressor as vc
from specjax.drafters.eagle3 import Eagle3Drafter, load_eagle3
from specjax.engine.engine import Engine
from specjax.engine.sampling import SamplingParams
from specjax.models.embedded import shape_scenes as S
from specjax.models.embedded import tiny_vlm_dir, tiny_vlm_eagle_dir
from specjax.models.multimodal import load_vlm

HERE = os.path.dirname(os.path.abspath(__file__))
CAPACITY, NEW_TOKENS = 60, 32


def held_out_prompts(n: int, seed: int = 0) -> dict[str, tuple[list[str], list]]:
    """{"describe": the first n held-out scenes' descriptions, "short": one other question each}."""
    rng = np.random.default_rng(seed)
    out = {"describe": ([], []), "short": ([], [])}
    for k, (_, image, qa) in enumerate(S.read_held_out(os.path.join(tiny_vlm_dir(), S.HELD_OUT_FILE))):
        if k == n:
            break
        short = [q for q, _ in qa if q != S.DESCRIBE]
        for kind, question in (("describe", S.DESCRIBE), ("short", short[int(rng.integers(len(short)))])):
            out[kind][0].append(S.prompt_text(question))
            out[kind][1].append([image])
    return out


def timed(engine: Engine, prompts, images, max_new_tokens: int, repeats: int) -> tuple[list, float]:
    """The results and the median wall time of ``repeats`` generations, after one untimed (compiling) run."""
    engine.generate(prompts, max_new_tokens, images=images)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        results = engine.generate(prompts, max_new_tokens, images=images)
        times.append(time.perf_counter() - t)
    return results, float(np.median(times))


def generate(vlm, drafter, prompts, images) -> list:
    return Engine(vlm, drafter, draft_capacity=CAPACITY).generate(prompts, NEW_TOKENS, images=images)


def run_against_plain(vlm, drafter, prompts, images, repeats: int = 7, capacity=CAPACITY) -> tuple[list, float]:
    """The drafter's results and its speedup: the median of ``repeats`` ratios of plain to drafted
    wall time, each pair run back to back (both engines compiled first)."""
    engines = [Engine(vlm, None), Engine(vlm, drafter, draft_capacity=capacity)]
    for engine in engines:
        engine.generate(prompts, NEW_TOKENS, images=images)
    ratios = []
    for _ in range(repeats):
        seconds = []
        for engine in engines:
            t = time.perf_counter()
            results = engine.generate(prompts, NEW_TOKENS, images=images)
            seconds.append(time.perf_counter() - t)
        ratios.append(seconds[0] / seconds[1])
    return results, float(np.median(ratios))


def with_compressor(head: Eagle3Drafter, mode: str, **fields) -> Eagle3Drafter:
    """The head in ``mode`` with its compressor's ``fields`` replaced (another grid or factor: only the
    parameter-free operators, pool and prune, or "none", apply there)."""
    comp = dataclasses.replace(head.cfg.compressor, **fields)
    return dataclasses.replace(head, cfg=dataclasses.replace(head.cfg, compressor=comp), visual_mode=mode)


def proposal_seconds(head: Eagle3Drafter, prompt_len: int, batch: int = 8, repeats: int = 30) -> float:
    """Seconds of one jitted proposal (the fastest of ``repeats``: on a shared CPU the slower runs
    measure the neighbours) after a prefill of ``prompt_len`` pairs holding one image run (random
    features: the cost depends on the shapes only)."""
    comp, text_h = head.cfg.compressor, head.cfg.target_hidden_size
    tokens = np.full((batch, prompt_len), 7, np.int32)
    tokens[:, 1: 1 + comp.image_tokens] = comp.image_token_id
    lengths = jnp.full(batch, prompt_len, jnp.int32)
    hidden = jax.random.normal(jax.random.key(0), (3, batch, prompt_len, text_h), jnp.float32)
    state = head.init_state(batch, prompt_len + NEW_TOKENS)
    state = jax.jit(head.prefill)(head.params, state, jnp.asarray(tokens), lengths, jnp.zeros(batch, jnp.int32), hidden)
    propose = jax.jit(lambda p, s, key: head.propose(p, s, jnp.zeros(batch, jnp.int32), lengths,
                                                     SamplingParams.make(batch), key)[0].tokens)
    propose(head.params, state, jax.random.key(1)).block_until_ready()
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        propose(head.params, state, jax.random.key(r)).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def cost_by_image_size(head: Eagle3Drafter) -> list[dict]:
    """The head's proposal cost when the image run is LLaVA-sized (a grid of 6, 12 or 24: 36, 144,
    576 tokens; random features), uncompressed and pooled 4x and 16x: what the cut saves where
    visual tokens dominate the head's context (tiny-vlm's 36 are a small share of its work)."""
    rows = []
    for grid in (6, 12, 24):
        for factor in (1, 2, 4) if grid > 6 else (1, 2):
            sized = with_compressor(head, "pool" if factor > 1 else "none", grid=grid, factor=factor if factor > 1 else 2)
            kept = grid * grid // (factor * factor)
            rows.append({"image_tokens": grid * grid, "kept": kept,
                         "proposal_s": round(proposal_seconds(sized, grid * grid + 8), 5)})
    return rows


def prefill_share(vlm, drafter, prompts, images) -> float:
    """Median seconds of prefill-only requests (one token: the tower, the projector, the prompt's
    pass and, with a head, its prefill) over those of the full requests."""
    engine = Engine(vlm, drafter, **({} if drafter is None else {"draft_capacity": CAPACITY}))
    _, prefill = timed(engine, prompts, images, 1, 3)
    _, full = timed(engine, prompts, images, NEW_TOKENS, 3)
    return prefill / full


def tokens_per_pass(results) -> float:
    return sum(len(r.token_ids) for r in results) / sum(r.target_passes for r in results)


def plot(path: str, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    modes = report["modes"]
    names = list(modes)
    axes[0].bar(names, [modes[m]["describe"]["tokens_per_pass"] for m in names], color="tab:blue")
    axes[0].set_ylabel("tokens per target pass (held-out descriptions)")
    axes[0].set_title("compressor mode (36 -> 9 visual tokens), T = 60")
    axes[0].axhline(0.9 * modes["none"]["describe"]["tokens_per_pass"], ls="--", c="gray", label="90% of none")
    axes[0].legend(loc="lower right")
    for op in ("pool", "prune"):
        rows = [r for r in report["by_visual_tokens"] if r["operator"] in (op, "none")]
        axes[1].plot([r["visual_tokens"] for r in rows], [r["tokens_per_pass"] for r in rows], "o-", label=op)
    axes[1].set_xlabel("visual tokens the head keeps (of 36)")
    axes[1].set_ylabel("tokens per pass")
    axes[1].set_xscale("log", base=2)
    axes[1].legend(loc="lower right")
    for size in sorted({r["image_tokens"] for r in report["cost_by_image_size"]}):
        rows = [r for r in report["cost_by_image_size"] if r["image_tokens"] == size]
        axes[2].plot([r["kept"] for r in rows], [1e3 * r["proposal_s"] for r in rows], "o-", label=f"{size} image tokens")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("visual tokens the head keeps")
    axes[2].set_ylabel("one T = 60 proposal, batch 8 (ms, CPU)")
    axes[2].legend()
    curve = report["training_curve"]
    for mode in ("none", "gate"):
        axes[3].plot([r["step"] for r in curve], [r[mode] for r in curve], "o-", ms=3, label=mode)
    axes[3].set_xlabel("online distillation steps")
    axes[3].set_ylabel("tokens per pass (24 held-out descriptions)")
    axes[3].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=48)
    p.add_argument("--out", default=os.path.join(HERE, "results", "vlm_eagle.json"))
    args = p.parse_args(argv)
    vlm = load_vlm(tiny_vlm_dir(), dtype=jnp.float32)
    head = load_eagle3(tiny_vlm_eagle_dir(), vlm.text_model(), dtype=jnp.float32, capacity=CAPACITY)
    sets = held_out_prompts(args.scenes)
    reference = {kind: [r.token_ids for r in generate(vlm, None, *sets[kind])] for kind in sets}
    report = {"device": jax.devices()[0].device_kind, "capacity": CAPACITY, "scenes": args.scenes,
              "prompts": "held-out scenes of tiny-vlm (held_out.jsonl.gz): each scene's description, and one "
                         "other question per scene",
              "modes": {}, "by_visual_tokens": []}

    def lossless(results, kind, label):
        if [r.token_ids for r in results] != reference[kind]:
            raise AssertionError(f"{label}: the tokens differ from plain greedy decoding")

    print(f"{'mode':<10} {'describe tok/pass':>18} {'speedup':>8} {'short tok/pass':>15} {'speedup':>8}")
    for mode in vc.MODES:
        drafter = dataclasses.replace(head, visual_mode=mode)
        row = {}
        for kind in sets:
            results, speedup = run_against_plain(vlm, drafter, *sets[kind])
            lossless(results, kind, mode)
            row[kind] = {"tokens_per_pass": round(tokens_per_pass(results), 3), "speedup": round(speedup, 3)}
        report["modes"][mode] = row
        print(f"{mode:<10} {row['describe']['tokens_per_pass']:>18.3f} {row['describe']['speedup']:>7.2f}x "
              f"{row['short']['tokens_per_pass']:>15.3f} {row['short']['speedup']:>7.2f}x")

    prompt_len = 36 + len(S.DESCRIBE.split())
    print(f"\n{'operator':<10} {'visual tokens':>13} {'tok/pass':>9} {'proposal ms':>12}")
    for factor in (1, 2, 3, 6):
        for op in ("pool", "prune") if factor > 1 else ("none",):
            drafter = with_compressor(head, op, factor=factor if factor > 1 else 2)
            results = generate(vlm, drafter, *sets["describe"])
            lossless(results, "describe", f"{op} factor {factor}")
            kept = (6 // factor) ** 2
            row = {"operator": op, "factor": factor, "visual_tokens": kept,
                   "tokens_per_pass": round(tokens_per_pass(results), 3),
                   "proposal_s": round(proposal_seconds(drafter, prompt_len), 5)}
            report["by_visual_tokens"].append(row)
            print(f"{op:<10} {kept:>13} {row['tokens_per_pass']:>9.3f} {1e3 * row['proposal_s']:>12.2f}")

    print(f"\n{'image tokens':>12} {'head keeps':>10} {'proposal ms':>12}")
    report["cost_by_image_size"] = cost_by_image_size(head)
    for row in report["cost_by_image_size"]:
        print(f"{row['image_tokens']:>12} {row['kept']:>10} {1e3 * row['proposal_s']:>12.2f}")

    results, speedup = run_against_plain(vlm, dataclasses.replace(head, visual_mode="gate"), *sets["describe"],
                                         capacity="auto")
    lossless(results, "describe", "gate, auto T")
    report["auto_T"] = {"tokens_per_pass": round(tokens_per_pass(results), 3), "speedup": round(speedup, 3)}
    print(f"\ngate with the auto tree size (draft_capacity='auto'): {report['auto_T']['tokens_per_pass']:.3f} "
          f"tokens/pass, {report['auto_T']['speedup']:.2f}x plain")
    report["prefill_share"] = {"plain": round(prefill_share(vlm, None, *sets["describe"]), 3),
                               "eagle_gate": round(prefill_share(vlm, head, *sets["describe"]), 3)}
    print(f"\nprefill share of a description request: plain {report['prefill_share']['plain']:.0%}, "
          f"EagleVLM (gate) {report['prefill_share']['eagle_gate']:.0%}")
    with open(os.path.join(tiny_vlm_eagle_dir(), "training.json")) as f:
        report["training_curve"] = json.load(f)["curve"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    plot(os.path.splitext(args.out)[0] + ".png", report)
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
