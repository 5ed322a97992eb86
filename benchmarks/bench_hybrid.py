"""Hybrid drafters vs their parts: tokens per target pass and verified nodes per step.

Runs, all at one tree capacity T, greedy, outputs checked against plain decoding:
each single drafter (the first is "the model alone", e.g. EAGLE alone), weight
averaging of the drafters (same architecture only), TAPS confidence routing,
entropy routing and merged trees, the suffix index alone, and Graft (the first
drafter + the suffix index). Two workloads: ``mixed`` (prompts of two domains,
interleaved) and ``repeat`` (the same requests again, batch after batch, so
retrieval has seen earlier outputs).

    python benchmarks/bench_hybrid.py --drafter-model STORIES_DIR --drafter-model SQL_DIR \\
        --target TARGET_DIR --prompts-a stories.jsonl --prompts-b sql.jsonl --capacity 16
    python benchmarks/bench_hybrid.py                  # skeleton run: embedded model, self + random drafts

A drafter is a directory (``specjax train-drafter`` output, an EAGLE-3 head or a
draft model), ``self`` (the target as its own draft model: an upper bound), or
``random-draft[:seed]`` / ``random-eagle3[:seed]`` (untrained, for smoke runs).
Prompt files are JSONL with a "prompt" field; default: the embedded SQL demo
prompts (two seeds), which are not two domains. Prints a table, writes JSON and
a PNG plot. Wall times include compilation (each run compiles its programs):
compare tokens per pass and nodes per step, not the times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.eagle3 import Eagle3Config, Eagle3Drafter, init_params
from specjax.drafters.graft import GraftDrafter
from specjax.drafters.hybrid import load_device_drafter
from specjax.drafters.routing import TapsDrafter, weight_average
from specjax.drafters.suffix_index import SuffixDecodingDrafter
from specjax.engine.device_loop import generate_on_device
from specjax.engine.engine import Engine
from specjax.engine.plain import greedy_generate
from specjax.models.config import ModelConfig
from specjax.models.decoder import init_params as init_decoder
from specjax.models.loading import Model, load_model

TOPK, DEPTH = 4, 6


# ------------------------------------------------------------------ counting verified nodes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CountState:
    inner: object
    last: jax.Array  # int32[B] valid nodes of the last proposed tree
    nodes: jax.Array  # int32[B] summed over steps where the row emitted tokens
    steps: jax.Array  # int32[B]


@dataclasses.dataclass(eq=False)
class CountingDrafter:
    """A device drafter that also counts the nodes it proposes per live step (for nodes/step)."""

    inner: object

    def __post_init__(self):
        self.capacity, self.hidden_layers = self.inner.capacity, self.inner.hidden_layers
        self.totals = (0, 0)

    @property
    def params(self):
        return self.inner.params

    def init_state(self, batch_size, max_len):
        zeros = jnp.zeros(batch_size, jnp.int32)
        return CountState(self.inner.init_state(batch_size, max_len), zeros, zeros, zeros)

    def prefill(self, params, dstate, *args):
        return dataclasses.replace(dstate, inner=self.inner.prefill(params, dstate.inner, *args))

    def propose(self, params, dstate, *args, with_q=False):
        tree, inner = self.inner.propose(params, dstate.inner, *args, with_q=with_q)
        return tree, dataclasses.replace(dstate, inner=inner, last=tree.valid.sum(axis=1).astype(jnp.int32))

    def update(self, params, dstate, accepted, aux):
        live = (accepted.num > 0).astype(jnp.int32)
        return CountState(self.inner.update(params, dstate.inner, accepted, aux), dstate.last,
                          dstate.nodes + live * dstate.last, dstate.steps + live)

    def end_batch(self, dstate):
        self.inner.end_batch(dstate.inner)
        nodes, steps = self.totals
        self.totals = (nodes + int(dstate.nodes.sum()), steps + int(dstate.steps.sum()))


class CountingHostDrafter:
    """A host drafter wrapper counting the nodes that fit the engine's fixed capacity."""

    def __init__(self, inner, capacity: int):
        self.inner, self.capacity, self.totals = inner, capacity, (0, 0)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def propose(self, rid, max_tokens):
        prop = self.inner.propose(rid, max_tokens)
        nodes, steps = self.totals
        self.totals = (nodes + min(len(prop), self.capacity), steps + 1)
        return prop


# ------------------------------------------------------------------ drafters


def make_model_drafter(spec: str, target: Model, capacity: int):
    """A device drafter from a directory, ``self``, ``random-draft[:seed]`` or ``random-eagle3[:seed]``."""
    name, _, seed = spec.partition(":")
    seed = int(seed or 0)
    shape = dict(capacity=capacity, topk=min(TOPK, capacity), depth=min(DEPTH, capacity))
    vocab = target.config.vocab_size
    if name == "self":
        return DraftModelDrafter(target, vocab, **shape)
    if name == "random-draft":
        params = init_decoder(target.config, jax.random.key(seed))
        return DraftModelDrafter(Model(target.config, params), vocab, **shape)
    if name == "random-eagle3":
        t = target.config
        layer = ModelConfig(model_type="llama", vocab_size=vocab, hidden_size=t.hidden_size,
                            intermediate_size=t.intermediate_size, num_layers=1, num_heads=t.num_heads,
                            num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps)
        cfg = Eagle3Config(layer, vocab, t.hidden_size)
        return Eagle3Drafter(cfg, init_params(cfg, jax.random.key(seed)), t.num_layers,
                             hidden_layers=(1, t.num_layers // 2, t.num_layers - 1), **shape)
    return load_device_drafter(spec, target, **shape)


def averaged(drafters: list):
    """Drafter 0 with the element-wise mean of every drafter's params, or None (different architectures)."""
    try:
        params = weight_average([d.params for d in drafters])
    except ValueError as e:
        print(f"weight averaging skipped: {e}")
        return None
    first = drafters[0]
    if isinstance(first, DraftModelDrafter):
        return dataclasses.replace(first, draft=Model(first.draft.config, params))
    return dataclasses.replace(first, params=params)


# ------------------------------------------------------------------ workloads


def read_prompts(path, fallback_seed: int, n: int, engine: Engine) -> list:
    if path:
        with open(path) as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()][:n]
    else:
        from specjax.models.embedded.toy_corpus import sql_prompts

        texts = sql_prompts(n, seed=fallback_seed)
    return [engine.encode(t) for t in texts]


def workloads(args, engine: Engine) -> dict:
    half = max(1, args.requests // 2)
    a = read_prompts(args.prompts_a, 0, half, engine)
    b = read_prompts(args.prompts_b, 1, half, engine)
    mixed = [p for pair in zip(a, b) for p in pair]
    return {"mixed": mixed, "repeat": mixed[: args.batch] * args.repeats}


# ------------------------------------------------------------------ runs


def run_device(target, drafter, prompts, args) -> tuple[list, float]:
    counting = CountingDrafter(drafter)
    engine = Engine(target, attention="xla", max_batch_size=args.batch)
    results = generate_on_device(engine, prompts, args.max_new_tokens, drafter=counting)
    nodes, steps = counting.totals
    return results, nodes / max(steps, 1)


def run_host(target, drafter, prompts, args) -> tuple[list, float]:
    counting = CountingHostDrafter(drafter, args.capacity)
    engine = Engine(target, counting, draft_capacity=args.capacity, attention="xla", max_batch_size=args.batch)
    results = engine.generate(prompts, args.max_new_tokens)
    nodes, steps = counting.totals
    return results, nodes / max(steps, 1)


def run_graft(target, drafter, prompts, args) -> tuple[list, float]:
    graft = GraftDrafter(drafter, SuffixDecodingDrafter(), capacity=args.capacity)
    engine = Engine(target, graft, attention="xla", max_batch_size=args.batch)
    results = engine.generate(prompts, args.max_new_tokens)
    return results, graft.stats["verified"] / max(graft.stats["steps"], 1)


def configurations(target, args) -> dict:
    """name -> (runner, drafter factory); factories build fresh drafters per workload."""
    specs = args.drafter_model or ["self", "random-draft:1"]
    make = lambda: [make_model_drafter(s, target, args.capacity) for s in specs]
    out = {}
    for i, spec in enumerate(specs):
        out[f"single:{os.path.basename(spec.rstrip('/')) or spec}"] = (run_device, lambda i=i: make()[i])
    if len(specs) >= 2:
        if averaged(make()) is not None:
            out["weight-average"] = (run_device, lambda: averaged(make()))
        for routing in ("confidence", "entropy", "merged"):
            out[f"taps-{routing}"] = (run_device, lambda r=routing: TapsDrafter(
                make(), target.config.vocab_size, routing=r, capacity=args.capacity))
    out["suffix"] = (run_host, lambda: SuffixDecodingDrafter())
    out["graft"] = (run_graft, lambda: make()[0])
    return out


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(next(iter(report["runs"].values())).keys())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(report["runs"])
    for w, (workload, runs) in enumerate(report["runs"].items()):
        x = np.arange(len(names)) + w * width
        axes[0].bar(x, [runs[n]["tokens_per_pass"] for n in names], width, label=workload)
        axes[1].bar(x, [runs[n]["nodes_per_step"] for n in names], width, label=workload)
    for ax, title in zip(axes, ("tokens per target pass", "verified nodes per step")):
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
        ax.set_title(f"{title} (T = {report['capacity']})")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="upper center", ncol=len(report["runs"]))
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", help="target model directory (default: the embedded tiny SQL model)")
    p.add_argument("--drafter-model", action="append", help="drafter (repeatable): DIR, self, random-draft[:seed], "
                                                            "random-eagle3[:seed]; default: self, random-draft:1")
    p.add_argument("--prompts-a", help="JSONL prompts of domain A")
    p.add_argument("--prompts-b", help="JSONL prompts of domain B")
    p.add_argument("--requests", type=int, default=8, help="mixed workload size (half from each domain)")
    p.add_argument("--repeats", type=int, default=3, help="repeat workload: rounds of the same batch")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--capacity", type=int, default=8, help="T, verified nodes per step for every run")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results/hybrid.json")
    p.add_argument("--plot", help="PNG path (default: --out with .png)")
    p.add_argument("--only", help="comma-separated run names to keep")
    args = p.parse_args()

    from specjax.models.embedded import default_model_dir

    target = load_model(args.target or default_model_dir(), dtype=jnp.float32)
    engine = Engine(target, attention="xla")
    loads = workloads(args, engine)
    configs = configurations(target, args)
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only.split(",")}
    report = {"capacity": args.capacity, "max_new_tokens": args.max_new_tokens, "backend": jax.default_backend(),
              "drafters": args.drafter_model or ["self", "random-draft:1"], "runs": {}}
    for workload, prompts in loads.items():
        expected = greedy_generate(target, prompts, args.max_new_tokens)
        runs = report["runs"].setdefault(workload, {})
        for name, (runner, factory) in configs.items():
            t0 = time.perf_counter()
            results, nodes = runner(target, factory(), prompts, args)
            tokens, passes = sum(len(r.token_ids) for r in results), sum(r.target_passes for r in results)
            runs[name] = {"tokens_per_pass": tokens / passes, "tokens": tokens, "target_passes": passes,
                          "nodes_per_step": nodes, "identical": [r.token_ids for r in results] == expected,
                          "wall_s_with_compile": time.perf_counter() - t0}
            print(f"{workload:<8}{name:<24}{runs[name]['tokens_per_pass']:>8.2f} tok/pass"
                  f"{nodes:>8.1f} nodes/step  identical={runs[name]['identical']}", flush=True)
    header = f"{'workload':<10}{'run':<24}{'tokens/pass':>12}{'nodes/step':>12}{'identical':>10}"
    print("\n" + header + "\n" + "-" * len(header))
    for workload, runs in report["runs"].items():
        for name, r in runs.items():
            print(f"{workload:<10}{name:<24}{r['tokens_per_pass']:>12.2f}{r['nodes_per_step']:>12.1f}"
                  f"{str(r['identical']):>10}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    plot(report, args.plot or os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out}")
    lossy = [f"{w}/{n}" for w, runs in report["runs"].items() for n, r in runs.items() if not r["identical"]]
    if lossy:
        raise SystemExit(f"output differs from plain greedy decoding (not lossless): {', '.join(lossy)}")


if __name__ == "__main__":
    main()
