"""What checking host drafters' proposals costs next to drafting them.

The engine checks each step's proposals (``specjax.drafters.base.check_proposals``)
before packing them. This runs the embedded demo (batch 16, prompt lookup) and
times, per step, the drafter's ``propose`` calls and the check of their results,
and the whole host drafting time the engine books per step, against runs on the
same engine with the check skipped (interleaved). Prints a table and writes JSON.

    python benchmarks/bench_drafter_checks.py
    python benchmarks/bench_drafter_checks.py --batch-size 4 --capacity 16 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np

import specjax.engine.engine as engine_module
from specjax.drafters.base import check_proposals
from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.engine import Engine
from specjax.models.embedded import default_model_dir
from specjax.models.loading import load_model
from specjax.models.embedded.toy_corpus import sql_prompts


class TimedPromptLookup(PromptLookupDrafter):
    """Prompt lookup that books the seconds its ``propose`` calls take."""

    def __init__(self, **options):
        super().__init__(**options)
        self.propose_s = 0.0

    def propose(self, request_id, max_tokens):
        t0 = time.perf_counter()
        proposal = super().propose(request_id, max_tokens)
        self.propose_s += time.perf_counter() - t0
        return proposal


def timed_checks(record: list):
    """``check_proposals`` that appends (seconds, proposals, nodes) per call to ``record``."""

    def check(proposals, drafter, max_tokens, vocab_size):
        t0 = time.perf_counter()
        check_proposals(proposals, drafter, max_tokens, vocab_size)
        record.append((time.perf_counter() - t0, len(proposals), sum(len(p) for p in proposals)))

    return check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--capacity", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "drafter_checks.json"))
    args = parser.parse_args()

    model = load_model(default_model_dir(), dtype=jnp.float32)
    drafter = TimedPromptLookup(max_ngram=3, max_branches=4)
    engine = Engine(model, drafter, draft_capacity=args.capacity, max_batch_size=args.batch_size)
    prompts = sql_prompts(args.batch_size, seed=0)
    engine.generate(prompts, max_new_tokens=args.max_new_tokens)  # compile the shapes the timed runs use
    record: list = []
    runs, unchecked = [], []
    try:
        for _ in range(args.repeats):  # interleaved with runs that skip the check: the "before" numbers
            engine_module.check_proposals = lambda *checked_args: None
            results = engine.generate(prompts, max_new_tokens=args.max_new_tokens)
            unchecked.append(1e3 * sum(r.draft_s for r in results) / (max(r.target_passes for r in results) - 1))
            record.clear()
            drafter.propose_s = 0.0
            engine_module.check_proposals = timed_checks(record)
            results = engine.generate(prompts, max_new_tokens=args.max_new_tokens)
            steps = len(record)
            runs.append({"steps": steps, "proposals_per_step": float(np.mean([r[1] for r in record])),
                         "nodes_per_step": float(np.mean([r[2] for r in record])),
                         "propose_ms_per_step": 1e3 * drafter.propose_s / steps,
                         "check_ms_per_step": 1e3 * sum(r[0] for r in record) / steps,
                         "host_draft_ms_per_step": 1e3 * sum(r.draft_s for r in results) / steps})
    finally:
        engine_module.check_proposals = check_proposals
    keys = list(runs[0])
    summary = {k: float(np.median([run[k] for run in runs])) for k in keys}
    summary["unchecked_host_draft_ms_per_step"] = float(np.median(unchecked))
    summary["check_share_of_host_drafting"] = summary["check_ms_per_step"] / summary["host_draft_ms_per_step"]
    print(f"embedded demo, prompt lookup, batch {args.batch_size}, T={args.capacity}, "
          f"{args.max_new_tokens} new tokens; median of {args.repeats} runs")
    keys = keys[1:] + ["unchecked_host_draft_ms_per_step"]
    print("| " + " | ".join(keys) + " | check share |")
    print("|" + "---|" * (len(keys) + 1))
    print("| " + " | ".join(f"{summary[k]:.3f}" for k in keys)
          + f" | {100 * summary['check_share_of_host_drafting']:.1f}% |")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "runs": runs, "median": summary}, f, indent=1)


if __name__ == "__main__":
    main()
