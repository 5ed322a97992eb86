"""Quantized targets: verify cost by tree size, parameter bytes per format, and a GPU roofline projection.

1. **Verify cost** (measured, this machine): the jitted fused ``step`` (verify + accept) of a chain
   tree of T nodes on ``--model`` (default SmolLM2-135M-Instruct), batch 1, after a ~100-token
   prompt, relative to one plain step (T = 0), for float32, bf16, int8 (per channel), int4 (group
   64, with a min) and the GGUF file's own blocks ("native"). Quantized formats dequantize to
   float32 (the CPU's dtype).
   Formats and tree sizes are interleaved in every repetition so load noise hits all alike; each
   step runs on a ``fork`` of one prefilled state; medians (the JSON also has the fastest runs' ratios).
2. **Parameter bytes** per format: that model's measured (``quant.param_bytes`` after loading), and the
   same formula, checked against those measurements to the byte, applied to the Qwen2.5-Coder-1.5B
   GGUF's tensor shapes and block types (header only, no weights read).
3. **GPU projection** (not measured): a roofline cost(T) = max(bytes / bandwidth, flops / peak)
   with the weight bytes of item 2 plus the KV cache, flops = 2 * params * (T + 1).
4. **Prompt lookup** on the int4 vs float32 SmolLM2 (tokens per pass, CPU speedup): shipped
   everyday tasks, greedy, every speculative output checked against plain decoding of the same model.

    python benchmarks/bench_quantized.py             # ~10 minutes on 2 busy cores
    python benchmarks/bench_quantized.py --quick     # a tiny subset (a minute or two)
    python benchmarks/bench_quantized.py --model qwen2.5-coder-1.5b-instruct --repeats 3 --skip-lookup \
        --check-native --out benchmarks/results/quantized_qwen15.json

Models are registry names (pulled on first use, ``SPECJAX_CACHE``) or GGUF paths.

Writes benchmarks/results/quantized.json and quantized.md (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.prompt_lookup import PromptLookupDrafter
from specjax.engine.engine import Engine
from specjax.engine.sampling import SamplingParams, request_keys
from specjax.engine.state import fork
from specjax.engine.steps import prefill, step
from specjax.engine.tree import DraftTree
from specjax.models import quant
from specjax.models.decoder import param_shapes
from specjax.models.gguf import GGUFFile, gguf_tensor_name, read_gguf_config
from specjax.models.loading import load_model
from specjax.models.pull import resolve_model
from specjax.models.tasks import load_tasks

# Registry names (``specjax pull``; pulled into the cache on first use) or GGUF paths.
SMOLLM2, QWEN15, QWEN05 = "smollm2-135m-instruct", "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"
# name -> (float dtype, load_model's quantize): quantized weights dequantize to the CPU's float32.
FORMATS = {"float32": (jnp.float32, None), "bf16": (jnp.bfloat16, None), "int8": (jnp.float32, "int8"),
           "int4": (jnp.float32, "int4"), "native": (jnp.float32, "native")}
# Published peak figures (dense, no sparsity): HBM/GDDR bytes/s, bf16/fp16 tensor FLOP/s (fp32 accumulate).
GPUS = {"H100 SXM": (3.35e12, 989e12), "A100 SXM 80GB": (2.04e12, 312e12), "RTX 3090": (0.936e12, 71e12)}


def model_label(path: str) -> str:
    """A GGUF file's name without directory and extension, lowercased: the model's row label."""
    return os.path.splitext(os.path.basename(path))[0].lower()


# ---------------------------------------------------------------- 1. verify cost


def chain_tree(capacity: int, tokens: np.ndarray) -> DraftTree:
    """A chain of ``capacity`` nodes (node i's parent is node i - 1), batch 1."""
    return DraftTree(tokens[None, :capacity].astype(np.int32),
                     (np.arange(capacity, dtype=np.int32) - 1)[None], np.ones((1, capacity), bool))


def prompt_ids(engine: Engine, length: int) -> list[int]:
    """``length`` tokens of the shipped tasks' chat prompts, concatenated."""
    ids: list[int] = []
    for task in load_tasks():
        ids += engine.encode_chat(task["messages"])
        if len(ids) >= length:
            return ids[:length]
    raise SystemExit(f"the shipped tasks hold fewer than {length} prompt tokens")


def prefilled_state(model, ids: list[int], max_len: int):
    tokens = np.asarray([ids], np.int32)
    out = prefill(model.params, model.config, tokens, np.asarray([len(ids)], np.int32), np.asarray([max_len], np.int32),
                  request_keys(np.zeros(1, np.int64)), SamplingParams.make(1), max_len=max_len)
    return out.state


def time_step(model, state, tree: DraftTree) -> float:
    """Seconds of one fused step on a fork of ``state`` (the fork made before the clock starts)."""
    forked = fork(state)
    jax.block_until_ready(forked)
    cfg = model.config
    t0 = time.perf_counter()
    _, acc = step(model.params, forked, tree, cfg=cfg, attention="xla", eos_ids=cfg.eos_token_ids)
    jax.block_until_ready(acc.num)
    return time.perf_counter() - t0


def verify_costs(models: dict, sizes: list[int], repeats: int, prompt_len: int, seed: int = 0) -> dict:
    """Median step seconds per (format, T); formats and sizes in a fresh random order every repetition."""
    any_model = next(iter(models.values()))
    ids = prompt_ids(Engine(any_model, None, draft_capacity=0), prompt_len)
    max_len = prompt_len + max(sizes) + 8
    states = {name: prefilled_state(m, ids, max_len) for name, m in models.items()}
    trees = {t: chain_tree(t, np.asarray(ids)) for t in sizes}
    pairs = [(name, t) for name in models for t in sizes]
    for name, t in pairs:  # compile and warm up
        time_step(models[name], states[name], trees[t])
        time_step(models[name], states[name], trees[t])
    times: dict = {pair: [] for pair in pairs}
    rng = random.Random(seed)
    for _ in range(repeats):
        rng.shuffle(pairs)
        for name, t in pairs:
            times[(name, t)].append(time_step(models[name], states[name], trees[t]))
    out = {}
    for name in models:
        median, fastest = (lambda t: float(np.median(times[(name, t)]))), (lambda t: float(min(times[(name, t)])))
        out[name] = {t: {"median_s": median(t), "relative": median(t) / median(0), "min_s": fastest(t),
                         "relative_of_min": fastest(t) / fastest(0), "runs_s": times[(name, t)]} for t in sizes}
    return out


# ---------------------------------------------------------------- 2. parameter bytes


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one quantized weight is stored (quant.py): value bits, group size, scale bytes, a min or not."""

    value_bits: int
    group: int
    scale_bytes: int
    has_min: bool

    def bytes(self, shape: tuple[int, ...]) -> int:
        n = int(np.prod(shape))
        return n * self.value_bits // 8 + (n // self.group) * self.scale_bytes * (2 if self.has_min else 1)


# GGUF block type -> its QuantizedWeight layout (quant.GGUF_NATIVE: Q8_0/Q4_0/Q4_1 keep float16 scales;
# K-quants' scales and mins are computed in float32; Q5_K / Q6_K widen to int8; Q6_K has groups of 16).
NATIVE_LAYOUTS = {"Q8_0": Layout(8, 32, 2, False), "Q4_0": Layout(4, 32, 2, False), "Q4_1": Layout(4, 32, 2, True),
                  "Q4_K": Layout(4, 32, 4, True), "Q5_K": Layout(8, 32, 4, True), "Q6_K": Layout(8, 16, 4, False)}


def stacked_layout(layouts: list[Layout]) -> Layout:
    """``quant.stack``'s common layout of per-layer weights: mixed value widths widen to int8, the
    smallest group, a min if any layer has one, the widest scale."""
    bits = {l.value_bits for l in layouts}
    return Layout(8 if len(bits) > 1 else bits.pop(), min(l.group for l in layouts),
                  max(l.scale_bytes for l in layouts), any(l.has_min for l in layouts))


def rtn_layout(fmt: str, shape: tuple[int, ...]) -> Layout:
    """quant.quantize_rtn's layout: int8 one float16 scale per output row; int4 groups of 64 with a min."""
    if fmt == "int8":
        return Layout(8, shape[-1], 2, False)
    return Layout(4, quant.DEFAULT_INT4_GROUP, 2, True)


def formula_bytes(g: GGUFFile, fmt: str, float_bytes: int, exclude: tuple[str, ...] = ()) -> int:
    """Parameter bytes of ``fmt`` for a GGUF file, from its header alone (shapes and block types),
    leaving out the top-level params named in ``exclude``."""
    cfg = read_gguf_config(g)
    total = 0
    groups = [((k,), v) for k, v in param_shapes(cfg).items() if k != "layers" and k not in exclude]
    groups += [(("layers", k), v) for k, v in param_shapes(cfg)["layers"].items()]
    for path, shape in groups:
        n = int(np.prod(shape))
        if path[-1] not in quant.QUANTIZABLE or fmt in ("float32", "bf16"):
            total += n * float_bytes
        elif fmt in ("int8", "int4"):
            total += rtn_layout(fmt, shape).bytes(shape)
        else:  # native: every layer's block type must map, else the group is float (loading._read_group)
            names = ([gguf_tensor_name(path)] if path[0] != "layers"
                     else [gguf_tensor_name(path, layer) for layer in range(shape[0])])
            kinds = [g.tensors[name].tensor_type.name for name in names]
            if all(kind in NATIVE_LAYOUTS for kind in kinds):
                total += stacked_layout([NATIVE_LAYOUTS[k] for k in kinds]).bytes(shape)
            else:
                total += n * float_bytes
    return total


def streamed(g: GGUFFile) -> tuple[str, ...]:
    """Top-level params a decode step does not read whole: the embedding when the LM head is its own
    matrix (the step gathers T + 1 rows of it)."""
    return () if read_gguf_config(g).tie_word_embeddings else ("embed",)


def param_count(g: GGUFFile, exclude: tuple[str, ...] = ()) -> int:
    shapes = param_shapes(read_gguf_config(g))
    shapes = {k: v for k, v in shapes.items() if k not in exclude}
    return int(sum(np.prod(v) for v in jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))))


def tensor_types(g: GGUFFile) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in g.reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


# ---------------------------------------------------------------- 3. roofline projection


def kv_bytes(g: GGUFFile, context: int, dtype_bytes: int = 2) -> int:
    cfg = read_gguf_config(g)
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * dtype_bytes


def roofline(weight_bytes: int, kv: int, params: int, sizes: list[int], bandwidth: float, peak: float) -> dict:
    """cost(T) / cost(0) with cost = max(bytes / bandwidth, 2 * params * (T + 1) / peak), and the T where
    compute starts to dominate."""
    cost = lambda t: max((weight_bytes + kv) / bandwidth, 2 * params * (t + 1) / peak)
    bend = (weight_bytes + kv) / bandwidth * peak / (2 * params) - 1
    return {"relative": {t: cost(t) / cost(0) for t in sizes}, "bend_T": bend, "step0_ms": cost(0) * 1e3}


# ---------------------------------------------------------------- 4. prompt lookup


def prompt_lookup(models: dict, n_prompts: int, max_new: int, capacity: int) -> dict:
    """Tokens per pass and speedup of prompt lookup (a chain of ``capacity``) per format, outputs checked."""
    messages = [t["messages"] for t in load_tasks()[:n_prompts]]
    out = {}
    for name, model in models.items():
        plain_engine = Engine(model, None, draft_capacity=0, max_batch_size=1)
        spec_engine = Engine(model, PromptLookupDrafter(), draft_capacity=capacity, max_batch_size=1)
        row = {}
        for label, engine in (("plain", plain_engine), ("prompt-lookup", spec_engine)):
            engine.generate(messages=messages, max_new_tokens=max_new)  # compile every prompt's buckets
            t0 = time.perf_counter()
            results = engine.generate(messages=messages, max_new_tokens=max_new)
            row[label] = {"wall_s": time.perf_counter() - t0, "token_ids": [r.token_ids for r in results],
                          "tokens": sum(len(r.token_ids) for r in results),
                          "passes": sum(r.target_passes for r in results)}
        plain, spec = row["plain"], row["prompt-lookup"]
        if spec["token_ids"] != plain["token_ids"]:
            raise SystemExit(f"{name}: prompt-lookup output differs from plain greedy decoding")
        out[name] = {"tokens_per_pass": spec["tokens"] / spec["passes"], "plain_tokens_per_pass": plain["tokens"] / plain["passes"],
                     "speedup": plain["wall_s"] / spec["wall_s"], "identical_to_plain": True,
                     "plain_wall_s": plain["wall_s"], "spec_wall_s": spec["wall_s"], "token_ids": plain["token_ids"]}
    return out


# ---------------------------------------------------------------- report


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def machine(load_at_start: float) -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other jobs, "
            f"load average {load_at_start:.1f} at the start, {load_average():.1f} at the end), "
            f"jax {jax.__version__} {jax.default_backend()}")


def markdown(res: dict) -> str:
    sizes, proj_sizes = res["args"]["sizes"], res["projection"].get("sizes", [])
    lines = ["# Quantized targets", "", f"Measured on: {res['machine']}.", "",
             f"Command: `{res['command']}`", "",
             "## Verify cost on this CPU (measured)", "",
             "Fused step (verify + accept) of a chain of T nodes relative to a plain step (T = 0), "
             f"{model_label(res['args']['model'])}, "
             f"batch 1, {res['args']['prompt_len']}-token prompt, median of {res['args']['repeats']} interleaved runs.",
             "", "| format | T=0 ms | " + " | ".join(f"T={t}" for t in sizes[1:]) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in sizes[1:]) + " |"]
    for name, row in res["verify_cost"].items():
        lines.append(f"| {name} | {row[sizes[0]]['median_s'] * 1e3:.1f} | "
                     + " | ".join(f"{row[t]['relative']:.2f}x" for t in sizes[1:]) + " |")
    lines += ["", "On this CPU every step is compute bound: the quantized formats dequantize every weight each "
              "step (an int4 plain step costs several float32 ones), which flattens their relative curve, and "
              "XLA's bf16 matrix-vector path is slow (a bf16 plain step can cost more than T = 1). An "
              "accelerator's decode step is memory bound instead: see the projection below.",
              "", "## Parameter bytes", "", "| model | format | MiB | vs bf16 | source |", "| --- | --- | ---: | ---: | --- |"]
    for model, rows in res["param_bytes"].items():
        for fmt, r in rows.items():
            lines.append(f"| {model} | {fmt} | {r['bytes'] / 2**20:.1f} | {r['vs_bf16']:.3f}x | {r['source']} |")
    lines += ["", "## GPU projection (a roofline, NOT measured)", "", res["projection"]["note"], "",
              "| GPU | format | bend at T | " + " | ".join(f"T={t}" for t in proj_sizes[1:]) + " |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in proj_sizes[1:]) + " |"]
    for gpu, rows in res["projection"]["rows"].items():
        for fmt, r in rows.items():
            lines.append(f"| {gpu} | {fmt} | {r['bend_T']:.0f} | "
                         + " | ".join(f"{r['relative'][t]:.2f}x" for t in proj_sizes[1:]) + " |")
    if res.get("prompt_lookup"):
        a = res["args"]
        lines += ["", f"## Prompt lookup, {model_label(res['args']['model'])} (measured, {a['lookup_prompts']} tasks x {a['lookup_tokens']} tokens, "
                  f"chain of {a['lookup_capacity']}, greedy)", "",
                  "| format | tokens/pass | CPU speedup | identical to plain |", "| --- | ---: | ---: | --- |"]
        for name, r in res["prompt_lookup"]["rows"].items():
            lines.append(f"| {name} | {r['tokens_per_pass']:.2f} | {r['speedup']:.2f}x | {r['identical_to_plain']} |")
        lines += ["", res["prompt_lookup"]["note"]]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in res["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2, help="the measured model (a GGUF file)")
    p.add_argument("--big", default=QWEN15, help="the GGUF whose bytes and roofline are computed from its header")
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--sizes", type=int, nargs="+", default=[0, 1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--prompt-len", type=int, default=100)
    p.add_argument("--context", type=int, default=1024, help="KV tokens in the projection")
    p.add_argument("--lookup-prompts", type=int, default=4)
    p.add_argument("--lookup-tokens", type=int, default=32)
    p.add_argument("--lookup-capacity", type=int, default=8)
    p.add_argument("--skip-lookup", action="store_true")
    p.add_argument("--check-native", nargs="*", default=[QWEN05],
                   help="GGUF files loaded with quantize='native' only to check the byte formula on their "
                        "block types (the default, the Qwen 0.5B Q4_K_M, covers K-quants mixed per layer)")
    p.add_argument("--quick", action="store_true", help="float32 and int4, T in 0 4 16, 3 repeats, 2 lookup prompts")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "quantized.json"))
    args = p.parse_args()
    load_at_start = load_average()
    if args.quick:
        args.formats, args.sizes, args.repeats, args.lookup_prompts, args.lookup_tokens, args.check_native = (
            ["float32", "int4"], [0, 4, 16], 3, 2, 16, [])
    if args.sizes[0] != 0:
        raise SystemExit("--sizes must start with 0 (the plain step everything is relative to)")

    # 2 first (cheap), with the measured bytes of every loaded format.
    args.model, args.big = resolve_model(args.model), (resolve_model(args.big) if args.big else None)
    args.check_native = [resolve_model(q) for q in args.check_native]
    small, big = GGUFFile(args.model), (GGUFFile(args.big) if args.big else None)
    label = model_label(args.model)
    models, param_bytes = {}, {label: {}}
    for name in args.formats:
        dtype, quantize = FORMATS[name]
        models[name] = load_model(args.model, dtype=dtype, quantize=quantize)
        measured = quant.param_bytes(models[name].params)
        predicted = formula_bytes(small, name, jnp.dtype(dtype).itemsize)
        assert measured == predicted, f"{name}: formula {predicted} bytes != measured {measured}"
        param_bytes[label][name] = {"bytes": measured, "source": "measured (quant.param_bytes), formula agrees"}
    native_checks = {}
    for path in args.check_native:
        measured = quant.param_bytes(load_model(path, dtype=jnp.float32, quantize="native").params)
        predicted = formula_bytes(GGUFFile(path), "native", 4)
        assert measured == predicted, f"{path} native: formula {predicted} bytes != measured {measured}"
        native_checks[os.path.basename(path)] = {"bytes": measured, "formula_agrees": True}
    bf16_small = formula_bytes(small, "bf16", 2)
    for r in param_bytes[label].values():
        r["vs_bf16"] = r["bytes"] / bf16_small
    rows_big = {}
    if big is not None:  # norms and biases in bf16, the accelerator dtype
        bf16_big = formula_bytes(big, "bf16", 2)
        for name in FORMATS:
            b = formula_bytes(big, name, 4 if name == "float32" else 2)
            rows_big[name] = {"bytes": b, "vs_bf16": b / bf16_big, "source": "formula on the GGUF header"}
        param_bytes["qwen2.5-coder-1.5b"] = rows_big

    costs = verify_costs(models, args.sizes, args.repeats, args.prompt_len)

    projection = {"note": "", "rows": {}}
    if big is not None:
        skip = streamed(big)
        n_params, kv = param_count(big, skip), kv_bytes(big, args.context)
        read = {fmt: formula_bytes(big, fmt, 2, skip) for fmt in ("bf16", "int4")}
        projection["sizes"] = sorted(set(args.sizes) | {128, 256})  # past the H100's bend too
        for gpu, (bw, peak) in GPUS.items():
            projection["rows"][gpu] = {f"1.5B {fmt}": roofline(read[fmt], kv, n_params, projection["sizes"], bw, peak)
                                       for fmt in ("bf16", "int4")}
        projection["weight_bytes_read_per_step"] = read
        projection["note"] = (
            f"Projection, not a measurement: Qwen2.5-Coder-1.5B, batch 1, {args.context} KV tokens "
            f"(bf16, {kv / 2**20:.0f} MiB), cost(T) = max((weights + KV) / bandwidth, 2 * params * (T + 1) / peak) "
            f"with the {n_params / 1e9:.2f}B matmul params and their bytes (bf16 {read['bf16'] / 2**20:.0f} MiB, "
            f"int4 {read['int4'] / 2**20:.0f} MiB; the embedding table is gathered, not streamed: "
            f"{', '.join(skip) or 'none'} left out), at published peak bandwidth and dense bf16 tensor FLOP/s "
            f"({', '.join(f'{g}: {bw / 1e12:.2f} TB/s, {pk / 1e12:.0f} TFLOP/s' for g, (bw, pk) in GPUS.items())}). "
            "'bend at T' is where compute starts to dominate. Real kernels reach neither peak, and W4A16 "
            "kernels spend extra compute dequantizing, so the int4 curve bends earlier still in practice.")

    lookup = None
    if not args.skip_lookup:
        chosen = {n: models[n] for n in ("float32", "int4") if n in models}
        rows = prompt_lookup(chosen, args.lookup_prompts, args.lookup_tokens, args.lookup_capacity)
        same = len(rows) == 2 and rows["float32"]["token_ids"] == rows["int4"]["token_ids"]
        lookup = {"rows": {n: {k: v for k, v in r.items() if k != "token_ids"} for n, r in rows.items()},
                  "int4_output_equals_float32": same,
                  "note": ("Each format's speculative output equals its own plain greedy output (asserted). "
                           f"The int4 model's greedy text {'equals' if same else 'differs from'} float32's "
                           "(round-to-nearest int4 is a different model; losslessness is against itself).")}

    res = {"machine": machine(load_at_start), "measured_on": "this CPU (shared 2 cores, other jobs running); projections are computed",
           "command": " ".join(["python", "benchmarks/bench_quantized.py"] + sys.argv[1:]),
           "args": vars(args), "verify_cost": costs, "param_bytes": param_bytes, "projection": projection,
           "prompt_lookup": lookup, "native_formula_checks": native_checks,
           "gguf_block_types": {os.path.basename(args.model): tensor_types(small),
                                **({os.path.basename(args.big): tensor_types(big)} if big is not None else {})},
           "notes": ["Quantized formats dequantize to float32 on the CPU (bf16 dots are slow there); on an "
                     "accelerator they would dequantize to bf16.",
                     "native = the GGUF file's own blocks: SmolLM2's Q4_1 (scale and min per 32, float16). The "
                     "1.5B Q4_K_M mixes Q4_K and Q6_K per layer, which quant.stack widens exactly to int8 with "
                     "groups of 16 and float32 scales and mins: hence its native bytes (about 0.49x bf16) "
                     "exceed the RTN int4's.",
                     "The 1.5B bytes are computed from its GGUF header with the formula that matched the "
                     "measured SmolLM2 bytes (and native_formula_checks) to the byte; norms and biases in bf16."]}
    sizes = args.sizes
    print(f"machine: {res['machine']}")
    print(f"verify cost relative to T=0 (median of {args.repeats}, {label}, batch 1, prompt {args.prompt_len}):")
    print(f"{'format':<9}{'T=0 ms':>8}" + "".join(f"{'T=' + str(t):>7}" for t in sizes[1:]))
    for name, row in costs.items():
        print(f"{name:<9}{row[0]['median_s'] * 1e3:>8.1f}" + "".join(f"{row[t]['relative']:>7.2f}" for t in sizes[1:]))
    print("parameter bytes:")
    for model, rows in param_bytes.items():
        for fmt, r in rows.items():
            print(f"  {model:<20}{fmt:<9}{r['bytes'] / 2**20:>9.1f} MiB {r['vs_bf16']:>7.3f}x bf16  ({r['source']})")
    if projection["rows"]:
        print("GPU projection (roofline, not measured), cost(T)/cost(0):")
        for gpu, rows in projection["rows"].items():
            for fmt, r in rows.items():
                print(f"  {gpu:<14}{fmt:<10} bend T={r['bend_T']:>5.0f} "
                      + " ".join(f"T={t}:{r['relative'][t]:.2f}" for t in projection["sizes"][1:]))
    if lookup:
        for name, r in lookup["rows"].items():
            print(f"prompt lookup {name}: {r['tokens_per_pass']:.2f} tokens/pass, {r['speedup']:.2f}x vs plain, identical")
        print(lookup["note"])
    for row in costs.values():  # JSON keys are strings
        for t in list(row):
            row[str(t)] = row.pop(t)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    md = os.path.splitext(args.out)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(dict(res, verify_cost={n: {int(t): v for t, v in r.items()} for n, r in costs.items()})))
    print(f"wrote {args.out} and {md}")


if __name__ == "__main__":
    main()
