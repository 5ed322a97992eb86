"""End-to-end speculative decoding on one model: drafters side by side in one run.

For each drafter (none = plain decoding, prompt lookup, suffix chain, suffix
tree, and the suffix index pre-filled from the embedded model's shipped history,
as ``specjax generate`` drafts) and each draft capacity T (fixed sizes and
"auto") it generates the same requests, checks the greedy outputs are identical to plain decoding, and
reports tokens per target pass, wall-clock time relative to plain decoding
(compilation excluded by a warm-up on the same shapes) and the time of one
step split into host drafting, device step (verify + accept) and host read.
Prints a table and writes JSON.

    python benchmarks/bench_engine.py                       # embedded tiny SQL model, CPU ok
    python benchmarks/bench_engine.py --model DIR --requests 64 --max-new-tokens 128
    python benchmarks/bench_engine.py --capacities 0 1 4 16 auto --drafters suffix-tree

On CPU a tiny model is dominated by per-step overhead, so the wall ratio there
says little; tokens per pass carries over to real models. Absolute times are
only meaningful on a GPU or TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.drafters.suffix_history import load_history
from specjax.drafters.suffix_index import SuffixDecodingDrafter
from specjax.engine.engine import Engine
from specjax.models.embedded import default_model_dir, embedded_suffix_history
from specjax.models.loading import load_model
from specjax.models.embedded.toy_corpus import sql_prompts

HISTORY: list = []  # responses of the embedded model's shipped suffix history (loaded in main)


def _remembering(drafter: SuffixDecodingDrafter) -> SuffixDecodingDrafter:
    drafter.remember(HISTORY)
    return drafter


DRAFTERS = {
    "none": lambda: None,
    "prompt-lookup": lambda: PromptLookupDrafter(max_ngram=3, max_branches=4),
    "suffix-chain": lambda: SuffixDecodingDrafter(),
    "suffix-tree": lambda: SuffixDecodingDrafter(tree=True),
    # What `specjax generate` drafts with on the embedded model: the index pre-filled from the shipped history.
    "suffix-history": lambda: _remembering(SuffixDecodingDrafter()),
}


def run(model, prompts, name: str, capacity, args) -> dict:
    engine = Engine(model, DRAFTERS[name](), draft_capacity=capacity, max_draft_capacity=args.max_capacity,
                    max_batch_size=args.batch_size)
    engine.generate(prompts, max_new_tokens=args.max_new_tokens)  # compile every shape the timed run uses
    engine.drafter = DRAFTERS[name]()  # a fresh index: no memory of the warm-up outputs
    start = time.perf_counter()
    results = engine.generate(prompts, max_new_tokens=args.max_new_tokens)
    wall = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    passes = sum(r.target_passes for r in results)
    # Steps: per batch, its longest request's passes after prefill.
    batches = [results[i: i + args.batch_size] for i in range(0, len(results), args.batch_size)]
    steps = sum(max(r.target_passes for r in b) - 1 for b in batches)
    per_step = lambda field: 1e3 * sum(getattr(r, field) for r in results) / max(steps, 1)
    return {"drafter": name, "capacity": capacity, "tokens": tokens, "target_passes": passes,
            "tokens_per_pass": tokens / passes, "steps": steps, "wall_s": wall,
            "draft_ms_per_step": per_step("draft_s"), "device_ms_per_step": per_step("verify_s"),
            "read_ms_per_step": per_step("read_s"), "token_ids": [r.token_ids for r in results]}


def _capacity(value: str):
    return value if value == "auto" else int(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory (default: the embedded tiny SQL model)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--capacities", type=_capacity, nargs="+", default=[0, 1, 4, 16, "auto"],
                   help="draft capacities T to run per drafter ('auto' = chosen per step)")
    p.add_argument("--max-capacity", type=int, default=16, help="the largest T 'auto' may choose")
    p.add_argument("--drafters", nargs="+", default=[d for d in DRAFTERS if d != "none"], choices=list(DRAFTERS))
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "engine.json"))
    args = p.parse_args()
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    model = load_model(args.model or default_model_dir(), dtype=dtype)
    if "suffix-history" in args.drafters:
        if args.model:
            p.error("--drafters suffix-history runs on the embedded model only (its shipped history)")
        HISTORY.extend(load_history(embedded_suffix_history(), vocab_size=model.config.vocab_size,
                                    tokenizer=model.tokenizer))
    prompts = sql_prompts(args.requests, seed=1)
    base = run(model, prompts, "none", 0, args)
    rows = [base] + [run(model, prompts, name, t, args) for name in args.drafters for t in args.capacities]
    print(f"backend: {jax.default_backend()}  device: {jax.devices()[0].device_kind}  "
          f"model: {args.model or 'embedded tiny-sql'}  requests: {args.requests}  "
          f"max_new_tokens: {args.max_new_tokens}  batch: {args.batch_size}")
    print(f"{'drafter':<15}{'T':>5}{'tokens':>8}{'passes':>8}{'tok/pass':>10}{'wall s':>9}{'speedup':>9}"
          f"{'draft ms':>10}{'device ms':>11}{'read ms':>9}{'identical':>11}")
    for r in rows:
        r["speedup"] = base["wall_s"] / r["wall_s"]
        r["identical_to_plain"] = r["token_ids"] == base["token_ids"]
        print(f"{r['drafter']:<15}{str(r['capacity']):>5}{r['tokens']:>8}{r['target_passes']:>8}"
              f"{r['tokens_per_pass']:>10.2f}{r['wall_s']:>9.2f}{r['speedup']:>9.2f}{r['draft_ms_per_step']:>10.2f}"
              f"{r['device_ms_per_step']:>11.2f}{r['read_ms_per_step']:>9.2f}{str(r['identical_to_plain']):>11}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "args": vars(args),
                   "rows": [{k: v for k, v in r.items() if k != "token_ids"} for r in rows]}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
