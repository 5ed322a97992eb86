"""Build the suffix-index history shipped with the embedded model.

The embedded tiny-sql model answers training-split questions of its toy corpus
greedily (plain decoding), and the answers are written as a suffix history
(``specjax.drafters.suffix_history``): what the model's global suffix index
would hold after serving those requests. ``specjax generate`` pre-fills the
index from it (``--suffix-history auto``), as a deployment's index is warm from
earlier traffic.

No demo answer occurs in it: a question is left out when it is a demo question
of seeds 0-9 or its gold SQL is a demo answer, and an answer is left out when a
demo answer (the gold SQL or the model's own greedy answer to a demo question)
occurs in its text. So the demo never drafts from an answer to its own question.

    python benchmarks/build_suffix_history.py --out models/assets/tiny-sql/suffix_history.jsonl.gz
"""

from __future__ import annotations

import argparse
import time
from typing import Iterable

import jax.numpy as jnp

from specjax.drafters.suffix_history import save_history
from specjax.engine.engine import Engine
from specjax.models.embedded import default_model_dir
from specjax.models.loading import load_model
from specjax.models.embedded.toy_corpus import Example, held_out_examples, sql_examples

DEMO_SEEDS = range(10)
DEMO_PROMPTS_PER_SEED = 256  # `--num-demo-prompts` up to this gives a prefix of these


def demo_examples() -> list[Example]:
    """The demo questions of ``specjax generate --seed 0`` to ``9`` (``toy_corpus.sql_prompts``)."""
    return [ex for s in DEMO_SEEDS for ex in held_out_examples(DEMO_PROMPTS_PER_SEED, s, split="demo")]


def contains_any(text: str, answers: Iterable[str]) -> bool:
    """Whether one of ``answers`` occurs verbatim in ``text``."""
    return any(a in text for a in answers)


def candidate_questions(n: int, seed: int, demo: list[Example]) -> list[str]:
    """The first ``n`` training-split prompts (stream ``seed``) that are no demo question and whose
    gold SQL is no demo answer."""
    prompts, answers = {ex.prompt for ex in demo}, {ex.sql for ex in demo}
    return [ex.prompt for ex in sql_examples(n, seed, split="train")
            if ex.prompt not in prompts and ex.sql not in answers]


def greedy_texts(engine: Engine, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], list[str]]:
    """Plain greedy answers: token ids and their text."""
    ids = [r.token_ids for r in engine.generate(prompts, max_new_tokens=max_new_tokens)]
    return ids, [engine.target.tokenizer.decode(t).strip() for t in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="history file to write (.jsonl.gz)")
    parser.add_argument("--questions", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=1, help="training-split stream of the questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    start = time.perf_counter()
    model = load_model(default_model_dir(), dtype=jnp.float32)  # as `specjax generate` runs on a CPU
    engine = Engine(model, None)
    demo = demo_examples()
    demo_prompts = sorted({ex.prompt for ex in demo})
    _, demo_greedy = greedy_texts(engine, demo_prompts, args.max_new_tokens)
    if not all(demo_greedy):
        raise SystemExit("an empty greedy demo answer would exclude every answer")
    demo_answers = {ex.sql for ex in demo} | set(demo_greedy)
    print(f"{len(demo_prompts)} demo questions, {len(demo_answers)} demo answers to leave out "
          f"({time.perf_counter() - start:.0f} s)")
    questions: list[str] = []
    responses: list[list[int]] = []
    pool = args.questions
    while len(responses) < args.questions:  # candidate_questions(m) extends candidate_questions(n < m)
        pool = pool * 9 // 8
        new = candidate_questions(pool, args.seed, demo)[len(questions):]
        ids, texts = greedy_texts(engine, new, args.max_new_tokens)
        questions += new
        responses += [i for i, t in zip(ids, texts) if not contains_any(t, demo_answers)]
        print(f"{pool} training questions: {len(questions)} candidates, {len(responses)} answers kept "
              f"({time.perf_counter() - start:.0f} s)")
    responses = responses[: args.questions]
    save_history(args.out, responses, vocab_size=model.config.vocab_size, tokenizer=model.tokenizer,
                 source=f"benchmarks/build_suffix_history.py --questions {args.questions} --seed {args.seed} "
                        f"--max-new-tokens {args.max_new_tokens}")
    print(f"{len(responses)} responses, {sum(map(len, responses))} tokens, in {time.perf_counter() - start:.0f} s "
          f"-> {args.out}")


if __name__ == "__main__":
    main()
