"""``specjax`` command line: ``generate`` (the main job) and ``replay`` (suffix-drafting traces).

With no ``--model`` and no ``--prompt``, ``generate`` runs the embedded tiny
text-to-SQL model on demo prompts: no download, a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

import numpy as np

DRAFTERS = ("auto", "suffix", "prompt-lookup", "draft-model", "eagle3", "token-recycling", "graft", "taps", "none")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face model directory (config.json + safetensors); "
                                   "default: the embedded tiny text-to-SQL model")
    p.add_argument("--drafter", choices=DRAFTERS, default="auto",
                   help="auto (default): with the embedded model on a TPU/GPU, the draft model shipped for "
                        "it; otherwise the suffix index (pre-filled from --suffix-history)")
    p.add_argument("--drafter-model", help="directory of the drafter's weights: a Hugging Face causal LM with the "
                                           "target's vocabulary (--drafter draft-model) or an EAGLE-3 head "
                                           "(--drafter eagle3)")
    p.add_argument("--routing", choices=("confidence", "entropy", "merged"), default="confidence",
                   help="--drafter taps (--drafter-model DIR1,DIR2): verify the most confident drafter's tree "
                        "per step and row, the least uncertain one's, or one merged tree of all of them")
    p.add_argument("--retrieval", choices=("suffix", "prompt-lookup"), default="suffix",
                   help="--drafter graft: where grafted continuations are retrieved from")
    p.add_argument("--suffix-history", default="auto",
                   help="--drafter suffix: pre-fill the global index with the responses in this file (see "
                        "--save-suffix-history); 'auto' (default): the history shipped with the embedded "
                        "model when it runs, else none; 'none': start empty")
    p.add_argument("--save-suffix-history", metavar="PATH",
                   help="--drafter suffix: after the run, write the global index's responses (the history "
                        "it started from, then this run's outputs) to PATH, for --suffix-history next time")
    p.add_argument("--no-spec", action="store_true", help="plain decoding (same as --drafter none)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable); default: demo SQL prompts")
    p.add_argument("--num-demo-prompts", type=int, default=32, help="demo prompts when no --prompt is given")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--draft-capacity", type=_capacity, default="auto",
                   help="tree slots per sequence and step (T), or 'auto' (default): T chosen per step from "
                        "measured step costs, up to --max-draft-capacity, 0 when drafts do not pay")
    p.add_argument("--max-draft-capacity", type=int, default=None,
                   help="the largest T 'auto' may choose, and device drafters' default T (default: 8 on a CPU, "
                        "where a step's cost grows with the nodes it verifies, else 16)")
    p.add_argument("--tree-topk", type=int, help="device drafters: children per expanded node (default: the "
                                                 "drafter directory's specjax_drafter.json, else 4 for "
                                                 "draft-model, 10 for eagle3)")
    p.add_argument("--tree-depth", type=int, help="device drafters: tree depth (default: specjax_drafter.json, "
                                                  "else 6 for draft-model, 7 for eagle3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--attention", choices=("auto", "xla", "pallas"), default="auto")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--compare-baseline", action="store_true",
                   help="also run plain decoding (--drafter none), check outputs match, report the speedup")
    p.add_argument("--repeat", type=_positive, default=3,
                   help="timed generations per side, interleaved with the baseline's; wall times are medians")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text and a table")


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def _capacity(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an integer, got {value!r}") from None


def _suffix_history_path(args) -> Optional[str]:
    """The history file ``--suffix-history`` names ('auto': the embedded model's, when it runs)."""
    choice = getattr(args, "suffix_history", None) or "none"
    if choice == "none":
        return None
    if choice != "auto":
        return choice
    if getattr(args, "model", None) is not None:
        return None
    from specjax.models.embedded import embedded_suffix_history

    return embedded_suffix_history()


def make_drafter(name: str, target=None, args=None):
    """The drafter called ``name``; device drafters (draft-model, eagle3, token-recycling) need the
    loaded target and the parsed args (``--drafter-model``, ``--draft-capacity``)."""
    if name == "none":
        return None
    if name == "prompt-lookup":
        from specjax.drafters.prompt_lookup import PromptLookupDrafter

        return PromptLookupDrafter(max_ngram=3, max_branches=4)
    if name == "suffix":
        from specjax.drafters.suffix_index import SuffixDecodingDrafter

        drafter = SuffixDecodingDrafter()
        history = _suffix_history_path(args)
        if history is not None:
            from specjax.drafters.suffix_history import load_history

            drafter.remember(load_history(history, vocab_size=target.config.vocab_size,
                                          tokenizer=target.tokenizer))
        return drafter
    if target is None or args is None:
        raise ValueError(f"drafter {name!r} runs on the device and needs the target model and the CLI args")
    fixed = args.draft_capacity if isinstance(args.draft_capacity, int) and args.draft_capacity > 0 else None
    if name == "token-recycling":
        from specjax.drafters.token_recycling import TokenRecyclingDrafter

        return TokenRecyclingDrafter(target.config.vocab_size, capacity=fixed or 80)
    if not args.drafter_model:
        raise ValueError(f"--drafter {name} needs --drafter-model DIR (the drafter's weights)")
    dtype = target.params["embed"].dtype
    if name in ("graft", "taps"):
        return _make_hybrid(name, target, args, fixed or args.max_draft_capacity)
    if name == "draft-model":
        from specjax.drafters.draft_model import DraftModelDrafter
        from specjax.models.loading import load_model

        capacity, topk, depth = _tree_shape(args, fixed, (args.max_draft_capacity, 4, 6))
        return DraftModelDrafter(load_model(args.drafter_model, dtype=dtype), target.config.vocab_size,
                                 capacity=capacity, topk=topk, depth=depth)
    from specjax.drafters.eagle3 import DEFAULT_CAPACITY, DEFAULT_DEPTH, DEFAULT_TOPK, load_eagle3

    capacity, topk, depth = _tree_shape(args, fixed, (DEFAULT_CAPACITY, DEFAULT_TOPK, DEFAULT_DEPTH))
    return load_eagle3(args.drafter_model, target, dtype=dtype, capacity=capacity, topk=topk, depth=depth)


RECOMMENDED_TREE = "specjax_drafter.json"  # in a drafter directory: {"tree": {"capacity", "topk", "depth"}}


def _tree_shape(args, fixed: Optional[int], defaults: tuple[int, int, int]) -> tuple[int, int, int]:
    """(capacity, topk, depth): the flags, else the drafter directory's recommended tree, else defaults
    (top-k and depth never above the capacity)."""
    import os

    recommended = {}
    path = os.path.join(args.drafter_model, RECOMMENDED_TREE)
    if os.path.isfile(path):
        with open(path) as f:
            recommended = json.load(f).get("tree", {})
    capacity = fixed or int(recommended.get("capacity", defaults[0]))
    topk = getattr(args, "tree_topk", None) or int(recommended.get("topk", min(defaults[1], capacity)))
    depth = getattr(args, "tree_depth", None) or int(recommended.get("depth", min(defaults[2], capacity)))
    return capacity, min(topk, capacity), min(depth, capacity)


def default_max_capacity() -> int:
    """8 on a CPU (bigger trees rarely pay for their verify cost there), 16 on accelerators."""
    import jax

    return 8 if jax.default_backend() == "cpu" else 16


def resolve_drafter(args) -> None:
    """``--drafter auto``: with the embedded model on a TPU/GPU, the draft model shipped for it (a
    verified chain costs about one decode step there); otherwise the suffix index (on a CPU a step's
    cost grows with the nodes verified, and the chain does not pay: see the README). ``--drafter
    draft-model`` without ``--drafter-model`` takes the shipped draft model for the embedded model."""
    import jax

    from specjax.models.embedded import embedded_drafter_dir

    shipped = embedded_drafter_dir() if args.model is None else None
    if args.drafter == "draft-model" and not args.drafter_model and shipped is not None:
        args.drafter_model = shipped
    if args.drafter != "auto":
        return
    if shipped is not None and not args.drafter_model and jax.default_backend() != "cpu":
        args.drafter, args.drafter_model = "draft-model", shipped
    else:
        args.drafter = "suffix"


def _make_hybrid(name: str, target, args, capacity: int):
    """Graft (one drafter directory + retrieval) or TAPS (comma-separated drafter directories)."""
    from specjax.drafters.hybrid import load_device_drafter

    dirs = [d for d in args.drafter_model.split(",") if d]
    if name == "graft":
        from specjax.drafters.graft import GraftDrafter

        if len(dirs) != 1:
            raise ValueError(f"--drafter graft takes one --drafter-model DIR, got {len(dirs)}")
        return GraftDrafter(load_device_drafter(dirs[0], target, capacity),
                            make_drafter(args.retrieval, target, args), capacity=capacity)
    from specjax.drafters.routing import TapsDrafter

    if len(dirs) < 2:
        raise ValueError(f"--drafter taps needs at least two drafters: --drafter-model DIR1,DIR2, got {len(dirs)}")
    return TapsDrafter([load_device_drafter(d, target, capacity) for d in dirs], target.config.vocab_size,
                       routing=args.routing, capacity=capacity)


def _load(args):
    import jax
    import jax.numpy as jnp

    from specjax.models.loading import load_model

    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    model_dir = args.model
    if model_dir is None:
        from specjax.models.embedded import default_model_dir

        model_dir = default_model_dir()
    return load_model(model_dir, dtype=getattr(jnp, dtype))


def _prompts(args) -> list[str]:
    if args.prompt:
        return args.prompt
    from specjax.models.toy_corpus import sql_prompts

    return sql_prompts(args.num_demo_prompts, seed=args.seed)


class _TimedRuns:
    """One drafter's engine, warmed up on the run's shapes, then timed generation by generation.

    Before each timed generation a learning drafter forgets the outputs it has seen (the
    warm-up's and earlier repetitions'), so every repetition drafts the same way.
    """

    def __init__(self, model, drafter_name: str, prompts, args):
        from specjax.engine.engine import Engine

        self.model, self.name, self.prompts, self.args = model, drafter_name, prompts, args
        self.engine = Engine(model, make_drafter(drafter_name, model, args), draft_capacity=args.draft_capacity,
                             max_draft_capacity=args.max_draft_capacity, attention=args.attention,
                             max_batch_size=args.batch_size)
        self.kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, seed=args.seed, stop=args.stop)
        self.engine.generate(prompts, **self.kwargs)  # compile every shape the timed runs use
        self.walls: list[float] = []
        self.results = None
        self.repeatable = True  # every repetition gave the same token ids

    def run(self, show_progress: bool) -> None:
        from tqdm.auto import tqdm

        if self.name != "none":
            _forget_outputs(self.engine, self.name, self.model, self.args)
        bar = tqdm(total=len(self.prompts) * self.args.max_new_tokens, desc=f"generate ({self.name})", unit="tok",
                   disable=not show_progress, file=sys.stderr)
        start = time.perf_counter()
        results = self.engine.generate(self.prompts, progress=bar, **self.kwargs)
        self.walls.append(time.perf_counter() - start)
        bar.close()
        if self.results is not None and self.args.temperature <= 0:
            self.repeatable &= [r.token_ids for r in results] == [r.token_ids for r in self.results]
        self.results = results

    def summary(self) -> dict:
        """The last run's outputs and counts, with the median wall time over the repetitions."""
        summary = _summary(self.results, float(np.median(self.walls)))
        summary["wall_s_runs"] = self.walls
        return summary


def _forget_outputs(engine, drafter_name: str, model, args) -> None:
    """Make the timed run draft without having seen the warm-up's outputs (suffix indexes and
    Token Recycling's table learn across requests), keeping compiled device drafters compiled."""
    from specjax.drafters.device import is_device_drafter

    drafter = engine.drafter
    if hasattr(drafter, "retrieval"):  # Graft: a device drafter plus a host retrieval index
        drafter.retrieval = make_drafter(args.retrieval, model, args)
    elif is_device_drafter(drafter):
        if hasattr(drafter, "reset"):
            drafter.reset()
    else:
        engine.drafter = make_drafter(drafter_name, model, args)


def _save_suffix_history(drafter, model, path: str) -> None:
    """Write the suffix index's responses (``--save-suffix-history``)."""
    from specjax.drafters.suffix_history import save_history

    save_history(path, drafter.history, vocab_size=model.config.vocab_size, tokenizer=model.tokenizer,
                 source="specjax generate --save-suffix-history")


def _summary(results, wall: float) -> dict:
    tokens = sum(len(r.token_ids) for r in results)
    passes = sum(r.target_passes for r in results)
    return {"text": [r.text for r in results], "token_ids": [r.token_ids for r in results],
            "tokens": tokens, "target_passes": passes, "tokens_per_pass": tokens / max(passes, 1),
            "wall_s": wall, "tokens_per_s": tokens / max(wall, 1e-9)}


def _table(rows: list[tuple[str, dict]]) -> str:
    header = f"{'run':<16}{'tokens':>8}{'target passes':>15}{'tokens/pass':>13}{'wall s':>9}{'tok/s':>9}"
    lines = [header, "-" * len(header)]
    for name, s in rows:
        lines.append(f"{name:<16}{s['tokens']:>8}{s['target_passes']:>15}{s['tokens_per_pass']:>13.2f}"
                     f"{s['wall_s']:>9.2f}{s['tokens_per_s']:>9.1f}")
    return "\n".join(lines)


def generate_main(args) -> int:
    if args.no_spec:
        args.drafter = "none"
    resolve_drafter(args)
    if args.max_draft_capacity is None:
        args.max_draft_capacity = default_max_capacity()
    if args.save_suffix_history and args.drafter != "suffix":
        raise SystemExit(f"specjax generate: --save-suffix-history needs --drafter suffix (this run drafts "
                         f"with {args.drafter!r})")
    model = _load(args)
    prompts = _prompts(args)
    spec = _TimedRuns(model, args.drafter, prompts, args)
    base = _TimedRuns(model, "none", prompts, args) if args.compare_baseline else None
    for i in range(args.repeat):  # interleaved, so a noisy stretch of the machine hits both alike
        spec.run(show_progress=i == 0 and not args.json)
        if base is not None:
            base.run(show_progress=i == 0 and not args.json)
    if args.save_suffix_history:
        _save_suffix_history(spec.engine.drafter, model, args.save_suffix_history)
    results = spec.results
    summary = dict(spec.summary(), drafter=args.drafter)
    rows = [(args.drafter, summary)]
    if base is not None:
        baseline = base.summary()
        summary["baseline"] = {k: v for k, v in baseline.items() if k not in ("text", "token_ids")}
        summary["speedup"] = baseline["wall_s"] / max(summary["wall_s"], 1e-9)
        summary["identical_to_baseline"] = (baseline["token_ids"] == summary["token_ids"] and spec.repeatable
                                            and base.repeatable)
        summary["sampled"] = args.temperature > 0
        rows.append(("none (baseline)", baseline))
    if args.json:
        print(json.dumps(summary))
        return 0
    for prompt, res in zip(prompts, results):
        print(f"\n>>> {prompt.strip()[-120:]}\n{res.text}")
    print("\n" + _table(rows))
    if args.compare_baseline:
        print(f"speedup vs baseline: {summary['speedup']:.2f}x (median wall times of {args.repeat} interleaved "
              f"runs each); {_comparison(summary)}")
    return 0


def _comparison(summary: dict) -> str:
    """What the baseline comparison shows: token equality under greedy, nothing per token under sampling."""
    if summary["sampled"]:
        return ("sampled: speculative and plain outputs follow the same distribution but are different "
                "draws, so they are not compared token by token (the test suite checks the distribution)")
    if summary["identical_to_baseline"]:
        return "outputs identical"
    return "outputs DIFFERENT from plain greedy decoding (please report a bug)"


def convert_llama2c_main(args) -> int:
    from specjax.models.llama2c import convert_llama2c

    header = convert_llama2c(args.checkpoint, args.out_dir)
    print(f"wrote {args.out_dir}: Hugging Face Llama from llama2.c v{header.version} ({header.n_layers} layers, "
          f"dim {header.dim}, vocab {header.vocab_size}); no tokenizer (not part of the checkpoint)")
    return 0


def _add_train_drafter_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", help="target model directory (default: the embedded tiny text-to-SQL model)")
    p.add_argument("--kind", choices=("eagle3", "draft-model"), default="eagle3")
    p.add_argument("--method", choices=("sft", "online", "opd"), default="online",
                   help="sft: fixed target trajectories; online: fresh ones each step; opd: online + Draft-OPD "
                        "replay (EAGLE-3: the head drafts its own chains, the target verifies them, and the "
                        "visited chains are trained on; draft models: on-policy re-weighting)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", required=True, help="output directory (config.json, model.safetensors, checkpoints/)")
    p.add_argument("--prompts", help="JSONL file with a \"prompt\" field per line (default: sample from the target "
                                     "starting at BOS)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT/checkpoints")
    p.add_argument("--init", metavar="DIR", help="start from this drafter's weights instead of a random "
                                                 "initialization (a directory train-drafter wrote, or a public "
                                                 "EAGLE-3 head / small Llama of the same shape): fine-tuning")
    p.add_argument("--ttt-steps", type=int, default=7, help="EAGLE-3 training-time-test unroll depth")
    p.add_argument("--feature-weight", type=float, default=0.0, help="Smooth L1 feature loss weight (EAGLE-3)")
    p.add_argument("--opd-weight", type=float, default=2.0)
    p.add_argument("--prompt-weight", type=float, default=0.1, help="loss weight inside the prompt")
    p.add_argument("--rollout-temperature", type=float, default=0.0)
    p.add_argument("--draft-layers", type=int, default=1)
    p.add_argument("--draft-hidden", type=int, help="draft model hidden size (default: the target's)")


def train_drafter_main(args) -> int:
    from specjax.drafters.training import cli_main

    return cli_main(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "replay":
        from specjax.drafters.replay import main as replay_main

        return replay_main(argv[1:])
    parser = argparse.ArgumentParser(prog="specjax", description="Lossless speculative decoding in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_args(sub.add_parser("generate", help="generate text (speculatively) with a model"))
    sub.add_parser("replay", help="replay recorded traces through the suffix drafter (see replay --help)")
    convert = sub.add_parser("convert-llama2c", help="convert a llama2.c checkpoint (.bin) to a Hugging Face "
                                                     "Llama directory")
    convert.add_argument("checkpoint", help="llama2.c checkpoint file (version 0 or 1 float32 export)")
    convert.add_argument("out_dir", help="output directory (config.json, model.safetensors)")
    _add_train_drafter_args(sub.add_parser("train-drafter", help="train an EAGLE-3 head or a draft model "
                                                                 "for a target (online distillation)"))
    args = parser.parse_args(argv)
    if args.command == "train-drafter":
        return train_drafter_main(args)
    if args.command == "convert-llama2c":
        return convert_llama2c_main(args)
    return generate_main(args)


if __name__ == "__main__":
    sys.exit(main())
