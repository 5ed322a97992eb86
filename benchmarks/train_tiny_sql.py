"""Build the embedded default model: a tiny Llama trained on our synthetic text-to-SQL corpus.

Everything is generated here, nothing is downloaded:

1. the corpus: ``specjax.models.embedded.toy_corpus.sql_examples`` (fixed schemas, template
   questions, gold SQL), split "train";
2. a byte-level BPE tokenizer trained on it with the ``tokenizers`` library
   (``<|endoftext|>`` = EOS, ``<|pad|>``);
3. a Llama-architecture decoder trained with optax (AdamW, warmup + cosine) on the
   loss of specjax's own forward pass (``specjax.models.decoder.forward``);
4. a Hugging Face checkpoint directory (config.json, model.safetensors in bf16,
   tokenizer.json, generation_config.json) that ``specjax.models.loading.load_model``
   and ``transformers`` both load.

Rebuild the shipped model (CPU, about 10 minutes on 2 cores)::

    python benchmarks/train_tiny_sql.py --out models/assets/tiny-sql

Deterministic for a given ``--seed`` on a given platform (XLA's CPU reductions may
differ across machines in the last bits).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, causal_mask, forward, init_params
from specjax.models.embedded.toy_corpus import held_out_examples, sql_examples
from specjax.models.training import (add_decoder_args, add_optimizer_args, export_llama, llama_hf_config,
                                     save_tokenizer_files)
from specjax.tpu_kernels.tree_attention import new_tokens_attention

EOS, PAD = "<|endoftext|>", "<|pad|>"


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def encode_corpus(tok, examples, eos_id: int):
    """Token ids per example (+EOS), where the question starts and where the SQL answer starts.

    The training loss covers the SQL answer and its EOS only, as in supervised
    fine-tuning: the schema block is the same for every example of a schema, and the
    question's random values cannot be predicted (they are copied into the answer).
    """
    seqs, question_starts, answer_starts = [], [], []
    for ex in examples:
        ids = tok.encode(ex.text).ids + [eos_id]
        block = tok.encode(ex.prompt[: ex.prompt.index("-- question:")]).ids
        prompt = tok.encode(ex.prompt).ids
        if ids[: len(block)] != block or ids[: len(prompt)] != prompt:
            raise RuntimeError(f"the question/answer do not start on a token boundary in {ex.text!r}")
        seqs.append(ids)
        question_starts.append(len(block))
        answer_starts.append(len(prompt))
    return seqs, question_starts, answer_starts


def pack_sequences(seqs, question_starts, answer_starts, schemas, per_sequence: int,
                   rng: np.random.Generator):
    """Training sequences of ``per_sequence`` examples of one schema sharing one schema block.

    ``schema + q1 + sql1 <eos> q2 + sql2 <eos> ...``: the first pair is exactly the
    inference format, the later ones reuse the (long, identical) schema block, so one
    forward pass supervises several answers. Returns ``(schema, ids, loss_mask)``
    triples, ``loss_mask[t]`` marking the tokens the loss predicts (SQL and EOS).
    """
    by_schema = defaultdict(list)
    for i, s in enumerate(schemas):
        by_schema[s].append(i)
    packed = []
    for name in sorted(by_schema):
        idx = np.array(by_schema[name])
        rng.shuffle(idx)
        for g in range(0, len(idx) - per_sequence + 1, per_sequence):
            ids, mask = [], []
            for j, i in enumerate(idx[g: g + per_sequence]):
                start = 0 if j == 0 else question_starts[i]
                part = seqs[i][start:]
                ids += part
                mask += [0.0] * (answer_starts[i] - start) + [1.0] * (len(seqs[i]) - answer_starts[i])
            packed.append((name, np.array(ids, np.int32), np.array(mask, np.float32)))
    return packed


def make_batches(packed, batch_size: int, rng: np.random.Generator, multiple: int = 32):
    """Shuffled batches of packed sequences, each batch from one schema, padded to a multiple."""
    by_schema = defaultdict(list)
    for i, (name, _, _) in enumerate(packed):
        by_schema[name].append(i)
    batches = []
    for name in sorted(by_schema):
        idx = np.array(by_schema[name])
        rng.shuffle(idx)
        for b in range(0, len(idx) - batch_size + 1, batch_size):
            batches.append(idx[b: b + batch_size])
    for bi in rng.permutation(len(batches)):
        rows = [packed[i] for i in batches[bi]]
        width = -(-max(len(ids) for _, ids, _ in rows) // multiple) * multiple
        tokens = np.zeros((len(rows), width), np.int32)
        weights = np.zeros((len(rows), width), np.float32)  # weights[:, t]: loss of predicting tokens[:, t+1]
        lengths = np.zeros(len(rows), np.int32)
        for r, (_, ids, mask) in enumerate(rows):
            tokens[r, : len(ids)] = ids
            weights[r, : len(ids) - 1] = mask[1:]
            lengths[r] = len(ids)
        yield tokens, weights, lengths


def build_train_step(cfg: ModelConfig, optimizer):
    def loss_fn(params, tokens, weights, lengths):
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cache = KVCache.zeros(cfg, b, t)
        out = forward(params, cfg, tokens, positions, cache, jnp.zeros(b, jnp.int32), causal_mask(b, t, lengths),
                      attention=new_tokens_attention)  # differentiable; the cache is empty
        logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
        # A one-hot product, not take_along_axis: its gradient is a multiply, not a (slow on CPU) scatter.
        nll = -jnp.sum(logp * jax.nn.one_hot(tokens[:, 1:], cfg.vocab_size, dtype=logp.dtype), axis=-1)
        w = weights[:, :-1]
        return jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)

    @jax.jit
    def step(params, opt_state, tokens, weights, lengths):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, weights, lengths)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, jax.jit(loss_fn)


def evaluate(model_dir: str, examples, max_new_tokens: int = 64):
    """Greedy SQL for held-out ``examples`` from the saved checkpoint: exact-match rate, samples."""
    from specjax.engine.plain import greedy_generate
    from specjax.models.loading import load_model

    model = load_model(model_dir, dtype=jnp.float32)
    prompts = [model.tokenizer.encode(ex.prompt).ids for ex in examples]
    outs = greedy_generate(model, prompts, max_new_tokens=max_new_tokens)
    texts = [model.tokenizer.decode(o).strip() for o in outs]
    exact = sum(t == ex.sql for t, ex in zip(texts, examples)) / len(examples)
    return exact, list(zip(examples, texts))


def held_out_loss(tok, cfg: ModelConfig, params, examples) -> float:
    """Mean loss over the SQL tokens of held-out ``examples``, one example per sequence."""
    eos_id = cfg.eos_token_ids[0]
    seqs, q_starts, a_starts = encode_corpus(tok, examples, eos_id)
    _, loss_fn = build_train_step(cfg, optax.identity())
    packed = pack_sequences(seqs, q_starts, a_starts, [e.schema for e in examples], 1, np.random.default_rng(0))
    return float(np.mean([loss_fn(params, *b) for b in make_batches(packed, 16, np.random.default_rng(0))]))


def eval_questions(n: int, seed: int, num_examples: int) -> list:
    """``n`` evaluation questions of which neither the question nor its SQL is among the build's
    ``num_examples`` training examples of ``seed`` (``toy_corpus.held_out_examples``, split "eval")."""
    return held_out_examples(n, seed, split="eval", training_sets=((num_examples, seed),))


def report(model_dir: str, tok, cfg: ModelConfig, params, args) -> tuple[float, float]:
    """Held-out loss (256 questions) and greedy exact match (``--eval-examples``) of the saved weights."""
    loss = held_out_loss(tok, cfg, params, eval_questions(256, args.seed, args.num_examples))
    exact, samples = evaluate(model_dir, eval_questions(args.eval_examples, args.seed, args.num_examples))
    for ex, text in samples[:4]:
        print(f"\n-- question: {ex.question}\n   gold:  {ex.sql}\n   model: {text}")
    return loss, exact


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "models", "assets", "tiny-sql"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-examples", type=int, default=20000)
    p.add_argument("--vocab-size", type=int, default=1024)
    add_decoder_args(p, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4, num_kv_heads=2)
    add_optimizer_args(p, steps=800, batch_size=8, lr=3e-3, warmup=50, batch_help="packed sequences per step")
    p.add_argument("--pack", type=int, default=4, help="examples per training sequence (one schema block)")
    p.add_argument("--eval-examples", type=int, default=32)
    p.add_argument("--evaluate-only", action="store_true",
                   help="only report the held-out loss and exact match of the checkpoint in --out")
    args = p.parse_args(argv)
    if args.evaluate_only:
        return evaluate_only(args)
    t0 = time.perf_counter()

    examples = sql_examples(args.num_examples, args.seed, split="train")
    tok = train_tokenizer((ex.text for ex in examples), args.vocab_size)
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    seqs, q_starts, a_starts = encode_corpus(tok, examples, eos_id)
    lens = np.array([len(s) for s in seqs])
    print(f"corpus: {len(examples)} examples, {len(set(ex.text for ex in examples))} distinct, "
          f"{lens.sum()} tokens (mean {lens.mean():.0f}, max {lens.max()}), vocab {tok.get_vocab_size()}")

    cfg = ModelConfig(
        model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_layers=args.num_layers, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, head_dim=args.hidden_size // args.num_heads, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=1024, eos_token_ids=(eos_id,))
    params = init_params(cfg, jax.random.key(args.seed), jnp.float32, scale=0.02)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {n_params / 1e6:.2f}M params, {cfg.num_layers} layers, hidden {cfg.hidden_size}")

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(args.warmup, args.steps // 10), args.steps, end_value=args.lr * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay))
    opt_state = optimizer.init(params)
    step_fn, _ = build_train_step(cfg, optimizer)

    rng = np.random.default_rng(args.seed)
    schemas = [ex.schema for ex in examples]

    def epoch():
        packed = pack_sequences(seqs, q_starts, a_starts, schemas, args.pack, rng)
        return make_batches(packed, args.batch_size, rng)

    batches = epoch()
    ema = None
    bar = tqdm(range(args.steps), desc="train", file=sys.stdout, mininterval=5.0)
    for i in bar:
        try:
            tokens, weights, lengths = next(batches)
        except StopIteration:
            batches = epoch()
            tokens, weights, lengths = next(batches)
        params, opt_state, loss = step_fn(params, opt_state, tokens, weights, lengths)
        if i % 10 == 0 or i == args.steps - 1:
            loss = float(loss)
            ema = loss if ema is None else 0.8 * ema + 0.2 * loss
            bar.set_postfix(loss=f"{ema:.4f}", lr=f"{float(schedule(i)):.2e}")
    bar.close()
    train_s = time.perf_counter() - t0

    hf_config = llama_hf_config(cfg, tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
                                pad_token_id=pad_id)
    export_llama(args.out, params, hf_config)
    save_tokenizer_files(args.out, tok, hf_config, EOS, PAD)

    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump({"seed": args.seed, "num_examples": args.num_examples,
                   "corpus_sha256": hashlib.sha256("\n\n".join(ex.text for ex in examples).encode()).hexdigest(),
                   "args": vars(args) | {"out": None}, "train_loss": round(ema, 4),
                   "train_seconds": round(train_s)}, f, indent=2)

    # Loss and greedy answers of the saved (bf16-rounded) weights on held-out questions.
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    loss_a, exact = report(args.out, tok, cfg, rounded, args)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"\nfinal train loss (EMA, SQL tokens) {ema:.4f}; held-out loss {loss_a:.4f}; held-out greedy exact match {exact:.1%} of {args.eval_examples}; "
          f"training {train_s:.0f}s; wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0


def evaluate_only(args) -> int:
    """``--evaluate-only``: the held-out report of the checkpoint already in ``--out``, no training."""
    from specjax.models.loading import load_model

    model = load_model(args.out, dtype=jnp.float32)
    loss, exact = report(args.out, model.tokenizer, model.config, model.params, args)
    print(f"\n{args.out}: held-out loss {loss:.4f}; held-out greedy exact match {exact:.1%} of {args.eval_examples}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
