"""Peak host memory of prefilling one long prompt (chunked, flash-style attention).

A random-weight Llama (hidden 256, 4 layers, 8 heads, 2 KV heads, max positions
32768) prefills a prompt of --tokens tokens and decodes a few tokens: plain
(``Engine.generate``), or with a device drafter (the on-device loop), whose own
prefill is chunked the same way: ``draft-model`` (a random 1-layer Llama of the
same width and vocabulary) or ``eagle3`` (a random EAGLE-3 head fed three of the
target's hidden layers). Each configuration runs in a fresh process, so the peak
resident set size (``ru_maxrss``) is that run's alone. Without chunking the jnp
attention would build fp32 scores [B, Hkv, G, P, S]: 8 GiB at 16k tokens.

    python benchmarks/bench_prefill_memory.py [--tokens 16384] [--chunks 512 2048]
        [--drafters none draft-model eagle3]

Prints a table and writes benchmarks/results/prefill_memory.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import subprocess
import sys
import time

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "prefill_memory.json"


DRAFTERS = ("none", "draft-model", "eagle3")


def make_drafter(name: str, target, chunk: int):
    """A random device drafter for ``target`` whose prefill runs in chunks of ``chunk`` tokens."""
    import dataclasses

    import jax

    from specjax.drafters.draft_model import DraftModelDrafter
    from specjax.drafters.eagle3 import Eagle3Config, Eagle3Drafter
    from specjax.drafters.eagle3 import init_params as eagle3_params
    from specjax.models.decoder import init_params
    from specjax.models.loading import Model

    if name == "draft-model":
        cfg = dataclasses.replace(target.config, num_layers=1)
        return DraftModelDrafter(Model(cfg, init_params(cfg, jax.random.key(1))), cfg.vocab_size, capacity=4,
                                 prefill_chunk=chunk)
    layer = dataclasses.replace(target.config, num_layers=1)
    cfg = Eagle3Config(layer, draft_vocab_size=8192, target_hidden_size=target.config.hidden_size)
    return Eagle3Drafter(cfg, eagle3_params(cfg, jax.random.key(1)), target.config.num_layers, capacity=8, topk=2,
                         depth=4, prefill_chunk=chunk)


def run_one(tokens: int, chunk: int, new_tokens: int, drafter: str = "none") -> dict:
    """Prefill + decode in this process; returns timings and peak RSS."""
    import jax
    import numpy as np

    from specjax.engine.device_loop import generate_on_device
    from specjax.engine.engine import Engine
    from specjax.models.config import ModelConfig
    from specjax.models.decoder import init_params
    from specjax.models.loading import Model

    cfg = ModelConfig(model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=688, num_layers=4,
                      num_heads=8, num_kv_heads=2, head_dim=32, max_position_embeddings=32768)
    model = Model(cfg, init_params(cfg, jax.random.key(0)))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, tokens).tolist()
    engine = Engine(model, None, prefill_chunk=chunk, attention="xla")
    start = time.perf_counter()
    if drafter == "none":
        result = engine.generate([prompt], max_new_tokens=new_tokens)[0]
    else:
        result = generate_on_device(engine, [prompt], new_tokens, drafter=make_drafter(drafter, model, chunk))[0]
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"tokens": tokens, "chunk": chunk, "drafter": drafter, "new_tokens": len(result.token_ids),
            "wall_s": wall, "peak_rss_gib": peak_kib / 2**20}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--chunks", type=int, nargs="+", default=[512])
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--drafters", nargs="+", choices=DRAFTERS, default=list(DRAFTERS))
    p.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.tokens, args.chunks[0], args.new_tokens, args.drafters[0])))
        return 0
    rows = []
    for drafter in args.drafters:
        for chunk in args.chunks:
            out = subprocess.run([sys.executable, __file__, "--one", "--tokens", str(args.tokens), "--chunks",
                                  str(chunk), "--new-tokens", str(args.new_tokens), "--drafters", drafter],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'prompt tokens':>14}{'drafter':>13}{'chunk':>8}{'wall s':>10}{'peak RSS GiB':>14}")
    for r in rows:
        print(f"{r['tokens']:>14}{r['drafter']:>13}{r['chunk']:>8}{r['wall_s']:>10.1f}{r['peak_rss_gib']:>14.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "processor": platform.processor(),
                                    "command": " ".join(["python", "benchmarks/bench_prefill_memory.py"] + sys.argv[1:]),
                                    "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
