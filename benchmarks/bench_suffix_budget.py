"""Budgeted suffix trees against ArcticInference: tokens per step against the node budget B.

For each trace file and each B: specjax's budgeted trees (up to B nodes per
step); ArcticInference's tree at factor 1 with at most B tokens (its
defaults); and ArcticInference at the factor that gives it as many drafted
nodes per step as specjax (bisected; its drafts stop growing at some factor,
and then that maximum is used). Also the SuffixDecoding rule (chain and tree,
defaults) for both, side by side. Prints a table, writes JSON and a PNG plot.

    python benchmarks/bench_suffix_budget.py [--limit N] [--budgets 1 4 16 32 64] [--traces F ...]

ArcticInference is optional; without it only specjax runs. The replays are
slow on a small machine: ``--limit`` replays the first N requests of each file.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

from specjax.engine.replay import (ArcticBackend, ReplayConfig, SpecjaxBackend, arctic_at_equal_nodes,
                                   arctic_cache_class, load_traces, run)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_TRACES = [DATA / "swe_minisweagent_gemini3pro_public.jsonl.gz", DATA / "tau_airline_gpt4o_public.jsonl.gz"]
KEYS = ("tokens_per_step", "mean_drafted", "spec_us_p50", "spec_us_p99", "update_us_p50")


def summary(result: dict) -> dict:
    return {key: result[key] for key in KEYS if key in result}


def rule_rows(requests, cache_class) -> dict:
    """The SuffixDecoding rule (factor 1, max depth 64) for both backends, chain and tree."""
    rows = {}
    for mode in ("chain", "tree"):
        config = ReplayConfig(tree=mode == "tree")
        backends = [SpecjaxBackend(config)] + ([ArcticBackend(config, cache_class)] if cache_class else [])
        for backend, result in zip(backends, run(requests, backends)):
            rows[f"{backend.name} {mode}"] = summary(result)
    return rows


def budget_rows(requests, cache_class, budget: int) -> dict:
    """specjax at budget B; Arctic at factor 1 (at most B tokens) and at specjax's drafted nodes."""
    config = ReplayConfig(tree=True, budget=budget)
    backends = [SpecjaxBackend(config)] + ([ArcticBackend(config, cache_class)] if cache_class else [])
    results = run(requests, backends)
    rows = {"specjax": summary(results[0])}
    if cache_class:
        rows["arctic factor 1"] = summary(results[1])
        equal = arctic_at_equal_nodes(requests, config, cache_class, results[0]["mean_drafted"])
        closest = min(equal["runs"], key=lambda r: abs(r["mean_drafted"] - results[0]["mean_drafted"]))
        rows["arctic equal nodes"] = dict(summary(closest), max_spec_factor=closest["max_spec_factor"],
                                          interpolated_tokens_per_step=equal["tokens_per_step"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header] + rows)


def plot(results: dict, budgets: list[int], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = list(results["files"])
    fig, axes = plt.subplots(1, len(files), figsize=(5.5 * len(files), 4), squeeze=False)
    for ax, name in zip(axes[0], files):
        by_budget = results["files"][name]["budgets"]
        for label, style in (("specjax", "o-"), ("arctic factor 1", "s--"), ("arctic equal nodes", "^:")):
            ys = [by_budget[str(b)].get(label, {}).get("tokens_per_step") for b in budgets]
            if all(y is not None for y in ys):
                ax.plot(budgets, ys, style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("node budget B per step")
        ax.set_ylabel("tokens per step")
        ax.set_title(f"{name} ({results['files'][name]['requests']} requests)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--traces", nargs="+", default=[str(t) for t in DEFAULT_TRACES])
    p.add_argument("--budgets", nargs="+", type=int, default=[1, 4, 16, 32, 64])
    p.add_argument("--limit", type=int, default=None, help="replay only the first N requests of each file")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "suffix_budget.json"))
    p.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "suffix_budget.png"))
    args = p.parse_args()
    cache_class = arctic_cache_class()
    results: dict = {"limit": args.limit, "budgets": args.budgets, "arctic": cache_class is not None,
                     "machine": platform.processor() or platform.machine(), "files": {}}
    rows = []
    for path in args.traces:
        name = pathlib.Path(path).name.split(".")[0]
        requests = load_traces(path)[: args.limit]
        entry = results["files"][name] = {"requests": len(requests), "rule": rule_rows(requests, cache_class),
                                          "budgets": {}}
        for label, r in entry["rule"].items():
            rows.append([name, "rule", label, f"{r['tokens_per_step']:.3f}", f"{r['mean_drafted']:.2f}",
                         f"{r['spec_us_p50']:.1f}", f"{r['spec_us_p99']:.1f}", f"{r['update_us_p50']:.1f}"])
        for budget in args.budgets:
            by_label = entry["budgets"][str(budget)] = budget_rows(requests, cache_class, budget)
            for label, r in by_label.items():
                if "max_spec_factor" in r:
                    label = f"{label} (x{r['max_spec_factor']:.3g})"
                rows.append([name, f"B={budget}", label, f"{r['tokens_per_step']:.3f}", f"{r['mean_drafted']:.2f}",
                             f"{r['spec_us_p50']:.1f}", f"{r['spec_us_p99']:.1f}", f"{r['update_us_p50']:.1f}"])
        print(f"done: {name}", flush=True)
    print(table(["traces", "setting", "backend", "tokens/step", "drafted", "spec p50 us", "spec p99 us",
                 "update p50 us"], rows))
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    plot(results, args.budgets, pathlib.Path(args.plot))
    print(f"\nwrote {out} and {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
