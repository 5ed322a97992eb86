"""Device drafters x tree size: tokens per target pass and steps per second, host loop vs device loop.

Each drafter (Token Recycling; the target as its own draft model, chain and
dynamic tree, an upper bound on acceptance; an untrained EAGLE-3 head, which
measures the drafting overhead at near-zero acceptance) runs the same requests
twice per tree size T: the host loop (one host sync per step,
``steps_per_sync=1``) and the device loop (``lax.while_loop`` over
``--steps-per-sync`` steps). Greedy outputs are checked against plain decoding.
Compilation is excluded (a warm-up run on the same shapes). Prints a table and
writes JSON.

    python benchmarks/bench_device_drafters.py                  # embedded tiny SQL model, CPU ok
    python benchmarks/bench_device_drafters.py --requests 32 --steps-per-sync 16

On CPU a model this small is dominated by per-step overhead; tokens per pass
carries over to real models, steps per second does not.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from specjax.drafters.draft_model import DraftModelDrafter
from specjax.drafters.eagle3 import Eagle3Config, Eagle3Drafter, init_params
from specjax.drafters.token_recycling import TokenRecyclingDrafter
from specjax.engine.device_loop import generate_on_device
from specjax.engine.engine import Engine
from specjax.models.config import ModelConfig
from specjax.models.embedded import default_model_dir
from specjax.models.loading import load_model
from specjax.models.embedded.toy_corpus import sql_prompts


def untrained_eagle3(model, capacity: int) -> Eagle3Drafter:
    t = model.config
    layer = ModelConfig(model_type="llama", vocab_size=t.vocab_size, hidden_size=t.hidden_size,
                        intermediate_size=t.intermediate_size, num_layers=1, num_heads=t.num_heads,
                        num_kv_heads=t.num_kv_heads, head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps)
    cfg = Eagle3Config(layer, t.vocab_size // 2, t.hidden_size)
    params = jax.tree_util.tree_map(lambda x: x.astype(model.params["embed"].dtype)
                                    if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                    init_params(cfg, jax.random.key(0)))
    layers = (1, t.num_layers // 2, t.num_layers - 1)
    return Eagle3Drafter(cfg, params, t.num_layers, capacity=capacity, topk=min(10, capacity),
                         depth=min(7, capacity), hidden_layers=layers)


CONFIGS = {  # name -> (tree sizes, factory(model, T))
    "token-recycling": ((16, 40, 80), lambda m, t: TokenRecyclingDrafter(m.config.vocab_size, capacity=t)),
    "self-draft-chain": ((4, 8), lambda m, t: DraftModelDrafter(m, m.config.vocab_size, capacity=t)),
    "self-draft-tree": ((16, 32), lambda m, t: DraftModelDrafter(m, m.config.vocab_size, capacity=t, topk=4,
                                                                 depth=6)),
    "eagle3-untrained": ((16, 60), untrained_eagle3),
}


def timed(engine, prompts, drafter, steps_per_sync: int, args) -> dict:
    kwargs = dict(max_new_tokens=args.max_new_tokens, drafter=drafter, steps_per_sync=steps_per_sync)
    generate_on_device(engine, prompts[: args.batch_size], **kwargs)  # compile
    if isinstance(drafter, TokenRecyclingDrafter):
        drafter.reset()  # the timed run starts cold and learns as it goes
    start = time.perf_counter()
    results = generate_on_device(engine, prompts, **kwargs)
    wall = time.perf_counter() - start
    tokens = sum(len(r.token_ids) for r in results)
    batches = [results[i: i + args.batch_size] for i in range(0, len(results), args.batch_size)]
    steps = sum(max(r.target_passes for r in b) - 1 for b in batches)
    return {"tokens": tokens, "tokens_per_pass": tokens / sum(r.target_passes for r in results), "steps": steps,
            "wall_s": wall, "steps_per_s": steps / wall, "tokens_per_s": tokens / wall,
            "token_ids": [r.token_ids for r in results]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="HF model directory (default: the embedded tiny SQL model)")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps-per-sync", type=int, default=16)
    p.add_argument("--drafters", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "device_drafters.json"))
    args = p.parse_args()
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    model = load_model(args.model or default_model_dir(), dtype=dtype)
    prompts = sql_prompts(args.requests, seed=1)
    engine = Engine(model, None, draft_capacity=0, max_batch_size=args.batch_size)
    engine.generate(prompts, max_new_tokens=args.max_new_tokens)  # compile plain decoding
    start = time.perf_counter()
    plain = engine.generate(prompts, max_new_tokens=args.max_new_tokens)
    plain_wall = time.perf_counter() - start
    plain_steps = sum(max(r.target_passes for r in plain[i: i + args.batch_size]) - 1
                      for i in range(0, len(plain), args.batch_size))
    plain_ids = [r.token_ids for r in plain]
    rows = []
    for name in args.drafters:
        sizes, factory = CONFIGS[name]
        for t in sizes:
            drafter = factory(model, t)
            for loop, n in (("host", 1), ("device", args.steps_per_sync)):
                r = timed(engine, prompts, drafter, n, args)
                r.update(drafter=name, capacity=t, loop=loop, identical_to_plain=r["token_ids"] == plain_ids,
                         speedup=plain_wall / r["wall_s"])
                rows.append(r)
    print(f"backend: {jax.default_backend()}  device: {jax.devices()[0].device_kind}  "
          f"model: {args.model or 'embedded tiny-sql'}  requests: {args.requests}  "
          f"max_new_tokens: {args.max_new_tokens}  batch: {args.batch_size}  steps/sync: {args.steps_per_sync}")
    print(f"plain decoding: {plain_steps} steps, {plain_steps / plain_wall:.1f} steps/s, {plain_wall:.2f} s")
    print(f"{'drafter':<18}{'T':>4}{'loop':>8}{'tok/pass':>10}{'steps':>7}{'steps/s':>9}{'tok/s':>8}{'wall s':>8}"
          f"{'vs plain':>9}{'identical':>11}")
    for r in rows:
        print(f"{r['drafter']:<18}{r['capacity']:>4}{r['loop']:>8}{r['tokens_per_pass']:>10.2f}{r['steps']:>7}"
              f"{r['steps_per_s']:>9.1f}{r['tokens_per_s']:>8.1f}{r['wall_s']:>8.2f}{r['speedup']:>9.2f}"
              f"{str(r['identical_to_plain']):>11}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "args": vars(args),
                   "plain": {"steps": plain_steps, "wall_s": plain_wall},
                   "rows": [{k: v for k, v in r.items() if k != "token_ids"} for r in rows]}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
