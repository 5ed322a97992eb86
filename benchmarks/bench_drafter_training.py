"""Drafter training: sft vs online vs opd, EAGLE-3 heads and draft models, measured on held-out prompts.

For each target (the embedded tiny-sql model; ``models/assets/stdlib-code`` when it
is built; karpathy's stories260K from ``../shared/models``, converted to a temporary
Hugging Face directory) and each drafter kind (``eagle3``, ``draft-model``), every
method (``sft``: fixed target trajectories; ``online``: fresh ones each step;
``opd``: Draft-OPD, the drafter's own chains replayed from the roots the loop
visits and verified by the target) trains on the same batch shape; each run
reports the target forward tokens it consumed (``target_tokens``: generating its
sequences, the teacher pass over them, and opd's verification of its own chains;
see ``drafters.training.loop.target_tokens_of_step``). ``--opd-steps`` gives opd fewer
steps so that its target tokens match the other methods'. Each trained drafter
then runs the EAGLE-2 dynamic tree (top-k 10, depth 7) at T = 16 and 60 on held-out
prompts, greedy and at temperature 1, through the device loop; greedy outputs are
asserted equal to plain greedy decoding (lossless). Reported per run: the mean
accepted length (tokens emitted per verify step, the bonus token included) and
tokens per target pass (prefill included).

Prompts: tiny-sql trains on corpus questions (split ``train``) and is measured on
the demo prompts of ``specjax generate``; stdlib-code trains on windows of its
training modules and is measured on its held-out modules; stories260K (no
tokenizer) uses story openings sampled from the model at BOS, with disjoint seeds
for training and measurement.

    python benchmarks/bench_drafter_training.py --quick               # minutes: a smoke run
    python benchmarks/bench_drafter_training.py --targets sql --kinds eagle3 --seeds 0 1 2
    # Draft-OPD's regime: continue a 250-step sft head at equal target tokens
    python benchmarks/bench_drafter_training.py --targets sql --kinds eagle3 --seeds 0 1 2 --train-prompts 4000 \
        --warm-start-steps 250 --steps 100 --opd-steps 42 --online-steps 50 --capacities 60 --temperatures 0

Prints a table, writes JSON (``benchmarks/results/drafter_training.json``) and a
PNG of acceptance against training target tokens (training-time estimate as lines,
held-out greedy tokens/pass at T = 60 as markers).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
import tempfile
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.eagle3 import load_eagle3
from specjax.drafters.training import KINDS, METHODS, TrainOptions, encode_prompts, train_drafter
from specjax.drafters.training.rollouts import rollout
from specjax.engine.device_loop import generate_on_device
from specjax.engine.engine import Engine
from specjax.models.embedded import default_model_dir
from specjax.models.loading import Model, load_model

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CODE_MODEL_DIR = os.path.join(REPO, "models", "assets", "stdlib-code")
STORIES_BIN = os.path.join(REPO, "..", "shared", "models", "tinyllamas", "stories260K.bin")
TARGETS = ("sql", "code", "stories")
TREE_TOPK, TREE_DEPTH = 10, 7  # EAGLE-2's dynamic tree


@dataclasses.dataclass
class Target:
    name: str
    model: Model
    train_prompts: list  # token-id lists
    eval_prompts: list
    seq_len: int
    max_new_tokens: int


# ------------------------------------------------------------------ targets and their prompts


def sql_target(n_train: int, n_eval: int) -> Target:
    from specjax.models.embedded.toy_corpus import sql_examples, sql_prompts

    model = load_model(default_model_dir(), dtype=jnp.float32)
    train = encode_prompts(model, [e.prompt for e in sql_examples(n_train, seed=1000, split="train")])
    held_out = encode_prompts(model, sql_prompts(n_eval, seed=0))  # the demo prompts of `specjax generate`
    return Target("sql", model, train, held_out, seq_len=160, max_new_tokens=64)


def _code_corpus_module():
    """``benchmarks/train_code_model.py`` (the code model's build script: its corpus split)."""
    spec = importlib.util.spec_from_file_location("train_code_model", os.path.join(HERE, "train_code_model.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_windows(model: Model, texts: list[str], n: int, width: int, seed: int) -> list[list[int]]:
    """``n`` windows of ``width`` tokens starting at line starts of ``texts`` (deterministic in seed)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        text = texts[rng.integers(len(texts))]
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        start = starts[rng.integers(len(starts))]
        ids = model.tokenizer.encode(text[start: start + width * 8]).ids[:width]
        if len(ids) == width:
            out.append(ids)
    return out


def code_target(n_train: int, n_eval: int) -> Optional[Target]:
    if not os.path.isfile(os.path.join(CODE_MODEL_DIR, "config.json")):
        return None
    import sysconfig

    corpus = _code_corpus_module()
    model = load_model(CODE_MODEL_DIR, dtype=jnp.float32)
    root = sysconfig.get_paths()["stdlib"]
    train_files, heldout_files = corpus.split_corpus(corpus.corpus_files(root))
    rng = np.random.default_rng(0)
    train_files = [train_files[i] for i in rng.choice(len(train_files), min(200, len(train_files)), replace=False)]
    read = lambda rel: corpus.read_source(os.path.join(root, rel))
    train = code_windows(model, [read(f) for f in train_files], n_train, 64, seed=1)
    held_out = code_windows(model, [read(f) for f in heldout_files], n_eval, 64, seed=2)
    return Target("code", model, train, held_out, seq_len=128, max_new_tokens=64)


def story_openings(model: Model, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` openings of up to ``length`` tokens sampled from the model at BOS (temperature 1)."""
    cfg = model.config
    tokens = np.zeros((n, length + 1), np.int32)
    tokens[:, 0] = cfg.bos_token_id
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), model.params)
    filled, lengths = jax.jit(rollout, static_argnames=("cfg", "temperature"))(
        params, cfg, jnp.asarray(tokens), jnp.ones(n, jnp.int32), jax.random.key(seed), temperature=1.0)
    filled, lengths = np.asarray(filled), np.asarray(lengths)
    eos = set(cfg.eos_token_ids)
    return [[t for t in row[: max(2, int(m))] if t not in eos] or [cfg.bos_token_id]
            for row, m in zip(filled, lengths)]


def stories_target(n_train: int, n_eval: int, work_dir: str) -> Optional[Target]:
    if not os.path.isfile(STORIES_BIN):
        return None
    from specjax.models.llama2c import convert_llama2c

    out = os.path.join(work_dir, "stories260K")
    convert_llama2c(STORIES_BIN, out)
    model = load_model(out, dtype=jnp.float32)
    train = story_openings(model, n_train, 12, seed=1)
    held_out = story_openings(model, n_eval, 12, seed=2)
    return Target("stories", model, train, held_out, seq_len=128, max_new_tokens=64)


def load_targets(names, n_train: int, n_eval: int, work_dir: str) -> list[Target]:
    makers: dict[str, Callable[[], Optional[Target]]] = {
        "sql": lambda: sql_target(n_train, n_eval), "code": lambda: code_target(n_train, n_eval),
        "stories": lambda: stories_target(n_train, n_eval, work_dir)}
    out = []
    for name in names:
        target = makers[name]()
        if target is None:
            print(f"skipping target {name!r}: its weights are not here", file=sys.stderr)
        else:
            out.append(target)
    return out


# ------------------------------------------------------------------ measurement


def plain_greedy(target: Target, batch_size: int) -> list[list[int]]:
    engine = Engine(target.model, None, draft_capacity=0, max_batch_size=batch_size)
    return [r.token_ids for r in engine.generate(target.eval_prompts, max_new_tokens=target.max_new_tokens)]


def make_drafter(kind: str, out_dir: str, target: Target, capacity: int):
    shape = dict(capacity=capacity, topk=min(TREE_TOPK, capacity), depth=TREE_DEPTH)
    if kind == "eagle3":
        return load_eagle3(out_dir, target.model, dtype=jnp.float32, **shape)
    draft = load_model(out_dir, dtype=jnp.float32)
    return DraftModelDrafter(draft, target.model.config.vocab_size, **shape)


def measure(target: Target, drafter, temperature: float, batch_size: int, seed: int) -> dict:
    """Mean accepted length (tokens per verify step, bonus included) and tokens per target pass."""
    engine = Engine(target.model, drafter, max_batch_size=batch_size)
    start = time.perf_counter()
    results = generate_on_device(engine, target.eval_prompts, target.max_new_tokens, temperature=temperature,
                                 seed=seed)
    wall = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    passes = sum(r.target_passes for r in results)
    steps = passes - len(results)  # the prefill pass gives each row its first token
    return {"tokens": tokens, "target_passes": passes, "tokens_per_pass": tokens / passes,
            "mean_accepted_length": (tokens - len(results)) / max(steps, 1), "wall_s_with_compile": wall,
            "token_ids": [r.token_ids for r in results]}


def steps_of(method: str, args) -> int:
    """A method's training steps: --steps, or --opd-steps / --online-steps for equal target tokens."""
    own = {"opd": args.opd_steps, "online": args.online_steps}.get(method)
    return own or args.steps


def warm_start(target: Target, kind: str, seed: int, args, work_dir: str) -> tuple[dict, int]:
    """(float32 params, target tokens) of ``sft`` for --warm-start-steps on the warm-start prompts,
    trained once per (target, kind, seed) in ``work_dir`` (a finished one is restored from its checkpoint)."""
    out_dir = os.path.join(work_dir, f"{target.name}-{kind}-warm{args.warm_start_steps}-s{seed}")
    opts = TrainOptions(batch_size=args.batch_size, seq_len=target.seq_len, lr=args.lr, seed=seed,
                        save_every=args.warm_start_steps, keep=1)
    history_path = os.path.join(out_dir, "history.json")  # written when the warm start finished
    if os.path.isfile(history_path) and not _trained_for(history_path, args.warm_start_steps, opts):
        raise SystemExit(f"{out_dir} holds a warm start trained with other options: remove it or use another "
                         "--keep-drafters directory")
    result = train_drafter(target.model, kind, "sft", args.warm_start_steps, out_dir,
                           prompts=warm_start_prompts(target), options=opts, resume=True,
                           progress=not args.no_progress)
    return result.params, result.history["target_tokens"][-1]


def warm_start_prompts(target: Target) -> list:
    """With a warm start, the first half of the training prompts is the warm start's fixed dataset
    (and sft's, continuing over it); the second half is the fresh prompts of online and opd."""
    return target.train_prompts[: len(target.train_prompts) // 2]


def train_and_measure(target: Target, kind: str, method: str, seed: int, args, work_dir: str,
                      reference: list[list[int]], warm_started: Optional[tuple[dict, int]] = None) -> dict:
    """Train one drafter (from ``warm_started``, ``warm_start``'s result, when given) and measure it."""
    steps = steps_of(method, args)
    warm = args.warm_start_steps if warm_started else 0
    out_dir = os.path.join(work_dir, f"{target.name}-{kind}-{method}-s{seed}" + (f"-after{warm}" if warm else ""))
    opts = TrainOptions(batch_size=args.batch_size, seq_len=target.seq_len, lr=args.lr, seed=seed,
                        save_every=10 ** 9, keep=1)
    prompts, init, warm_tokens = target.train_prompts, None, 0
    if warm:
        init, warm_tokens = warm_started
        fixed = warm_start_prompts(target)
        prompts = fixed if method == "sft" else target.train_prompts[len(fixed):]
        if method == "sft" and steps * args.batch_size > len(fixed):
            raise SystemExit("--warm-start-steps: sft's continuation must not wrap around its fixed dataset "
                             f"({steps} x {args.batch_size} > {len(fixed)} prompts)")
    history_path = os.path.join(out_dir, "history.json")
    start = time.perf_counter()
    reused = bool(args.reuse_trained) and _trained_for(history_path, steps, opts)
    if reused:
        with open(history_path) as f:  # measured again, not retrained (same steps and options)
            h = json.load(f)["history"]
    else:
        h = train_drafter(target.model, kind, method, steps, out_dir, prompts=prompts, options=opts,
                          progress=not args.no_progress, init_params=init).history
    train_s = time.perf_counter() - start
    if "target_tokens" in h:  # counted by train_drafter (see target_tokens_of_step)
        spent = h["target_tokens"]
    else:  # histories written before the count existed: the padded batch shape
        spent = [s * args.batch_size * target.seq_len for s in h["step"]]
    if warm and method == "sft":
        # sft continues over the warm start's sequences, which are already generated (greedy: the same
        # ones): each step pays the teacher pass only, half of what a first use (counted above) pays.
        spent = [t // 2 for t in spent]
    row = {"target": target.name, "kind": kind, "method": method, "seed": seed, "steps": steps,
           "budget_steps": args.steps,  # the sft/online steps this run is compared at
           "warm_start_steps": warm, "warm_start_target_tokens": warm_tokens,
           "target_tokens": spent[-1], "train_s": train_s, "reused_trained": reused,
           "train_curve": {"target_tokens": spent,
                           "tokens_per_pass_estimate": h["tokens_per_pass"], "loss": h["loss"]},
           "eval": []}
    for capacity in args.capacities:
        drafter = make_drafter(kind, out_dir, target, capacity)
        for temperature in args.temperatures:
            m = measure(target, drafter, temperature, args.eval_batch_size, seed=seed)
            ids = m.pop("token_ids")
            if temperature == 0.0:
                m["identical_to_plain_greedy"] = ids == reference
                assert m["identical_to_plain_greedy"], (
                    f"{target.name} {kind} {method} seed {seed} T={capacity}: greedy output differs from plain greedy")
            row["eval"].append({"capacity": capacity, "temperature": temperature, **m})
    return row


def _trained_for(history_path: str, steps: int, opts: TrainOptions) -> bool:
    """Whether ``history_path`` records a finished run of ``steps`` steps with these options."""
    if not os.path.isfile(history_path):
        return False
    with open(history_path) as f:
        done = json.load(f)
    return done["history"]["step"][-1:] == [steps] and done["options"] == dataclasses.asdict(opts)


# ------------------------------------------------------------------ report


def headline(row: dict, capacity: Optional[int] = None, temperature: float = 0.0) -> Optional[float]:
    """Held-out tokens per pass at tree size ``capacity`` (default: the largest measured)."""
    capacity = capacity or max(e["capacity"] for e in row["eval"])
    for e in row["eval"]:
        if e["capacity"] == capacity and e["temperature"] == temperature:
            return e["tokens_per_pass"]
    return None


def budget_of(row: dict) -> int:
    """The steps of sft a run is compared with (opd and online may run fewer for equal target tokens)."""
    return row.get("budget_steps", row["steps"])


def warm_of(row: dict) -> int:
    """The sft warm start a run continued (0: trained from a random head)."""
    return row.get("warm_start_steps") or 0


def compare_methods(rows: list[dict], capacity: int) -> list[dict]:
    """opd vs sft per (target, kind, budget): mean, spread (max - min over seeds) of greedy tokens/pass
    at T, and the mean target tokens of each method's runs (methods outside ``METHODS``, e.g. relabelled
    variants in a combined file, are summarized too but not compared)."""
    out = []
    present = {r["method"] for r in rows}
    methods = [m for m in METHODS if m in present] + sorted(present - set(METHODS))
    for tname, kind, warm, budget in sorted({(r["target"], r["kind"], warm_of(r), budget_of(r)) for r in rows}):
        stats = {}
        for method in methods:
            group = [r for r in rows if (r["target"], r["kind"], r["method"], warm_of(r), budget_of(r)) ==
                     (tname, kind, method, warm, budget)]
            vals = [v for v in (headline(r, capacity) for r in group) if v is not None]
            if vals:
                stats[method] = {"values": vals, "mean": float(np.mean(vals)),
                                 "target_tokens_mean": float(np.mean([r["target_tokens"] for r in group])),
                                 "steps": sorted({r["steps"] for r in group}),
                                 "spread": float(np.max(vals) - np.min(vals)), "seeds": len(vals)}
        if "sft" in stats and "opd" in stats:
            margin = stats["opd"]["mean"] - stats["sft"]["mean"]
            spread = max(stats["opd"]["spread"], stats["sft"]["spread"])
            stats["opd_minus_sft"] = margin
            several = min(stats["opd"]["seeds"], stats["sft"]["seeds"]) > 1  # one seed has no spread
            stats["opd_beats_sft_beyond_spread"] = (bool(min(stats["opd"]["values"]) > max(stats["sft"]["values"])
                                                         and margin > spread) if several else None)
            stats["opd_target_tokens_at_most_sft"] = bool(
                stats["opd"]["target_tokens_mean"] <= stats["sft"]["target_tokens_mean"])
        if stats:
            out.append({"target": tname, "kind": kind, "warm_start_steps": warm, "budget_steps": budget,
                        "capacity": capacity, **stats})
    return out


def print_table(rows: list[dict]) -> None:
    header = (f"{'target':<8}{'kind':<12}{'method':<8}{'seed':>5}{'tokens':>9}{'train s':>9}{'T':>4}{'temp':>6}"
              f"{'acc len':>9}{'tok/pass':>10}{'lossless':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        for e in r["eval"]:
            lossless = e.get("identical_to_plain_greedy")
            print(f"{r['target']:<8}{r['kind']:<12}{r['method']:<8}{r['seed']:>5}{r['target_tokens']:>9}"
                  f"{r['train_s']:>9.0f}{e['capacity']:>4}{e['temperature']:>6.1f}{e['mean_accepted_length']:>9.2f}"
                  f"{e['tokens_per_pass']:>10.2f}{'-' if lossless is None else str(lossless):>10}")


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    targets = sorted({r["target"] for r in rows})
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4), squeeze=False)
    colors = {"sft": "tab:blue", "online": "tab:orange", "opd": "tab:green"}
    for ax, tname in zip(axes[0], targets):
        for r in (r for r in rows if r["target"] == tname):
            c = r["train_curve"]
            y = np.asarray(c["tokens_per_pass_estimate"], float)
            smooth = np.convolve(y, np.ones(min(10, len(y))) / min(10, len(y)), mode="valid")
            style = "-" if r["kind"] == "eagle3" else "--"
            label = f"{r['kind']} {r['method']}" if r["seed"] == min(x["seed"] for x in rows) else None
            ax.plot(c["target_tokens"][len(y) - len(smooth):], smooth, style, color=colors[r["method"]],
                    alpha=0.6, label=label)
            final = headline(r)
            if final is not None:
                ax.plot([r["target_tokens"]], [final], "o" if r["kind"] == "eagle3" else "s",
                        color=colors[r["method"]])
        ax.set_title(f"{tname}: training chain estimate (lines), held-out greedy, largest T (markers)",
                     fontsize=9)
        ax.set_xlabel("training target tokens")
        ax.set_ylabel("tokens per target pass")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_budget_curve(rows: list[dict], path: str, capacity: int) -> bool:
    """Held-out greedy tokens/pass at T = ``capacity`` against counted target tokens: per method and
    budget the mean over seeds, bars from the lowest to the highest seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    pairs = sorted({(r["target"], r["kind"]) for r in rows})
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.5 * len(pairs), 4), squeeze=False)
    colors = {"sft": "tab:blue", "online": "tab:orange", "opd": "tab:green"}
    extra_colors = iter(["tab:red", "tab:purple", "tab:brown", "tab:gray"])
    for ax, (tname, kind) in zip(axes[0], pairs):
        labelled = set()
        for c in (c for c in compare_methods(rows, capacity) if (c["target"], c["kind"]) == (tname, kind)):
            for method in (m for m, st in c.items() if isinstance(st, dict)):
                st = c[method]
                if method not in colors:
                    colors[method] = next(extra_colors, "black")
                color = colors[method]
                ax.errorbar([st["target_tokens_mean"] / 1e3], [st["mean"]],
                            yerr=[[st["mean"] - min(st["values"])], [max(st["values"]) - st["mean"]]],
                            fmt="o" if method in METHODS else "x", color=color, capsize=3,
                            label=None if method in labelled else method)
                labelled.add(method)
        ax.set_title(f"{tname} {kind}: held-out greedy T={capacity} (mean, min-max over seeds)", fontsize=9)
        ax.set_xlabel("target forward tokens consumed in training (thousands)")
        ax.set_ylabel("tokens per target pass")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _same_run(a: dict, b: dict) -> bool:
    keys = ("target", "kind", "method", "seed", "steps", "budget_steps", "warm_start_steps")
    return all(a.get(k) == b.get(k) for k in keys)


def combine(paths: list[str], out: str, plot_path: Optional[str]) -> int:
    """Merge result files of several invocations (e.g. one per step budget) into ``out``."""
    rows, invocations, device = [], [], None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        found = data.get("invocations") or [data["args"]]
        invocations.extend(found)
        for r in data["runs"]:
            r = {**r, "budget_steps": r.get("budget_steps", data["args"]["steps"]) if "args" in data else budget_of(r)}
            same = [old for old in rows if r.get("reused_trained") and _same_run(old, r)]
            if same:  # a re-measurement of a drafter trained earlier (--reuse-trained): add its new evals
                have = {(e["capacity"], e["temperature"]) for e in same[0]["eval"]}
                same[0]["eval"].extend(e for e in r["eval"] if (e["capacity"], e["temperature"]) not in have)
            else:
                rows.append(r)
        device = device or (data["backend"], data["device"])
    capacity = max(e["capacity"] for r in rows for e in r["eval"])
    with open(out, "w") as f:
        json.dump({"backend": device[0], "device": device[1], "invocations": invocations,
                   "tree": {"topk": TREE_TOPK, "depth": TREE_DEPTH}, "runs": rows,
                   "opd_vs_sft": compare_methods(rows, capacity)}, f, indent=1)
    print(f"wrote {out}")
    for c in compare_methods(rows, capacity):
        print(f"{c['target']} {c['kind']} budget {c['budget_steps']} steps: " + ", ".join(
            f"{m} {c[m]['mean']:.2f} (spread {c[m]['spread']:.2f}, {c[m]['seeds']} seeds, "
            f"{c[m]['target_tokens_mean'] / 1e3:.1f}k tokens)" for m, st in c.items() if isinstance(st, dict)))
    png = plot_path or os.path.splitext(out)[0] + ".png"
    if plot_budget_curve(rows, png, capacity):
        print(f"wrote {png}")
    return 0


# ------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    p.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per run (same for every method)")
    p.add_argument("--opd-steps", type=int,
                   help="training steps of opd runs (default: --steps); opd also pays for verifying its own "
                        "chains, so fewer steps give it the target tokens of the other methods")
    p.add_argument("--online-steps", type=int, help="training steps of online runs (default: --steps)")
    p.add_argument("--warm-start-steps", type=int, default=0,
                   help="first train sft this many steps per seed on the first half of the training prompts, then "
                        "continue from it: sft over the same (already generated) sequences, online and opd on "
                        "fresh rollouts of the second half (Draft-OPD's regime: continuing after sft)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--capacities", nargs="+", type=int, default=[16, 60], help="tree sizes T measured")
    p.add_argument("--temperatures", nargs="+", type=float, default=[0.0, 1.0])
    p.add_argument("--train-prompts", type=int, default=2000)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, 8 held-out prompts, T = 16")
    p.add_argument("--keep-drafters", help="keep the trained drafter directories here (default: a temp dir)")
    p.add_argument("--reuse-trained", action="store_true",
                   help="with --keep-drafters: measure a drafter already trained there (same steps and options) "
                        "instead of training it again")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default=os.path.join(HERE, "results", "drafter_training.json"))
    p.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="train nothing: merge these result files (e.g. one per --steps budget) into --out, "
                        "compare opd with sft per budget and plot tokens/pass against target tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_prompts, args.capacities, args.train_prompts = 20, 8, [16], 64
    if min(args.steps, args.opd_steps or 1, args.online_steps or 1) < 1 or args.warm_start_steps < 0:
        p.error("--steps, --opd-steps and --online-steps must be >= 1, --warm-start-steps >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out, args.plot)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="specjax-bench-") as tmp:
        work_dir = args.keep_drafters or tmp
        os.makedirs(work_dir, exist_ok=True)
        targets = load_targets(args.targets, args.train_prompts, args.eval_prompts, tmp)
        for target in targets:
            reference = plain_greedy(target, args.eval_batch_size)
            for kind in args.kinds:
                for seed in args.seeds:  # seeds outermost: an interrupted run still compares methods
                    warm = warm_start(target, kind, seed, args, work_dir) if args.warm_start_steps else None
                    for method in args.methods:
                        rows.append(train_and_measure(target, kind, method, seed, args, work_dir, reference, warm))
                        print(f"done {target.name} {kind} {method} seed {seed}: greedy tokens/pass at the largest T "
                              f"{headline(rows[-1]):.2f}", file=sys.stderr, flush=True)
                        write_json(args, rows)  # after every run: partial results survive an interruption
    report(args, rows)
    return 0


def write_json(args, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                   "args": vars(args), "tree": {"topk": TREE_TOPK, "depth": TREE_DEPTH},
                   "runs": rows, "opd_vs_sft": compare_methods(rows, max(args.capacities))}, f, indent=1)


def report(args, rows: list[dict]) -> None:
    print(f"backend: {jax.default_backend()}  steps: {args.steps}  batch: {args.batch_size}  "
          f"held-out prompts: {args.eval_prompts}  tree: top-k {TREE_TOPK}, depth {TREE_DEPTH}")
    print_table(rows)
    for c in compare_methods(rows, max(args.capacities)):
        parts = [f"{m} {c[m]['mean']:.2f} (spread {c[m]['spread']:.2f}, {c[m]['seeds']} seeds, "
                 f"{c[m]['target_tokens_mean'] / 1e3:.0f}k target tokens)"
                 for m in METHODS if m in c]
        extra = ""
        if "opd_minus_sft" in c:
            extra = f"; opd - sft = {c['opd_minus_sft']:+.2f}, beyond spread: {c['opd_beats_sft_beyond_spread']}"
        after = f" after {c['warm_start_steps']} sft steps" if c.get("warm_start_steps") else ""
        print(f"{c['target']} {c['kind']} budget {c['budget_steps']} steps{after}, greedy T={c['capacity']} tokens/pass: "
              + ", ".join(parts) + extra)
    write_json(args, rows)
    print(f"wrote {args.out}")
    png = args.plot or os.path.splitext(args.out)[0] + ".png"
    if plot(rows, png):
        print(f"wrote {png}")


if __name__ == "__main__":
    sys.exit(main())
