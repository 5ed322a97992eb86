"""Build ``stdlib-code``: a small Llama code model trained on Python's own standard library.

A real target for drafter benchmarks, built from text no one here wrote and every
machine has: the ``.py`` sources under ``sysconfig.get_paths()["stdlib"]``
(PSF license). Nothing is downloaded:

1. the corpus: every stdlib ``.py`` file in sorted path order, minus tests
   (``test/``, ``tests/``, ``idle_test/``), site-packages, build-specific files
   (``config-*/``, ``_sysconfigdata_*``), the generated charmap tables of
   ``encodings/`` and files over 200 KB; a fixed list of modules (``HELDOUT_MODULES``,
   present on Python 3.10-3.13) is held out for evaluation;
2. a byte-level BPE tokenizer (``tokenizers``) trained on the training split only,
   ``<|endoftext|>`` = BOS/EOS between files, ``<|pad|>``; no normalizer, so
   whitespace and indentation round-trip exactly;
3. a Llama-architecture decoder trained with ``specjax.models.training`` (optax AdamW,
   warmup + cosine; orbax checkpoints, so ``--resume`` continues an interrupted build)
   on the loss of specjax's own forward pass, on random windows of the token stream;
4. a Hugging Face checkpoint directory (config.json, model.safetensors in bf16,
   tokenizer.json, ...) that ``specjax.models.loading.load_model`` and ``transformers``
   both load, plus ``training.json``: the Python version and corpus SHA-256 (the
   stdlib differs across versions), the module split, losses and a greedy sample.

Rebuild the shipped model (CPU: about 15 minutes on 2 idle cores, up to 45 on shared ones)::

    python benchmarks/train_code_model.py --out models/assets/stdlib-code

Deterministic for a given ``--seed`` and Python version on a given platform.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
import tokenize

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, causal_mask, forward, init_params
from specjax.tpu_kernels.tree_attention import new_tokens_attention

EOS, PAD = "<|endoftext|>", "<|pad|>"
MAX_FILE_BYTES = 200_000
# Directories never in the corpus: tests, third-party packages, build-specific files,
# and encodings/ (its codecs are generated 256-entry charmap tables, not code).
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                           "encodings"})
# Held out for evaluation: modules of every Python 3.10-3.13 stdlib, about 4% of the corpus.
HELDOUT_MODULES = ("argparse", "csv", "fnmatch", "fractions", "glob", "graphlib", "heapq", "json", "queue",
                   "sched", "shlex", "statistics", "textwrap")


def module_name(relpath: str) -> str:
    """``json/decoder.py`` -> ``json.decoder``; ``json/__init__.py`` -> ``json``."""
    parts = relpath[: -len(".py")].replace(os.sep, "/").split("/")
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _excluded_dir(part: str) -> bool:
    return part in EXCLUDED_DIRS or part.startswith("config-")


def corpus_files(root: str) -> list[str]:
    """Sorted relative paths of the corpus's ``.py`` files under ``root`` (see the module doc)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if (name.endswith(".py") and not name.startswith("_sysconfigdata")
                    and os.path.getsize(path) <= MAX_FILE_BYTES):
                found.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(found)


def is_heldout(module: str, heldout: tuple[str, ...] = HELDOUT_MODULES) -> bool:
    return any(module == h or module.startswith(h + ".") for h in heldout)


def split_corpus(relpaths: list[str], heldout: tuple[str, ...] = HELDOUT_MODULES) -> tuple[list[str], list[str]]:
    """(training files, held-out files): a file is held out when its module is in ``heldout``.

    Raises if a named held-out module has no file, so the split never silently shrinks.
    """
    modules = {p: module_name(p) for p in relpaths}
    missing = [h for h in heldout if not any(is_heldout(m, (h,)) for m in modules.values())]
    if missing:
        raise ValueError(f"held-out modules not found in the corpus: {missing}")
    held = [p for p in relpaths if is_heldout(modules[p], heldout)]
    train = [p for p in relpaths if not is_heldout(modules[p], heldout)]
    return train, held


def read_source(path: str) -> str:
    """A source file's text, decoded by its PEP 263 coding cookie (newlines normalized to \\n)."""
    with tokenize.open(path) as f:
        return f.read()


def corpus_sha256(root: str, relpaths: list[str]) -> str:
    """SHA-256 over (path, text) of every file: identifies the exact corpus a model saw."""
    h = hashlib.sha256()
    for rel in relpaths:
        h.update(rel.encode() + b"\0" + read_source(os.path.join(root, rel)).encode() + b"\0")
    return h.hexdigest()


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE: every byte is a base token, so any text (indentation included) round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def token_stream(tok, texts: list[str], eos_id: int) -> np.ndarray:
    """All texts' token ids, each followed by EOS, concatenated (the documents of one stream)."""
    out = []
    for enc in tok.encode_batch(texts):
        out.extend(enc.ids)
        out.append(eos_id)
    return np.asarray(out, np.int32)


def window_batch(stream: np.ndarray, seq_len: int, batch_size: int, position: int, seed: int) -> np.ndarray:
    """Training windows ``position .. position + batch_size`` of the shuffled-window order.

    The stream is cut into non-overlapping windows of ``seq_len`` tokens; window ``g`` of
    the order is ``perm_e[g mod n]`` with ``perm_e`` a fresh permutation per epoch
    ``e = g // n``. A pure function of ``position``, so a resumed build sees the same data.
    """
    n = len(stream) // seq_len
    rows = []
    for g in range(position, position + batch_size):
        epoch, i = divmod(g, n)
        w = np.random.default_rng((seed, epoch)).permutation(n)[i]
        rows.append(stream[w * seq_len: (w + 1) * seq_len])
    return np.stack(rows)


def model_config(vocab_size: int, eos_id: int, args) -> ModelConfig:
    return ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size, num_layers=args.num_layers, num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads, head_dim=args.hidden_size // args.num_heads, rms_norm_eps=1e-5,
        tie_word_embeddings=True, max_position_embeddings=args.max_position_embeddings,
        eos_token_ids=(eos_id,))


def next_token_loss(params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats) of full windows ``tokens[B, T]`` (specjax's forward)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = forward(params, cfg, tokens, positions, KVCache.zeros(cfg, b, t), jnp.zeros(b, jnp.int32),
                  causal_mask(b, t), attention=new_tokens_attention)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    # A one-hot product, not take_along_axis: its gradient is a multiply, not a (slow on CPU) scatter.
    return -jnp.mean(jnp.sum(logp * jax.nn.one_hot(tokens[:, 1:], cfg.vocab_size, dtype=logp.dtype), axis=-1))


def unigram_loss(train_ids: np.ndarray, eval_ids: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats) of ``eval_ids`` under add-one smoothed unigram counts of ``train_ids``."""
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_ids].mean())


def heldout_loss(params, cfg: ModelConfig, stream: np.ndarray, seq_len: int, batch_size: int = 8) -> float:
    """Mean next-token loss over the held-out stream cut into windows (the last partial one dropped)."""
    n = len(stream) // seq_len
    windows = stream[: n * seq_len].reshape(n, seq_len)
    loss_fn = jax.jit(lambda p, x: next_token_loss(p, cfg, x))
    total = 0.0
    for b in range(0, n, batch_size):
        chunk = windows[b: b + batch_size]
        total += float(loss_fn(params, jnp.asarray(chunk))) * len(chunk)
    return total / n


def greedy_sample(model_dir: str, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` by the saved checkpoint."""
    from specjax.engine.plain import greedy_generate
    from specjax.models.loading import load_model

    model = load_model(model_dir, dtype=jnp.float32)
    out = greedy_generate(model, [model.tokenizer.encode(prompt).ids], max_new_tokens=max_new_tokens)[0]
    return model.tokenizer.decode(out)


SAMPLE_FILE, SAMPLE_ANCHOR = "textwrap.py", "def dedent(text):"  # held out; in every 3.10-3.13 stdlib


def sample_prompt(text: str) -> tuple[str, str]:
    """(prompt, true continuation) of a held-out function: its context and docstring, then its body."""
    start = text.index(SAMPLE_ANCHOR)
    end = text.index('    """\n', start + len(SAMPLE_ANCHOR) + 8) + len('    """\n')
    return text[max(0, start - 400): end], text[end: end + 400]


def build_train_step(cfg: ModelConfig, optimizer):
    import optax

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(next_token_loss)(params, cfg, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def load_or_train_tokenizer(checkpoint_dir: str, texts: list[str], vocab_size: int, resume: bool):
    """The run's tokenizer: the one saved next to its checkpoints when resuming, else a new one."""
    from tokenizers import Tokenizer

    path = os.path.join(checkpoint_dir, "tokenizer.json")
    if resume and os.path.isfile(path):
        return Tokenizer.from_file(path)
    tok = train_tokenizer(texts, vocab_size)
    os.makedirs(checkpoint_dir, exist_ok=True)
    tok.save(path)
    return tok


def write_checkpoint_dir(out: str, params, cfg: ModelConfig, tok, eos_id: int, pad_id: int) -> None:
    from specjax.models.training import export_llama, llama_hf_config, save_tokenizer_files

    hf_config = llama_hf_config(cfg, tie_word_embeddings=True, bos_token_id=eos_id, eos_token_id=eos_id,
                                pad_token_id=pad_id)
    export_llama(out, params, hf_config)
    save_tokenizer_files(out, tok, hf_config, EOS, PAD)


def parse_args(argv=None) -> argparse.Namespace:
    from specjax.models.training import add_decoder_args, add_optimizer_args

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    p.add_argument("--out", default=os.path.join(here, "..", "models", "assets", "stdlib-code"))
    p.add_argument("--checkpoint-dir", default=os.path.join(here, "..", "build", "stdlib-code-checkpoints"),
                   help="orbax checkpoints and the run's tokenizer (not shipped)")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --checkpoint-dir")
    p.add_argument("--stdlib", default=sysconfig.get_paths()["stdlib"], help="the corpus root")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096)
    add_decoder_args(p, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6, num_kv_heads=2)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--seq-len", type=int, default=512)
    add_optimizer_args(p, steps=360, batch_size=8, lr=2.5e-3, warmup=30)
    p.add_argument("--save-every", type=int, default=40)
    p.add_argument("--sample-tokens", type=int, default=64)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from specjax.models.training import TrainCheckpointer, TrainState, check_run_args, make_optimizer

    args = parse_args(argv)
    t0 = time.perf_counter()
    run_args = {k: v for k, v in vars(args).items() if k not in ("out", "checkpoint_dir", "resume", "stdlib")}
    run_args["python_version"] = sys.version.split()[0]
    check_run_args(args.checkpoint_dir, run_args, args.resume)

    files = corpus_files(args.stdlib)
    train_files, held_files = split_corpus(files)
    train_texts = [read_source(os.path.join(args.stdlib, p)) for p in train_files]
    held_texts = [read_source(os.path.join(args.stdlib, p)) for p in held_files]
    tok = load_or_train_tokenizer(args.checkpoint_dir, train_texts, args.vocab_size, args.resume)
    eos_id, pad_id = tok.token_to_id(EOS), tok.token_to_id(PAD)
    bad = [p for p, t in zip(held_files, held_texts) if tok.decode(tok.encode(t).ids) != t]
    if bad:
        raise RuntimeError(f"the tokenizer does not round-trip held-out files {bad}")
    train_ids = token_stream(tok, train_texts, eos_id)
    held_ids = token_stream(tok, held_texts, eos_id)
    print(f"corpus: Python {run_args['python_version']} stdlib, {len(train_files)} training files "
          f"({sum(map(len, train_texts)) / 1e6:.1f} M chars, {len(train_ids) / 1e6:.2f} M tokens), "
          f"{len(held_files)} held-out files ({len(held_ids) / 1e3:.0f} k tokens), vocab {tok.get_vocab_size()}")

    cfg = model_config(tok.get_vocab_size(), eos_id, args)
    params = init_params(cfg, jax.random.key(args.seed), jnp.float32, scale=0.02)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    tokens_per_epoch = len(train_ids) // args.seq_len * args.seq_len
    print(f"model: {n_params / 1e6:.2f}M params, {cfg.num_layers} layers, hidden {cfg.hidden_size}; "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens = "
          f"{args.steps * args.batch_size * args.seq_len / tokens_per_epoch:.2f} epochs")

    optimizer = make_optimizer(args.lr, args.steps, min(args.warmup, args.steps), args.weight_decay)
    # The key is unused (batches are a pure function of the step), but the checkpointer cannot save a
    # zero-size array, so the state carries one.
    state = TrainState(params=params, opt_state=optimizer.init(params), rng=jax.random.key(args.seed))
    ckpt = TrainCheckpointer(args.checkpoint_dir, args.save_every, keep=2)
    if args.resume:
        restored = ckpt.restore_latest(state)
        if restored is not None:
            state = restored
            print(f"resumed at step {state.step} from {args.checkpoint_dir}")
    step_fn = build_train_step(cfg, optimizer)
    params, opt_state = state.params, state.opt_state
    ema, losses = None, []
    bar = tqdm(range(state.step, args.steps), initial=state.step, total=args.steps, desc="train",
               file=sys.stdout, mininterval=5.0)
    t_train = time.perf_counter()
    for step in bar:
        tokens = window_batch(train_ids, args.seq_len, args.batch_size, step * args.batch_size, args.seed)
        params, opt_state, loss = step_fn(params, opt_state, jnp.asarray(tokens))
        if step % 10 == 0 or step == args.steps - 1:
            loss = float(loss)
            losses.append((step, round(loss, 4)))
            ema = loss if ema is None else 0.7 * ema + 0.3 * loss
            bar.set_postfix(loss=f"{ema:.3f}")
        ckpt.save(TrainState(params, opt_state, step + 1, (step + 1) * args.batch_size, state.rng),
                  force=step == args.steps - 1)
    bar.close()
    ckpt.close()
    train_s = time.perf_counter() - t_train

    write_checkpoint_dir(args.out, params, cfg, tok, eos_id, pad_id)
    # Losses of the saved (bf16-rounded) weights.
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
    held_loss = heldout_loss(rounded, cfg, held_ids, args.seq_len)
    probe = window_batch(train_ids, args.seq_len, 64, 10**9, args.seed + 1)  # 64 random training windows
    train_loss = heldout_loss(rounded, cfg, probe.reshape(-1), args.seq_len)
    unigram = unigram_loss(train_ids, held_ids, cfg.vocab_size)
    sample_text = held_texts[held_files.index(SAMPLE_FILE)]
    prompt, reference = sample_prompt(sample_text)
    completion = greedy_sample(args.out, prompt, args.sample_tokens)
    wall_s = time.perf_counter() - t0

    meta = {
        "python_version": run_args["python_version"],
        "corpus": "sysconfig.get_paths()['stdlib'] .py files (see benchmarks/train_code_model.py)",
        "corpus_sha256": corpus_sha256(args.stdlib, files),
        "heldout_module_names": list(HELDOUT_MODULES),
        "heldout_files": held_files,
        "train_modules": [module_name(p) for p in train_files],
        "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)),
        "params": int(n_params),
        "args": run_args,
        "train_loss_last": losses[-1][1] if losses else None,
        "train_loss_curve": losses,
        "train_window_loss": round(train_loss, 4),
        "heldout_loss": round(held_loss, 4),
        "heldout_perplexity": round(math.exp(held_loss), 2),
        "heldout_unigram_loss": round(unigram, 4),
        "sample": {"file": SAMPLE_FILE, "prompt": prompt, "greedy": completion, "reference": reference},
        "train_seconds": round(train_s), "wall_seconds": round(wall_s),
    }
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(meta, f, indent=1)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"\n--- held-out prompt (end) ---\n{prompt[-300:]}--- greedy ---\n{completion}\n--- reference ---\n"
          f"{reference[:len(completion) + 40]}")
    print(f"\ntraining {train_s:.0f}s ({(args.steps - state.step) / max(train_s, 1e-9):.2f} steps/s this run); "
          f"train-window loss {train_loss:.3f}; held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.1f}, "
          f"unigram {unigram:.3f}); wall {wall_s:.0f}s; wrote {args.out} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
