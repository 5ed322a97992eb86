"""Small models, drafters and the exact-distribution checks shared by the engine tests."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from specjax.drafters.base import HostDrafter, Proposal
from specjax.engine.tree import DraftTree
from specjax.models.config import ModelConfig
from specjax.models.decoder import KVCache, causal_mask, forward, init_params
from specjax.models.loading import Model

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0, vocab: int = 64, qk_norm: bool = False, tie: bool = False,
               layers: int = 2, eos=()) -> Model:
    cfg = ModelConfig(model_type="qwen3" if qk_norm else "llama", vocab_size=vocab, hidden_size=32,
                      intermediate_size=64, num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8,
                      qk_norm=qk_norm, tie_word_embeddings=tie, max_position_embeddings=512,
                      eos_token_ids=tuple(eos))
    # A large init scale makes the next-token distribution peaked, so argmax ties never occur.
    return Model(cfg, init_params(cfg, jax.random.key(seed), scale=0.5))


class ReferenceFollower:
    """Host-drafter bookkeeping for test drafters that know each prompt's greedy continuation:
    ``truth(rid)`` is what the target will still emit for that request."""

    def __init__(self, references: dict):
        self.references = references  # prompt tuple -> full greedy continuation
        self.contexts: dict = {}
        self.calls = 0

    def start_request(self, rid, prompt_ids):
        self.contexts[rid] = (tuple(prompt_ids), [])

    def observe(self, rid, accepted_ids):
        self.contexts[rid][1].extend(accepted_ids)

    def stop_request(self, rid):
        self.contexts.pop(rid)

    def truth(self, rid) -> list:
        prompt, out = self.contexts[rid]
        return self.references[prompt][len(out):]


class OracleTreeDrafter(ReferenceFollower):
    """Proposes random tree shapes whose nodes follow a known continuation with some probability.

    Gives every batch a mix of fully accepted, partially accepted and rejected
    branches. ``shapes`` is a list of parent arrays to cycle through.
    """

    def __init__(self, references: dict, shapes: list, follow_prob: float, vocab: int, seed: int = 0):
        super().__init__(references)
        self.shapes = shapes
        self.follow_prob = follow_prob
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)

    def propose(self, rid, max_tokens):
        truth = self.truth(rid)
        parents = np.asarray(self.shapes[self.calls % len(self.shapes)], np.int32)[:max_tokens]
        self.calls += 1
        tokens = np.zeros(len(parents), np.int32)
        on_truth = np.zeros(len(parents), bool)
        for i, p in enumerate(parents):
            depth_ok = p == -1 or on_truth[p]
            depth = 0 if p == -1 else _depth(parents, p) + 1
            if depth_ok and depth < len(truth) and self.rng.random() < self.follow_prob:
                tokens[i], on_truth[i] = truth[depth], True
            else:
                tokens[i] = self.rng.integers(0, self.vocab)
        return Proposal(tokens, parents, np.ones(len(parents), np.float32))


def _depth(parents, i):
    d = 0
    while parents[i] != -1:
        i, d = parents[i], d + 1
    return d


# ------------------------------------------------------------------ lossless sampling: exact (t2, t3) checks


def near_copy(model: Model, noise: float, seed: int) -> Model:
    """A draft close to the target but not equal (so acceptance, rejection and residuals all occur)."""
    leaves, treedef = jax.tree_util.tree_flatten(model.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + noise * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    return Model(model.config, jax.tree_util.tree_unflatten(treedef, noisy))


@functools.partial(jax.jit, static_argnames=("cfg", "prompt"))
def _all_continuation_logits(params, cfg: ModelConfig, prompt: tuple) -> jax.Array:
    """Logits [V * V, len(prompt) + 2, V] of ``prompt`` followed by every pair (t1, t2)."""
    v = cfg.vocab_size
    seqs = jnp.array([list(prompt) + [a, b] for a, b in itertools.product(range(v), repeat=2)])
    b, t = seqs.shape
    return forward(params, cfg, seqs, jnp.broadcast_to(jnp.arange(t), (b, t)), KVCache.zeros(cfg, b, t),
                   jnp.zeros(b, jnp.int32), causal_mask(b, t)).logits


def exact_tables(model: Model, prompt, temperature: float) -> tuple:
    """P(t1), P(t2 | t1), P(t3 | t1, t2) of ``model`` after ``prompt``, by running every continuation
    (softmax in float64)."""
    v = model.config.vocab_size
    logits = np.asarray(_all_continuation_logits(model.params, model.config, tuple(prompt)), np.float64)
    logits = logits / temperature
    t = logits.shape[1]
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = (probs / probs.sum(axis=-1, keepdims=True)).reshape(v, v, t, v)
    n = len(prompt)
    return probs[0, 0, n - 1], probs[:, 0, n], probs[:, :, n + 1]


def exact_pair_distribution(model: Model, prompt, temperature: float) -> np.ndarray:
    """P(t2, t3) = sum_t1 P(t1) P(t2 | t1) P(t3 | t1, t2)."""
    return np.einsum("a,ab,abc->bc", *exact_tables(model, prompt, temperature))


def chi_square_p(pairs: np.ndarray, expected: np.ndarray) -> float:
    """Chi-square p-value of sampled (t2, t3) ``pairs`` against the ``expected`` [V, V] distribution,
    cells expecting fewer than 5 samples merged into one."""
    from scipy import stats

    observed = np.zeros(expected.shape)
    np.add.at(observed, (pairs[:, 0], pairs[:, 1]), 1)
    exp, obs = expected.ravel() * len(pairs), observed.ravel()
    keep = exp >= 5  # sparse cells merged into one bucket
    obs, exp = np.append(obs[keep], obs[~keep].sum()), np.append(exp[keep], exp[~keep].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue


class GarbageDrafter(HostDrafter):
    """A host drafter whose confident chains are never right (the last token id): speculation can
    only cost time."""

    learns_across_requests = False

    def __init__(self, vocab):
        self.vocab, self.calls = vocab, 0

    def propose(self, rid, max_tokens):
        self.calls += 1
        n = min(max_tokens, 8)
        return Proposal(np.full(n, self.vocab - 1, np.int32), np.arange(-1, n - 1, dtype=np.int32),
                        np.full(n, 0.9, np.float32))


@dataclasses.dataclass(eq=False)
class WrongDrafter:
    """A device drafter whose confident chains are never right (token ``never``)."""

    never: int
    capacity: int = 8
    hidden_layers: tuple = ()
    params: None = None

    def init_state(self, batch_size, max_len):
        return jnp.zeros(batch_size, jnp.int32)

    def prefill(self, params, dstate, prompt_tokens, prompt_lengths, first_tokens, hidden):
        return dstate

    def propose(self, params, dstate, root_tokens, lengths, sampling, key, *, with_q=False):
        b, t = root_tokens.shape[0], self.capacity
        parents = jnp.broadcast_to(jnp.arange(-1, t - 1, dtype=jnp.int32), (b, t))
        probs = jnp.broadcast_to(0.95 ** jnp.arange(1, t + 1, dtype=jnp.float32), (b, t))
        return DraftTree(jnp.full((b, t), self.never, jnp.int32), parents, jnp.ones((b, t), bool), probs), dstate

    def update(self, params, dstate, accepted, aux):
        return dstate + accepted.num

    def end_batch(self, dstate):
        return None


def load_benchmark(name: str):
    """The module of ``benchmarks/NAME.py`` (benchmarks are scripts, not a package), registered in
    ``sys.modules`` so its dataclasses can look their module up."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def grow_chunk_policies_to_every_size(monkeypatch) -> None:
    """Make each new device-loop chunk policy run every tree size once, smallest first, before it
    chooses for itself (for tests that need every bucket to run whatever the measured timings)."""
    from specjax.engine import device_loop

    real_policy = device_loop.chunk_policy

    def every_size(*args):
        policy = real_policy(*args)
        if not policy.history:
            pending, real_choose = list(policy.buckets), policy.choose
            policy.choose = lambda: pending.pop(0) if pending else real_choose()
        return policy

    monkeypatch.setattr(device_loop, "chunk_policy", every_size)
