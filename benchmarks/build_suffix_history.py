"""Build the suffix-index history shipped with the embedded model.

The embedded tiny-sql model answers training-split questions of its toy corpus
greedily (plain decoding), and the answers are written as a suffix history
(``specjax.drafters.suffix_history``): what the model's global suffix index
would hold after serving those requests. ``specjax generate`` pre-fills the
index from it (``--suffix-history auto``), as a deployment's index is warm from
earlier traffic. Questions that also occur among the demo prompts of seeds
0-9 are left out, so the demo never drafts from an answer to its own question.

    python benchmarks/build_suffix_history.py --out models/assets/tiny-sql/suffix_history.jsonl.gz
"""

from __future__ import annotations

import argparse
import time

import jax.numpy as jnp

from specjax.drafters.suffix_history import save_history
from specjax.engine.engine import Engine
from specjax.models.embedded import default_model_dir
from specjax.models.loading import load_model
from specjax.models.toy_corpus import sql_examples

DEMO_SEEDS = range(10)
DEMO_PROMPTS_PER_SEED = 256


def history_questions(n: int, seed: int) -> list[str]:
    """``n`` training-split prompts whose questions appear in no demo prompt of seeds 0-9."""
    demo = {ex.prompt for s in DEMO_SEEDS for ex in sql_examples(DEMO_PROMPTS_PER_SEED, s, split="demo")}
    prompts: list[str] = []
    pool = 2 * n
    while len(prompts) < n:
        prompts = [ex.prompt for ex in sql_examples(pool, seed, split="train") if ex.prompt not in demo][:n]
        pool *= 2
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="history file to write (.jsonl.gz)")
    parser.add_argument("--questions", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=1, help="training-split stream of the questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    model = load_model(default_model_dir(), dtype=jnp.float32)  # as `specjax generate` runs on a CPU
    prompts = history_questions(args.questions, args.seed)
    start = time.perf_counter()
    results = Engine(model, None).generate(prompts, max_new_tokens=args.max_new_tokens)
    responses = [r.token_ids for r in results]
    save_history(args.out, responses, vocab_size=model.config.vocab_size, tokenizer=model.tokenizer,
                 source=f"benchmarks/build_suffix_history.py --questions {args.questions} --seed {args.seed} "
                        f"--max-new-tokens {args.max_new_tokens}")
    print(f"{len(responses)} responses, {sum(map(len, responses))} tokens, in {time.perf_counter() - start:.0f} s "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
