"""Every applicable drafter on real pretrained targets, over the shipped task set, lossless-checked.

Targets (pulled through ``specjax pull``, float32 on a CPU):
- ``smollm2``: SmolLM2-135M-Instruct;
- ``qwen-coder``: Qwen2.5-Coder-1.5B-Instruct, with Qwen2.5-Coder-0.5B-Instruct as its draft model.

Drafters (each run only where it applies to the target):
- ``prompt-lookup``; ``suffix-cold`` (an empty index per request) and ``suffix-warm`` (the
  index holds the outputs of every request this run finished before: at batch 1 the
  earlier tasks, at batch B the earlier batches); ``token-recycling`` (its table reset
  before every request: cold); those use the engine's auto tree size (``--host-capacity``);
- ``draft-chain-dD`` / ``draft-tree-TtKkDd``: the draft model as a chain of D tokens or as a
  dynamic tree of T nodes (top-k K, depth D), fixed size (``--chains``, ``--trees``);
- ``eagle3``: an EAGLE-3 head trained by ``specjax train-drafter`` for the target
  (``--eagle3 TARGET=DIR``), as a tree (``--eagle3-tree``);
- ``graft``: the target's model drafter (EAGLE-3 head, else the draft model tree) pruned to
  half the slots, plus the warm suffix index's retrievals;
- ``taps``: confidence routing between the target's two model drafters (where it has two).

Per target and batch size the tasks run in groups of B (batch 1: one task at a time).
Each group runs untimed once per engine (compiles its shape bucket), then ``--repeats``
times with plain decoding and every drafter interleaved (plain, d1, d2, ..., plain, ...),
so a noisy stretch of the shared machine hits all alike. Per drafter: tokens per target
pass (prefill counts as one, as ``specjax generate`` reports), mean accepted length (draft
tokens accepted per speculative pass) and the CPU wall speedup (the plain medians summed
over groups, over the drafter's). Every run's token ids must equal plain greedy decoding's
at the same batch size, or the script exits nonzero after writing its report.

    python benchmarks/bench_real_models.py                                    # everything (long)
    python benchmarks/bench_real_models.py --targets smollm2 --tasks 3 --batches 1 --repeats 1  # minutes
    python benchmarks/bench_real_models.py --targets qwen-coder --categories code --batches 1 \\
        --drafters draft-chain,draft-tree --chains 4,6 --trees 8x2x4,16x4x5          # tune the draft model

Writes JSON (``--out``), a PNG next to it, a Markdown table (``.md``), and prints the table.
``SPECJAX_CACHE`` chooses where pulled models live (a pull happens once).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Callable, Optional

import numpy as np

TARGETS = {
    "smollm2": {"model": "smollm2-135m-instruct", "draft": None},
    "qwen-coder": {"model": "qwen2.5-coder-1.5b-instruct", "draft": "qwen2.5-coder-0.5b-instruct"},
}
DRAFTERS = ("prompt-lookup", "suffix-cold", "suffix-warm", "token-recycling", "draft-chain", "draft-tree", "eagle3",
            "graft", "taps", "hierarchical")
MODEL_DRAFTERS = {"draft-chain", "draft-tree", "graft", "taps", "hierarchical"}  # those that need the draft model
CODE_CATEGORIES = ("code-edit", "code-refactor", "sql")


# ------------------------------------------------------------------ arguments


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"16x4x6"`` -> (capacity 16, top-k 4, depth 6)."""
    try:
        capacity, topk, depth = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a tree shape is CAPACITYxTOPKxDEPTH, e.g. 16x4x6; got {text!r}") from None
    if min(capacity, topk, depth) < 1 or topk > capacity or depth > capacity:
        raise argparse.ArgumentTypeError(f"tree shape {text!r}: need 1 <= top-k, depth <= capacity")
    return capacity, topk, depth


def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {unknown or text!r}; choose from {', '.join(choices)}")
        return names
    return parse


def target_dirs(text: str) -> tuple[str, str]:
    target, _, path = text.partition("=")
    if target not in TARGETS or not path:
        raise argparse.ArgumentTypeError(f"expected TARGET=DIR with TARGET one of {', '.join(TARGETS)}, got {text!r}")
    return target, path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--targets", type=name_list(tuple(TARGETS)), default=list(TARGETS))
    p.add_argument("--drafters", type=name_list(DRAFTERS), default=list(DRAFTERS))
    p.add_argument("--batches", type=int_list, default=[1, 8])
    p.add_argument("--tasks", type=int, help="the first N tasks (after --categories)")
    p.add_argument("--task-ids", help="comma-separated task ids (after --categories)")
    p.add_argument("--categories", help="comma-separated task categories; 'code' = " + ",".join(CODE_CATEGORIES))
    p.add_argument("--max-new-tokens", type=int, help="override every task's max_new_tokens")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per group and engine (median)")
    p.add_argument("--chains", type=int_list, default=[6], help="draft-model chain depths to run")
    p.add_argument("--trees", type=lambda s: [parse_shape(x) for x in s.split(",") if x], default=[(16, 4, 6)],
                   help="draft-model tree shapes CAPACITYxTOPKxDEPTH to run")
    p.add_argument("--min-lengths", type=int_list, default=[6],
                   help="hierarchical: the intermediate's minimum chain lengths to run")
    p.add_argument("--hier-top", type=int, default=16, help="hierarchical: the Token Recycling top's tree size")
    p.add_argument("--quantize", choices=("int8", "int4", "native"),
                   help="the target's weights (weight-only; the draft model stays float32): int8 per output "
                        "channel, int4 in groups of 32 by round to nearest, or native GGUF blocks")
    p.add_argument("--eagle3", type=target_dirs, action="append", default=[], metavar="TARGET=DIR",
                   help="an EAGLE-3 head trained for TARGET (specjax train-drafter --kind eagle3)")
    p.add_argument("--eagle3-tree", type=parse_shape, default=(16, 4, 6), help="EAGLE-3, Graft, TAPS tree shape")
    p.add_argument("--host-capacity", default="auto", help="host drafters and Token Recycling: 'auto' or a fixed T")
    p.add_argument("--max-host-capacity", type=int, default=8, help="the largest T 'auto' may pick")
    p.add_argument("--recycling-capacity", type=int, help="Token Recycling at this fixed T (default: auto, as "
                                                          "host drafters)")
    p.add_argument("--model", type=target_dirs, action="append", default=[], metavar="TARGET=PATH",
                   help="load TARGET from PATH (a HF directory or .gguf) instead of the registry")
    p.add_argument("--draft", type=target_dirs, action="append", default=[], metavar="TARGET=PATH",
                   help="TARGET's draft model from PATH instead of the registry")
    p.add_argument("--out", default="benchmarks/results/real_models.json")
    p.add_argument("--combine", nargs="+", metavar="JSON", help="measure nothing: join these reports' "
                                                                 "measurements into --out (JSON, .md, .png)")
    return p


# ------------------------------------------------------------------ tasks and models


def select_tasks(categories: Optional[str], n: Optional[int], ids: Optional[str] = None) -> list[dict]:
    from specjax.models.tasks import load_tasks

    tasks = load_tasks()
    if ids:
        wanted_ids = ids.split(",")
        unknown = sorted(set(wanted_ids) - {t["id"] for t in tasks})
        if unknown:
            raise SystemExit(f"unknown task ids {unknown}")
        tasks = [t for t in tasks if t["id"] in wanted_ids]
    if categories:
        wanted = set()
        for c in categories.split(","):
            wanted |= set(CODE_CATEGORIES) if c == "code" else {c}
        known = {t["category"] for t in tasks}
        if wanted - known:
            raise SystemExit(f"unknown task categories {sorted(wanted - known)}; the task set has {sorted(known)}")
        tasks = [t for t in tasks if t["category"] in wanted]
    return tasks[:n] if n else tasks


def load(spec: str, quantize: Optional[str] = None):
    """A registry name (pulled on first use) or a path, as float32 (or weight-only ``quantize``d)."""
    import jax.numpy as jnp

    from specjax.models.loading import load_model

    return load_model(spec, dtype=jnp.float32, quantize=quantize)  # it pulls registry names and parses "int8"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (how busy the shared machine was)."""
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------ runners


@dataclasses.dataclass
class Runner:
    """One engine and how to put its drafter in its starting state before a run."""

    name: str
    engine: object
    prepare: Callable[[list], None]  # called with the outputs of earlier requests before every run
    compiled: set = dataclasses.field(default_factory=set)


def _set_host(engine, factory) -> Callable[[list], None]:
    def prepare(earlier: list) -> None:
        engine.drafter = factory(earlier)
    return prepare


def _suffix(earlier: Optional[list] = None):
    from specjax.drafters.suffix_index import SuffixDecodingDrafter

    drafter = SuffixDecodingDrafter()
    if earlier:
        drafter.remember(earlier)
    return drafter


def model_drafters(target, draft_model, eagle3_dir: Optional[str], args) -> dict:
    """name -> a factory of the target's model drafters (``eagle3``, ``draft-tree``) in the Graft/TAPS shape."""
    from specjax.drafters.draft_model import DraftModelDrafter
    from specjax.drafters.eagle3 import load_eagle3

    capacity, topk, depth = args.eagle3_tree
    vocab = target.config.vocab_size
    out = {}
    if eagle3_dir:
        out["eagle3"] = lambda: load_eagle3(eagle3_dir, target, dtype=np.float32, capacity=capacity, topk=topk,
                                            depth=depth)
    if draft_model is not None:
        out["draft-tree"] = lambda: DraftModelDrafter(draft_model, vocab, capacity=capacity, topk=topk, depth=depth)
    return out


def make_runners(target, draft_model, eagle3_dir: Optional[str], args, batch: int) -> list[Runner]:
    """The plain runner first, then one per applicable drafter configuration."""
    from specjax.drafters.draft_model import DraftModelDrafter
    from specjax.drafters.graft import GraftDrafter
    from specjax.drafters.prompt_lookup import PromptLookupDrafter
    from specjax.drafters.routing import TapsDrafter
    from specjax.drafters.token_recycling import TokenRecyclingDrafter
    from specjax.engine.engine import Engine

    host = args.host_capacity if args.host_capacity == "auto" else int(args.host_capacity)
    host_options = dict(draft_capacity=host, max_draft_capacity=args.max_host_capacity, attention="xla",
                        max_batch_size=batch)
    fixed = dict(attention="xla", max_batch_size=batch)
    vocab = target.config.vocab_size
    runners = [Runner("plain", Engine(target, None, **fixed), lambda earlier: None)]

    def add_host(name, factory):
        engine = Engine(target, factory([]), **host_options)
        runners.append(Runner(name, engine, _set_host(engine, factory)))

    def add_device(name, drafter, options=None):
        engine = Engine(target, drafter, **(options or dict(fixed, draft_capacity=drafter.capacity)))
        reset = getattr(drafter, "reset", None)
        runners.append(Runner(name, engine, lambda earlier: reset() if reset else None))

    wanted = set(args.drafters)
    if "prompt-lookup" in wanted:
        add_host("prompt-lookup", lambda earlier: PromptLookupDrafter(max_ngram=3, max_branches=4))
    if "suffix-cold" in wanted:
        add_host("suffix-cold", lambda earlier: _suffix())
    if "suffix-warm" in wanted:
        add_host("suffix-warm", _suffix)
    if "token-recycling" in wanted:
        if args.recycling_capacity is None:  # the engine's auto tree size over the paper's 80-node template
            add_device("token-recycling", TokenRecyclingDrafter(vocab, capacity=80), host_options)
        else:
            add_device(f"token-recycling-T{args.recycling_capacity}",
                       TokenRecyclingDrafter(vocab, capacity=args.recycling_capacity))
    if draft_model is not None and "draft-chain" in wanted:
        for depth in args.chains:
            add_device(f"draft-chain-d{depth}", DraftModelDrafter(draft_model, vocab, capacity=depth, topk=1,
                                                                  depth=depth))
    if draft_model is not None and "draft-tree" in wanted:
        for capacity, topk, depth in args.trees:
            add_device(f"draft-tree-T{capacity}k{topk}d{depth}",
                       DraftModelDrafter(draft_model, vocab, capacity=capacity, topk=topk, depth=depth))
    models = model_drafters(target, draft_model, eagle3_dir, args)
    if "eagle3" in wanted and "eagle3" in models:
        add_device("eagle3", models["eagle3"]())
    if "graft" in wanted and models:
        first = models.get("eagle3") or models["draft-tree"]
        graft = GraftDrafter(first(), _suffix(), capacity=args.eagle3_tree[0])
        engine = Engine(target, graft, **fixed)

        def prepare_graft(earlier, graft=graft):
            graft.retrieval = _suffix(earlier)
        runners.append(Runner(f"graft({'eagle3' if 'eagle3' in models else 'draft-tree'}+suffix-warm)", engine,
                              prepare_graft))
    if draft_model is not None and "hierarchical" in wanted:
        from specjax.drafters.hierarchical import HierarchicalDrafter

        for n in args.min_lengths:  # HierSpec: Token Recycling drafts trees for the draft model, whose chain we verify
            top = TokenRecyclingDrafter(vocab, capacity=args.hier_top)
            add_device(f"hierarchical(tr{args.hier_top}->draft,min{n})",
                       HierarchicalDrafter(draft_model, top, vocab, min_draft_length=n))
    if "taps" in wanted and len(models) >= 2:
        taps = TapsDrafter([factory() for factory in models.values()], vocab, routing="confidence",
                           capacity=args.eagle3_tree[0])
        add_device(f"taps({'+'.join(models)})", taps)
    return runners


# ------------------------------------------------------------------ measuring


def timed_run(runner: Runner, prompts: list, max_new_tokens: int, earlier: list) -> tuple[list, float]:
    runner.prepare(earlier)
    start = time.perf_counter()
    results = runner.engine.generate(prompts, max_new_tokens)
    return results, time.perf_counter() - start


def compile_bucket(runner: Runner, prompts: list, max_new_tokens: int) -> None:
    """Compile what a run on ``prompts`` uses, without generating it all: host loops through
    ``Engine.warmup`` (which also measures the step costs "auto" needs); device and hybrid loops
    through a run that a stop string every text contains ends after its first sync."""
    engine = runner.engine
    if engine.on_device or hasattr(engine.drafter, "generate_hybrid"):
        runner.prepare([])
        engine.generate(prompts, max_new_tokens, stop=[""])
    else:
        engine.warmup(batch_size=len(prompts), prompt_len=max(len(p) for p in prompts),
                      max_new_tokens=max_new_tokens)


def bucket(runner: Runner, prompts: list, max_new_tokens: int) -> tuple:
    engine = runner.engine
    return engine.prompt_bucket(max(len(p) for p in prompts)), max_new_tokens, engine.batch_bucket(len(prompts))


def measure_target(name: str, target, runners: list[Runner], tasks: list[dict], args, batch: int, bar,
                   on_group: Callable[[dict], None] = lambda partial: None) -> dict:
    """One target at one batch size: every runner over every group of tasks, interleaved;
    ``on_group`` gets the measurement so far after each group."""
    from specjax.models.chat import encode_chat

    prompts = [encode_chat(target, t["messages"]) for t in tasks]
    limits = [args.max_new_tokens or t["max_new_tokens"] for t in tasks]
    groups = [list(range(i, min(i + batch, len(tasks)))) for i in range(0, len(tasks), batch)]
    per = {r.name: {"wall_s": [], "token_ids": [], "tokens": 0, "passes": 0, "accepted": 0, "lossless": True}
           for r in runners}
    earlier: list = []
    load_before = load_average()
    for group in groups:
        group_prompts, limit = [prompts[i] for i in group], max(limits[i] for i in group)
        for runner in runners:  # compile this shape bucket, untimed
            key = bucket(runner, group_prompts, limit)
            if key not in runner.compiled:
                bar.set_postfix_str(f"{name} B={batch} compile {runner.name}")
                compile_bucket(runner, group_prompts, limit)
                runner.compiled.add(key)
            bar.update(1)
        walls = {r.name: [] for r in runners}
        outputs: dict = {}
        expected = None  # plain greedy token ids of this group (the first runner is plain)
        for _ in range(args.repeats):
            for runner in runners:
                bar.set_postfix_str(f"{name} B={batch} {runner.name}")
                results, wall = timed_run(runner, group_prompts, limit, earlier)
                walls[runner.name].append(wall)
                ids = [r.token_ids for r in results]
                expected = ids if expected is None else expected
                if ids != expected:
                    per[runner.name]["lossless"] = False
                outputs[runner.name] = results
                bar.update(1)
        for runner in runners:
            results, row = outputs[runner.name], per[runner.name]
            row["wall_s"].append(float(np.median(walls[runner.name])))
            row["wall_s_runs"] = row.get("wall_s_runs", []) + [walls[runner.name]]
            row["token_ids"].extend(r.token_ids for r in results)
            row["tokens"] += sum(len(r.token_ids) for r in results)
            row["passes"] += sum(r.target_passes for r in results)
            row["accepted"] += sum(r.accepted_draft_tokens for r in results)
            row["spec_passes"] = row.get("spec_passes", 0) + sum(max(r.target_passes - 1, 0) for r in results)
            row.setdefault("tokens_per_pass_per_group", []).append(
                sum(len(r.token_ids) for r in results) / max(sum(r.target_passes for r in results), 1))
        earlier.extend(r.token_ids for r in outputs["plain"])
        on_group(summarize(name, batch, tasks[: group[-1] + 1], per, limits, args, load_before))
    return summarize(name, batch, tasks, per, limits, args, load_before)


def summarize(name: str, batch: int, tasks: list[dict], per: dict, limits: list[int], args,
              load_before: list[float]) -> dict:
    """The measurement over the groups run so far: totals per runner, speedups against plain."""
    plain_wall = sum(per["plain"]["wall_s"])
    table = {}
    for runner_name, row in per.items():
        wall = sum(row["wall_s"])
        table[runner_name] = {
            "tokens": row["tokens"], "target_passes": row["passes"],
            "tokens_per_pass": row["tokens"] / max(row["passes"], 1),
            "mean_accepted": row["accepted"] / max(row.get("spec_passes", 0), 1),
            "wall_s": wall, "speedup": plain_wall / max(wall, 1e-9), "lossless": row["lossless"],
            "wall_s_per_group": row["wall_s"], "wall_s_runs": row.get("wall_s_runs", []),
            "tokens_per_pass_per_group": row.get("tokens_per_pass_per_group", []),
            "tokens_per_s": row["tokens"] / max(wall, 1e-9)}
    return {"target": name, "batch": batch, "tasks": [t["id"] for t in tasks], "groups": -(-len(tasks) // batch),
            "max_new_tokens": limits[: len(tasks)], "repeats": args.repeats, "load_avg_before": load_before,
            "load_avg_after": load_average(), "runs": table, "plain_token_ids": per["plain"]["token_ids"]}


# ------------------------------------------------------------------ reporting


def table_rows(report: dict) -> list[dict]:
    rows = []
    for m in report["measurements"]:
        for name, r in m["runs"].items():
            rows.append({"target": m["target"], "batch": m["batch"], "drafter": name, "n_tasks": len(m["tasks"]), **r})
    return rows


def markdown_table(report: dict) -> str:
    """The drafters' rows (each speedup is against the plain run measured beside it, so plain's own rows
    are left out)."""
    lines = ["| target | batch | tasks | drafter | tokens/pass | mean accepted | CPU speedup | lossless |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
    for r in table_rows(report):
        if r["drafter"] != "plain":
            lines.append(f"| {r['target']} | {r['batch']} | {r['n_tasks']} | {r['drafter']} | "
                         f"{r['tokens_per_pass']:.2f} | {r['mean_accepted']:.2f} | {r['speedup']:.2f}x | "
                         f"{'yes' if r['lossless'] else 'NO'} |")
    return "\n".join(lines)


def text_table(report: dict) -> str:
    header = (f"{'target':<12}{'B':>3}{'tasks':>6}  {'drafter':<34}{'tok/pass':>9}{'accepted':>9}{'wall s':>9}"
              f"{'speedup':>9}  lossless")
    lines = [header, "-" * len(header)]
    for r in table_rows(report):
        lines.append(f"{r['target']:<12}{r['batch']:>3}{r['n_tasks']:>6}  {r['drafter']:<34}{r['tokens_per_pass']:>9.2f}"
                     f"{r['mean_accepted']:>9.2f}{r['wall_s']:>9.1f}{r['speedup']:>8.2f}x  "
                     f"{'yes' if r['lossless'] else 'NO'}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = report["measurements"]
    fig, axes = plt.subplots(len(panels), 2, figsize=(13, 3.2 * len(panels)), squeeze=False)
    for (ax_tpp, ax_speed), m in zip(axes, panels):
        names = [n for n in m["runs"] if n != "plain"]
        x = np.arange(len(names))
        ax_tpp.bar(x, [m["runs"][n]["tokens_per_pass"] for n in names], color="tab:blue")
        ax_speed.bar(x, [m["runs"][n]["speedup"] for n in names],
                     color=["tab:green" if m["runs"][n]["speedup"] >= 1 else "tab:red" for n in names])
        ax_speed.axhline(1.0, color="black", lw=0.8)
        for ax, title in ((ax_tpp, "tokens per target pass"), (ax_speed, "CPU wall speedup vs plain")):
            ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{m['target']}, batch {m['batch']}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def git_revision() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.combine:
        return combine(args.combine, args.out)
    import jax
    from tqdm.auto import tqdm

    from specjax.engine.compile_cache import enable_compilation_cache

    enable_compilation_cache()  # reruns (e.g. tuning one drafter) skip the compiles of earlier runs

    tasks = select_tasks(args.categories, args.tasks, args.task_ids)
    if not tasks:
        raise SystemExit("no tasks selected")
    model_paths, draft_paths, eagle3_dirs = dict(args.model), dict(args.draft), dict(args.eagle3)
    report = {"backend": jax.default_backend(), "dtype": "float32", "quantize": args.quantize, "cpu_count": os.cpu_count(),
              "revision": git_revision(), "command": " ".join(sys.argv), "repeats": args.repeats,
              "host_capacity": args.host_capacity, "max_host_capacity": args.max_host_capacity,
              "eagle3_dirs": eagle3_dirs, "measurements": []}
    for name in args.targets:
        spec = TARGETS[name]
        print(f"loading {name} ...", file=sys.stderr, flush=True)
        target = load(model_paths.get(name, spec["model"]), args.quantize)
        if args.quantize:
            name = f"{name}-{args.quantize}"
        draft = None
        if spec["draft"] and MODEL_DRAFTERS & set(args.drafters):
            draft = load(draft_paths.get(name, spec["draft"]))
        runners = {b: make_runners(target, draft, eagle3_dirs.get(name), args, b) for b in args.batches}
        total = sum(-(-len(tasks) // b) * len(runners[b]) * (1 + args.repeats) for b in args.batches)
        with tqdm(total=total, unit="run", desc=name, file=sys.stderr) as bar:
            for batch in args.batches:
                done = list(report["measurements"])

                def write_partial(partial, done=done):  # partial results survive an interrupted run
                    report["measurements"] = done + [dict(partial, partial=True)]
                    write_report(report, args.out)
                m = measure_target(name, target, runners[batch], tasks, args, batch, bar, write_partial)
                report["measurements"] = done + [m]
        del target, draft, runners
    print(text_table(report))
    write_report(report, args.out)
    lossy = [f"{r['target']}/B={r['batch']}/{r['drafter']}" for r in table_rows(report) if not r["lossless"]]
    if lossy:
        print(f"NOT LOSSLESS: output differs from plain greedy decoding: {', '.join(lossy)}", file=sys.stderr)
        return 1
    return 0


def combine(paths: list[str], out: str) -> int:
    """Several runs' reports as one (each measurement keeps its own plain baseline and settings)."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    measurements = [dict(m, run=r["command"], run_settings={k: v for k, v in r.items() if k != "measurements"})
                    for r in reports for m in r["measurements"]]
    report = {"combined_from": paths, "measurements": measurements}
    write_report(report, out)
    print(text_table(report))
    return 0 if all(r["lossless"] for r in table_rows(report)) else 1


def write_report(report: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    stem = os.path.splitext(out)[0]
    with open(stem + ".md", "w") as f:
        f.write(markdown_table(report) + "\n")
    plot(report, stem + ".png")


if __name__ == "__main__":
    sys.exit(main())
